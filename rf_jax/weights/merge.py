"""Merging loaded variables into freshly initialised ones (big_vision's `merge_params` style).

Names are the '/'-joined paths of the variable trees ('params/layer4_1/conv2/kernel',
'batch_stats/rgb_trunk/bn1/mean'). `dont_load` regexes (full match) name the variables that keep
their fresh values, on both sides. Every other initialised variable must be loaded with its shape,
and every loaded one must be used; anything else is ONE WeightsMismatchError listing every
missing, unexpected and misshapen name and every pattern that matches nothing.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, unfreeze

from rf_jax.weights.errors import Mismatches

Flat = dict[str, Any]  # '/'-joined name -> array


def flatten(variables: Mapping[str, Any]) -> Flat:
  return traverse_util.flatten_dict(unfreeze(dict(variables)), sep='/')


def unflatten_like(like: Mapping[str, Any], flat: Flat) -> Any:
  """`flat` as a tree, a FrozenDict when `like` is one."""
  tree = traverse_util.unflatten_dict(flat, sep='/')
  return FrozenDict(tree) if isinstance(like, FrozenDict) else tree


def _shape(value: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in np.shape(value))


def _compiled(dont_load: Sequence[str], names: Sequence[str],
              problems: Mismatches) -> list[re.Pattern]:
  """The patterns, each listed as a problem when it is no regex or matches none of `names`."""
  patterns = []
  for pattern in dont_load:
    try:
      compiled = re.compile(pattern)
    except re.error as e:
      problems.add('dont_load', f'pattern {pattern!r} is not a regular expression ({e})',
                   None, None)
      continue
    if not any(compiled.fullmatch(name) for name in names):
      problems.add('dont_load', f"pattern {pattern!r} matches no name (names look like "
                   f"'{names[0] if names else 'params/conv1/kernel'}')", None, None)
    patterns.append(compiled)
  return patterns


def merge_flat(init: Flat, loaded: Flat, dont_load: Sequence[str], problems: Mismatches) -> Flat:
  """`init` with every name not matched by `dont_load` taken from `loaded` (cast to init's dtype).

  Mismatches go to `problems`; the caller raises them (with what it knows about the source).
  """
  patterns = _compiled(dont_load, list(init), problems)
  kept = lambda name: any(p.fullmatch(name) for p in patterns)
  merged = dict(init)
  for name, fresh in init.items():
    if kept(name):
      continue
    if name not in loaded:
      problems.add('missing', name, _shape(fresh), None)
    elif _shape(loaded[name]) != _shape(fresh):
      problems.add('shape', name, _shape(fresh), _shape(loaded[name]))
    else:
      merged[name] = jnp.asarray(loaded[name], dtype=fresh.dtype)
  for name, value in loaded.items():
    if name not in init and not kept(name):
      problems.add('unexpected', name, None, _shape(value))
  return merged


def merge(init_variables: Mapping[str, Any], loaded_variables: Mapping[str, Any],
          dont_load: Sequence[str] = ()) -> Any:
  """`init_variables` with the loaded values in, except the names matched by `dont_load`.

  Args:
    init_variables: the freshly initialised variables ({'params', 'batch_stats'}).
    loaded_variables: the values to load, in the same tree layout.
    dont_load: regexes, full match on names like 'params/layer4_1/conv2/kernel'.

  Returns:
    The merged variables (a FrozenDict when `init_variables` is one).

  Raises:
    WeightsMismatchError: one error listing every offending name and pattern.
  """
  problems = Mismatches()
  merged = merge_flat(flatten(init_variables), flatten(loaded_variables), dont_load, problems)
  problems.raise_if_any('loaded variables do not fit the initialised ones')
  return unflatten_like(init_variables, merged)
