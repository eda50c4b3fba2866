"""rf_jax: train, evaluate and compare the study's models on the Planet Amazon chips.

Examples:
  rf-jax --config demo --workdir runs/demo        # synthetic demo (configs/demo.py), end to end
  rf-jax --config dual --workdir runs/dual --config.data.raw_dir=/data/planet
  rf-jax --mode evaluate --workdir runs/dual                      # the run's own saved config
  rf-jax --mode predict --workdir runs/dual --chips '/data/new/*.tif' --output new.csv
  rf-jax --mode export --workdir runs/dual --output ~/models/dual
  rf-jax --mode compare --compare runs/rgb,runs/rgbir,runs/dual --workdir runs/comparison
  rf-jax --mode ensemble --members runs/rgb,runs/rgbir,runs/dual --workdir runs/ensemble

Modes: `train`; `evaluate` (restore the best epoch, recompute the validation scores, reproduction
check, metrics and report); `predict` (Kaggle submission for the test chips); `export` (the best
epoch's variables as msgpack and safetensors, with tags and band statistics); `compare` (side by
side of the --compare workdirs, written into --workdir); `ensemble` (the mean of the --members'
saved validation and test probabilities, no model: thresholds, metrics, report and submission in
--workdir); `all` (default): train, evaluate, and predict when the dataset has test chips.
Every config key, with its meaning, is in configs/default.py; override one with
--config.<key>=<value> (e.g. --config.num_epochs=10).
`~` in any path (flag or config key) is the home directory. `rf-jax --version` prints the
versions that decide the numbers. `python -m rf_jax.main` is the same program as `rf-jax`.
"""

import contextlib
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from rf_jax import comparison
from rf_jax import compilation
from rf_jax import config_checks
from rf_jax import ensemble
from rf_jax import evaluate
from rf_jax import export
from rf_jax import inputs
from rf_jax import parallel
from rf_jax import provenance
from rf_jax import runner as runner_lib
from rf_jax import submission
from rf_jax import train
from rf_jax import chip_scores
from rf_jax import cli
from rf_jax import workdir as workdir_lib
from rf_jax import xla_cpu
from rf_jax.configs import default

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory of the run: checkpoints, history, evaluation.')
flags.DEFINE_enum('mode', 'all',
                  ['all', 'train', 'evaluate', 'predict', 'export', 'compare', 'ensemble'],
                  'What to do in the workdir.')
flags.DEFINE_list('compare', [], 'Workdirs to compare side by side (--mode compare), '
                  'comma-separated without spaces.')
flags.DEFINE_list('members', [], 'Evaluated and predicted workdirs whose probabilities --mode '
                  'ensemble averages, comma-separated without spaces.')
flags.DEFINE_string('chips', None, '--mode predict: score these chips (a directory of .tif '
                    'chips or a quoted glob) into a CSV instead of the test split.')
flags.DEFINE_string('output', None, 'Where --mode predict --chips writes its CSV (default '
                    '<workdir>/chip_scores.csv) or --mode export its files (default '
                    '<workdir>/export); an existing CSV is never replaced.')
flags.DEFINE_list('allow_config_change', [],
                  'Config keys that may differ from the run being resumed (one of '
                  f'{", ".join(config_checks.CHANGEABLE_KEYS)}); the change is recorded in '
                  'history.json.')
flags.DEFINE_bool('multihost', False, 'One process per host: jax.distributed.initialize(), '
                  'with the cluster (SLURM, Open MPI, ...) detected or the three flags below.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (--multihost).')
flags.DEFINE_integer('num_processes', None, 'How many processes the job has (--multihost).')
flags.DEFINE_integer('process_id', None, "This process's index, 0-based (--multihost).")
config_flags.DEFINE_config_file('config', None, 'A get_config() file, e.g. configs/dual.py, or '
                                'a built-in config by name (demo, rgb, rgbir, dual); evaluate, '
                                'predict and export default to the run\'s saved config.',
                                lock_config=True)

# Flags that mean something in some modes only: given to another mode they would be ignored.
MODE_FLAGS = {'chips': ('predict',), 'output': ('predict', 'export'), 'compare': ('compare',),
              'members': ('ensemble',), 'allow_config_change': ('train', 'all')}
MULTIHOST_FLAGS = ('coordinator_address', 'num_processes', 'process_id')
SAVED_CONFIG_MODES = ('evaluate', 'predict', 'export')  # the run's own config.json by default
NO_CONFIG_MODES = ('compare', 'ensemble')  # they read other workdirs' results: no model, no data


def run(mode: str, config, workdir: str, allow_config_change=(), chips=None,
        output=None) -> None:
  """The study's modes; `all` prepares the dataset once for training, evaluation and submission."""
  if mode == 'predict' and chips:
    chip_scores.predict_chips(config, workdir, chips, output=output)
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
    export.export(config, workdir, output=output)


def _stray_arguments(args: list[str]) -> str:
  listed = next((name for name in ('compare', 'members') if FLAGS[name].present), None)
  if listed:
    hint = (f'--{listed} takes one comma-separated list without spaces, e.g. '
            f'--{listed} runs/rgb,runs/dual')
  elif FLAGS['chips'].present:
    hint = "quote a glob so that the shell passes it whole, e.g. --chips '/data/new/*.tif'"
  else:
    hint = 'every option is --name=value (rf-jax --help lists them)'
  return f'unexpected argument(s) {" ".join(args)}: {hint}.'


