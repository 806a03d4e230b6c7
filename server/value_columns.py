"""Feast `ValueProto` blobs decoded a feature column at a time, with NumPy, into Arrow arrays.

A bulk read (server.store_reads.SqliteRead.read_arrays) gets, per feature, the stored blobs of many entities
concatenated into one bytes object, with each blob's length and the position of its entity. Decoding them one
`ValueProto.FromString` at a time costs ~1-2 us per value in Python; the blobs of one feature share a layout,
so NumPy can take them apart all at once:

- varint scalars (int64, int32, bool): a tag byte, then the varint;
- doubles and floats: a tag byte, then 8 or 4 little-endian bytes;
- strings and bytes: a tag byte, a varint length, the bytes;
- packed numeric lists (int64, int32, bool, double, float): a tag, a length, then the list message,
  whose one field (tag 0x0a) holds the packed values;
- string and bytes lists: a tag, a length, then one (0x0a, length, bytes) field per element.

Every layout is checked, not assumed: a column whose blobs are not all one of these layouts exactly (another
kind of value, unpacked lists, unknown fields, a mix of kinds) is decoded blob by blob with protobuf, as
`get_online_features` would. Values come out exactly as protobuf gives them (tests/test_bulk_read.py compares
with Feast's own read); nulls (a missing row, an empty blob, `null_val`) come out as Arrow nulls.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import feast_value_type_to_python_type

_SCALAR_KINDS = frozenset({"int32_val", "int64_val", "float_val", "double_val", "string_val", "bytes_val", "bool_val"})
_LIST_KINDS = frozenset(
    {"int32_list_val", "int64_list_val", "float_list_val", "double_list_val", "string_list_val", "bytes_list_val", "bool_list_val"}
)

# Value's fields by the tag bytes that open a blob: (kind, Arrow type of the values).
_VARINT = {b"\x18": pa.int32(), b"\x20": pa.int64(), b"\x38": pa.bool_()}  # int32_val=3, int64_val=4, bool_val=7
_FIXED = {b"\x29": ("<f8", pa.float64()), b"\x35": ("<f4", pa.float32())}  # double_val=5, float_val=6
_BYTES = {b"\x0a": pa.binary(), b"\x12": pa.string()}  # bytes_val=1, string_val=2
_PACKED_LISTS = {b"\x6a": pa.int32(), b"\x72": pa.int64(), b"\x8a\x01": pa.bool_()}  # int32_list_val=13, int64_list_val=14, bool_list_val=17
_FIXED_LISTS = {b"\x7a": ("<f8", pa.float64()), b"\x82\x01": ("<f4", pa.float32())}  # double_list_val=15, float_list_val=16
_BYTES_LISTS = {b"\x5a": pa.binary(), b"\x62": pa.string()}  # bytes_list_val=11, string_list_val=12
_NULL = b"\x98\x01"  # null_val=19 (a varint): the value is missing
_LIST_FIELD = 0x0A  # the `val` field (1, length-delimited) of Feast's *List messages


class _NotThisLayout(Exception):
    """The blobs are not all of the layout being decoded: decode them one by one instead."""


def python_value(value: ValueProto) -> object:
    """A Feast Value as get_online_features would return it (None when unset), fast for scalars and lists."""
    kind = value.WhichOneof("val")
    if kind in _SCALAR_KINDS:
        return getattr(value, kind)
    if kind in _LIST_KINDS:
        return list(getattr(value, kind).val)
    if kind is None or kind == "null_val":
        return None
    return feast_value_type_to_python_type(value)  # timestamps, sets, maps, structs: Feast's own conversion


def decode_column(blobs: bytes, lengths: np.ndarray, positions: np.ndarray, n: int) -> pa.Array | list[object]:
    """n values: blob k (blobs[sum(lengths[:k]) : ...], non-empty) is the value at positions[k]; the others are null.

    An Arrow array when the blobs share a layout this module decodes in bulk; otherwise a list of Python values
    (None where null), decoded blob by blob as get_online_features would.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    if len(lengths) != len(positions) or int(lengths.sum()) != len(blobs):
        raise ValueError(f"{len(lengths)} blob lengths summing to {int(lengths.sum())} bytes for {len(positions)} positions and {len(blobs)} bytes")
    if not len(lengths):
        return pa.nulls(n)
    buf = np.frombuffer(blobs, dtype=np.uint8)
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    try:
        values = _decode(blobs, buf, starts, lengths)
    except _NotThisLayout:
        return _one_by_one(blobs, starts, lengths, positions, n)
    if values is None:  # every blob is null_val
        return pa.nulls(n)
    return _scatter(values, positions, n)


