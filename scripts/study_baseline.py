r"""The validation loss of always predicting each tag's base rate, on the study's split.

The study's code paired chips with label rows by position, so its models could
learn no more than each tag's frequency. This prints the mean binary
cross-entropy, over the study's validation rows and the 17 tags, of predicting
that frequency for every chip, next to the study's best validation loss.

  python scripts/study_baseline.py --labels data/planet/train_v2.csv
"""

import sys

from absl import app
from absl import flags
import numpy as np

from rf_jax.data import planet

# Checked in main, not marked required: a required absl flag would bind every
# program that imports this module (the tests do) to pass it.
_LABELS = flags.DEFINE_string('labels', None, 'the Kaggle label file, train_v2.csv')
_VAL_FRACTION = flags.DEFINE_float('val_fraction', planet.STUDY_VAL_FRACTION,
                                   "the study's train_test_split test_size")
_SEED = flags.DEFINE_integer('seed', planet.STUDY_SEED,
                             "the study's train_test_split random_state")

# The study's lowest validation loss (rgb, epoch 2 of 35: results/SingleNetwork_results.txt).
STUDY_BEST_VAL_LOSS = 0.2575


def base_rate_bce(freq: np.ndarray, labels: np.ndarray) -> float:
  """Mean binary cross-entropy over rows and tags of predicting `freq` [T] for each row of `labels` [N, T]."""
  freq = np.asarray(freq, np.float64)
  y = np.asarray(labels, np.float64)
  with np.errstate(divide='ignore'):  # a tag never seen in training costs inf where it occurs
    loss = np.where(y == 1, -np.log(freq), -np.log1p(-freq))
  return float(loss.mean())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _LABELS.value:
    raise app.UsageError('give --labels, the Kaggle label file (train_v2.csv)')
  try:
    names, labels = planet.read_labels(_LABELS.value)
  except planet.PlanetDataError as e:
    sys.exit(f'error: {e}')
  train, val = planet.split(names, _VAL_FRACTION.value, _SEED.value)
  train_freq = labels[train].mean(0, dtype=np.float64)
  val_freq = labels[val].mean(0, dtype=np.float64)
  print(f'{_LABELS.value}: {len(names)} chips; train_test_split(test_size={_VAL_FRACTION.value}, '
        f'random_state={_SEED.value}): {len(train)} train, {len(val)} validation')
  # Predicting a tag for every validation chip has precision equal to its validation frequency.
  print(f'{"tag":<18} {"train freq":>10} {"val freq":>10}')
  for tag, ft, fv in zip(planet.TAGS, train_freq, val_freq):
    print(f'{tag:<18} {ft:10.6f} {fv:10.6f}')
  print('Validation loss (mean BCE over rows and tags) of always predicting each tag\'s frequency:')
  print(f'  training-split frequency  {base_rate_bce(train_freq, labels[val]):.5f}')
  print(f'  all-rows frequency        {base_rate_bce(labels.mean(0, dtype=np.float64), labels[val]):.5f}')
  print(f'  validation frequency      {base_rate_bce(val_freq, labels[val]):.5f}'
        '  (the best any constant prediction scores)')
  print(f"The study's best validation loss: {STUDY_BEST_VAL_LOSS} (rgb, epoch 2)")


if __name__ == '__main__':
  app.run(main)
