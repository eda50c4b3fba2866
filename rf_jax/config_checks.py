"""Checks a run's ConfigDict before any work starts, naming the bad key.

ml_collections already rejects unknown keys (the configs are locked) and
values of the wrong type; this catches values of the right type that make no
sense, so that a typo fails in a second instead of after an epoch. The choices
are read from the modules that own them.
"""

import os

import ml_collections

from rf_jax import augment
from rf_jax import checkpoints
from rf_jax import errors
from rf_jax import parallel
from rf_jax import steps
from rf_jax.configs import default
from rf_jax.data import pipeline
from rf_jax.data import planet
from rf_jax.models import registry


class ConfigError(errors.UserError, ValueError):
  """A config value that cannot work; the message names the key."""


DTYPES = ('float32', 'bfloat16')

_CHOICES = {
    'model.name': registry.MODEL_NAMES,
    'model.ir_stem_init': registry.IR_STEM_INITS,
    'data.layout': planet.LAYOUTS,
    'data.train_transform': augment.TRAIN_TRANSFORMS,
    'data.normalisation': augment.NORMALISATIONS,
    'data.cache': pipeline.CACHES,
    'eval.select_by': tuple(checkpoints.SELECT_BY),
    'eval.tta': steps.TTA_CHOICES,
    'dtype': DTYPES,
    'parallel': parallel.KINDS,
}
_POSITIVE = ('model.width', 'optim.lr', 'optim.decay_epochs', 'optim.decay_rate', 'batch_size',
             'eval_batch_size', 'num_epochs', 'data.crop_size', 'data.eval_size',
             'log_every_steps')
_NON_NEGATIVE = ('optim.momentum', 'data.num_workers',
                 'data.synthetic.num_chips', 'data.synthetic.num_test',
                 'checkpoint_every_steps', 'eval.top_n', 'compare.seed')


# The keys that hold a path: `~` in them is the home directory, as in every path flag.
PATH_KEYS = ('data.raw_dir', 'data.prepared_dir', 'model.weights')


def with_expanded_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose PATH_KEYS have `~` expanded (the shell does not expand it after
  `=`, and a literal folder named `~` is never what was meant)."""
  config = config.copy_and_resolve_references()
  for key in PATH_KEYS:
    section, name = key.rsplit('.', 1)
    node = _get(config, section)
    node[name] = os.path.expanduser(node[name])
  return config


def _get(config: ml_collections.ConfigDict, key: str):
  value = config
  for part in key.split('.'):
    if part not in value:
      raise ConfigError(f'config.{key} is missing: start from configs/default.py, '
                        'which defines every key.')
    value = value[part]
  return value


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first value that cannot work."""
  for key, choices in _CHOICES.items():
    value = _get(config, key)
    if value not in choices:
      raise ConfigError(f'config.{key}={value!r} is not one of {", ".join(choices)}.')
  for key in _POSITIVE:
    if not _get(config, key) > 0:
      raise ConfigError(f'config.{key}={_get(config, key)!r} must be > 0.')
  for key in _NON_NEGATIVE:
    if _get(config, key) < 0:
      raise ConfigError(f'config.{key}={_get(config, key)!r} must be >= 0.')
  if not (isinstance(_get(config, 'compare.resamples'), int)
          and config.compare.resamples >= 100):
    raise ConfigError(f'config.compare.resamples={config.compare.resamples!r} must be an '
                      'integer >= 100 (fewer give percentile intervals too coarse to read; '
                      '2000 is the default).')
  if not (isinstance(_get(config, 'eval.crossfit_folds'), int)
          and config.eval.crossfit_folds >= 2):
    raise ConfigError(f'config.eval.crossfit_folds={config.eval.crossfit_folds!r} must be an '
                      'integer >= 2 (thresholds tuned on k - 1 folds, scored on the held one).')
  if not isinstance(_get(config, 'cpu_tuning'), bool):
    raise ConfigError(f'config.cpu_tuning={config.cpu_tuning!r} must be True or False.')
  if not isinstance(_get(config, 'compilation_cache'), str):
    raise ConfigError(f'config.compilation_cache={config.compilation_cache!r} must be a '
                      "directory, or '' for no compilation cache.")
  if not 0 < config.data.val_fraction < 1:
    raise ConfigError(f'config.data.val_fraction={config.data.val_fraction!r} must be '
                      'strictly between 0 and 1.')
  if not config.data.raw_dir and not config.data.synthetic.num_chips:
    raise ConfigError('config.data.raw_dir is empty and config.data.synthetic.num_chips is 0: '
                      'point raw_dir at a Kaggle- or course-layout directory, or ask for a '
                      'synthetic dataset.')
  if config.data.synthetic.num_chips and config.data.synthetic.chip_size < config.data.crop_size:
    raise ConfigError(f'config.data.crop_size={config.data.crop_size} exceeds '
                      f'config.data.synthetic.chip_size={config.data.synthetic.chip_size}.')


