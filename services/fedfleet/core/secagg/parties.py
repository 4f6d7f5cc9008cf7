"""Secure aggregation parties: the device's :class:`SecAggClient` and the aggregator's
:class:`SecAggServer` state machines; see :mod:`fedfleet.core.secagg`."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from numpy.typing import NDArray

from fedfleet.core.secagg.crypto import (
    _aad,
    _agree,
    _channel_key,
    _Committer,
    _frame,
    _limit,
    _mask_key,
    _Prg,
    _raw_private,
    _raw_public,
    _ring_dtype,
    _self_mask_key,
    _unframe,
    _usable_key,
    dequantize,
    fixed_point_scale,
    lagrange_at_zero,
    quantize,
    shamir_share,
)
from fedfleet.core.secagg.wire import (
    _COMMIT_BYTES,
    _NONCE_BYTES,
    _PAIR_COMMIT_BYTES,
    _TAG_BYTES,
    FIELD_PRIME,
    KEY_BYTES,
    MAX_CIPHERTEXT_BYTES,
    MAX_GROUP_SIZE,
    REASON_DUPLICATE,
    REASON_FULL,
    REASON_KEY,
    REASON_KIND,
    REASON_LENGTH,
    REASON_MALFORMED,
    REASON_PHASE,
    REASON_RECIPIENTS,
    REASON_REPLAYED_KEY,
    REASON_SHARE,
    REASON_SHARES,
    REASON_UNKNOWN,
    SHARE_BYTES,
    Inbox,
    KeyAdvert,
    MaskedInput,
    Roster,
    SecAggAbort,
    SecAggFailed,
    SecAggParams,
    SecAggRejected,
    SecAggResult,
    ShareKeys,
    Survivors,
    UnmaskShares,
    _check_id,
)

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
