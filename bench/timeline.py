"""Where a deployed round's time goes: each attempt's phases as seen in the store.

A thread reads the job's round states every ``every`` seconds (its own store connection) and
records when each attempt was first seen in each phase. Since the coordinator writes every
phase change to the store, the gaps between them are the round's stages: selection,
waiting for the previous round (pipelining), reporting (configuration, download, training,
upload, and the close being noticed), and closing (partial sums published and the master's
commit noticed). The sampling adds up to ``every`` to each timestamp, and the extra reads a
little load: it is a profile, run on request (``bench/up.py --timeline``).
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from dataclasses import dataclass, field

from fedfleet.core.protocol import Phase
from fedfleet.store.base import Store

__all__ = ["Timeline"]

STAGES = (
    ("selection", Phase.selecting, Phase.waiting),
    ("pipeline wait", Phase.waiting, Phase.reporting),
    ("reporting", Phase.reporting, Phase.closing),
    ("closing", Phase.closing, Phase.committed),
)


@dataclass
class Timeline:
    store: Store
    job: str
    every: float = 0.003
    seen: dict[str, dict[Phase, float]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="timeline", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rounds = self.store.rounds(self.job)
            except Exception:  # a profile never breaks the run it watches
                rounds = []
            now = time.perf_counter()
            for r in rounds:
                self.seen.setdefault(r.key, {}).setdefault(r.phase, now)
            self._stop.wait(self.every)

    def committed(self) -> list[dict[Phase, float]]:
        done = [p for p in self.seen.values() if Phase.committed in p]
        return sorted(done, key=lambda p: p[Phase.committed])

    def report(self, compute: dict[str, float]) -> list[str]:
        """Median seconds per stage, the interval between commits, and the per-round system
        overhead (commit interval minus the slowest device's own compute in that round)."""
        rows = self.committed()
        keys = {id(p): k for k, p in self.seen.items()}
        lines = [
            f"timeline: {len(rows)} committed attempts sampled every {self.every * 1e3:.0f} ms"
        ]

        def fmt(name: str, values: list[float]) -> None:
            if not values:
                return
            values = sorted(values)
            p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
            lines.append(
                f"  {name:<28} median {statistics.median(values) * 1e3:8.1f} ms"
                f"   p95 {p95 * 1e3:8.1f} ms   n={len(values)}"
            )

        for name, a, b in STAGES:
            fmt(name, [p[b] - p[a] for p in rows if a in p and b in p])
        fmt(
            "configured -> committed",
            [p[Phase.committed] - p[Phase.reporting] for p in rows if Phase.reporting in p],
        )
        pairs = list(itertools.pairwise(rows))
        # The gap between a commit and the next round's configuration: selection still running
        # when the previous round committed (pipelining hid none of it), and the coordinator's
        # reaction to the commit.
        fmt(
            "commit -> next configured",
            [b[Phase.reporting] - a[Phase.committed] for a, b in pairs if Phase.reporting in b],
        )
        late = [b[Phase.waiting] - a[Phase.committed] for a, b in pairs if Phase.waiting in b]
        if late:
            lines.append(
                f"  selection still open at the previous commit in {sum(x > 0 for x in late)}"
                f" of {len(late)} rounds"
            )
        intervals = [b[Phase.committed] - a[Phase.committed] for a, b in pairs]
        fmt("commit interval (round)", intervals)
        slowest = [compute.get(keys[id(p)], 0.0) for p in rows[1:]]
        fmt("slowest device compute", [s for s in slowest if s > 0])
        fmt("overhead (interval-compute)", [i - s for i, s in zip(intervals, slowest, strict=True)])
        return lines
