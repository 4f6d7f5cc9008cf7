"""Secure aggregation (Bonawitz et al., CCS 2017), honest-but-curious variant, as pure state.

One :class:`SecAggServer` per aggregator group and one :class:`SecAggClient` per device run the
four rounds of the paper's protocol; they exchange the frozen message dataclasses below and
never touch a socket, a clock or a store, so the same code runs embedded, behind HTTP or in
tests. Every message has ``to_dict``/``from_dict`` (JSON-safe: bytes as base64, shares as
fixed-width hex); ``from_dict`` parses untrusted input strictly and bounds every size.

The rounds, with ``U1 ⊇ U2 ⊇ U3`` the devices still present after each:

0. **AdvertiseKeys.** Each device sends two X25519 public keys (:class:`KeyAdvert`): ``c`` to
   encrypt the shares it deals, ``s`` to agree pairwise masks. The server closes the round
   into a :class:`Roster` (``U1`` sorted by device id, threshold ``t``, fixed-point scale).
1. **ShareKeys.** Each device draws a self-mask seed ``b_u`` and ``t``-of-``n`` Shamir-shares
   ``b_u`` and its raw ``s`` private key over GF(2^521 - 1) (evaluation point = 1-based roster
   index). The share pair for ``v`` travels AES-GCM encrypted under
   HKDF(X25519(c_sk_u, c_pk_v)), with group and both ids in the key derivation and the
   associated data; the server only routes it. Beside it go SHA-256 commitments to every
   share (the dealer's own included, bound to group and roster indices), so that the server
   can refuse a wrong revealed share; shares are uniform 521-bit values, so a commitment hides
   its share.
2. **MaskedInputCollection.** Each device of ``U2`` quantizes its clipped vector into
   Z_{2^ring_bits} and sends ``y_u = q_u + PRG(b_u) + sum_v ±PRG(s_uv)`` (``+`` when
   ``u < v``) with ``s_uv`` agreed by X25519 with every other ``v`` in ``U2``. The server folds
   each ``y_u`` into one running sum as it arrives and keeps nothing else of it.
3. **Unmasking.** Each device of ``U3`` reveals its shares of ``b_v`` for the survivors and of
   ``s_sk_v`` for the dropped (``U2 \\ U3``), once. From any ``t`` responders the server
   rebuilds those secrets, removes the self masks of survivors and the dropped devices' pairwise
   masks from the sum, and decodes it: the sum of the ``U3`` devices' clipped inputs.

What keeps an individual input hidden from an honest-but-curious server: a device never reveals
both kinds of share for one device (it unmasks once, for a disjoint survivors/dropped split),
and the server refuses a message carrying the wrong kind, so it never receives an s-share of a
survivor nor a b-share of a dropped device (fewer than ``t`` colluding devices cannot make up
the difference).
``t = floor(threshold_fraction * n) + 1`` with ``threshold_fraction`` in [0.5, 1) is a strict
majority of ``U1``. Active attacks (a server lying about who dropped, a device dealing
inconsistent shares) are out of scope: that is the malicious variant with consistency checks
and signatures, which this module does not implement. A reconstructed ``s`` key is checked
against its advertised public key; a reconstructed ``b`` cannot be checked.

Fixed point: each coordinate is clipped to ``[-clip_range, clip_range]`` and rounded to an
integer of magnitude at most ``K = floor((2^(ring_bits-1) - 1) / n)`` (``scale = K /
clip_range``), so a sum of ``n`` of them never wraps; the decoded sum is within ``n / (2 *
scale)`` of the true sum per coordinate (with ``ring_bits=64`` the float64 conversion, ~1e-16
relative, dominates). Pseudo-random expansion is AES-256-CTR from a zero counter; every AES key
comes out of HKDF-SHA256 with a purpose label, the group and the ids, so no key expands two
different streams (both ends of a pair expand the same mask, which is the point). Device ids
compare as Python strings (code-point order).

Costs for a group of n with vectors of m: each device does O(n) key agreements and O(n * m)
keystream, plus O(n * t) field operations to deal its shares; the server holds O(n^2)
ciphertexts and commitments until round 2 closes and O(m) for the sum, and unmasking costs it
O(t^2 + n * t) field operations plus one keystream per survivor and per (dropped, survivor)
pair: dropouts between rounds 1 and 2 are the expensive case.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

__all__ = [
    "FIELD_PRIME",
    "KEY_BYTES",
    "MAX_CIPHERTEXT_BYTES",
    "MAX_GROUP_SIZE",
    "MAX_ID_BYTES",
    "MAX_VECTOR_LENGTH",
    "REASON_DUPLICATE",
    "REASON_FULL",
    "REASON_KEY",
    "REASON_KIND",
    "REASON_LENGTH",
    "REASON_MALFORMED",
    "REASON_PHASE",
    "REASON_RECIPIENTS",
    "REASON_REPLAYED_KEY",
    "REASON_SHARE",
    "REASON_SHARES",
    "REASON_UNKNOWN",
    "SHARE_BYTES",
    "Inbox",
    "KeyAdvert",
    "MaskedInput",
    "Roster",
    "SecAggAbort",
    "SecAggClient",
    "SecAggError",
    "SecAggFailed",
    "SecAggParams",
    "SecAggRejected",
    "SecAggResult",
    "SecAggServer",
    "ServerPhase",
    "ShareKeys",
    "Survivors",
    "UnmaskShares",
    "dequantize",
    "fixed_point_scale",
    "lagrange_at_zero",
    "prg",
    "quantize",
    "shamir_share",
]

FIELD_PRIME = 2**521 - 1
"""The Mersenne prime of the Shamir field; 32-byte secrets fit with room to spare."""
SHARE_BYTES = 66
"""A field element, big-endian (521 bits)."""
KEY_BYTES = 32
"""An X25519 public or private key, a self-mask seed, an AES-256 key."""
MAX_GROUP_SIZE = 4096
"""Most devices one group may hold; bounds every map a message may carry."""
MAX_ID_BYTES = 256
"""Longest device id, in UTF-8 bytes."""
MAX_VECTOR_LENGTH = 1 << 27
"""Longest vector (m); a 64-bit masked input of this length is 1 GiB."""
_NONCE_BYTES = 12
_TAG_BYTES = 16
MAX_CIPHERTEXT_BYTES = _NONCE_BYTES + _TAG_BYTES + 16 + 2 * MAX_ID_BYTES + 2 * SHARE_BYTES
"""Largest share ciphertext: nonce, tag, the framed ids and the two shares."""
_COMMIT_BYTES = 32
_PAIR_COMMIT_BYTES = 2 * _COMMIT_BYTES

REASON_MALFORMED = "malformed"
"""Not a well-formed message (types, lengths, encodings, bounds)."""
REASON_PHASE = "phase"
"""The server is not in the round this message belongs to."""
REASON_UNKNOWN = "unknown"
"""The sender (or a device named in the message) is not a member of the current round."""
REASON_DUPLICATE = "duplicate"
"""The sender already sent this round's message."""
REASON_REPLAYED_KEY = "replayed_key"
"""A public key already advertised in this group (by anyone), or ``c`` equal to ``s``."""
REASON_KEY = "key"
"""A public key X25519 refuses (a low-order point)."""
REASON_FULL = "full"
"""The group already holds :data:`MAX_GROUP_SIZE` devices."""
REASON_RECIPIENTS = "recipients"
"""A ShareKeys whose recipients are not exactly the other roster members."""
REASON_LENGTH = "length"
"""A masked input whose length is not ``vector_length * ring_bits / 8`` bytes."""
REASON_KIND = "kind"
"""An unmask response with a b-share of a dropped device or an s-share of a survivor."""
REASON_SHARES = "shares"
"""An unmask response that does not cover exactly the survivors and the dropped."""
REASON_SHARE = "bad_share"
"""A revealed share that does not match its dealer's commitment."""

