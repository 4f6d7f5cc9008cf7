"""Secure aggregation primitives: key agreement and derivation, share encryption and
commitments, the AES-CTR PRG, Shamir sharing over GF(2^521 - 1) and fixed-point quantization;
see :mod:`fedfleet.core.secagg`."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from fedfleet.core.secagg.wire import _LABEL, _ZERO_BLOCK, FIELD_PRIME, KEY_BYTES, SHARE_BYTES

# -- Primitives -----------------------------------------------------------------------------------


def _frame(*parts: bytes) -> bytes:
    """Unambiguous concatenation: each part prefixed with its 4-byte big-endian length."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _unframe(data: bytes, count: int) -> list[bytes] | None:
    parts: list[bytes] = []
    pos = 0
    while pos < len(data) and len(parts) < count:
        if pos + 4 > len(data):
            return None
        size = int.from_bytes(data[pos : pos + 4], "big")
        pos += 4
        if pos + size > len(data):
            return None
        parts.append(data[pos : pos + size])
        pos += size
    return parts if len(parts) == count and pos == len(data) else None


def _hkdf(secret: bytes, *info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_frame(*info)).derive(
        secret
    )


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def _agree(private: X25519PrivateKey, public: bytes) -> bytes | None:
    """X25519, or None for a key X25519 refuses (low order: an all-zero shared secret)."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return None


_PROBE_KEY = X25519PrivateKey.generate()


def _usable_key(public: bytes) -> bool:
    return len(public) == KEY_BYTES and _agree(_PROBE_KEY, public) is not None


def _mask_key(shared: bytes, group: bytes, a: str, b: str) -> bytes:
    lo, hi = (a, b) if a < b else (b, a)
    return _hkdf(shared, _LABEL, b"pairwise-mask", group, lo.encode(), hi.encode())


def _self_mask_key(seed: bytes, group: bytes, device: str) -> bytes:
    return _hkdf(seed, _LABEL, b"self-mask", group, device.encode())


def _channel_key(shared: bytes, group: bytes, sender: str, recipient: str) -> bytes:
    return _hkdf(shared, _LABEL, b"share-encryption", group, sender.encode(), recipient.encode())


def _aad(group: bytes, sender: str, recipient: str) -> bytes:
    return _frame(_LABEL, b"share-aad", group, sender.encode(), recipient.encode())


class _Committer:
    """SHA-256 commitments to shares: group || kind || dealer index || holder index || share.

    Roster indices stand for device ids (the roster fixes the mapping for the session); the
    hash state of the group prefix is computed once and copied per share.
    """

    def __init__(self, group: bytes) -> None:
        self._base = hashlib.sha256(_frame(_LABEL, b"commit", group))

    def __call__(self, kind: bytes, dealer: int, holder: int, share: int) -> bytes:
        h = self._base.copy()
        h.update(
            kind
            + dealer.to_bytes(4, "big")
            + holder.to_bytes(4, "big")
            + share.to_bytes(SHARE_BYTES, "big")
        )
        return h.digest()


def _ring_dtype(ring_bits: int) -> np.dtype[np.unsignedinteger[Any]]:
    if ring_bits == 32:
        return np.dtype("<u4")
    if ring_bits == 64:
        return np.dtype("<u8")
    raise ValueError("ring_bits must be 32 or 64")


class _Prg:
    """AES-256-CTR keystream from a zero counter, as ``m`` little-endian ring elements.

    One scratch buffer per instance: the array :meth:`expand` returns is overwritten by the next
    call, so callers fold it in before expanding again.
    """

    def __init__(self, m: int, ring_bits: int) -> None:
        dtype = _ring_dtype(ring_bits)
        self._zeros = bytes(m * dtype.itemsize)
        self._buf = bytearray(len(self._zeros) + 15)
        self._view: NDArray[np.unsignedinteger[Any]] = np.frombuffer(
            self._buf, dtype=dtype, count=m
        )

    def expand(self, key: bytes) -> NDArray[np.unsignedinteger[Any]]:
        enc = Cipher(algorithms.AES(key), modes.CTR(_ZERO_BLOCK)).encryptor()
        enc.update_into(self._zeros, self._buf)
        return self._view


def prg(key: bytes, m: int, ring_bits: int) -> NDArray[np.unsignedinteger[Any]]:
    """``m`` ring elements of AES-256-CTR keystream under ``key`` (a fresh array)."""
    return _Prg(m, ring_bits).expand(key).copy()


def shamir_share(secret: int, threshold: int, xs: Sequence[int]) -> list[int]:
    """Shares of ``secret`` at the points ``xs`` (non-zero, distinct) such that any
    ``threshold`` of them reconstruct it and fewer reveal nothing: a random polynomial of
    degree ``threshold - 1`` over GF(:data:`FIELD_PRIME`) with constant term ``secret``."""
    p = FIELD_PRIME
    if not 0 <= secret < p or threshold < 1:
        raise ValueError("secret must be a field element and threshold positive")
    coeffs = [secrets.randbelow(p) for _ in range(threshold - 1)]
    coeffs.reverse()
    coeffs.append(secret)  # highest degree first, for Horner
    out: list[int] = []
    for x in xs:
        if not 0 < x < p:
            raise ValueError("evaluation points must be non-zero field elements")
        # Reduce only every ``every`` steps: with a small x the accumulator grows by a few bits
        # a step, and an occasional reduction of a ~1000-bit value beats one per step.
        every = max(1, 521 // x.bit_length())
        acc = 0
        left = every
        for c in coeffs:
            acc = acc * x + c
            left -= 1
            if not left:
                acc %= p
                left = every
        out.append(acc % p)
    return out


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Coefficients ``l_i`` with ``f(0) = sum(l_i * f(x_i))`` for any polynomial of degree
    below ``len(xs)``; compute once per holder set and reuse for every secret it shares."""
    p = FIELD_PRIME
    out: list[int] = []
    for i, xi in enumerate(xs):
        num = 1
        den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % p
                den = den * (xj - xi) % p
        out.append(num * pow(den, -1, p) % p)
    return out