# Keys a run may change between invocations without changing what was trained or evaluated.
# cpu_tuning changes the last bits only, as another machine does; a program loaded from the
# compilation cache is the one compiled.
_FREE_KEYS = ('log_every_steps', 'checkpoint_every_steps', 'data.raw_dir', 'data.prepared_dir',
              'eval.', 'compare.', 'cpu_tuning', 'compilation_cache')
# Keys that may change with --allow_config_change (the change is recorded in history.json).
CHANGEABLE_KEYS = ('num_epochs',)


def _flat(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
  return out


# Keys an earlier rf_jax had: {old key: (the key now, a value to give it)}. A saved config.json
# is read with the new names (`_renamed`); the command line names the new key (cli.py).
RENAMED_KEYS = {'eval.flips': ('eval.tta', 'flip')}


def _renamed(saved: dict) -> dict:
  """A saved config with the keys an earlier rf_jax spelled otherwise under their new names:
  eval.flips (a bool) is eval.tta 'flip' or 'none'."""
  section = saved.get('eval')
  if not (isinstance(section, dict) and 'flips' in section):
    return saved
  section = dict(section)
  section.setdefault('tta', 'flip' if section.pop('flips') else 'none')
  return {**saved, 'eval': section}


def with_defaults(saved: dict) -> dict:
  """A saved run's config with the keys it lacks at configs/default.py's values: such a key was
  added by a later rf_jax, and its default is what the run did (a renamed key: `_renamed`)."""
  def merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
      both = isinstance(value, dict) and isinstance(base.get(key), dict)
      out[key] = merged(base[key], value) if both else value
    return out
  return merged(default.get_config().to_dict(), _renamed(saved))


def changed_keys(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{key: (the run's value, this config's value)} for every key that would change the run."""
  now = _flat(config.to_dict())
  before = _flat(with_defaults(saved))
  return {k: (before.get(k), now.get(k)) for k in sorted(before.keys() | now.keys())
          if before.get(k) != now.get(k) and not k.startswith(_FREE_KEYS)}


def check_same_run(saved: dict, config: ml_collections.ConfigDict, allowed: tuple[str, ...],
                   where) -> dict[str, tuple]:
  """Refuses a config that differs from the run's in a key that matters; returns the allowed
  changes. `allowed`: keys of CHANGEABLE_KEYS the user explicitly let change."""
  unknown = [k for k in allowed if k not in CHANGEABLE_KEYS]
  if unknown:
    raise ConfigError(f'--allow_config_change={",".join(unknown)}: only '
                      f'{", ".join(CHANGEABLE_KEYS)} can change within a run; start a new run '
                      'in another --workdir to change anything else.')
  changes = changed_keys(saved, config)
  refused = {k: v for k, v in changes.items() if k not in allowed}
  if refused:
    lines = '\n  '.join(f'config.{k}: the run has {a!r}, this config has {b!r}'
                        for k, (a, b) in refused.items())
    changeable = [k for k in refused if k in CHANGEABLE_KEYS]
    hint = (f' To continue this run with the new value, add --allow_config_change='
            f'{",".join(changeable)}.' if changeable else '')
    raise ConfigError(
        f'{where} holds a run with another config; its results would be mixed with this '
        f"one's:\n  {lines}\nUse another --workdir for the new config, or the run's own config "
        f'(saved in its config.json; --mode evaluate and predict use it when --config is '
        f'omitted).{hint}')
  return changes
