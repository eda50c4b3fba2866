"""Entry point: `python -m rf_jax.main --config configs/dual.py --workdir runs/dual`.

Modes: `train`; `evaluate` (restore, predict validation, reproduction check,
metrics and report); `predict` (Kaggle submission for the test chips);
`compare` (side-by-side of the --compare workdirs, written into --workdir);
`all` (default): train, evaluate, and predict when the dataset has test chips.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from rf_jax import comparison
from rf_jax import config_checks
from rf_jax import evaluate
from rf_jax import inputs
from rf_jax import submission
from rf_jax import train
from rf_jax import user_errors
from rf_jax import workdir as workdir_lib

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, history, TensorBoard files.')
flags.DEFINE_enum('mode', 'all', ['all', 'train', 'evaluate', 'predict', 'compare'],
                  'What to do in the workdir.')
flags.DEFINE_list('compare', [], 'Workdirs to compare side by side (--mode compare).')
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() (one process per host).')
config_flags.DEFINE_config_file('config', None, 'A get_config() file, e.g. configs/dual.py.',
                                lock_config=True)


def run(mode: str, config, workdir: str) -> None:
  """The study's modes; `all` prepares the dataset once for training, evaluation and submission."""
  data = None
  if mode == 'all':
    config_checks.check(config)
    wd = workdir_lib.Workdir(workdir)
    wd.create()
    data = inputs.prepare(config, wd)
  if mode in ('train', 'all'):
    train.train_and_evaluate(config, workdir, data)
  if mode in ('evaluate', 'all'):
    evaluate.evaluate(config, workdir, data)
  if mode == 'predict' or (mode == 'all' and data.test is not None):
    submission.predict_test(config, workdir, data)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS.workdir:  # checked here, not marked required: importing this module
    # (tests, grain workers parsing flags) must not make --workdir mandatory for them.
    raise app.UsageError('--workdir is required, e.g. --workdir runs/dual')
  if FLAGS.mode == 'compare':
    if not FLAGS.compare:
      raise app.UsageError('--mode compare needs --compare=WORKDIR,WORKDIR,...')
    with user_errors.reported(FLAGS.workdir):
      print(comparison.write_comparison(FLAGS.compare, FLAGS.workdir))
    return
  if FLAGS.config is None:
    raise app.UsageError('--config is required, e.g. --config configs/dual.py')
  if not FLAGS['verbosity'].present:  # library logs (orbax, tfds) drown the progress lines
    logging.set_verbosity(logging.ERROR)
  if FLAGS.multihost:
    jax.distributed.initialize()
  logging.info('JAX process %d/%d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  with user_errors.reported(FLAGS.workdir):
    run(FLAGS.mode, FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main, flags_parser=user_errors.parse_flags)
