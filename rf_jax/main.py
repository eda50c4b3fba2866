"""rf_jax: train, evaluate and compare the study's models on the Planet Amazon chips.

Examples:
  rf-jax --config demo --workdir runs/demo        # synthetic demo (configs/demo.py), end to end
  rf-jax --config dual --workdir runs/dual --config.data.raw_dir=/data/planet
  rf-jax --mode evaluate --workdir runs/dual                      # the run's own saved config
  rf-jax --mode predict --workdir runs/dual --chips '/data/new/*.tif'   # any chips -> CSV
  rf-jax --mode compare --compare runs/rgb,runs/rgbir,runs/dual --workdir runs/comparison

Modes: `train`; `evaluate` (restore the best epoch, recompute the validation scores, reproduction
check, metrics and report); `predict` (Kaggle submission for the test chips); `export` (the best
epoch's variables as msgpack and safetensors, with tags and band statistics); `compare` (side by
side of the --compare workdirs, written into --workdir); `all` (default): train, evaluate, and
predict when the dataset has test chips. Every config key, with its meaning, is in
configs/default.py; override one with --config.<key>=<value> (e.g. --config.num_epochs=10).
`python -m rf_jax.main` is the same program as `rf-jax`.
"""

import contextlib
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from rf_jax import comparison
from rf_jax import config_checks
from rf_jax import evaluate
from rf_jax import export
from rf_jax import inputs
from rf_jax import provenance
from rf_jax import runner as runner_lib
from rf_jax import submission
from rf_jax import train
from rf_jax import chip_scores
from rf_jax import cli
from rf_jax import workdir as workdir_lib

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory of the run: checkpoints, history, evaluation.')
flags.DEFINE_enum('mode', 'all', ['all', 'train', 'evaluate', 'predict', 'export', 'compare'],
                  'What to do in the workdir.')
flags.DEFINE_list('compare', [], 'Workdirs to compare side by side (--mode compare).')
flags.DEFINE_string('chips', None, '--mode predict: score these chips (a directory of .tif '
                    'chips or a glob) into <workdir>/chip_scores.csv instead of the test split.')
flags.DEFINE_list('allow_config_change', [],
                  'Config keys that may differ from the run being resumed (one of '
                  f'{", ".join(config_checks.CHANGEABLE_KEYS)}); the change is recorded in '
                  'history.json.')
flags.DEFINE_bool('multihost', False, 'One process per host: jax.distributed.initialize(), '
                  'with the cluster (SLURM, Open MPI, ...) detected or the three flags below.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (--multihost).')
flags.DEFINE_integer('num_processes', None, 'How many processes the job has (--multihost).')
flags.DEFINE_integer('process_id', None, "This process's index, 0-based (--multihost).")
config_flags.DEFINE_config_file('config', None, 'A get_config() file, e.g. configs/dual.py; '
                                'evaluate and predict default to the run\'s saved config.',
                                lock_config=True)


def run(mode: str, config, workdir: str, allow_config_change=(), chips=None) -> None:
  """The study's modes; `all` prepares the dataset once for training, evaluation and submission."""
  if mode == 'predict' and chips:
    chip_scores.predict_chips(config, workdir, chips)
    return
  data = runner = None
  if mode == 'all':  # one dataset and one set of compiled steps for all three
    config_checks.check(config)
    data = inputs.prepare(config, workdir_lib.Workdir(workdir))
    runner = runner_lib.for_config(config, inputs.preprocess(config, data))
  if mode in ('train', 'all'):
    train.train_and_evaluate(config, workdir, data, allow_config_change, runner)
  if mode in ('evaluate', 'all'):
    evaluate.evaluate(config, workdir, data, runner)
  if mode == 'predict' or (mode == 'all' and data.has_test):
    submission.predict_test(config, workdir, data, runner)
  if mode == 'export':
    export.export(config, workdir)


def _initialise_processes() -> None:
  if FLAGS.multihost:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  cli.check_backend()
  logging.info('JAX process %d/%d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS.workdir:  # checked here, not marked required: importing this module
    # (tests, other absl programs parsing their flags) must not make --workdir mandatory for them.
    raise app.UsageError('--workdir is required, e.g. --workdir runs/dual')
  if not FLAGS['verbosity'].present:  # library logs (orbax, tfds) drown the progress lines
    logging.set_verbosity(logging.ERROR)
  wd = workdir_lib.Workdir(FLAGS.workdir)
  with cli.reported(FLAGS.workdir):
    if FLAGS.mode == 'compare':
      if not FLAGS.compare:
        raise app.UsageError('--mode compare needs --compare=WORKDIR,WORKDIR,...')
      print(comparison.write_comparison(FLAGS.compare, FLAGS.workdir))
      return
    config = FLAGS.config
    if config is None:
      if FLAGS.mode not in ('evaluate', 'predict', 'export'):
        raise app.UsageError('--config is required to train, e.g. --config configs/dual.py')
      config = provenance.saved_config(wd)
    _initialise_processes()
    chief = jax.process_index() == 0  # the workdir's lock and log belong to process 0
    with (workdir_lib.locked(wd) if chief else contextlib.nullcontext(),
          workdir_lib.logged_output(wd) if chief else contextlib.nullcontext()):
      run(FLAGS.mode, config, FLAGS.workdir, tuple(FLAGS.allow_config_change), FLAGS.chips)


def run_cli():
  """The `rf-jax` console script."""
  sys.modules['__main__'].__doc__ = __doc__  # absl's --help prints the main module's docstring
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run_cli()