def _decode(blobs: bytes, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> pa.Array | None:
    """The blobs' values in blob order, when they all have one of the bulk layouts (None when all are null_val)."""
    first = blobs[:1]
    tag = blobs[:2] if first[0] & 0x80 else first  # field numbers 16-2047 take two tag bytes
    if not _all_start_with(buf, starts, lengths, tag):
        raise _NotThisLayout
    width = len(tag)
    if tag == _NULL:
        _varint_spans(buf, starts + width, lengths - width)  # null_val and nothing else
        return None
    if tag in _VARINT:
        values = _varint_spans(buf, starts + width, lengths - width)
        return _typed(values, _VARINT[tag])
    if tag in _FIXED:
        dtype, arrow_type = _FIXED[tag]
        size = np.dtype(dtype).itemsize
        if (lengths != width + size).any():
            raise _NotThisLayout
        data = buf[(starts + width)[:, None] + np.arange(size)].copy().view(dtype).ravel()
        return pa.array(data, type=arrow_type)
    if tag in _BYTES:
        begin, end = _length_delimited(buf, starts + width, starts + lengths)
        return _binary(buf, begin, end, _BYTES[tag])
    if tag in _PACKED_LISTS or tag in _FIXED_LISTS or tag in _BYTES_LISTS:
        begin, end = _length_delimited(buf, starts + width, starts + lengths)  # the list message
        if tag in _BYTES_LISTS:
            return _bytes_lists(buf, begin, end, _BYTES_LISTS[tag])
        begin, end = _packed_field(buf, begin, end)
        counts, values = (_packed_varints(buf, begin, end, _PACKED_LISTS[tag]) if tag in _PACKED_LISTS
                          else _packed_fixed(buf, begin, end, *_FIXED_LISTS[tag]))
        return pa.ListArray.from_arrays(pa.array(_offsets(counts), type=pa.int32()), values)
    raise _NotThisLayout


def _all_start_with(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, tag: bytes) -> bool:
    if (lengths < len(tag) + 1).any():  # every layout has at least one byte after its tag
        return False
    return all((buf[starts + i] == byte).all() for i, byte in enumerate(tag))


def _varint_spans(buf: np.ndarray, begin: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The varint that fills exactly buf[begin:begin + size] for each blob, as uint64 (two's complement for negatives)."""
    if (sizes < 1).any() or (sizes > 10).any():
        raise _NotThisLayout
    width = int(sizes.max())
    j = np.arange(width)
    inside = j < sizes[:, None]
    raw = buf[np.where(inside, begin[:, None] + j, 0)]
    more = raw >= 0x80
    # Each varint continues on every byte but its last, and ends exactly at the end of its span.
    if not ((more == (j < sizes[:, None] - 1)) | ~inside).all():
        raise _NotThisLayout
    parts = np.where(inside, raw & 0x7F, 0).astype(np.uint64) << (7 * j).astype(np.uint64)
    return np.bitwise_or.reduce(parts, axis=1)


def _varints_at(buf: np.ndarray, at: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The varints starting at each position (each must end before `end`): their values and sizes in bytes."""
    value = np.zeros(len(at), dtype=np.uint64)
    size = np.zeros(len(at), dtype=np.int64)
    going = np.ones(len(at), dtype=bool)
    for i in range(10):
        where = at + i
        if (where[going] >= end[going]).any():
            raise _NotThisLayout
        byte = buf[np.where(going, where, 0)]
        value |= np.where(going, byte & 0x7F, 0).astype(np.uint64) << np.uint64(7 * i)
        size += going
        going &= byte >= 0x80
        if not going.any():
            return value, size
    raise _NotThisLayout


def _length_delimited(buf: np.ndarray, at: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A length varint at each position whose bytes fill the rest of the span exactly: where those bytes begin and end."""
    length, size = _varints_at(buf, at, end)
    begin = at + size
    if (begin + length.astype(np.int64) != end).any():
        raise _NotThisLayout
    return begin, end


def _packed_field(buf: np.ndarray, begin: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inside each list message: its one packed field (empty for an empty message)."""
    full = end > begin
    if not (buf[begin[full]] == _LIST_FIELD).all():
        raise _NotThisLayout
    inner_begin, _ = _length_delimited(buf, begin[full] + 1, end[full])
    begin = begin.copy()
    begin[full] = inner_begin
    return begin, end


def _packed_varints(buf: np.ndarray, begin: np.ndarray, end: np.ndarray, arrow_type: pa.DataType) -> tuple[np.ndarray, pa.Array]:
    data = buf[_ranges(begin, end)]
    last = data < 0x80  # the last byte of each varint
    ends_before = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum(last, out=ends_before[1:])
    sizes = end - begin
    full = sizes > 0
    cuts = _offsets(sizes)
    # Every list's bytes must end with a complete varint, so no value runs across two lists.
    if full.any() and not last[cuts[1:][full] - 1].all():
        raise _NotThisLayout
    counts = ends_before[cuts[1:]] - ends_before[cuts[:-1]]
    if not len(data):
        return counts, pa.array([], type=arrow_type)
    value_starts = np.flatnonzero(np.concatenate(([True], last[:-1])))
    shift = np.arange(len(data)) - np.repeat(value_starts, np.diff(np.append(value_starts, len(data))))
    if shift.max() > 9:
        raise _NotThisLayout
    parts = (data & 0x7F).astype(np.uint64) << (7 * shift).astype(np.uint64)
    return counts, _typed(np.bitwise_or.reduceat(parts, value_starts), arrow_type)


def _packed_fixed(buf: np.ndarray, begin: np.ndarray, end: np.ndarray, dtype: str, arrow_type: pa.DataType) -> tuple[np.ndarray, pa.Array]:
    size = np.dtype(dtype).itemsize
    sizes = end - begin
    if (sizes % size).any():
        raise _NotThisLayout
    return sizes // size, pa.array(buf[_ranges(begin, end)].view(dtype), type=arrow_type)


def _bytes_lists(buf: np.ndarray, begin: np.ndarray, end: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """String or bytes lists: one (0x0a, length, bytes) field per element, read for every list at once, element by element."""
    owners, item_begins, item_ends = [], [], []
    owner = np.arange(len(begin))
    at, stop = begin, end
    going = at < stop
    while going.any():
        owner, at, stop = owner[going], at[going], stop[going]
        if not (buf[at] == _LIST_FIELD).all():
            raise _NotThisLayout
        length, size = _varints_at(buf, at + 1, stop)
        item_begin = at + 1 + size
        item_end = item_begin + length.astype(np.int64)
        if (item_end > stop).any():
            raise _NotThisLayout
        owners.append(owner)
        item_begins.append(item_begin)
        item_ends.append(item_end)
        at = item_end
        going = at < stop
    counts = np.bincount(np.concatenate(owners), minlength=len(begin)) if owners else np.zeros(len(begin), dtype=np.int64)
    if not owners:
        return pa.ListArray.from_arrays(pa.array(_offsets(counts), type=pa.int32()), pa.array([], type=arrow_type))
    # Elements were found one round per element index: put them back in list order (list, then index in the list).
    order = np.argsort(np.concatenate(owners), kind="stable")
    values = _binary(buf, np.concatenate(item_begins)[order], np.concatenate(item_ends)[order], arrow_type)
    return pa.ListArray.from_arrays(pa.array(_offsets(counts), type=pa.int32()), values)


def _binary(buf: np.ndarray, begin: np.ndarray, end: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    data = buf[_ranges(begin, end)]
    offsets = _offsets(end - begin)
    if offsets[-1] >= 2**31:
        raise _NotThisLayout
    array = pa.Array.from_buffers(pa.binary(), len(begin), [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data.tobytes())])
    if arrow_type == pa.string():
        array = array.cast(pa.string())  # checks UTF-8, as protobuf does for string fields
    return array


def _ranges(begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The indices begin[k]..end[k]-1 for every k, concatenated."""
    sizes = end - begin
    total = int(sizes.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    full = sizes > 0
    step = np.ones(total, dtype=np.int64)
    cuts = _offsets(sizes[full])[:-1]
    b, e = begin[full], end[full]
    step[cuts[1:]] = b[1:] - e[:-1] + 1  # jump from the end of one range to the beginning of the next
    step[0] = b[0]
    return np.cumsum(step)


def _offsets(counts: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def _typed(values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """uint64 varint payloads as the field's type (protobuf keeps the low 32 bits of an int32 and any non-zero bool as True)."""
    if arrow_type == pa.bool_():
        return pa.array(values != 0)
    signed = values.view(np.int64)
    if arrow_type == pa.int32():
        return pa.array(signed.astype(np.int32))
    return pa.array(signed)


def _scatter(values: pa.Array, positions: np.ndarray, n: int) -> pa.Array:
    """values[k] at positions[k] of an array of n, nulls elsewhere."""
    if len(positions) == n and (positions == np.arange(n)).all():
        return values
    take = np.full(n, -1, dtype=np.int64)
    take[positions] = np.arange(len(positions))
    missing = take < 0
    return values.take(pa.array(take, mask=missing))


def _one_by_one(blobs: bytes, starts: np.ndarray, lengths: np.ndarray, positions: np.ndarray, n: int) -> list[object]:
    out: list[object] = [None] * n
    for start, length, position in zip(starts.tolist(), lengths.tolist(), positions.tolist()):
        out[position] = python_value(ValueProto.FromString(blobs[start : start + length]))
    return out