_LABEL = b"fedfleet/secagg/v1"
_ZERO_BLOCK = bytes(16)


# -- Errors ---------------------------------------------------------------------------------------


class SecAggError(Exception):
    """Base of every secure-aggregation error; ``reason`` is a short code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SecAggRejected(SecAggError):
    """A malformed, forged, duplicate or out-of-phase message; the server state is unchanged."""


class SecAggFailed(SecAggError):
    """The group cannot finish; the server moved to ``failed`` and holds nothing usable.
    ``reason``: ``too_few`` (a round closed, or finish was called, below the threshold) or
    ``reconstruct`` (a secret rebuilt from the shares does not fit or does not match its
    advertised public key: a dealer was dishonest)."""


class SecAggAbort(SecAggError):
    """The client refuses to continue; it is dead afterwards and refuses every further call.
    ``reason``: ``roster``, ``inbox``, ``ciphertext``, ``survivors`` (that message failed a
    check), ``order`` / ``replay`` (a round asked out of order or a second time) or ``aborted``
    (a call after an abort)."""


# -- Parameters -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SecAggParams:
    """What the server and every client of one group must agree on before round 0."""

    group_id: str
    """E.g. ``ns/job/a17/aggregator-0``; bound into every key derivation and associated data."""
    vector_length: int
    """m, the number of ring elements each device contributes."""
    min_group_size: int = 2
    """k: the roster must hold at least ``max(k, 2)`` devices."""
    threshold_fraction: float = 0.5
    """t = floor(fraction * |U1|) + 1; in [0.5, 1), so t is a strict majority of U1."""
    clip_range: float = 1.0
    ring_bits: int = 32
    """32 or 64."""

    def __post_init__(self) -> None:
        if not isinstance(self.group_id, str) or not self.group_id:
            raise ValueError("group_id must be a non-empty string")
        if len(self.group_id.encode()) > MAX_ID_BYTES:
            raise ValueError(f"group_id longer than {MAX_ID_BYTES} bytes")
        if not 1 <= self.vector_length <= MAX_VECTOR_LENGTH:
            raise ValueError(f"vector_length must be in [1, {MAX_VECTOR_LENGTH}]")
        if not 1 <= self.min_group_size <= MAX_GROUP_SIZE:
            raise ValueError(f"min_group_size must be in [1, {MAX_GROUP_SIZE}]")
        if not 0.5 <= self.threshold_fraction < 1.0:
            raise ValueError("threshold_fraction must be in [0.5, 1)")
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError("clip_range must be finite and positive")
        if self.ring_bits not in (32, 64):
            raise ValueError("ring_bits must be 32 or 64")

    @property
    def ring_bytes(self) -> int:
        return self.ring_bits // 8

    @property
    def masked_bytes(self) -> int:
        """Exact size of a masked input."""
        return self.vector_length * self.ring_bytes

    def threshold(self, n: int) -> int:
        """Shares needed to reconstruct in a roster of ``n``: floor(fraction * n) + 1."""
        return math.floor(self.threshold_fraction * n) + 1

    def minimum(self) -> int:
        """Smallest roster (and smallest U2, U3) the group accepts at all."""
        return max(self.min_group_size, 2)


# -- Messages -------------------------------------------------------------------------------------


def _malformed(message: str) -> SecAggRejected:
    return SecAggRejected(REASON_MALFORMED, message)


def _fields(d: Any, name: str, keys: Iterable[str]) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise _malformed(f"{name}: not an object")
    want = set(keys)
    if set(d) != want:
        raise _malformed(f"{name}: fields {sorted(map(str, d))}, want {sorted(want)}")
    return d


def _check_id(v: Any, what: str) -> str:
    if type(v) is str and 0 < len(v) <= MAX_ID_BYTES and v.isascii():
        return v  # the common case, checked cheaply (maps of ids are parsed per entry)
    if not isinstance(v, str) or not v:
        raise _malformed(f"{what}: not a non-empty string")
    try:
        raw = v.encode()
    except UnicodeEncodeError:
        raise _malformed(f"{what}: not encodable as UTF-8") from None
    if len(raw) > MAX_ID_BYTES:
        raise _malformed(f"{what}: longer than {MAX_ID_BYTES} bytes")
    return v


def _check_ids(v: Any, what: str) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) > MAX_GROUP_SIZE:
        raise _malformed(f"{what}: not a list of at most {MAX_GROUP_SIZE} ids")
    ids = tuple(_check_id(x, what) for x in v)
    if len(set(ids)) != len(ids):
        raise _malformed(f"{what}: duplicate ids")
    return ids


def _b64(v: Any, what: str, *, exact: int | None = None, most: int | None = None) -> bytes:
    limit = exact if exact is not None else most
    assert limit is not None
    if not isinstance(v, str) or len(v) > 4 * ((limit + 2) // 3):
        raise _malformed(f"{what}: not a base64 string of at most {limit} bytes")
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise _malformed(f"{what}: not base64") from None
    if exact is not None and len(raw) != exact:
        raise _malformed(f"{what}: {len(raw)} bytes, want {exact}")
    if len(raw) > limit:
        raise _malformed(f"{what}: longer than {limit} bytes")
    return raw


def _enc(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _malformed(f"{what}: not an integer in [{lo}, {hi}]")
    return v


def _float(v: Any, what: str) -> float:
    if type(v) not in (int, float) or not math.isfinite(v) or v <= 0:
        raise _malformed(f"{what}: not a finite positive number")
    return float(v)


def _map(v: Any, what: str) -> dict[Any, Any]:
    if not isinstance(v, dict) or len(v) > MAX_GROUP_SIZE:
        raise _malformed(f"{what}: not an object of at most {MAX_GROUP_SIZE} entries")
    return v


def _share_hex(value: int) -> str:
    return value.to_bytes(SHARE_BYTES, "big").hex()


def _parse_share(v: Any, what: str) -> int:
    if not isinstance(v, str) or len(v) != 2 * SHARE_BYTES:
        raise _malformed(f"{what}: not {2 * SHARE_BYTES} hex digits")
    try:
        raw = bytes.fromhex(v)
    except ValueError:
        raise _malformed(f"{what}: not hex") from None
    if len(raw) != SHARE_BYTES:
        raise _malformed(f"{what}: not {2 * SHARE_BYTES} hex digits")
    value = int.from_bytes(raw, "big")
    if value >= FIELD_PRIME:
        raise _malformed(f"{what}: not a field element")
    return value


@dataclass(frozen=True, slots=True)
class KeyAdvert:
    """Round 0, device to server: the device's two X25519 public keys (32 raw bytes each)."""

    device_id: str
    c_pk: bytes
    """Encryption key: shares dealt to this device are encrypted under keys agreed with it."""
    s_pk: bytes
    """Masking key: pairwise masks are agreed with it."""

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "c_pk": _enc(self.c_pk), "s_pk": _enc(self.s_pk)}

    @classmethod
    def from_dict(cls, d: Any) -> KeyAdvert:
        d = _fields(d, "KeyAdvert", ("device_id", "c_pk", "s_pk"))
        return cls(
            device_id=_check_id(d["device_id"], "device_id"),
            c_pk=_b64(d["c_pk"], "c_pk", exact=KEY_BYTES),
            s_pk=_b64(d["s_pk"], "s_pk", exact=KEY_BYTES),
        )


