"""Secure aggregation: limits, errors, parameters, and the messages with their strict parsing
(the wire format every party reads from untrusted input); see :mod:`fedfleet.core.secagg`."""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

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
