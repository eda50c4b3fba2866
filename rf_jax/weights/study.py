"""The ImageNet ResNet-18 into a study model, as models/registry.py declares it.

Every trunk prefix of the model (`StudyModel.trunks`) receives the pretrained ResNet-18 trunk; the
17-class head (`params/fc`) always keeps its fresh values; a trunk with a `NewStem` rule gets the
pretrained 3-channel stem widened to its input channels (stem.py). The merge is merge.py's, so
`dont_load` patterns and the one listing error work on the study model's own names.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from rf_jax.models import registry
from rf_jax.weights import files
from rf_jax.weights import stem
from rf_jax.weights.errors import Mismatches
# Functions by name: the package exports the function `merge`, which hides the module.
from rf_jax.weights.merge import flatten, merge_flat, unflatten_like
from rf_jax.weights.torchvision_resnet import check_resnet18

# The head of torchvision's ResNet-18 and of every study model: never loaded.
HEAD = 'params/fc/'
_STEM = 'params/conv1/kernel'


def _under(prefix: tuple[str, ...], name: str) -> str:
  """('rgb_trunk',), 'params/conv1/kernel' -> 'params/rgb_trunk/conv1/kernel'."""
  collection, rest = name.split('/', 1)
  return '/'.join((collection, *prefix, rest))


def _widened_stem(rng: jax.Array, pretrained: np.ndarray, fresh: Any, rule: registry.NewStem,
                  how: str) -> Optional[np.ndarray]:
  """The pretrained stem widened to the fresh stem's input channels; None when it cannot be."""
  pre, target = np.shape(pretrained), np.shape(fresh)
  fits = (len(pre) == len(target) == 4 and pre[2] == 3 and pre[:2] == target[:2]
          and pre[3] == target[3] and (target[2] > 3 or not rule.keep_rgb))
  return stem.widen_stem(rng, pretrained, target[2], rule, how) if fits else None


def _check_arguments(model: str, ir_stem_init: str,
                     dont_load: Sequence[str]) -> registry.StudyModel:
  study = registry.get(model)
  if ir_stem_init not in registry.IR_STEM_INITS:
    raise ValueError(f'config.model.ir_stem_init={ir_stem_init!r} is not one of '
                     f'{", ".join(registry.IR_STEM_INITS)}')
  if isinstance(dont_load, str):
    raise ValueError(f'config.model.dont_load={dont_load!r} is one string: give a tuple of '
                     f'regexes, e.g. ({dont_load!r},)')
  return study


def merge_pretrained(variables: Mapping[str, Any], pretrained: Mapping[str, Any], *, model: str,
                     ir_stem_init: str, dont_load: Sequence[str], rng: jax.Array) -> Any:
  """Merges a ported ResNet-18 (`pretrained`) into the study model `model`'s fresh `variables`.

  Args:
    variables: {'params', 'batch_stats'} of `registry.create_model(model, ...)`, freshly
      initialised (a FrozenDict stays one).
    pretrained: ported ResNet-18 variables (files.load_weights_file / torchvision_to_flax); its
      head is not used.
    model: a registry.MODEL_NAMES name.
    ir_stem_init: a registry.IR_STEM_INITS name: how new stem input channels are drawn.
    dont_load: regexes (full match on the model's names, e.g. 'params/layer4_1/conv2/kernel' or
      'params/ir_trunk/conv1/kernel') whose fresh values are kept.
    rng: PRNG key for the drawn stem slices.

  Returns:
    `variables` with the pretrained trunk(s) in, new stems widened, the fresh head.

  Raises:
    ValueError: an unknown model or ir_stem_init, or `dont_load` given as one string.
    WeightsMismatchError: `pretrained` is not a ResNet-18, or does not fit the model: one error
      listing every offending name.
  """
  study = _check_arguments(model, ir_stem_init, dont_load)
  check_resnet18(pretrained, what='pretrained weights')
  init = flatten(variables)
  trunk = {name: np.asarray(value) for name, value in flatten(pretrained).items()
           if not name.startswith(HEAD)}
  problems = Mismatches()
  loaded = {}
  for index, prefix in enumerate(study.trunks):
    placed = {_under(prefix, name): value for name, value in trunk.items()}
    name = _under(prefix, _STEM)
    if prefix in study.new_stems and name in init:
      widened = _widened_stem(jax.random.fold_in(rng, index), placed[name], init[name],
                              study.new_stems[prefix], ir_stem_init)
      if widened is None:
        problems.add('stem', name, np.shape(init[name]),
                     f'{np.shape(placed[name])} (a [kh, kw, 3, out] RGB stem is widened to '
                     f'the model\'s input channels: {study.new_stems[prefix]})')
        del placed[name]
      else:
        placed[name] = widened
    loaded.update(placed)
  merged = merge_flat(init, loaded, (*dont_load, HEAD + '.*'), problems)
  problems.raise_if_any(f'pretrained weights do not fit the {model!r} model '
                        f'(config.model.name, config.model.dont_load)')
  fresh = sum(merged[name] is value for name, value in init.items())
  logging.info('Pretrained %s: loaded %d arrays, kept %d fresh (head, dont_load)%s', model,
               len(init) - fresh, fresh, f'; new stems {ir_stem_init}' if study.new_stems else '')
  return unflatten_like(variables, merged)


def load_pretrained(variables: Mapping[str, Any], *, model: str, path: str, ir_stem_init: str,
                    dont_load: Sequence[str], rng: jax.Array) -> Any:
  """`variables` unchanged when `path` is '' (train from scratch), else the weights file at `path`
  (config.model.weights, SHA-256 checked) merged in with merge_pretrained."""
  if path == '':
    return variables
  return merge_pretrained(variables, files.load_weights_file(path), model=model,
                          ir_stem_init=ir_stem_init, dont_load=dont_load, rng=rng)
