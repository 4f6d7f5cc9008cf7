"""Secure aggregation cost per group: server time, per-client time and bytes, against group size.

For each group size n (``--sizes``) and vector length m (``--params``) the benchmark runs one
whole :mod:`fedfleet.core.secagg` session in this process: n :class:`SecAggClient` and one
:class:`SecAggServer`, every message through its wire form exactly as the HTTP path carries it
(JSON of ``to_dict`` for KeyAdvert, ShareKeys, UnmaskShares, Roster, Inbox and Survivors; the
raw bytes body for MaskedInput). Inputs are uniform in [-1, 1], ``ring_bits`` 32 (``--ring-bits``)
and the threshold fraction 0.5 (t = n // 2 + 1). Reported per run:

- **server s**: all server work across the four rounds: ``receive_*``, ``close_*``, ``inbox``
  and ``finish`` (``finish s`` is the last alone: Shamir reconstruction, mask expansion,
  decoding). It excludes the clients' work and the wire format;
- **srv wire s**: the server's side of the wire format: ``from_dict`` of every JSON message it
  receives (plus ``json.loads``), ``to_dict`` + ``json.dumps`` of the roster and survivors (once
  each, broadcast) and of every inbox;
- **client s**: mean over the clients of each one's total work across its rounds (key
  generation, ``advertise``, ``share_keys``, ``masked_input``, ``unmask``), without the wire
  format; ``max s`` the slowest client;
- **sent / recv KiB**: bytes one client sends and receives, mean over the clients that finished
  (wire sizes as above, bodies only, no HTTP framing);
- **err/bound**: the largest coordinate error of the decoded sum against the float64 sum of
  the survivors' inputs, divided by the quantization bound n / (2 * scale): must be <= 1.

``--dropout F`` adds, for each configuration, a run in which a fraction F of the devices drop
after sharing their keys (they never send a masked input): the server then reconstructs their
s keys and removes n x F x (n - n x F) pairwise masks, the expensive case in Bonawitz et al.

Everything runs on one core, sequentially: a client's time is its own CPU work, as on a phone.
Reference: Bonawitz et al., CCS 2017 (their Java implementation), about 2 s of server time for
500 clients x 100K entries with no dropouts, as cited in the issue. This is a report, not a test:
it exits 0 whatever the figures.

    python bench/secagg.py [--sizes 10,50,100,200,500] [--params 10000,100000] [--dropout 0.1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import cryptography
import numpy as np

from fedfleet.core.secagg import (
    Inbox,
    KeyAdvert,
    MaskedInput,
    Roster,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    ShareKeys,
    Survivors,
    UnmaskShares,
)

REFERENCE_SERVER_S = 2.0
"""Bonawitz et al., CCS 2017: ~2 s server time, n = 500, m = 100K, no dropouts (as cited)."""


def encode(msg: Any) -> bytes:
    return json.dumps(msg.to_dict(), separators=(",", ":")).encode()


@dataclass
class Row:
    n: int
    m: int
    dropped: int
    threshold: int
    server_s: float
    finish_s: float
    server_wire_s: float
    client_mean_s: float
    client_max_s: float
    sent_kib: float
    recv_kib: float
    err_over_bound: float


class Clock:
    """Accumulates elapsed time per key."""

    def __init__(self) -> None:
        self.total: dict[Any, float] = {}

    def run(self, key: Any, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args)
        self.total[key] = self.total.get(key, 0.0) + time.perf_counter() - start
        return out


def run_group(n: int, m: int, dropout: float, ring_bits: int, seed: int) -> Row:
    params = SecAggParams(
        group_id="bench/job/a1/aggregator-0", vector_length=m, ring_bits=ring_bits
    )
    rng = np.random.default_rng(seed)
    clock = Clock()
    server = SecAggServer(params)
    ids = [f"device-{i:05d}" for i in range(n)]
    clients = {d: clock.run(d, SecAggClient, params, d) for d in ids}
    sent = dict.fromkeys(ids, 0)
    recv = dict.fromkeys(ids, 0)
    SRV, WIRE = "server", "wire"

    # Round 0: adverts in, roster out (serialized once, parsed by every client).
    for d, c in clients.items():
        body = encode(clock.run(d, c.advertise))
        sent[d] += len(body)
        clock.run(
            SRV, server.receive_advert, clock.run(WIRE, KeyAdvert.from_dict, json.loads(body))
        )
    roster = clock.run(SRV, server.close_advertise)
    roster_body = clock.run(WIRE, encode, roster)
    t = roster.threshold

    # Round 1: encrypted shares in.
    for d, c in clients.items():
        recv[d] += len(roster_body)
        mine = Roster.from_dict(json.loads(roster_body))
        body = encode(clock.run(d, c.share_keys, mine))
        sent[d] += len(body)
        clock.run(
            SRV, server.receive_shares, clock.run(WIRE, ShareKeys.from_dict, json.loads(body))
        )
    clock.run(SRV, server.close_share)

    # Round 2: inboxes out, masked inputs in; a fraction drops before masking.
    k = min(round(dropout * n), n - t)
    gone = set(rng.choice(ids, size=k, replace=False).tolist()) if k else set()
    expected = np.zeros(m, dtype=np.float64)
    for d, c in clients.items():
        x = rng.uniform(-1.0, 1.0, m)
        if d in gone:
            continue
        expected += x
        inbox = clock.run(SRV, server.inbox, d)
        inbox_body = clock.run(WIRE, encode, inbox)
        recv[d] += len(inbox_body)
        masked = clock.run(d, c.masked_input, Inbox.from_dict(json.loads(inbox_body)), x)
        sent[d] += len(masked.data)
        clock.run(SRV, server.receive_masked, MaskedInput(d, masked.data))
    survivors = clock.run(SRV, server.close_collect)
    survivors_body = clock.run(WIRE, encode, survivors)

    # Round 3: unmask shares in, then the sum.
    for d in survivors.survivors:
        c = clients[d]
        recv[d] += len(survivors_body)
        body = encode(clock.run(d, c.unmask, Survivors.from_dict(json.loads(survivors_body))))
        sent[d] += len(body)
        clock.run(
            SRV, server.receive_unmask, clock.run(WIRE, UnmaskShares.from_dict, json.loads(body))
        )
    before = clock.total[SRV]
    result = clock.run(SRV, server.finish)
    finish_s = clock.total[SRV] - before

    bound = n / (2 * roster.scale)
    err = float(np.max(np.abs(result.total - expected)))
    client_times = [clock.total[d] for d in ids]
    done = survivors.survivors
    return Row(
        n=n,
        m=m,
        dropped=k,
        threshold=t,
        server_s=clock.total[SRV],
        finish_s=finish_s,
        server_wire_s=clock.total[WIRE],
        client_mean_s=float(np.mean(client_times)),
        client_max_s=max(client_times),
        sent_kib=float(np.mean([sent[d] for d in done])) / 1024,
        recv_kib=float(np.mean([recv[d] for d in done])) / 1024,
        err_over_bound=err / bound,
    )


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


HEADER = (
    f"{'n':>5}{'m':>8}{'drop':>6}{'t':>5}{'server s':>10}{'finish s':>10}{'srv wire s':>11}"
    f"{'client s':>10}{'max s':>8}{'sent KiB':>10}{'recv KiB':>10}{'err/bound':>11}"
)


def fmt(r: Row) -> str:
    return (
        f"{r.n:>5}{r.m:>8}{r.dropped:>6}{r.threshold:>5}{r.server_s:>10.3f}{r.finish_s:>10.3f}"
        f"{r.server_wire_s:>11.3f}{r.client_mean_s:>10.3f}{r.client_max_s:>8.3f}"
        f"{r.sent_kib:>10.1f}{r.recv_kib:>10.1f}{r.err_over_bound:>11.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", type=int_list, default=[10, 50, 100, 200, 500])
    parser.add_argument("--params", type=int_list, default=[10_000, 100_000])
    parser.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="also run each configuration with this fraction dropped after sharing keys",
    )
    parser.add_argument("--ring-bits", type=int, choices=(32, 64), default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if any(n < 2 for n in args.sizes) or any(m < 1 for m in args.params):
        parser.error("sizes must be at least 2 and params at least 1")
    if not 0.0 <= args.dropout < 0.5:
        parser.error("--dropout must be in [0, 0.5)")

    print(f"fedfleet secure aggregation cost, {dt.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"cryptography {cryptography.__version__}, {os.cpu_count()} cores, "
        f"ring_bits {args.ring_bits}, threshold fraction 0.5"
    )
    print(f"load average at start: {load_average()}", flush=True)
    print()
    print(HEADER, flush=True)
    rows: list[Row] = []
    wall = time.perf_counter()
    for m in args.params:
        for n in args.sizes:
            fractions = [0.0] + ([args.dropout] if args.dropout > 0 else [])
            for f in fractions:
                row = run_group(n, m, f, args.ring_bits, args.seed)
                rows.append(row)
                print(fmt(row), flush=True)
    print()
    ref = [r for r in rows if r.n == 500 and r.m == 100_000 and r.dropped == 0]
    note = f"; this run: {ref[0].server_s:.2f} s" if ref else ""
    print(
        f"reference: Bonawitz et al., CCS 2017 (Java): ~{REFERENCE_SERVER_S:.0f} s server time "
        f"for n=500, m=100K, no dropouts (as cited in the issue){note}"
    )
    print(
        "server s excludes the wire format (srv wire s) and all client work; client s is the "
        "mean per client of its own four rounds, wire format excluded"
    )
    print(f"total wall {time.perf_counter() - wall:.1f} s; load average at end: {load_average()}")


if __name__ == "__main__":
    main()