@dataclass(frozen=True, slots=True)
class Roster:
    """End of round 0, server to every device: U1 with its keys, the threshold, the encoding."""

    group_id: str
    devices: tuple[tuple[str, bytes, bytes], ...]
    """U1 as ``(device_id, c_pk, s_pk)``, sorted by device id; a device's Shamir evaluation
    point is its 1-based index here."""
    threshold: int
    vector_length: int
    ring_bits: int
    clip_range: float
    scale: float
    """Fixed-point scale, :func:`fixed_point_scale` of ``len(devices)``."""

    @property
    def device_ids(self) -> tuple[str, ...]:
        return tuple(d[0] for d in self.devices)

    def adverts(self) -> tuple[KeyAdvert, ...]:
        return tuple(KeyAdvert(d, c, s) for d, c, s in self.devices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "group_id": self.group_id,
            "devices": [[d, _enc(c), _enc(s)] for d, c, s in self.devices],
            "threshold": self.threshold,
            "vector_length": self.vector_length,
            "ring_bits": self.ring_bits,
            "clip_range": self.clip_range,
            "scale": self.scale,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Roster:
        d = _fields(
            d,
            "Roster",
            (
                "group_id",
                "devices",
                "threshold",
                "vector_length",
                "ring_bits",
                "clip_range",
                "scale",
            ),
        )
        entries = d["devices"]
        if not isinstance(entries, list) or len(entries) > MAX_GROUP_SIZE:
            raise _malformed(f"devices: not a list of at most {MAX_GROUP_SIZE} entries")
        devices: list[tuple[str, bytes, bytes]] = []
        for e in entries:
            if not isinstance(e, list) or len(e) != 3:
                raise _malformed("devices: an entry is not [device_id, c_pk, s_pk]")
            devices.append(
                (
                    _check_id(e[0], "device_id"),
                    _b64(e[1], "c_pk", exact=KEY_BYTES),
                    _b64(e[2], "s_pk", exact=KEY_BYTES),
                )
            )
        ring_bits = _int(d["ring_bits"], "ring_bits", 32, 64)
        if ring_bits not in (32, 64):
            raise _malformed("ring_bits: not 32 or 64")
        return cls(
            group_id=_check_id(d["group_id"], "group_id"),
            devices=tuple(devices),
            threshold=_int(d["threshold"], "threshold", 1, MAX_GROUP_SIZE),
            vector_length=_int(d["vector_length"], "vector_length", 1, MAX_VECTOR_LENGTH),
            ring_bits=ring_bits,
            clip_range=_float(d["clip_range"], "clip_range"),
            scale=_float(d["scale"], "scale"),
        )


@dataclass(frozen=True, slots=True)
class ShareKeys:
    """Round 1, device to server: encrypted share pairs for the other members, commitments
    to all of the dealer's shares (its own included)."""

    sender: str
    ciphertexts: Mapping[str, bytes]
    """Recipient -> nonce || AES-GCM(ciphertext || tag); exactly U1 minus the sender."""
    commitments: Mapping[str, bytes]
    """Holder -> SHA-256 commitment to its b-share || to its s-share (64 bytes); exactly U1."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "sender": self.sender,
            "ciphertexts": {k: _enc(v) for k, v in self.ciphertexts.items()},
            "commitments": {k: _enc(v) for k, v in self.commitments.items()},
        }

    @classmethod
    def from_dict(cls, d: Any) -> ShareKeys:
        d = _fields(d, "ShareKeys", ("sender", "ciphertexts", "commitments"))
        cts = _map(d["ciphertexts"], "ciphertexts")
        coms = _map(d["commitments"], "commitments")
        return cls(
            sender=_check_id(d["sender"], "sender"),
            ciphertexts={
                _check_id(k, "recipient"): _b64(v, "ciphertext", most=MAX_CIPHERTEXT_BYTES)
                for k, v in cts.items()
            },
            commitments={
                _check_id(k, "holder"): _b64(v, "commitment", exact=_PAIR_COMMIT_BYTES)
                for k, v in coms.items()
            },
        )


@dataclass(frozen=True, slots=True)
class Inbox:
    """End of round 1, server to each device of U2: U2 and the share ciphertexts dealt to it."""

    recipient: str
    members: tuple[str, ...]
    """U2, sorted: the devices whose shares were routed; each masks with all the others."""
    ciphertexts: Mapping[str, bytes]
    """Dealer -> ciphertext, for every dealer of U2 but the recipient."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipient": self.recipient,
            "members": list(self.members),
            "ciphertexts": {k: _enc(v) for k, v in self.ciphertexts.items()},
        }

    @classmethod
    def from_dict(cls, d: Any) -> Inbox:
        d = _fields(d, "Inbox", ("recipient", "members", "ciphertexts"))
        cts = _map(d["ciphertexts"], "ciphertexts")
        return cls(
            recipient=_check_id(d["recipient"], "recipient"),
            members=_check_ids(d["members"], "members"),
            ciphertexts={
                _check_id(k, "dealer"): _b64(v, "ciphertext", most=MAX_CIPHERTEXT_BYTES)
                for k, v in cts.items()
            },
        )


