"""rf_jax.data.example_wire and PlanetSource.read_into against protobuf's own Example parser."""

import numpy as np
import pytest
from tensorflow_datasets.proto import tf_example_pb2

from rf_jax.data import example_wire
from rf_jax.data import pipeline
from rf_jax.data import planet
from rf_jax.data import prepared


def _example(**features) -> bytes:
  """A serialized Example: bytes -> bytes_list, float lists -> float_list, int lists ->
  int64_list."""
  example = tf_example_pb2.Example()
  for key, value in features.items():
    feature = example.features.feature[key]
    if isinstance(value, bytes):
      feature.bytes_list.value.append(value)
    elif all(isinstance(v, float) for v in value):
      feature.float_list.value.extend(value)
    else:
      feature.int64_list.value.extend(value)
  return example.SerializeToString()


def test_spans_locate_what_protobuf_decodes():
  image = np.random.default_rng(0).integers(0, 2**16, (8, 8, 4), dtype=np.uint16).tobytes()
  labels = [0.0, 1.0, 0.5, -2.25]
  serialized = _example(image=image, labels=labels, name=b'train_17', ids=[3, 300, 2**40])
  spans = example_wire.feature_spans(serialized)
  assert spans.keys() == {'image', 'labels', 'name', 'ids'}
  parsed = tf_example_pb2.Example.FromString(serialized).features.feature
  at = lambda key: serialized[spans[key].start:spans[key].end]
  assert spans['image'].kind == 'bytes_list' and at('image') == parsed['image'].bytes_list.value[0]
  assert at('name') == b'train_17'
  assert spans['labels'].kind == 'float_list'
  np.testing.assert_array_equal(np.frombuffer(at('labels'), '<f4'),
                                np.asarray(parsed['labels'].float_list.value, np.float32))
  assert spans['ids'].kind == 'int64_list'


def test_truncated_or_foreign_records_are_refused():
  serialized = _example(image=b'x' * 1000, labels=[1.0])
  for bad in (serialized[:-10], serialized[:3], b'\x0f\x00', b''):
    with pytest.raises(example_wire.WireError):
      example_wire.feature_spans(bad)


def test_read_into_equals_the_decoded_record(prepared_synthetic):
  source = prepared_synthetic.validation
  chip = source[0]['image']
  image = pipeline.aligned_empty(chip.shape, chip.dtype)
  for index in (0, len(source) - 1):
    record = source[index]
    labels = source.read_into(index, image)
    np.testing.assert_array_equal(image, record['image'])
    np.testing.assert_array_equal(labels, record['labels'])
    assert labels.dtype == np.float32


class _Records:
  def __init__(self, records):
    self.data_source = records

  def __len__(self):
    return len(self.data_source)


def test_a_damaged_record_is_one_error_naming_the_prepared_dataset():
  image = np.zeros((4, 4, 4), np.uint16)
  wrong_size = _example(image=b'\x00' * 16, labels=[0.0] * planet.NUM_TAGS)
  source = prepared.PlanetSource(_Records([b'\x0a\x40cut short', wrong_size]), 'planet/x/train',
                                 '/data/prepared/planet_amazon/x')
  for index, reason in ((0, 'runs past its message'), (1, 'holds 16 bytes, not 128')):
    with pytest.raises(planet.PlanetDataError) as raised:
      source.read_into(index, image)
    message = str(raised.value)
    assert f'record {index} is not a prepared chip' in message and reason in message
    assert '/data/prepared/planet_amazon/x is damaged; delete it and run again' in message
