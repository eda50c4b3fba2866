"""Where each feature of a serialized tf.train.Example lies, found without decoding it.

A prepared chip's record is a tf.train.Example (TFDS writes it): its image is one 512 KB
`bytes_list` value, its labels a packed `float_list`. Decoding the Example copies the image
twice (into a parsed message, then a bytes object); `feature_spans` only walks the protobuf
wire format, so the loader copies the image once, from the record straight into its batch.

  Example  { Features features = 1; }
  Features { map<string, Feature> feature = 1; }  (entries: key = 1, value = 2)
  Feature  { oneof { BytesList bytes_list = 1; FloatList float_list = 2;
                     Int64List int64_list = 3; } }
  BytesList / FloatList / Int64List { repeated value = 1; }  (floats packed)
"""

from __future__ import annotations

from typing import NamedTuple

KINDS = {1: 'bytes_list', 2: 'float_list', 3: 'int64_list'}
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class Span(NamedTuple):
  """A feature's first value: bytes [start, end) of the record, of Feature kind `kind`."""
  kind: str
  start: int
  end: int


class WireError(ValueError):
  """The record is not a tf.train.Example of the shape `feature_spans` reads."""


def _varint(data, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    if pos >= len(data) or shift > 63:
      raise WireError(f'truncated or overlong varint at byte {pos}')
    byte = data[pos]
    value |= (byte & 0x7F) << shift
    pos, shift = pos + 1, shift + 7
    if byte < 0x80:
      return value, pos


def _fields(data, start: int, end: int):
  """(field number, wire type, value start, value end) of each field in data[start:end]."""
  pos = start
  while pos < end:
    tag, pos = _varint(data, pos)
    wire = tag & 7
    if wire == _VARINT:
      value_end = _varint(data, pos)[1]
    elif wire == _LENGTH:
      size, pos = _varint(data, pos)
      value_end = pos + size
    elif wire in (_FIXED64, _FIXED32):
      value_end = pos + (8 if wire == _FIXED64 else 4)
    else:
      raise WireError(f'unsupported wire type {wire} at byte {pos}')
    if value_end > end:
      raise WireError(f'field {tag >> 3} runs past its message (byte {value_end} > {end})')
    yield tag >> 3, wire, pos, value_end
    pos = value_end


def _first(data, start: int, end: int, number: int) -> tuple[int, int] | None:
  """The first length-delimited field `number` of data[start:end] (TFDS writes each once)."""
  for field, wire, value_start, value_end in _fields(data, start, end):
    if field == number and wire == _LENGTH:
      return value_start, value_end
  return None


def feature_spans(serialized: bytes) -> dict[str, Span]:
  """{feature name: Span of its first value} for every feature of the Example. A packed
  float or int64 list spans all its values; a bytes list's span is its first bytes value."""
  data = memoryview(serialized)
  features = _first(data, 0, len(data), 1)
  if features is None:
    raise WireError('no features in the record')
  spans = {}
  for field, wire, start, end in _fields(data, *features):
    if field != 1 or wire != _LENGTH:
      continue
    key, value = _first(data, start, end, 1), _first(data, start, end, 2)
    if key is None or value is None:
      raise WireError(f'a feature map entry without key or value at byte {start}')
    for kind_number, kind_wire, kind_start, kind_end in _fields(data, *value):
      if kind_number in KINDS and kind_wire == _LENGTH:
        first = _first(data, kind_start, kind_end, 1)
        if first is not None:
          spans[bytes(data[key[0]:key[1]]).decode()] = Span(KINDS[kind_number], *first)
  return spans