@dataclass(frozen=True, slots=True)
class MaskedInput:
    """Round 2, device to server: the masked vector as raw little-endian ring elements.

    ``data`` is meant to travel as a raw request body; ``to_dict`` (base64) is there for
    transports that only carry JSON.
    """

    device_id: str
    data: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "data": _enc(self.data)}

    @classmethod
    def from_dict(cls, d: Any, *, max_bytes: int = MAX_VECTOR_LENGTH * 8) -> MaskedInput:
        d = _fields(d, "MaskedInput", ("device_id", "data"))
        return cls(
            device_id=_check_id(d["device_id"], "device_id"),
            data=_b64(d["data"], "data", most=max_bytes),
        )


@dataclass(frozen=True, slots=True)
class Survivors:
    """End of round 2, server to each device of U3: who is in the sum and who dropped."""

    survivors: tuple[str, ...]
    """U3, sorted: the b-shares of these are revealed."""
    dropped: tuple[str, ...]
    """U2 minus U3, sorted: the s-shares of these are revealed."""

    def to_dict(self) -> dict[str, Any]:
        return {"survivors": list(self.survivors), "dropped": list(self.dropped)}

    @classmethod
    def from_dict(cls, d: Any) -> Survivors:
        d = _fields(d, "Survivors", ("survivors", "dropped"))
        return cls(
            survivors=_check_ids(d["survivors"], "survivors"),
            dropped=_check_ids(d["dropped"], "dropped"),
        )


@dataclass(frozen=True, slots=True)
class UnmaskShares:
    """Round 3, device to server: the shares it holds of survivors' b and dropped devices' s."""

    device_id: str
    b_shares: Mapping[str, int]
    """Survivor -> this device's share of its self-mask seed (the device's own included)."""
    s_shares: Mapping[str, int]
    """Dropped device -> this device's share of its s private key."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "b_shares": {k: _share_hex(v) for k, v in self.b_shares.items()},
            "s_shares": {k: _share_hex(v) for k, v in self.s_shares.items()},
        }

    @classmethod
    def from_dict(cls, d: Any) -> UnmaskShares:
        d = _fields(d, "UnmaskShares", ("device_id", "b_shares", "s_shares"))
        b = _map(d["b_shares"], "b_shares")
        s = _map(d["s_shares"], "s_shares")
        if len(b) + len(s) > MAX_GROUP_SIZE:
            raise _malformed(f"more than {MAX_GROUP_SIZE} shares")
        return cls(
            device_id=_check_id(d["device_id"], "device_id"),
            b_shares={_check_id(k, "dealer"): _parse_share(v, "b_share") for k, v in b.items()},
            s_shares={_check_id(k, "dealer"): _parse_share(v, "s_share") for k, v in s.items()},
        )


@dataclass(frozen=True, slots=True)
class SecAggResult:
    """The unmasked sum of the survivors' (clipped, fixed-point) inputs."""

    total: NDArray[np.float64]
    survivors: tuple[str, ...]
    """U3: whose inputs are in ``total``."""
    dropped: tuple[str, ...]
    """U2 minus U3: sent shares but no input in the sum (their masks were removed)."""


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


# -- Client ---------------------------------------------------------------------------------------


