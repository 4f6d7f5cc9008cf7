"""Unit tests of fedfleet.core.serde: round trips and refusal of hostile or wrong messages."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest

from fedfleet.core.serde import (
    SerdeError,
    decode_arrays,
    decode_state,
    encode_arrays,
    encode_state,
)

pytestmark = pytest.mark.unit

DTYPES = [np.float32, np.float64, np.int64, np.int32, np.uint8]


def _random_array(rng: np.random.Generator, dtype: type) -> np.ndarray:
    ndim = int(rng.integers(0, 5))
    shape = tuple(int(d) for d in rng.integers(0, 5, size=ndim))
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def _header(code: int, shape: tuple[int, ...], count: int = 1) -> bytes:
    """Header of a message whose first array has ``shape``, padded so its data is aligned."""
    head = (
        b"FFA1"
        + struct.pack("<I", count)
        + struct.pack("<BB", code, len(shape))
        + struct.pack(f"<{len(shape)}Q", *shape)
    )
    return head + bytes(-len(head) % 16)


@pytest.mark.parametrize("copy", [True, False])
def test_round_trip_random_shapes_and_dtypes(copy: bool) -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        arrays = [
            _random_array(rng, DTYPES[int(rng.integers(len(DTYPES)))])
            for _ in range(int(rng.integers(0, 6)))
        ]
        decoded = decode_arrays(encode_arrays(arrays), copy=copy)
        assert len(decoded) == len(arrays)
        for a, b in zip(arrays, decoded, strict=True):
            assert b.dtype == a.dtype and b.shape == a.shape
            assert np.array_equal(a, b)
            assert b.flags.writeable is copy


def test_round_trip_edge_cases() -> None:
    arrays: list[np.ndarray] = [
        np.array(3.5, dtype=np.float32),
        np.array(-7, dtype=np.int64),
        np.zeros((0,), dtype=np.float64),
        np.zeros((3, 0, 2), dtype=np.int32),
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.array([np.nan, np.inf, -0.0], dtype=np.float64),
        np.ones((1,) * 8, dtype=np.float32),
    ]
    decoded = decode_arrays(encode_arrays(arrays))
    for a, b in zip(arrays, decoded, strict=True):
        assert b.shape == a.shape and b.dtype == a.dtype
        np.testing.assert_array_equal(a, b)
    assert decode_arrays(encode_arrays([])) == []


def test_non_contiguous_and_big_endian_inputs_are_normalised() -> None:
    base = np.arange(20, dtype=np.float64).reshape(4, 5)
    big = base.astype(">f8")
    data = encode_arrays([base.T, big, base[::2, 1::2]])
    out = decode_arrays(data)
    np.testing.assert_array_equal(out[0], base.T)
    np.testing.assert_array_equal(out[1], base)
    np.testing.assert_array_equal(out[2], base[::2, 1::2])
    assert out[1].dtype == np.float64
    assert data == encode_arrays([np.ascontiguousarray(base.T), base, base[::2, 1::2].copy()])


def test_format_is_the_documented_layout() -> None:
    arr = np.array([[1, 2]], dtype=np.int32)
    expected = _header(4, (1, 2)) + np.array([1, 2], dtype="<i4").tobytes()
    assert encode_arrays([arr]) == expected


def test_data_is_16_byte_aligned_and_zero_copy_views_are_aligned() -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.random(s).astype(np.float32) for s in [(3,), (5, 7), (1,), (2, 3, 4)]]
    data = encode_arrays(arrays)
    views = decode_arrays(data, copy=False)
    base = np.frombuffer(data, dtype=np.uint8).ctypes.data
    for view, arr in zip(views, arrays, strict=True):
        assert (view.ctypes.data - base) % 16 == 0
        assert view.flags.aligned and not view.flags.writeable
        np.testing.assert_array_equal(view, arr)


def test_non_zero_padding_is_refused() -> None:
    data = bytearray(encode_arrays([np.zeros(2, dtype=np.float32)]))
    data[18] = 7  # inside the padding after the first record's 18-byte header
    with pytest.raises(SerdeError, match="padding"):
        decode_arrays(bytes(data))


@pytest.mark.parametrize("dtype", [np.float16, np.bool_, np.int8, np.uint64, np.complex64])
def test_refuses_to_encode_unsupported_dtypes(dtype: type) -> None:
    with pytest.raises(SerdeError, match="cannot encode dtype"):
        encode_arrays([np.zeros(2, dtype=dtype)])


def test_refuses_bad_magic() -> None:
    data = encode_arrays([np.zeros(3, np.float32)])
    with pytest.raises(SerdeError, match="magic"):
        decode_arrays(b"XXXX" + data[4:])
    with pytest.raises(SerdeError, match="magic"):
        decode_arrays(b"")


def test_refuses_every_truncation() -> None:
    data = encode_arrays([np.ones((2, 3), np.float32), np.array(1, np.int64)])
    for cut in range(len(data)):
        with pytest.raises(SerdeError):
            decode_arrays(data[:cut])


def test_refuses_trailing_bytes() -> None:
    data = encode_arrays([np.ones(3, np.float32)])
    with pytest.raises(SerdeError, match="trailing"):
        decode_arrays(data + b"\0")


def test_refuses_unknown_dtype_code_and_too_many_dims() -> None:
    with pytest.raises(SerdeError, match="unknown dtype code 9"):
        decode_arrays(_header(9, (1,)) + b"\0" * 8)
    with pytest.raises(SerdeError, match="dimensions"):
        decode_arrays(_header(5, (1,) * 9) + b"\0")


def test_refuses_oversized_claims_before_allocating() -> None:
    hostile = [
        _header(2, (2**40,)) + b"\0" * 16,  # 8 TiB claimed, 16 bytes present
        _header(2, (2**63, 2**63)) + b"\0" * 16,  # element count overflows 64 bits
        _header(1, (0, 2**62, 2**62)),  # zero elements, yet an impossible shape
        b"FFA1" + struct.pack("<I", 0xFFFFFFFF),  # four billion arrays in no bytes
    ]
    tracemalloc.start()
    try:
        for data in hostile:
            with pytest.raises(SerdeError):
                decode_arrays(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_max_bytes_is_enforced() -> None:
    data = encode_arrays([np.zeros(1000, np.float64)])
    assert len(decode_arrays(data, max_bytes=len(data))[0]) == 1000
    with pytest.raises(SerdeError, match="exceeds the limit"):
        decode_arrays(data, max_bytes=len(data) - 1)


def test_expectations_are_checked() -> None:
    data = encode_arrays([np.zeros((2, 3), np.float32), np.zeros(3, np.float32)])
    out = decode_arrays(data, expected_shapes=[(2, 3), (3,)], expected_dtype=np.float32)
    assert [a.shape for a in out] == [(2, 3), (3,)]
    with pytest.raises(SerdeError, match=r"has shape \(2, 3\), expected \(3, 2\)"):
        decode_arrays(data, expected_shapes=[(3, 2), (3,)])
    with pytest.raises(SerdeError, match="expected 1 arrays"):
        decode_arrays(data, expected_shapes=[(2, 3)])
    with pytest.raises(SerdeError, match="dtype"):
        decode_arrays(data, expected_dtype=np.float64)


def test_accepts_bytearray_and_memoryview() -> None:
    data = encode_arrays([np.arange(5, dtype=np.int64)])
    for buf in (bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(decode_arrays(buf)[0], np.arange(5))


def test_state_round_trip_keeps_names_and_order() -> None:
    rng = np.random.default_rng(1)
    state: dict[str, np.ndarray] = {
        "step": np.array(7, np.int64),
        "m/0": rng.standard_normal((3, 2)),
        "v/0": rng.standard_normal(4).astype(np.float32),
        "ünïcode": np.zeros(0, np.uint8),
    }
    out = decode_state(encode_state(state))
    assert list(out) == list(state)
    for name, arr in state.items():
        assert out[name].dtype == arr.dtype
        np.testing.assert_array_equal(out[name], arr)
    assert decode_state(encode_state({})) == {}


def test_state_refuses_bad_messages() -> None:
    data = encode_state({"a": np.ones(2), "b": np.zeros(1, np.int32)})
    for cut in range(len(data)):
        with pytest.raises(SerdeError):
            decode_state(data[:cut])
    with pytest.raises(SerdeError, match="trailing"):
        decode_state(data + b"x")
    with pytest.raises(SerdeError, match="magic"):
        decode_state(encode_arrays([np.ones(2)]))
    with pytest.raises(SerdeError, match="exceeds the limit"):
        decode_state(data, max_bytes=10)
    duplicate = (
        b"FFS1" + struct.pack("<I", 2) + b"\x01\0a\x01\0a" + encode_arrays([np.ones(1), np.ones(1)])
    )
    with pytest.raises(SerdeError, match="duplicate"):
        decode_state(duplicate)
    bad_utf8 = b"FFS1" + struct.pack("<I", 1) + b"\x01\0\xff" + encode_arrays([np.ones(1)])
    with pytest.raises(SerdeError, match="UTF-8"):
        decode_state(bad_utf8)
    mismatch = b"FFS1" + struct.pack("<I", 1) + b"\x01\0a" + encode_arrays([])
    with pytest.raises(SerdeError, match="1 names but 0 arrays"):
        decode_state(mismatch)
