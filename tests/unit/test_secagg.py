"""Unit tests of fedfleet.core.secagg: the four rounds, dropouts, thresholds, what the server
sees, and refusal of malformed, forged, replayed and out-of-phase messages."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from fedfleet.core.secagg import (
    FIELD_PRIME,
    MAX_GROUP_SIZE,
    Inbox,
    KeyAdvert,
    MaskedInput,
    Roster,
    SecAggAbort,
    SecAggClient,
    SecAggFailed,
    SecAggParams,
    SecAggRejected,
    SecAggResult,
    SecAggServer,
    ServerPhase,
    ShareKeys,
    Survivors,
    UnmaskShares,
    dequantize,
    fixed_point_scale,
    lagrange_at_zero,
    prg,
    quantize,
    shamir_share,
)
from fedfleet.core.secagg.crypto import _self_mask_key

pytestmark = pytest.mark.unit

GROUP = "ns/job/a17/aggregator-0"


def wire(msg: Any) -> Any:
    """The message as it arrives after a JSON round trip (what a device or server parses)."""
    return type(msg).from_dict(json.loads(json.dumps(msg.to_dict())))


@dataclass
class Group:
    """A server and n honest clients driven round by round; every message the server receives
    is recorded (its whole view, besides the running sum it holds)."""

    params: SecAggParams
    clients: list[SecAggClient]
    inputs: dict[str, NDArray[np.float64]]
    server: SecAggServer
    json: bool = True
    adverts: list[KeyAdvert] = field(default_factory=list)
    shares: list[ShareKeys] = field(default_factory=list)
    masked: list[MaskedInput] = field(default_factory=list)
    unmasks: list[UnmaskShares] = field(default_factory=list)
    roster: Roster | None = None
    survivors: Survivors | None = None

    @classmethod
    def make(
        cls,
        n: int,
        m: int = 16,
        *,
        ring_bits: int = 32,
        seed: int = 0,
        json: bool = True,
        **kw: Any,
    ) -> Group:
        params = SecAggParams(group_id=GROUP, vector_length=m, ring_bits=ring_bits, **kw)
        rng = np.random.default_rng(seed)
        clients = [SecAggClient(params, f"dev-{i:03d}") for i in range(n)]
        inputs = {c.device_id: rng.uniform(-1.2, 1.2, m) for c in clients}  # some get clipped
        return cls(params, clients, inputs, SecAggServer(params), json)

    def _w(self, msg: Any) -> Any:
        return wire(msg) if self.json else msg

    def pick(self, ids: Iterable[str]) -> list[SecAggClient]:
        want = set(ids)
        return [c for c in self.clients if c.device_id in want]

    def advertise(self, clients: list[SecAggClient] | None = None) -> Roster:
        for c in self.clients if clients is None else clients:
            msg = self._w(c.advertise())
            self.server.receive_advert(msg)
            self.adverts.append(msg)
        self.roster = self._w(self.server.close_advertise())
        return self.roster

    def share(self, skip: int = 0) -> None:
        assert self.roster is not None
        members = self.pick(self.roster.device_ids)
        for c in members[skip:]:
            msg = self._w(c.share_keys(self.roster))
            self.server.receive_shares(msg)
            self.shares.append(msg)
        self.server.close_share()

    def collect(self, skip: int = 0) -> Survivors:
        u2 = sorted({s.sender for s in self.shares})
        for c in self.pick(u2)[skip:]:
            inbox = self._w(self.server.inbox(c.device_id))
            msg = c.masked_input(inbox, self.inputs[c.device_id])
            self.server.receive_masked(msg)
            self.masked.append(msg)
        self.survivors = self._w(self.server.close_collect())
        return self.survivors

    def unmask(self, skip: int = 0) -> SecAggResult:
        assert self.survivors is not None
        for c in self.pick(self.survivors.survivors)[skip:]:
            msg = self._w(c.unmask(self.survivors))
            self.server.receive_unmask(msg)
            self.unmasks.append(msg)
        return self.server.finish()

    def expected(self, ids: Iterable[str]) -> NDArray[np.float64]:
        c = self.params.clip_range
        total: NDArray[np.float64] = np.sum([np.clip(self.inputs[i], -c, c) for i in ids], axis=0)
        return total

    def tolerance(self) -> float:
        """n / (2 * scale) per coordinate, plus float64 rounding (it dominates in 64 bits)."""
        assert self.roster is not None
        n = len(self.roster.devices)
        return n / (2 * self.roster.scale) + 1e-13 * n * self.params.clip_range


def check_sum(g: Group, result: SecAggResult) -> None:
    assert g.survivors is not None
    assert result.survivors == g.survivors.survivors
    assert result.dropped == g.survivors.dropped
    assert result.total.dtype == np.float64
    err = np.max(np.abs(result.total - g.expected(result.survivors)))
    assert err <= g.tolerance()


def reconstruct(points: dict[int, int]) -> int:
    xs = sorted(points)
    return sum(c * points[x] for c, x in zip(lagrange_at_zero(xs), xs, strict=True)) % FIELD_PRIME


def chi_square_top_bits(values: NDArray[Any], bits: int, top: int = 4) -> float:
    """Chi-square statistic of the top ``top`` bits of ring elements against uniform."""
    buckets = (values.astype(np.uint64) >> np.uint64(bits - top)).astype(np.int64)
    counts = np.bincount(buckets, minlength=1 << top)
    expected = len(values) / (1 << top)
    return float(np.sum((counts - expected) ** 2 / expected))


CHI2_15DF_P1E6 = 60.0
"""Chi-square with 15 degrees of freedom exceeds ~60 with probability ~1e-6."""


# -- the sum -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ring_bits", [32, 64])
@pytest.mark.parametrize(("n", "m"), [(3, 64), (10, 200), (100, 50)])
def test_sum_equals_plaintext_sum(n: int, m: int, ring_bits: int) -> None:
    g = Group.make(n, m, ring_bits=ring_bits, json=n <= 10)
    roster = g.advertise()
    assert roster.threshold == n // 2 + 1
    assert g.server.phase is ServerPhase.share and g.server.pending() == n
    g.share()
    assert g.server.phase is ServerPhase.collect  # type: ignore[comparison-overlap]
    g.collect()
    assert g.server.phase is ServerPhase.unmask and g.server.survivors() == g.survivors
    result = g.unmask()
    assert g.server.phase is ServerPhase.done and g.server.pending() == 0
    assert result.dropped == () and len(result.survivors) == n
    check_sum(g, result)
    # The inputs really were clipped before summing: some coordinates exceed clip_range.
    raw = np.sum(list(g.inputs.values()), axis=0)
    assert np.max(np.abs(result.total - raw)) > g.tolerance()


def test_protocol_result_independent_of_message_order() -> None:
    g = Group.make(6, 32, json=False)
    for c in reversed(g.clients):
        g.server.receive_advert(c.advertise())
    roster = g.server.close_advertise()
    assert list(roster.device_ids) == sorted(c.device_id for c in g.clients)
    g.roster = roster
    g.share()
    g.collect()
    check_sum(g, g.unmask())


# -- dropouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ring_bits", [32, 64])
@pytest.mark.parametrize(
    ("after_advertise", "after_share", "after_masked"),
    [(4, 0, 0), (0, 4, 0), (0, 0, 4), (1, 2, 1), (0, 2, 2)],
)
def test_dropouts_after_each_phase(
    after_advertise: int, after_share: int, after_masked: int, ring_bits: int
) -> None:
    """n = 10, t = 6: up to n - t = 4 devices vanish after advertising (never share keys),
    after sharing (never send a masked input) or after their masked input (never unmask);
    the result is the sum of exactly the devices whose masked input was received."""
    g = Group.make(10, 40, ring_bits=ring_bits)
    g.advertise()
    assert g.roster is not None and g.roster.threshold == 6
    g.share(skip=after_advertise)
    assert g.server.members() == {s.sender for s in g.shares}
    survivors = g.collect(skip=after_share)
    assert len(survivors.dropped) == after_share
    assert g.server.pending() == len(survivors.survivors)
    result = g.unmask(skip=after_masked)
    check_sum(g, result)
    assert set(result.survivors) == {m.device_id for m in g.masked}
    assert len(result.survivors) == 10 - after_advertise - after_share


def test_devices_that_never_advertised_are_not_in_the_group() -> None:
    g = Group.make(8, 16)
    g.advertise(g.clients[:5])
    assert g.roster is not None and len(g.roster.devices) == 5
    g.share()
    g.collect()
    result = g.unmask()
    assert result.survivors == tuple(c.device_id for c in g.clients[:5])
    check_sum(g, result)


# -- failure below the threshold ---------------------------------------------------------------


def assert_failed(server: SecAggServer) -> None:
    assert server.phase is ServerPhase.failed
    assert server.pending() == 0
    with pytest.raises(SecAggRejected) as exc:
        server.receive_advert(SecAggClient(server.params, "late").advertise())
    assert exc.value.reason == "phase"


def test_close_advertise_fails_below_minimum_group_size() -> None:
    g = Group.make(5, 8, min_group_size=6)
    with pytest.raises(SecAggFailed):
        g.advertise()
    assert_failed(g.server)
    assert g.server.roster() is None

    lone = Group.make(1, 8)
    with pytest.raises(SecAggFailed):
        lone.advertise()  # min_group_size 1 is raised to 2: a sum of one is the input itself
    assert_failed(lone.server)


def test_close_share_fails_below_threshold() -> None:
    g = Group.make(10, 8)
    g.advertise()
    with pytest.raises(SecAggFailed) as exc:
        g.share(skip=5)  # 5 < t = 6
    assert "threshold 6" in str(exc.value)
    assert_failed(g.server)


def test_close_collect_fails_below_threshold() -> None:
    g = Group.make(10, 8)
    g.advertise()
    g.share(skip=2)
    with pytest.raises(SecAggFailed):
        g.collect(skip=3)  # 8 shared, 5 masked inputs < 6
    assert_failed(g.server)
    assert g.server.survivors() is None


def test_finish_fails_below_threshold_of_unmask_responses() -> None:
    g = Group.make(10, 8)
    g.advertise()
    g.share()
    g.collect(skip=2)
    with pytest.raises(SecAggFailed):
        g.unmask(skip=3)  # 8 survivors, 5 responses < 6
    assert_failed(g.server)
    assert g.server.result() is None


def test_threshold_is_a_strict_majority() -> None:
    for frac in (0.5, 0.6, 0.99):
        p = SecAggParams(group_id=GROUP, vector_length=1, threshold_fraction=frac)
        for n in range(2, 60):
            t = p.threshold(n)
            assert n // 2 < t <= n
    with pytest.raises(ValueError):
        SecAggParams(group_id=GROUP, vector_length=1, threshold_fraction=0.4)
    with pytest.raises(ValueError):
        SecAggParams(group_id=GROUP, vector_length=1, threshold_fraction=1.0)
    with pytest.raises(ValueError):
        SecAggParams(group_id=GROUP, vector_length=1, ring_bits=16)


# -- what the aggregator sees ------------------------------------------------------------------


def test_aggregator_view_reveals_no_individual_input() -> None:
    """Everything the server receives, plus the running sum it holds, for n = 10 with two
    devices dropped after sharing keys (their pairwise masks must be removed):

    - every unmask response carries b-shares of exactly the survivors and s-shares of exactly
      the dropped, so the server never holds a single s-share of a survivor nor a b-share of a
      dropped device (fewer than t of either, so Shamir hides them);
    - each masked input is its quantized input plus a mask that looks uniform, and it still does
      when the server removes the self mask it can rebuild for a survivor: what remains is the
      pairwise masks, whose keys it never learns;
    - the server keeps no masked input: only one ring vector, the running sum.
    """
    m, bits = 4096, 32
    g = Group.make(10, m, ring_bits=bits)
    g.advertise()
    g.share()
    u2 = {s.sender for s in g.shares}
    gone_after_share = g.clients[-2:]
    for c in g.pick(u2):
        if c in gone_after_share:
            continue
        msg = c.masked_input(g.server.inbox(c.device_id), g.inputs[c.device_id])
        data = msg.data
        before = sys.getrefcount(data)  # (outside assert: pytest's rewriting holds references)
        g.server.receive_masked(msg)
        after = sys.getrefcount(data)
        # The server let go of the bytes: nothing of this input stays referenced in it.
        assert after == before
        del data
        g.masked.append(msg)
    arrays = [v for v in vars(g.server).values() if isinstance(v, np.ndarray)]
    assert len(arrays) == 1 and arrays[0].shape == (m,)  # the running sum, nothing else
    held = [v for v in vars(g.server).values() if isinstance(v, bytes | bytearray)]
    assert not any(len(v) == m * 4 for v in held)
    g.survivors = g.server.close_collect()
    result = g.unmask()
    check_sum(g, result)

    u3, dropped = set(result.survivors), set(result.dropped)
    assert dropped == {c.device_id for c in gone_after_share}
    assert len(g.unmasks) == 8
    for answer in g.unmasks:
        assert set(answer.b_shares) == u3
        assert set(answer.s_shares) == dropped
    t = g.roster.threshold if g.roster else 0
    assert t == 6
    s_shares_of_survivors = sum(v in u3 for msg in g.unmasks for v in msg.s_shares)
    b_shares_of_dropped = sum(v in dropped for msg in g.unmasks for v in msg.b_shares)
    assert s_shares_of_survivors == 0 and b_shares_of_dropped == 0

    assert g.roster is not None
    index = {d: i for i, d in enumerate(g.roster.device_ids, start=1)}
    scale, limit = g.roster.scale, (2**31 - 1) // 10
    for msg in g.masked:
        u = msg.device_id
        y = np.frombuffer(msg.data, dtype="<u4")
        x = np.clip(g.inputs[u], -1.0, 1.0)
        q = quantize(x, scale, bits, limit=limit)
        mask = y - q
        assert np.count_nonzero(mask) > m - 5
        assert chi_square_top_bits(mask, bits) < CHI2_15DF_P1E6
        # The server can rebuild b_u of a survivor from the b-shares it received ...
        seed = reconstruct({index[r.device_id]: r.b_shares[u] for r in g.unmasks[:t]})
        self_mask = prg(_self_mask_key(seed.to_bytes(32, "big"), GROUP.encode(), u), m, bits)
        rest = mask - self_mask
        # ... and what is left of y_u - q_u is the sum of pairwise masks, still uniform.
        assert np.count_nonzero(rest) > m - 5
        assert chi_square_top_bits(rest, bits) < CHI2_15DF_P1E6
        # For a sanity check of the statistic: the quantized input itself is far from uniform.
        assert chi_square_top_bits(q, bits) > 10 * CHI2_15DF_P1E6


def test_server_refuses_both_kinds_of_share_for_one_device() -> None:
    g = Group.make(8, 16)
    g.advertise()
    g.share()
    survivors = g.collect(skip=2)
    assert len(survivors.dropped) == 2
    honest = [c.unmask(survivors) for c in g.pick(survivors.survivors)]
    some_survivor, some_dropped = survivors.survivors[0], survivors.dropped[0]
    h = honest[0]
    asks_s_of_survivor = replace(
        h, s_shares={**h.s_shares, some_survivor: h.b_shares[some_survivor]}
    )
    asks_b_of_dropped = replace(h, b_shares={**h.b_shares, some_dropped: 1})
    only_s = replace(h, b_shares={}, s_shares={**h.s_shares, some_survivor: 5})
    for forged in (asks_s_of_survivor, asks_b_of_dropped, only_s):
        with pytest.raises(SecAggRejected) as exc:
            g.server.receive_unmask(forged)
        assert exc.value.reason == "kind"
    assert g.server.received() == 0
    incomplete = replace(h, b_shares=dict(list(h.b_shares.items())[1:]))
    with pytest.raises(SecAggRejected) as exc:
        g.server.receive_unmask(incomplete)
    assert exc.value.reason == "shares"
    for msg in honest:
        g.server.receive_unmask(msg)
    check_sum(g, g.server.finish())


# -- malformed and forged messages ---------------------------------------------------------------


def test_wrong_share_refused_state_unchanged_and_finish_still_works() -> None:
    g = Group.make(8, 16)
    g.advertise()
    g.share()
    survivors = g.collect(skip=1)
    honest = [wire(c.unmask(survivors)) for c in g.pick(survivors.survivors)]
    first = honest[0]
    dealer = survivors.survivors[3]
    bad_b = replace(
        first, b_shares={**first.b_shares, dealer: (first.b_shares[dealer] + 1) % FIELD_PRIME}
    )
    gone = survivors.dropped[0]
    bad_s = replace(first, s_shares={**first.s_shares, gone: 0})
    # A genuine share, but the one another holder got from the same dealer.
    stolen = replace(first, b_shares={**first.b_shares, dealer: honest[1].b_shares[dealer]})
    for bad, who in ((bad_b, dealer), (bad_s, gone), (stolen, dealer)):
        with pytest.raises(SecAggRejected) as exc:
            g.server.receive_unmask(bad)
        assert exc.value.reason == "bad_share"
        assert repr(first.device_id) in str(exc.value) and repr(who) in str(exc.value)
        assert g.server.received() == 0 and g.server.pending() == 7
    for msg in honest:
        g.server.receive_unmask(msg)
    check_sum(g, g.server.finish())


def test_replayed_public_key_refused_by_server() -> None:
    p = SecAggParams(group_id=GROUP, vector_length=4)
    server = SecAggServer(p)
    a, b = SecAggClient(p, "a"), SecAggClient(p, "b")
    server.receive_advert(a.advertise())
    adv = b.advertise()
    for forged in (
        KeyAdvert("b", a.advertise().c_pk, adv.s_pk),
        KeyAdvert("b", adv.c_pk, a.advertise().s_pk),
        KeyAdvert("b", a.advertise().s_pk, adv.s_pk),  # a's s key reused as c key
        KeyAdvert("b", adv.c_pk, adv.c_pk),
    ):
        with pytest.raises(SecAggRejected) as exc:
            server.receive_advert(forged)
        assert exc.value.reason == "replayed_key"
    with pytest.raises(SecAggRejected) as exc:
        server.receive_advert(KeyAdvert("b", bytes(32), adv.s_pk))  # low-order point
    assert exc.value.reason == "key"
    with pytest.raises(SecAggRejected) as exc:
        server.receive_advert(a.advertise())
    assert exc.value.reason == "duplicate"
    assert server.members() == {"a"}
    server.receive_advert(adv)
    assert len(server.close_advertise().devices) == 2


def _roster_for(g: Group) -> Roster:
    g.advertise()
    assert g.roster is not None
    return g.roster


def test_client_refuses_a_roster_with_a_replayed_key() -> None:
    g = Group.make(4, 4)
    roster = _roster_for(g)
    devices = list(roster.devices)
    d0, d1 = devices[0], devices[1]
    devices[1] = (d1[0], d1[1], d0[2])  # device 1 "advertises" device 0's s key
    forged = replace(roster, devices=tuple(devices))
    with pytest.raises(SecAggAbort) as exc:
        g.clients[2].share_keys(forged)
    assert exc.value.reason == "roster" and "replayed" in str(exc.value)
    with pytest.raises(SecAggAbort) as exc:
        g.clients[2].share_keys(roster)  # an aborted client stays aborted
    assert exc.value.reason == "aborted"


@pytest.mark.parametrize(
    "forge",
    [
        "not_member",
        "wrong_keys",
        "unsorted",
        "duplicate_id",
        "low_threshold",
        "too_small",
        "other_group",
        "other_scale",
        "other_length",
    ],
)
def test_client_refuses_a_bad_roster(forge: str) -> None:
    g = Group.make(5, 4)
    roster = _roster_for(g)
    me = g.clients[0]
    devices = list(roster.devices)
    other = SecAggClient(g.params, "zz").advertise()
    if forge == "not_member":
        forged = replace(roster, devices=tuple(devices[1:]))
    elif forge == "wrong_keys":
        devices[0] = (devices[0][0], other.c_pk, other.s_pk)
        forged = replace(roster, devices=tuple(devices))
    elif forge == "unsorted":
        forged = replace(roster, devices=tuple(reversed(devices)))
    elif forge == "duplicate_id":
        devices[1] = (devices[0][0], other.c_pk, other.s_pk)
        forged = replace(roster, devices=tuple(devices))
    elif forge == "low_threshold":
        forged = replace(roster, threshold=2)  # 2 of 5 is not a majority
    elif forge == "too_small":
        forged = replace(roster, devices=tuple(devices[:1]), threshold=1)
    elif forge == "other_group":
        forged = replace(roster, group_id="ns/job/a18/aggregator-0")
    elif forge == "other_scale":
        forged = replace(roster, scale=roster.scale * 2)
    else:
        forged = replace(roster, vector_length=5)
    with pytest.raises(SecAggAbort) as exc:
        me.share_keys(forged)
    assert exc.value.reason == "roster"


def _at_inbox(n: int = 5) -> tuple[Group, dict[str, Inbox]]:
    g = Group.make(n, 8)
    g.advertise()
    g.share()
    return g, {c.device_id: g.server.inbox(c.device_id) for c in g.clients}


def test_client_aborts_on_a_tampered_ciphertext() -> None:
    g, inboxes = _at_inbox()
    me, dealer = g.clients[0], g.clients[1].device_id
    inbox = inboxes[me.device_id]
    blob = bytearray(inbox.ciphertexts[dealer])
    blob[20] ^= 1
    tampered = replace(inbox, ciphertexts={**inbox.ciphertexts, dealer: bytes(blob)})
    with pytest.raises(SecAggAbort) as exc:
        me.masked_input(tampered, g.inputs[me.device_id])
    assert exc.value.reason == "ciphertext"
    with pytest.raises(SecAggAbort):
        me.masked_input(inbox, g.inputs[me.device_id])  # no second chance


@pytest.mark.parametrize("forge", ["swapped", "misrouted", "truncated", "missing", "extra"])
def test_client_aborts_on_a_forged_inbox(forge: str) -> None:
    g, inboxes = _at_inbox()
    me, other = g.clients[0], g.clients[1]
    mine, theirs = inboxes[me.device_id], inboxes[other.device_id]
    a, b = g.clients[2].device_id, g.clients[3].device_id
    cts = dict(mine.ciphertexts)
    if forge == "swapped":  # two dealers' ciphertexts exchanged: the AAD names the dealer
        cts[a], cts[b] = cts[b], cts[a]
    elif forge == "misrouted":  # dealt to another holder
        cts[a] = theirs.ciphertexts[a]
    elif forge == "truncated":
        cts[a] = cts[a][:10]
    elif forge == "missing":
        del cts[a]
    else:
        cts[me.device_id] = cts[a]
    with pytest.raises(SecAggAbort) as exc:
        me.masked_input(replace(mine, ciphertexts=cts), g.inputs[me.device_id])
    assert exc.value.reason in ("ciphertext", "inbox")


@pytest.mark.parametrize("forge", ["other_recipient", "outsider", "too_few", "without_me"])
def test_client_aborts_on_bad_u2(forge: str) -> None:
    g, inboxes = _at_inbox(6)
    me = g.clients[0]
    mine = inboxes[me.device_id]
    if forge == "other_recipient":
        bad = replace(mine, recipient=g.clients[1].device_id)
    elif forge == "outsider":
        bad = replace(mine, members=(*mine.members, "zz-outsider"))
    elif forge == "too_few":  # 3 < t = 4: the pairwise masks would hide too little
        keep = mine.members[:3]
        bad = Inbox(me.device_id, keep, {v: mine.ciphertexts[v] for v in keep[1:]})
    else:
        bad = replace(mine, members=mine.members[1:])
    with pytest.raises(SecAggAbort) as exc:
        me.masked_input(bad, g.inputs[me.device_id])
    assert exc.value.reason == "inbox"


def test_bad_vector_is_a_value_error_and_the_client_can_retry() -> None:
    g, inboxes = _at_inbox()
    me = g.clients[0]
    with pytest.raises(ValueError):
        me.masked_input(inboxes[me.device_id], np.zeros(3))
    with pytest.raises(ValueError):
        me.masked_input(inboxes[me.device_id], np.full(8, np.nan))
    msg = me.masked_input(inboxes[me.device_id], g.inputs[me.device_id])
    assert len(msg.data) == 8 * 4


def test_server_refuses_wrong_length_unknown_duplicate_and_wrong_phase() -> None:
    g = Group.make(5, 8)
    early = g.clients[0].advertise()
    with pytest.raises(RuntimeError):
        g.server.close_share()
    with pytest.raises(SecAggRejected) as exc:
        g.server.receive_masked(MaskedInput(early.device_id, bytes(32)))
    assert exc.value.reason == "phase"
    g.advertise()
    assert g.roster is not None
    with pytest.raises(SecAggRejected) as exc:
        g.server.receive_advert(SecAggClient(g.params, "late").advertise())
    assert exc.value.reason == "phase"
    with pytest.raises(RuntimeError):
        g.server.close_advertise()

    first = g.clients[0].share_keys(g.roster)
    g.server.receive_shares(first)
    with pytest.raises(SecAggRejected) as exc:
        g.server.receive_shares(first)
    assert exc.value.reason == "duplicate"
    outsider = replace(first, sender="zz-outsider")
    with pytest.raises(SecAggRejected) as exc:
        g.server.receive_shares(outsider)
    assert exc.value.reason == "unknown"
    second = g.clients[1].share_keys(g.roster)
    short = replace(second, ciphertexts=dict(list(second.ciphertexts.items())[1:]))
    with pytest.raises(SecAggRejected) as exc:
        g.server.receive_shares(short)
    assert exc.value.reason == "recipients"
    to_self = replace(
        second, ciphertexts={**short.ciphertexts, "dev-001": second.ciphertexts["dev-000"]}
    )
    with pytest.raises(SecAggRejected) as exc:
        g.server.receive_shares(to_self)
    assert exc.value.reason == "recipients"
    no_self_commit = replace(
        second, commitments={k: v for k, v in second.commitments.items() if k != "dev-001"}
    )
    with pytest.raises(SecAggRejected) as exc:
        g.server.receive_shares(no_self_commit)
    assert exc.value.reason == "recipients"
    assert g.server.received() == 1 and g.server.pending() == 4
    g.server.receive_shares(second)
    for c in g.clients[2:]:
        g.server.receive_shares(c.share_keys(g.roster))
    with pytest.raises(SecAggRejected) as exc:
        g.server.inbox("dev-000")
    assert exc.value.reason == "phase"
    g.server.close_share()

    with pytest.raises(SecAggRejected) as exc:
        g.server.inbox("zz-outsider")
    assert exc.value.reason == "unknown"
    me = g.clients[0]
    msg = me.masked_input(g.server.inbox(me.device_id), g.inputs[me.device_id])
    for bad in (msg.data[:-1], msg.data + b"\0", msg.data * 2, b""):
        with pytest.raises(SecAggRejected) as exc:
            g.server.receive_masked(MaskedInput(me.device_id, bad))
        assert exc.value.reason == "length"
    with pytest.raises(SecAggRejected) as exc:
        g.server.receive_masked(MaskedInput("zz-outsider", msg.data))
    assert exc.value.reason == "unknown"
    g.server.receive_masked(msg)
    with pytest.raises(SecAggRejected) as exc:
        g.server.receive_masked(msg)
    assert exc.value.reason == "duplicate"
    with pytest.raises(SecAggRejected) as exc:
        g.server.receive_unmask(UnmaskShares(me.device_id, {}, {}))
    assert exc.value.reason == "phase"
    with pytest.raises(RuntimeError):
        g.server.finish()
    for c in g.clients[1:]:
        g.server.receive_masked(c.masked_input(g.server.inbox(c.device_id), g.inputs[c.device_id]))
    g.survivors = g.server.close_collect()
    g.masked = []
    answer = me.unmask(g.survivors)
    g.server.receive_unmask(answer)
    with pytest.raises(SecAggRejected) as exc:
        g.server.receive_unmask(answer)
    assert exc.value.reason == "duplicate"
    with pytest.raises(SecAggRejected) as exc:
        g.server.receive_unmask(replace(answer, device_id="zz-outsider"))
    assert exc.value.reason == "unknown"
    for c in g.clients[1:]:
        g.server.receive_unmask(c.unmask(g.survivors))
    check_sum(g, g.server.finish())
    with pytest.raises(RuntimeError):
        g.server.finish()


def _valid_dicts() -> dict[type[Any], dict[str, Any]]:
    g = Group.make(3, 4, json=False)
    g.advertise()
    assert g.roster is not None
    share = g.clients[0].share_keys(g.roster)
    for c in g.clients[1:]:
        g.server.receive_shares(c.share_keys(g.roster))
    g.server.receive_shares(share)
    g.server.close_share()
    inbox = g.server.inbox("dev-000")
    masked = g.clients[0].masked_input(inbox, g.inputs["dev-000"])
    for c in g.clients[1:]:
        g.server.receive_masked(c.masked_input(g.server.inbox(c.device_id), g.inputs[c.device_id]))
    g.server.receive_masked(masked)
    survivors = g.server.close_collect()
    unmask = g.clients[0].unmask(survivors)
    return {
        KeyAdvert: g.clients[0].advertise().to_dict(),
        Roster: g.roster.to_dict(),
        ShareKeys: share.to_dict(),
        Inbox: inbox.to_dict(),
        MaskedInput: masked.to_dict(),
        Survivors: survivors.to_dict(),
        UnmaskShares: unmask.to_dict(),
    }


def test_every_message_survives_a_json_round_trip() -> None:
    for cls, d in _valid_dicts().items():
        msg = cls.from_dict(json.loads(json.dumps(d)))
        assert isinstance(msg, cls)
        assert msg.to_dict() == d


def _garbage(d: dict[str, Any]) -> list[Any]:
    """Hostile variants of a valid message dict, each of which must be refused."""
    out: list[Any] = [None, [], "x", 7, {}, {**d, "extra": 1}]
    out += [{k: v for k, v in d.items() if k != drop} for drop in d]
    for k, v in d.items():
        bad: list[Any] = [None, True, {"a": 1} if not isinstance(v, dict) else [1]]
        if isinstance(v, str):
            bad += [7, [], "\ud800", "a" * 100_001]
        elif isinstance(v, bool | int):
            bad += ["3", 3.5, -1]
        elif isinstance(v, float):
            bad += ["1.0", -1.0, 0, float("nan"), float("inf")]
        elif isinstance(v, list):
            bad += ["x", [7], [None], [{}], [v[0], v[0]] if v and isinstance(v[0], str) else [[]]]
            if v and isinstance(v[0], list):
                bad += [[v[0][:2]], [[v[0][0], v[0][1], "AAAA"]]]
        elif isinstance(v, dict) and v:
            key, val = next(iter(v.items()))
            bad += [{**v, key: val + "A"}, {**v, "": val}, {**v, key: 5}, {**v, key: "!" + val}]
        out += [{**d, k: b} for b in bad]
    return out


@pytest.mark.parametrize(
    "cls", [KeyAdvert, Roster, ShareKeys, Inbox, MaskedInput, Survivors, UnmaskShares]
)
def test_from_dict_refuses_garbage(cls: type[Any]) -> None:
    d = _valid_dicts()[cls]
    refused = 0
    for bad in _garbage(d):
        with pytest.raises(SecAggRejected) as exc:
            cls.from_dict(bad)
        assert exc.value.reason == "malformed"
        refused += 1
    assert refused > 10


def test_from_dict_bounds_sizes() -> None:
    key = "A" * 43 + "="  # base64 of 32 bytes
    with pytest.raises(SecAggRejected):
        KeyAdvert.from_dict({"device_id": "a", "c_pk": "A" * 44 + "AAAA", "s_pk": key})
    with pytest.raises(SecAggRejected):
        KeyAdvert.from_dict({"device_id": "é" * 200, "c_pk": key, "s_pk": key})
    with pytest.raises(SecAggRejected):
        KeyAdvert.from_dict({"device_id": "\ud800", "c_pk": key, "s_pk": key})
    too_many = {f"d{i}": "AAAA" for i in range(MAX_GROUP_SIZE + 1)}
    with pytest.raises(SecAggRejected):
        ShareKeys.from_dict({"sender": "a", "ciphertexts": too_many, "commitments": {}})
    with pytest.raises(SecAggRejected):
        ShareKeys.from_dict({"sender": "a", "ciphertexts": {"b": "A" * 4000}, "commitments": {}})
    p_hex = FIELD_PRIME.to_bytes(66, "big").hex()
    with pytest.raises(SecAggRejected):
        UnmaskShares.from_dict({"device_id": "a", "b_shares": {"b": p_hex}, "s_shares": {}})
    ok = (FIELD_PRIME - 1).to_bytes(66, "big").hex()
    assert UnmaskShares.from_dict(
        {"device_id": "a", "b_shares": {"b": ok}, "s_shares": {}}
    ).b_shares == {"b": FIELD_PRIME - 1}
    spaced = " " + ok[2:] + " "
    with pytest.raises(SecAggRejected):
        UnmaskShares.from_dict({"device_id": "a", "b_shares": {"b": spaced}, "s_shares": {}})
    with pytest.raises(SecAggRejected):
        MaskedInput.from_dict({"device_id": "a", "data": "AAAA" * 10}, max_bytes=16)
    with pytest.raises(SecAggRejected):
        Survivors.from_dict({"survivors": ["a", "a"], "dropped": []})


# -- the client refuses an unsafe unmask request ------------------------------------------------


def _at_survivors(n: int = 8, drop: int = 2) -> tuple[Group, Survivors]:
    g = Group.make(n, 8)
    g.advertise()
    g.share()
    return g, g.collect(skip=drop)


def test_client_unmasks_only_once() -> None:
    g, survivors = _at_survivors()
    me = g.pick(survivors.survivors)[0]
    first = me.unmask(survivors)
    assert set(first.b_shares) == set(survivors.survivors)
    # A second request naming a survivor "dropped" would reveal its s-share next to the b-share
    # already sent: refused, whatever it says.
    flipped = Survivors(
        survivors=survivors.survivors[1:],
        dropped=tuple(sorted((*survivors.dropped, survivors.survivors[0]))),
    )
    for again in (flipped, survivors):
        with pytest.raises(SecAggAbort) as exc:
            me.unmask(again)
        assert exc.value.reason in ("replay", "aborted")


@pytest.mark.parametrize("forge", ["not_subset", "below_threshold", "not_me", "inconsistent"])
def test_client_refuses_an_unsafe_survivors_set(forge: str) -> None:
    g, survivors = _at_survivors()
    me = g.pick(survivors.survivors)[0]
    u3, dropped = survivors.survivors, survivors.dropped
    if forge == "not_subset":
        bad = Survivors((*u3, "zz-outsider"), dropped)
    elif forge == "below_threshold":  # n = 8, t = 5: keep 4
        keep = u3[:4]
        bad = Survivors(keep, tuple(sorted(set(u3[4:]) | set(dropped))))
    elif forge == "not_me":
        bad = Survivors(u3[1:], tuple(sorted((*dropped, u3[0]))))
    else:  # a survivor listed as dropped too: both shares of it requested at once
        bad = Survivors(u3, (*dropped, u3[1]))
    with pytest.raises(SecAggAbort) as exc:
        me.unmask(bad)
    assert exc.value.reason == "survivors"
    with pytest.raises(SecAggAbort):
        me.unmask(survivors)


def test_client_calls_out_of_order_abort() -> None:
    g = Group.make(3, 4)
    roster = _roster_for(g)
    c = g.clients[0]
    with pytest.raises(SecAggAbort) as exc:
        c.unmask(Survivors(roster.device_ids, ()))
    assert exc.value.reason == "order"
    d = g.clients[1]
    d.share_keys(roster)
    with pytest.raises(SecAggAbort) as exc:
        d.share_keys(roster)  # dealing b_u twice to possibly different rosters
    assert exc.value.reason == "replay"


# -- building blocks -----------------------------------------------------------------------------


def test_shamir_threshold_and_lagrange() -> None:
    secret = int.from_bytes(bytes(range(32)), "big")
    xs = list(range(1, 8))
    shares = shamir_share(secret, 4, xs)
    assert all(0 <= s < FIELD_PRIME for s in shares)
    for subset in ([1, 2, 3, 4], [7, 5, 3, 1], [2, 4, 5, 6, 7]):
        assert reconstruct({x: shares[x - 1] for x in subset}) == secret
    assert reconstruct({x: shares[x - 1] for x in [1, 2, 3]}) != secret
    assert shamir_share(secret, 4, xs) != shares  # fresh randomness each dealing


@pytest.mark.parametrize("ring_bits", [32, 64])
def test_quantize_round_trip_and_no_wrap(ring_bits: int) -> None:
    n, clip = 7, 2.5
    scale = fixed_point_scale(n, clip, ring_bits)
    limit = (2 ** (ring_bits - 1) - 1) // n
    x = np.array([-clip, clip, 0.0, 1e-9, -1.3, 2.4999])
    q = quantize(x, scale, ring_bits, limit=limit)
    assert q.dtype == np.dtype(f"uint{ring_bits}")
    back = dequantize(q, scale, ring_bits)
    assert np.max(np.abs(back - x)) <= 0.5 / scale + 1e-15 * clip
    # n inputs at the extremes sum without wrapping.
    total = np.zeros(2, dtype=q.dtype)
    for _ in range(n):
        total += quantize(np.array([clip, -clip]), scale, ring_bits, limit=limit)
    assert np.allclose(dequantize(total, scale, ring_bits), [n * clip, -n * clip])
    with pytest.raises(ValueError):
        quantize(np.array([np.inf]), scale, ring_bits)
    with pytest.raises(ValueError):
        quantize(np.array([clip * n * 2]), scale, ring_bits)


def test_prg_is_deterministic_per_key_and_distinct_across_keys() -> None:
    a = prg(bytes(32), 1000, 32)
    assert np.array_equal(a, prg(bytes(32), 1000, 32))
    b = prg(b"\1" + bytes(31), 1000, 32)
    assert np.count_nonzero(a == b) < 5
    assert np.array_equal(prg(bytes(32), 10, 64).view("<u4"), prg(bytes(32), 20, 32))