class SecAggClient:
    """One device's side of one group. Call :meth:`advertise`, :meth:`share_keys`,
    :meth:`masked_input`, :meth:`unmask` in order, each at most once (``advertise`` is
    idempotent); anything unsafe raises :class:`SecAggAbort` and ends the client."""

    def __init__(self, params: SecAggParams, device_id: str) -> None:
        _check_id(device_id, "device_id")
        self._params = params
        self._id = device_id
        self._group = params.group_id.encode()
        self._c_sk = X25519PrivateKey.generate()
        self._s_sk = X25519PrivateKey.generate()
        self._advert = KeyAdvert(device_id, _raw_public(self._c_sk), _raw_public(self._s_sk))
        self._stage = 0
        self._aborted = False
        self._roster: Roster | None = None
        self._keys: dict[str, KeyAdvert] = {}
        self._threshold = 0
        self._scale = 0.0
        self._limit = 0
        self._b_seed = b""
        self._recv_keys: dict[str, bytes] = {}
        self._b_held: dict[str, int] = {}
        self._s_held: dict[str, int] = {}
        self._u2: frozenset[str] = frozenset()

    @property
    def device_id(self) -> str:
        return self._id

    def _abort(self, reason: str, message: str) -> SecAggAbort:
        self._aborted = True
        self._recv_keys.clear()
        self._b_held.clear()
        self._s_held.clear()
        return SecAggAbort(reason, f"{self._id}: {message}")

    def _enter(self, stage: int) -> None:
        if self._aborted:
            raise SecAggAbort("aborted", f"{self._id}: the client aborted earlier")
        if self._stage != stage:
            reason = "replay" if self._stage > stage else "order"
            raise self._abort(reason, f"round {stage} asked at stage {self._stage}")

    def advertise(self) -> KeyAdvert:
        """Round 0: the public keys (the same message every call)."""
        if self._aborted:
            raise SecAggAbort("aborted", f"{self._id}: the client aborted earlier")
        return self._advert

    def share_keys(self, roster: Roster) -> ShareKeys:
        """Round 1: check the roster, deal shares of ``b_u`` and ``s_sk_u`` to every member."""
        self._enter(0)
        p = self._params
        ids = roster.device_ids
        n = len(ids)
        t = roster.threshold
        problem = None
        if roster.group_id != p.group_id:
            problem = f"roster of group {roster.group_id!r}"
        elif (roster.vector_length, roster.ring_bits, roster.clip_range) != (
            p.vector_length,
            p.ring_bits,
            p.clip_range,
        ):
            problem = "roster encoding differs from the parameters"
        elif list(ids) != sorted(set(ids)):
            problem = "roster ids not sorted or not distinct"
        elif n < p.minimum() or n > MAX_GROUP_SIZE:
            problem = f"roster of {n} devices (minimum {p.minimum()})"
        elif t != p.threshold(n) or not n // 2 < t <= n:
            problem = f"threshold {t} for {n} devices"
        elif roster.scale != fixed_point_scale(n, p.clip_range, p.ring_bits):
            problem = "roster scale differs from the parameters"
        elif (self._id, self._advert.c_pk, self._advert.s_pk) not in roster.devices:
            problem = "this device is not in the roster with its own keys"
        else:
            keys = [d[1] for d in roster.devices] + [d[2] for d in roster.devices]
            if len(set(keys)) != len(keys):
                problem = "a public key appears twice in the roster (replayed key)"
        if problem is not None:
            raise self._abort("roster", problem)

        me = self._id
        xs = range(1, n + 1)
        self._b_seed = secrets.token_bytes(KEY_BYTES)
        b_shares = shamir_share(int.from_bytes(self._b_seed, "big"), t, xs)
        s_shares = shamir_share(int.from_bytes(_raw_private(self._s_sk), "big"), t, xs)
        ciphertexts: dict[str, bytes] = {}
        commitments: dict[str, bytes] = {}
        recv_keys: dict[str, bytes] = {}
        group = self._group
        adverts = roster.adverts()
        commit = _Committer(group)
        mine = ids.index(me) + 1
        for holder, (member, sb, ss) in enumerate(
            zip(adverts, b_shares, s_shares, strict=True), start=1
        ):
            v = member.device_id
            commitments[v] = commit(b"b", mine, holder, sb) + commit(b"s", mine, holder, ss)
            if v == me:
                self._b_held[me] = sb
                self._s_held[me] = ss
                continue
            shared = _agree(self._c_sk, member.c_pk)
            if shared is None:
                raise self._abort("roster", f"X25519 refuses the c key of {v!r}")
            recv_keys[v] = _channel_key(shared, group, v, me)
            nonce = os.urandom(_NONCE_BYTES)
            plain = _frame(
                me.encode(),
                v.encode(),
                sb.to_bytes(SHARE_BYTES, "big"),
                ss.to_bytes(SHARE_BYTES, "big"),
            )
            sealed = AESGCM(_channel_key(shared, group, me, v)).encrypt(
                nonce, plain, _aad(group, me, v)
            )
            ciphertexts[v] = nonce + sealed
        self._roster = roster
        self._keys = {m.device_id: m for m in adverts}
        self._threshold = t
        self._scale = roster.scale
        self._limit = _limit(n, p.ring_bits)
        self._recv_keys = recv_keys
        self._stage = 1
        return ShareKeys(sender=me, ciphertexts=ciphertexts, commitments=commitments)

    def masked_input(self, inbox: Inbox, vector: NDArray[np.floating[Any]]) -> MaskedInput:
        """Round 2: decrypt the shares dealt to this device, then mask the quantized vector.

        ``vector`` (length ``vector_length``, finite) is clipped to ``±clip_range``; a bad
        vector raises ValueError and leaves the client able to retry.
        """
        self._enter(1)
        p = self._params
        x = np.array(vector, dtype=np.float64)  # a copy: clipped in place below
        if x.shape != (p.vector_length,):
            raise ValueError(f"vector of shape {x.shape}, want ({p.vector_length},)")
        if not np.all(np.isfinite(x)):
            raise ValueError("vector holds NaN or infinity")
        me = self._id
        u2 = frozenset(inbox.members)
        problem = None
        if inbox.recipient != me:
            problem = f"inbox addressed to {inbox.recipient!r}"
        elif len(u2) != len(inbox.members) or not u2 <= self._keys.keys():
            problem = "U2 has duplicates or devices outside the roster"
        elif me not in u2:
            problem = "this device is not in U2"
        elif len(u2) < max(self._threshold, p.minimum()):
            problem = f"U2 of {len(u2)} is below the threshold {self._threshold}"
        elif inbox.ciphertexts.keys() != u2 - {me}:
            problem = "the inbox does not hold exactly one ciphertext per other member of U2"
        if problem is not None:
            raise self._abort("inbox", problem)

        group = self._group
        for v, blob in inbox.ciphertexts.items():
            if len(blob) < _NONCE_BYTES + _TAG_BYTES:
                raise self._abort("ciphertext", f"ciphertext from {v!r} too short")
            try:
                plain = AESGCM(self._recv_keys[v]).decrypt(
                    blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], _aad(group, v, me)
                )
            except InvalidTag:
                raise self._abort(
                    "ciphertext", f"ciphertext from {v!r} fails authentication"
                ) from None
            parts = _unframe(plain, 4)
            if (
                parts is None
                or parts[0] != v.encode()
                or parts[1] != me.encode()
                or len(parts[2]) != SHARE_BYTES
                or len(parts[3]) != SHARE_BYTES
            ):
                raise self._abort("ciphertext", f"ciphertext from {v!r} carries the wrong ids")
            sb = int.from_bytes(parts[2], "big")
            ss = int.from_bytes(parts[3], "big")
            if sb >= FIELD_PRIME or ss >= FIELD_PRIME:
                raise self._abort("ciphertext", f"share from {v!r} is not a field element")
            self._b_held[v] = sb
            self._s_held[v] = ss

        np.clip(x, -p.clip_range, p.clip_range, out=x)
        y = quantize(x, self._scale, p.ring_bits, limit=self._limit)
        gen = _Prg(p.vector_length, p.ring_bits)
        y += gen.expand(_self_mask_key(self._b_seed, group, me))
        for v in sorted(u2):
            if v == me:
                continue
            shared = _agree(self._s_sk, self._keys[v].s_pk)
            if shared is None:
                raise self._abort("roster", f"X25519 refuses the s key of {v!r}")
            mask = gen.expand(_mask_key(shared, group, me, v))
            if me < v:
                y += mask
            else:
                y -= mask
        self._u2 = u2
        self._recv_keys.clear()
        self._stage = 2
        return MaskedInput(device_id=me, data=y.tobytes())

    def unmask(self, survivors: Survivors) -> UnmaskShares:
        """Round 3, once: b-shares of the survivors, s-shares of the dropped."""
        self._enter(2)
        u3 = frozenset(survivors.survivors)
        dropped = frozenset(survivors.dropped)
        problem = None
        if len(u3) != len(survivors.survivors) or len(dropped) != len(survivors.dropped):
            problem = "survivors or dropped hold duplicates"
        elif not u3 <= self._u2:
            problem = "survivors outside U2"
        elif self._id not in u3:
            problem = "this device is not among the survivors"
        elif len(u3) < max(self._threshold, self._params.minimum()):
            problem = f"{len(u3)} survivors, below the threshold {self._threshold}"
        elif dropped != self._u2 - u3:
            problem = "dropped is not U2 minus the survivors"
        if problem is not None:
            raise self._abort("survivors", problem)
        msg = UnmaskShares(
            device_id=self._id,
            b_shares={v: self._b_held[v] for v in sorted(u3)},
            s_shares={v: self._s_held[v] for v in sorted(dropped)},
        )
        self._stage = 3
        self._b_held.clear()
        self._s_held.clear()
        return msg


