"""Safe binary serialization of numpy arrays: model weights, updates, partial sums, state.

Updates arrive from devices nobody controls, so decoding must never execute anything (no
pickle) and must refuse a hostile header *before* it allocates memory for it. The format is a
small fixed header followed by raw little-endian buffers, readable from any language::

    arrays := b"FFA1" u32:count  record*count
    record := u8:dtype_code  u8:ndim  u64:dim*ndim  zero padding  raw little-endian C-order data

    state  := b"FFS1" u32:count  (u16:name_length  utf-8 name)*count  arrays

All integers are little-endian. Dtype codes: 1 float32, 2 float64, 3 int64, 4 int32, 5 uint8.
``ndim`` is at most 8. The padding (0 to 15 zero bytes) makes every array's data start at an
offset from the start of the message that is a multiple of 16, so zero-copy views are aligned
and numpy's fast paths apply to them. Decoding returns owned, writable copies by default;
``copy=False`` returns read-only zero-copy views into ``data`` instead (aligned whenever ``data``
itself is, as ``bytes`` objects are), which is what the aggregator's hot path uses.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

__all__ = [
    "ARRAYS_MAGIC",
    "MAX_NDIM",
    "STATE_MAGIC",
    "SerdeError",
    "decode_arrays",
    "decode_state",
    "encode_arrays",
    "encode_state",
]

ARRAYS_MAGIC = b"FFA1"
STATE_MAGIC = b"FFS1"
MAX_NDIM = 8

_DTYPE_BY_CODE: dict[int, np.dtype[Any]] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i8"),
    4: np.dtype("<i4"),
    5: np.dtype("u1"),
}
_CODE_BY_KIND: dict[tuple[str, int], int] = {
    (dt.kind, dt.itemsize): code for code, dt in _DTYPE_BY_CODE.items()
}
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_RECORD_HEAD = struct.Struct("<BB")
# numpy refuses shapes whose element count overflows intp; refuse them first with a clear error.
_MAX_ELEMENTS = np.iinfo(np.intp).max // 8

Buffer = bytes | bytearray | memoryview


class SerdeError(ValueError):
    """Bytes that are not a well-formed (or not the expected) array message."""


def _dtype_code(dtype: np.dtype[Any]) -> int:
    code = _CODE_BY_KIND.get((dtype.kind, dtype.itemsize))
    if code is None:
        names = ", ".join(str(dt) for dt in _DTYPE_BY_CODE.values())
        raise SerdeError(f"cannot encode dtype {dtype}; supported: {names}")
    return code


_ALIGN = 16
_ZEROS = bytes(_ALIGN)


def _encode_into(parts: list[Any], arrays: Sequence[NDArray[Any]], pos: int) -> None:
    """Append an arrays message to ``parts``; ``pos`` is its offset in the whole message."""
    head = ARRAYS_MAGIC + _U32.pack(len(arrays))
    parts.append(head)
    pos += len(head)
    for i, raw in enumerate(arrays):
        arr = np.asarray(raw)
        code = _dtype_code(arr.dtype)
        if arr.ndim > MAX_NDIM:
            raise SerdeError(f"array {i} has {arr.ndim} dimensions; at most {MAX_NDIM} allowed")
        # Not np.ascontiguousarray: it turns 0-d arrays into 1-d ones.
        arr = np.asarray(arr, dtype=_DTYPE_BY_CODE[code], order="C")
        head = _RECORD_HEAD.pack(code, arr.ndim) + struct.pack(f"<{arr.ndim}Q", *arr.shape)
        pos += len(head)
        pad = -pos % _ALIGN
        parts.append(head + _ZEROS[:pad])
        pos += pad + arr.nbytes
        # A 1-d byte view is handed to bytes.join without an intermediate copy.
        parts.append(arr.reshape(-1).view(np.uint8).data)


def encode_arrays(arrays: Sequence[NDArray[Any]]) -> bytes:
    """Serialize ``arrays`` (float32, float64, int64, int32 or uint8; any shape up to 8-d)."""
    if len(arrays) > 0xFFFFFFFF:
        raise SerdeError("too many arrays")
    parts: list[Any] = []
    _encode_into(parts, arrays, 0)
    return b"".join(parts)


def _check_limit(data: Buffer, max_bytes: int | None) -> memoryview:
    view = memoryview(data).cast("B")
    if max_bytes is not None and view.nbytes > max_bytes:
        raise SerdeError(f"message of {view.nbytes} bytes exceeds the limit of {max_bytes}")
    return view


def _decode_from(
    view: memoryview,
    offset: int,
    *,
    expected_shapes: Sequence[tuple[int, ...]] | None,
    expected_dtype: DTypeLike | None,
    copy: bool,
) -> list[NDArray[Any]]:
    size = view.nbytes
    if view[offset : offset + 4] != ARRAYS_MAGIC:
        raise SerdeError(f"not an array message: expected magic {ARRAYS_MAGIC!r}")
    if size < offset + 8:
        raise SerdeError("truncated: header ends early")
    (count,) = _U32.unpack_from(view, offset + 4)
    offset += 8
    if expected_shapes is not None and count != len(expected_shapes):
        raise SerdeError(f"expected {len(expected_shapes)} arrays, message holds {count}")
    # Every record needs at least two bytes: refuse absurd counts before looping over them.
    if count * _RECORD_HEAD.size > size - offset:
        raise SerdeError(f"truncated: {count} arrays cannot fit in {size - offset} bytes")
    want_dtype = None if expected_dtype is None else np.dtype(expected_dtype)

    # First pass: parse and check every header, so nothing is copied from a bad message.
    records: list[tuple[np.dtype[Any], tuple[int, ...], int, int]] = []
    for i in range(count):
        if size - offset < _RECORD_HEAD.size:
            raise SerdeError(f"truncated: array {i} header ends early")
        code, ndim = _RECORD_HEAD.unpack_from(view, offset)
        offset += _RECORD_HEAD.size
        dtype = _DTYPE_BY_CODE.get(code)
        if dtype is None:
            raise SerdeError(f"array {i} has unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise SerdeError(f"array {i} claims {ndim} dimensions; at most {MAX_NDIM} allowed")
        if size - offset < 8 * ndim:
            raise SerdeError(f"truncated: array {i} shape ends early")
        shape = struct.unpack_from(f"<{ndim}Q", view, offset)
        offset += 8 * ndim
        pad = -offset % _ALIGN
        if size - offset < pad:
            raise SerdeError(f"truncated: array {i} padding ends early")
        if pad and view[offset : offset + pad] != _ZEROS[:pad]:
            raise SerdeError(f"array {i} has non-zero padding")
        offset += pad
        # Python ints cannot overflow; compare the claimed size with what is really there.
        # Zero-length dimensions do not excuse the others: numpy checks their product too.
        if math.prod(max(d, 1) for d in shape) > _MAX_ELEMENTS:
            raise SerdeError(f"array {i} claims an impossible shape {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > size - offset:
            raise SerdeError(f"truncated: array {i} claims {nbytes} bytes, {size - offset} remain")
        if expected_shapes is not None and shape != tuple(expected_shapes[i]):
            raise SerdeError(f"array {i} has shape {shape}, expected {tuple(expected_shapes[i])}")
        if want_dtype is not None and dtype != want_dtype:
            raise SerdeError(f"array {i} has dtype {dtype}, expected {want_dtype}")
        records.append((dtype, shape, offset, nbytes))
        offset += nbytes
    if offset != size:
        raise SerdeError(f"{size - offset} trailing bytes after the last array")

    out: list[NDArray[Any]] = []
    for dtype, shape, start, nbytes in records:
        arr = np.frombuffer(view[start : start + nbytes], dtype=dtype).reshape(shape)
        if copy:
            arr = arr.astype(dtype.newbyteorder("="), copy=True)
        else:
            arr.flags.writeable = False
        out.append(arr)
    return out


def decode_arrays(
    data: Buffer,
    *,
    max_bytes: int | None = None,
    expected_shapes: Sequence[tuple[int, ...]] | None = None,
    expected_dtype: DTypeLike | None = None,
    copy: bool = True,
) -> list[NDArray[Any]]:
    """Parse a message from :func:`encode_arrays`, or raise :class:`SerdeError`.

    ``max_bytes`` bounds the whole message and is checked before anything is parsed;
    ``expected_shapes`` and ``expected_dtype`` are checked against the headers before any data
    is copied. With ``copy=False`` the arrays are read-only views that keep ``data`` alive.
    """
    view = _check_limit(data, max_bytes)
    return _decode_from(
        view, 0, expected_shapes=expected_shapes, expected_dtype=expected_dtype, copy=copy
    )


def encode_state(state: Mapping[str, NDArray[Any]]) -> bytes:
    """Serialize named arrays (an optimizer's state); names are kept in insertion order."""
    if len(state) > 0xFFFFFFFF:
        raise SerdeError("too many arrays")
    parts: list[Any] = [STATE_MAGIC + _U32.pack(len(state))]
    for name in state:
        raw = name.encode("utf-8")
        if len(raw) > 0xFFFF:
            raise SerdeError(f"state name longer than 65535 bytes: {name[:40]!r}...")
        parts.append(_U16.pack(len(raw)) + raw)
    _encode_into(parts, list(state.values()), sum(len(p) for p in parts))
    return b"".join(parts)


def decode_state(
    data: Buffer, *, max_bytes: int | None = None, copy: bool = True
) -> dict[str, NDArray[Any]]:
    """Parse a message from :func:`encode_state`, or raise :class:`SerdeError`."""
    view = _check_limit(data, max_bytes)
    size = view.nbytes
    if view[:4] != STATE_MAGIC:
        raise SerdeError(f"not a state message: expected magic {STATE_MAGIC!r}")
    if size < 8:
        raise SerdeError("truncated: header ends early")
    (count,) = _U32.unpack_from(view, 4)
    offset = 8
    if count * _U16.size > size - offset:
        raise SerdeError(f"truncated: {count} names cannot fit in {size - offset} bytes")
    names: list[str] = []
    for i in range(count):
        if size - offset < _U16.size:
            raise SerdeError(f"truncated: name {i} ends early")
        (length,) = _U16.unpack_from(view, offset)
        offset += _U16.size
        if size - offset < length:
            raise SerdeError(f"truncated: name {i} ends early")
        try:
            name = bytes(view[offset : offset + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise SerdeError(f"name {i} is not valid UTF-8") from None
        offset += length
        names.append(name)
    if len(set(names)) != len(names):
        raise SerdeError("duplicate names in state")
    arrays = _decode_from(view, offset, expected_shapes=None, expected_dtype=None, copy=copy)
    if len(arrays) != count:
        raise SerdeError(f"state has {count} names but {len(arrays)} arrays")
    return dict(zip(names, arrays, strict=True))
