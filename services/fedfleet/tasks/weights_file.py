"""The trained model as a file a user loads anywhere: safetensors or ``.npz``, never pickle.

``fedfleet run --out`` and ``fedfleet fetch-model -o`` write the final weights under the task's
names. safetensors (an 8-byte little-endian header length, a JSON header of
``{name: {dtype, shape, data_offsets}}``, then the raw little-endian bytes) is written here with
numpy and json so no extra package is needed; the ``safetensors`` package, PyTorch's
``safetensors.torch.load_file`` and :func:`load_weights` all read it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedfleet.core.serde import decode_state

__all__ = ["WEIGHT_SUFFIXES", "checkpoint_weights", "default_names", "load_weights", "save_weights"]

WEIGHT_SUFFIXES = (".safetensors", ".npz")
"""File suffixes that select a weights format."""

_DTYPES = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "I64": "<i8", "I32": "<i4"}
_CODES = {np.dtype(v).str: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def save_weights(
    path: Path, names: Sequence[str], weights: Sequence[NDArray[Any]], metadata: dict[str, str]
) -> None:
    """Write ``weights`` by ``names`` to ``path`` (format by suffix: safetensors or npz)."""
    if len(names) != len(weights):
        raise ValueError(f"{len(names)} names for {len(weights)} arrays")
    if path.suffix == ".npz":
        with path.open("wb") as fh:
            arrays: dict[str, Any] = dict(zip(names, weights, strict=True))
            np.savez(fh, allow_pickle=False, **arrays)
        return
    if path.suffix != ".safetensors":
        raise ValueError(f"unknown weights format {path.suffix!r}: use .safetensors or .npz")
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    blobs: list[bytes] = []
    offset = 0
    for name, w in zip(names, weights, strict=True):
        arr = np.ascontiguousarray(w, dtype=np.asarray(w).dtype.newbyteorder("<"))
        code = _CODES.get(arr.dtype.str)
        if code is None:
            raise ValueError(f"array {name!r} has dtype {arr.dtype}, not storable")
        blob = arr.tobytes()
        header[name] = {
            "dtype": code,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for blob in blobs:
            fh.write(blob)


def load_weights(path: Path) -> dict[str, NDArray[Any]]:
    """Read a file :func:`save_weights` wrote: arrays by name, in the file's order."""
    data = path.read_bytes()
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if len(data) < 8:
        raise ValueError(f"{path}: too short for safetensors")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(_MAX_HEADER, len(data) - 8):
        raise ValueError(f"{path}: safetensors header of {size} bytes does not fit the file")
    header = json.loads(data[8 : 8 + size])
    body = memoryview(data)[8 + size :]
    out: dict[str, NDArray[Any]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = (int(v) for v in info["data_offsets"])
        if not 0 <= start <= end <= len(body):
            raise ValueError(f"{path}: array {name!r} lies outside the file")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        arr = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"])
        out[name] = arr.astype(dtype.newbyteorder("="))
    return out


def checkpoint_weights(data: bytes) -> list[NDArray[Any]]:
    """The model's arrays of a checkpoint (``w/0..n``; the optimizer state is left out)."""
    named = decode_state(data)
    out: list[NDArray[Any]] = []
    while (arr := named.get(f"w/{len(out)}")) is not None:
        out.append(arr)
    return out


def default_names(count: int) -> list[str]:
    """Names for arrays whose task is unknown (``fetch-model`` without ``--manifest``)."""
    return [f"w.{i}" for i in range(count)]