def fixed_point_scale(n: int, clip_range: float, ring_bits: int) -> float:
    """``K / clip_range`` with ``K = floor((2^(ring_bits-1) - 1) / n)``: ``n`` clipped inputs
    sum to at most ``2^(ring_bits-1) - 1`` in magnitude, so the signed sum never wraps."""
    return _limit(n, ring_bits) / clip_range


def _limit(n: int, ring_bits: int) -> int:
    limit: int = (2 ** (ring_bits - 1) - 1) // n
    return limit


def quantize(
    x: NDArray[np.floating[Any]] | Sequence[float],
    scale: float,
    ring_bits: int,
    *,
    limit: int | None = None,
) -> NDArray[np.unsignedinteger[Any]]:
    """``round(x * scale)`` as elements of Z_{2^ring_bits} (negatives wrap).

    With ``limit`` the integers are clamped to ``[-limit, limit]`` (float64 rounding near
    ``±clip_range`` can overshoot by a few units in a 64-bit ring); without it a value that
    does not fit a signed ``ring_bits`` integer raises ValueError, as does NaN or infinity.
    """
    dtype = _ring_dtype(ring_bits)
    v = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError("input holds NaN or infinity")
    q = np.rint(v * scale)
    if limit is None:
        if np.any(np.abs(q) >= 2.0 ** (ring_bits - 1)):
            raise ValueError(f"a quantized value does not fit a signed {ring_bits}-bit integer")
        qi = q.astype(np.int64)
    else:
        np.clip(q, -float(limit), float(limit), out=q)
        qi = q.astype(np.int64)
        np.clip(qi, -limit, limit, out=qi)
    return qi.astype(dtype)


def dequantize(
    total: NDArray[np.unsignedinteger[Any]], scale: float, ring_bits: int
) -> NDArray[np.float64]:
    """A ring vector read as signed integers, divided by ``scale``."""
    signed = np.dtype("<i4") if ring_bits == 32 else np.dtype("<i8")
    arr = np.ascontiguousarray(total, dtype=_ring_dtype(ring_bits))
    return arr.view(signed).astype(np.float64) / scale