# -- Server ---------------------------------------------------------------------------------------


class ServerPhase(StrEnum):
    advertise = "advertise"
    """Collecting key adverts (round 0)."""
    share = "share"
    """Collecting encrypted shares from U1 (round 1)."""
    collect = "collect"
    """Collecting masked inputs from U2 (round 2)."""
    unmask = "unmask"
    """Collecting unmask shares from U3 (round 3)."""
    done = "done"
    failed = "failed"


@dataclass(slots=True)
class _Unmasked:
    b: dict[str, int] = field(default_factory=dict)
    s: dict[str, int] = field(default_factory=dict)


class SecAggServer:
    """The server side of one group: routes shares, sums masked inputs, unmasks the sum.

    ``receive_*`` raise :class:`SecAggRejected` and change nothing when refusing a message;
    ``close_*`` and :meth:`finish` end a round (RuntimeError in the wrong phase) and raise
    :class:`SecAggFailed`, moving to ``failed``, when too few devices are left. The server never
    stores a masked input: each is added into one running sum and dropped.
    """

    def __init__(self, params: SecAggParams) -> None:
        self._params = params
        self._group = params.group_id.encode()
        self._commit = _Committer(self._group)
        self._phase = ServerPhase.advertise
        self._adverts: dict[str, KeyAdvert] = {}
        self._seen_keys: set[bytes] = set()
        self._roster: Roster | None = None
        self._index: dict[str, int] = {}
        self._commitments: dict[str, bytes] = {}
        self._shared: set[str] = set()
        """Senders of an accepted ShareKeys: U2 once the round closes."""
        self._inboxes: dict[str, dict[str, bytes]] = {}
        """Recipient -> dealer -> ciphertext, filled as ShareKeys arrive (each inbox is then
        ready to hand out as is, instead of gathered from n dealers' messages per request)."""
        self._u2: tuple[str, ...] = ()
        self._total: NDArray[np.unsignedinteger[Any]] | None = None
        self._collected: set[str] = set()
        self._survivors: Survivors | None = None
        self._unmasked: dict[str, _Unmasked] = {}
        self._result: SecAggResult | None = None

    # -- state ----------------------------------------------------------------------------------

    @property
    def phase(self) -> ServerPhase:
        return self._phase

    @property
    def params(self) -> SecAggParams:
        return self._params

    def members(self) -> frozenset[str]:
        """Who may send in the current phase: advertisers so far, then U1, U2, U3."""
        ph = self._phase
        if ph is ServerPhase.advertise:
            return frozenset(self._adverts)
        if ph is ServerPhase.share and self._roster is not None:
            return frozenset(self._roster.device_ids)
        if ph is ServerPhase.collect:
            return frozenset(self._u2)
        if self._survivors is not None and ph in (ServerPhase.unmask, ServerPhase.done):
            return frozenset(self._survivors.survivors)
        return frozenset()

    def received(self) -> int:
        """Messages accepted in the current phase."""
        ph = self._phase
        if ph is ServerPhase.advertise:
            return len(self._adverts)
        if ph is ServerPhase.share:
            return len(self._shared)
        if ph is ServerPhase.collect:
            return len(self._collected)
        if ph is ServerPhase.unmask:
            return len(self._unmasked)
        return 0

    def pending(self) -> int:
        """Members of the current phase that have not answered yet. Always 0 while
        advertising: the server does not know who was invited; the caller closes that round."""
        if self._phase in (ServerPhase.share, ServerPhase.collect, ServerPhase.unmask):
            return len(self.members()) - self.received()
        return 0

    def roster(self) -> Roster | None:
        return self._roster

    def survivors(self) -> Survivors | None:
        return self._survivors

    def result(self) -> SecAggResult | None:
        return self._result

    def _expect(self, phase: ServerPhase, what: str) -> None:
        if self._phase is not phase:
            raise SecAggRejected(REASON_PHASE, f"{what} in phase {self._phase}, want {phase}")

    def _close(self, phase: ServerPhase, what: str) -> None:
        if self._phase is not phase:
            raise RuntimeError(f"{what} in phase {self._phase}, want {phase}")

    def _fail(self, message: str, reason: str = "too_few") -> SecAggFailed:
        self._phase = ServerPhase.failed
        self._inboxes.clear()
        self._commitments.clear()
        self._unmasked.clear()
        self._total = None
        return SecAggFailed(reason, f"{self._params.group_id}: {message}")

    # -- round 0 --------------------------------------------------------------------------------

    def receive_advert(self, msg: KeyAdvert) -> None:
        self._expect(ServerPhase.advertise, "KeyAdvert")
        if msg.device_id in self._adverts:
            raise SecAggRejected(REASON_DUPLICATE, f"{msg.device_id!r} already advertised")
        if len(self._adverts) >= MAX_GROUP_SIZE:
            raise SecAggRejected(REASON_FULL, f"the group holds {MAX_GROUP_SIZE} devices")
        if msg.c_pk == msg.s_pk or msg.c_pk in self._seen_keys or msg.s_pk in self._seen_keys:
            raise SecAggRejected(
                REASON_REPLAYED_KEY, f"{msg.device_id!r} advertised a key already in the group"
            )
        if not (_usable_key(msg.c_pk) and _usable_key(msg.s_pk)):
            raise SecAggRejected(REASON_KEY, f"{msg.device_id!r} advertised a low-order key")
        self._adverts[msg.device_id] = msg
        self._seen_keys.update((msg.c_pk, msg.s_pk))

    def close_advertise(self) -> Roster:
        """U1 = the advertisers; fails below ``max(min_group_size, 2)``."""
        self._close(ServerPhase.advertise, "close_advertise")
        p = self._params
        n = len(self._adverts)
        if n < p.minimum() or n < p.threshold(n):
            raise self._fail(f"{n} devices advertised keys, minimum {p.minimum()}")
        members = tuple(self._adverts[d] for d in sorted(self._adverts))
        devices = tuple((m.device_id, m.c_pk, m.s_pk) for m in members)
        self._roster = Roster(
            group_id=p.group_id,
            devices=devices,
            threshold=p.threshold(n),
            vector_length=p.vector_length,
            ring_bits=p.ring_bits,
            clip_range=p.clip_range,
            scale=fixed_point_scale(n, p.clip_range, p.ring_bits),
        )
        self._index = {m.device_id: i for i, m in enumerate(members, start=1)}
        self._inboxes = {m.device_id: {} for m in members}
        self._adverts.clear()
        self._seen_keys.clear()
        self._phase = ServerPhase.share
        return self._roster

    # -- round 1 --------------------------------------------------------------------------------

    def receive_shares(self, msg: ShareKeys) -> None:
        self._expect(ServerPhase.share, "ShareKeys")
        u = msg.sender
        if u not in self._index:
            raise SecAggRejected(REASON_UNKNOWN, f"{u!r} is not in the roster")
        if u in self._shared:
            raise SecAggRejected(REASON_DUPLICATE, f"{u!r} already shared its keys")
        if len(msg.ciphertexts) != len(self._index) - 1 or u in msg.ciphertexts:
            raise SecAggRejected(REASON_RECIPIENTS, f"{u!r}: recipients are not U1 minus it")
        if len(msg.commitments) != len(self._index):
            raise SecAggRejected(REASON_RECIPIENTS, f"{u!r}: commitments do not cover U1")
        index = self._index
        blob = bytearray(len(index) * _PAIR_COMMIT_BYTES)
        for holder, com in msg.commitments.items():
            i = index.get(holder)
            if i is None or len(com) != _PAIR_COMMIT_BYTES:
                raise SecAggRejected(REASON_RECIPIENTS, f"{u!r}: commitment for {holder!r}")
            blob[(i - 1) * _PAIR_COMMIT_BYTES : i * _PAIR_COMMIT_BYTES] = com
        for v, ct in msg.ciphertexts.items():
            if v not in index:
                raise SecAggRejected(REASON_RECIPIENTS, f"{u!r}: ciphertext for {v!r}")
            if not _NONCE_BYTES + _TAG_BYTES < len(ct) <= MAX_CIPHERTEXT_BYTES:
                raise SecAggRejected(REASON_MALFORMED, f"{u!r}: ciphertext for {v!r} size")
        inboxes = self._inboxes
        for v, ct in msg.ciphertexts.items():
            inboxes[v][u] = ct
        self._shared.add(u)
        self._commitments[u] = bytes(blob)

    def close_share(self) -> None:
        """U2 = the devices that shared their keys; fails below the threshold."""
        self._close(ServerPhase.share, "close_share")
        assert self._roster is not None
        n2 = len(self._shared)
        need = max(self._roster.threshold, self._params.minimum())
        if n2 < need:
            raise self._fail(f"{n2} devices shared keys, threshold {need}")
        self._u2 = tuple(sorted(self._shared))
        missing = [v for v in self._roster.device_ids if v not in self._shared]
        for v in missing:  # U1 \ U2 neither receives nor deals shares from here on
            del self._inboxes[v]
        for inbox in self._inboxes.values():
            for v in missing:
                inbox.pop(v, None)
        self._total = np.zeros(
            self._params.vector_length, dtype=_ring_dtype(self._params.ring_bits)
        )
        self._phase = ServerPhase.collect

    def inbox(self, device_id: str) -> Inbox:
        """Round 2's input for one device of U2 (only while collecting)."""
        self._expect(ServerPhase.collect, "inbox")
        ciphertexts = self._inboxes.get(device_id)
        if ciphertexts is None:
            raise SecAggRejected(REASON_UNKNOWN, f"{device_id!r} is not in U2")
        return Inbox(
            recipient=device_id, members=self._u2, ciphertexts=MappingProxyType(ciphertexts)
        )

    # -- round 2 --------------------------------------------------------------------------------

    def receive_masked(self, msg: MaskedInput) -> None:
        self._expect(ServerPhase.collect, "MaskedInput")
        u = msg.device_id
        if u not in self._inboxes:
            raise SecAggRejected(REASON_UNKNOWN, f"{u!r} is not in U2")
        if u in self._collected:
            raise SecAggRejected(REASON_DUPLICATE, f"{u!r} already sent its masked input")
        p = self._params
        if len(msg.data) != p.masked_bytes:
            raise SecAggRejected(
                REASON_LENGTH, f"{u!r}: {len(msg.data)} bytes, want {p.masked_bytes}"
            )
        assert self._total is not None
        self._total += np.frombuffer(msg.data, dtype=_ring_dtype(p.ring_bits))
        self._collected.add(u)

    def close_collect(self) -> Survivors:
        """U3 = the devices whose masked input is in the sum; fails below the threshold."""
        self._close(ServerPhase.collect, "close_collect")
        assert self._roster is not None
        n3 = len(self._collected)
        need = max(self._roster.threshold, self._params.minimum())
        if n3 < need:
            raise self._fail(f"{n3} masked inputs, threshold {need}")
        u3 = tuple(sorted(self._collected))
        dropped = tuple(v for v in self._u2 if v not in self._collected)
        self._survivors = Survivors(survivors=u3, dropped=dropped)
        self._inboxes.clear()
        self._phase = ServerPhase.unmask
        return self._survivors

    # -- round 3 --------------------------------------------------------------------------------

    def receive_unmask(self, msg: UnmaskShares) -> None:
        """Check every share against its dealer's commitment before keeping any."""
        self._expect(ServerPhase.unmask, "UnmaskShares")
        assert self._survivors is not None
        h = msg.device_id
        dropped = self._survivors.dropped
        if h not in self._collected:
            raise SecAggRejected(REASON_UNKNOWN, f"{h!r} is not a survivor")
        if h in self._unmasked:
            raise SecAggRejected(REASON_DUPLICATE, f"{h!r} already sent its shares")
        b_keys, s_keys = msg.b_shares.keys(), msg.s_shares.keys()
        # The server must never hold both kinds of share for one device: refuse a b-share of a
        # dropped device and an s-share of a survivor outright, whatever else the message holds.
        wrong = sorted(b_keys & set(dropped)) + sorted(s_keys & self._collected)
        if wrong:
            raise SecAggRejected(
                REASON_KIND, f"{h!r}: wrong kind of share for {wrong[:3]} (b for survivors only)"
            )
        if b_keys != self._collected or s_keys != set(dropped):
            raise SecAggRejected(REASON_SHARES, f"{h!r}: shares do not cover U3 and U2 \\ U3")
        holder = self._index[h]
        offset = (holder - 1) * _PAIR_COMMIT_BYTES
        commit, index, commitments = self._commit, self._index, self._commitments
        for kind, shares, at in ((b"b", msg.b_shares, 0), (b"s", msg.s_shares, _COMMIT_BYTES)):
            for dealer, share in shares.items():
                want = commitments[dealer][offset + at : offset + at + _COMMIT_BYTES]
                if (
                    not 0 <= share < FIELD_PRIME
                    or commit(kind, index[dealer], holder, share) != want
                ):
                    raise SecAggRejected(
                        REASON_SHARE,
                        f"holder {h!r} revealed a {kind.decode()}-share of dealer {dealer!r} "
                        "that does not match the dealer's commitment",
                    )
        self._unmasked[h] = _Unmasked(b=dict(msg.b_shares), s=dict(msg.s_shares))

    def finish(self) -> SecAggResult:
        """Reconstruct from the first ``t`` responders (roster order), unmask and decode."""
        self._close(ServerPhase.unmask, "finish")
        assert self._roster is not None and self._survivors is not None
        assert self._total is not None
        p = self._params
        t = self._roster.threshold
        if len(self._unmasked) < t:
            raise self._fail(f"{len(self._unmasked)} unmask responses, threshold {t}")
        holders = sorted(self._unmasked, key=self._index.__getitem__)[:t]
        lam = lagrange_at_zero([self._index[h] for h in holders])
        responses = [self._unmasked[h] for h in holders]
        prime = FIELD_PRIME
        keys = {m.device_id: m for m in self._roster.adverts()}
        group = self._group
        total = self._total
        gen = _Prg(p.vector_length, p.ring_bits)

        for v in self._survivors.survivors:
            seed = sum(c * r.b[v] for c, r in zip(lam, responses, strict=True)) % prime
            if seed >= 1 << (8 * KEY_BYTES):
                raise self._fail(f"the self-mask seed of {v!r} did not reconstruct", "reconstruct")
            total -= gen.expand(_self_mask_key(seed.to_bytes(KEY_BYTES, "big"), group, v))

        for v in self._survivors.dropped:
            raw = sum(c * r.s[v] for c, r in zip(lam, responses, strict=True)) % prime
            sk = None
            if raw < 1 << (8 * KEY_BYTES):
                sk = X25519PrivateKey.from_private_bytes(raw.to_bytes(KEY_BYTES, "big"))
            if sk is None or _raw_public(sk) != keys[v].s_pk:
                raise self._fail(f"the s key of dropped {v!r} did not reconstruct", "reconstruct")
            for u in self._survivors.survivors:
                shared = _agree(sk, keys[u].s_pk)
                if shared is None:  # unreachable: every advertised key was probed
                    raise self._fail(f"X25519 refuses the s key of {u!r}", "reconstruct")
                mask = gen.expand(_mask_key(shared, group, u, v))
                # u added sign(u, v) * mask to y_u; take it back out.
                if u < v:
                    total -= mask
                else:
                    total += mask

        self._result = SecAggResult(
            total=dequantize(total, self._roster.scale, p.ring_bits),
            survivors=self._survivors.survivors,
            dropped=self._survivors.dropped,
        )
        self._total = None
        self._unmasked.clear()
        self._commitments.clear()
        self._phase = ServerPhase.done
        return self._result