# The modes whose --workdir is where they write, not a run they read.
_WORKDIR_OF_MODE = {
    'compare': ': --mode compare writes the comparison there, e.g. --workdir runs/comparison',
    'ensemble': ': --mode ensemble writes the ensemble there, e.g. --workdir runs/ensemble',
}


def check_command_line(args: list[str]) -> None:
  """Refuses what would be ignored (a stray argument, a flag of another mode) or cannot work,
  naming the flag: before anything is created."""
  if args:
    raise cli.CommandLineError(_stray_arguments(args))
  if not FLAGS.workdir:  # checked here, not marked required: importing this module
    # (tests, other absl programs parsing their flags) must not make --workdir mandatory for them.
    raise cli.CommandLineError('--workdir is required'
                               + _WORKDIR_OF_MODE.get(FLAGS.mode, ', e.g. --workdir runs/dual'))
  for name, modes in MODE_FLAGS.items():
    if FLAGS[name].present and FLAGS.mode not in modes:
      raise cli.CommandLineError(
          f'--{name} applies to --mode {" or ".join(modes)} only, and this is --mode '
          f'{FLAGS.mode}{" (the default)" if not FLAGS["mode"].present else ""}, which would '
          f'ignore it: add --mode {modes[0]}, or drop --{name}.')
  if FLAGS.mode == 'predict' and FLAGS['output'].present and not FLAGS.chips:
    raise cli.CommandLineError(
        '--output names the CSV of --mode predict --chips; the test split\'s Kaggle submission '
        'is always <workdir>/submission.csv: add --chips, or drop --output.')
  if FLAGS.mode == 'compare' and not FLAGS.compare:
    raise cli.CommandLineError('--mode compare needs --compare=WORKDIR,WORKDIR,...')
  if FLAGS.mode == 'ensemble' and not FLAGS.members:
    raise cli.CommandLineError('--mode ensemble needs --members=WORKDIR,WORKDIR,...')
  given = [f'--{name}' for name in MULTIHOST_FLAGS if FLAGS[name].present]
  if given and not FLAGS.multihost:
    raise cli.CommandLineError(f'{", ".join(given)} (for a multi-process job) need '
                               '--multihost: add it, or drop them to run in one process.')
  if FLAGS.config is None and FLAGS.mode not in (*SAVED_CONFIG_MODES, *NO_CONFIG_MODES):
    raise cli.CommandLineError(f'--config is required for --mode {FLAGS.mode}, e.g. --config '
                               'dual or --config configs/dual.py.')


def _initialise_processes() -> None:
  if FLAGS.multihost:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  cli.check_backend()
  logging.info('JAX process %d/%d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())


def _path(value: str | None) -> str | None:
  """A path flag's value with `~` expanded: the shell leaves `--workdir=~/run` alone."""
  return os.path.expanduser(value) if value else value


def main(argv):
  if not FLAGS['verbosity'].present:  # library logs (orbax, tfds) drown the progress lines
    logging.set_verbosity(logging.ERROR)
  workdir = _path(FLAGS.workdir)
  with cli.reported(workdir):
    check_command_line(argv[1:])
    if FLAGS.mode in NO_CONFIG_MODES:  # the config's compare and eval keys, if one is given
      config = FLAGS.config if FLAGS.config is not None else default.get_config()
      config_checks.check(config)
      statistics = dict(resamples=config.compare.resamples, seed=config.compare.seed,
                        folds=config.eval.crossfit_folds)
      if FLAGS.mode == 'compare':
        print(comparison.write_comparison([_path(w) for w in FLAGS.compare], workdir,
                                          **statistics))
      else:
        ensemble.write_ensemble([_path(w) for w in FLAGS.members], workdir, **statistics)
      return
    wd = workdir_lib.Workdir(workdir)
    config = FLAGS.config if FLAGS.config is not None else provenance.saved_config(wd)
    config = config_checks.with_expanded_paths(config)
    config_checks.check(config)  # a refused config creates no workdir
    compilation.configure(config)  # before anything compiles: JAX opens its cache once
    if config.cpu_tuning:  # before JAX starts its backend, which reads XLA_FLAGS once
      xla_cpu.set_default_flags()
    _initialise_processes()
    if FLAGS.mode in ('train', 'all'):
      parallel.check_batch_sizes(config)
    # The workdir's lock and log belong to process 0 of a run that writes into it; export and
    # predict --chips only read the run, so a read-only (shared, archived) one serves them.
    holds = jax.process_index() == 0 and not (
        FLAGS.mode == 'export' or (FLAGS.mode == 'predict' and FLAGS.chips))
    with (workdir_lib.removed_if_refused(wd) if holds else contextlib.nullcontext(),
          workdir_lib.locked(wd) if holds else contextlib.nullcontext(),
          workdir_lib.logged_output(wd) if holds else contextlib.nullcontext(),
          compilation.reported()):  # its line closes the mode's output (and log.txt)
      run(FLAGS.mode, config, workdir, tuple(FLAGS.allow_config_change), _path(FLAGS.chips),
          _path(FLAGS.output))


def run_cli():
  """The `rf-jax` console script."""
  sys.modules['__main__'].__doc__ = __doc__  # absl's --help prints the main module's docstring
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run_cli()
