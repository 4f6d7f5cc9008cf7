"""Pace steering (Bonawitz et al. §2.3): reconnect windows that shape the check-in rate.

Every device that is not needed now is told when to come back. Two regimes:

* **large population** — windows are spread uniformly around a mean delay ``T`` chosen so that
  the population cycling through this selector checks in at the rate the job needs. By Little's
  law the cycling population is ``observed_rate x T_current``; the delay that yields the target
  rate is ``population / target_rate``. The estimate is re-made every measurement interval and
  smoothed geometrically, so it follows the daily swing (~4x) without oscillating.
* **small population** — when the cycling population is below what a round needs, spreading
  would starve every round; windows are instead concentrated just after the next selection
  opens, so enough devices are online at the same time.

Rounds shorter than those delays (seconds: a short task on a small model) get a third rule,
whatever the population: each device not needed now is sent to one of the coming selection
openings, the first with room left, so each opening gets a little more than its share of
devices just after it opens. Selection then fills at once instead of waiting for devices
spread over several rounds, and the devices not needed do not check in every round.

Pure: time is passed in; the device draws its own time inside the window, which is what
spreads the herd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedfleet.core.protocol import Reconnect

__all__ = ["PaceSteering"]


@dataclass(slots=True)
class PaceSteering:
    min_delay: float = 2.0
    """Shortest reconnect delay handed out (seconds)."""
    max_delay: float = 6 * 3600.0
    """Longest reconnect delay handed out (seconds)."""
    interval: float = 30.0
    """How often the observed check-in rate is re-measured (seconds)."""
    smoothing: float = 0.5
    """Weight of a new delay estimate in the geometric running mean (0..1]."""
    spread: float = 0.5
    """Large-population windows are [(1-spread)T, (1+spread)T] after now."""
    concentrate_jitter: float = 5.0
    """Small-population windows span this many seconds after the next selection opens."""
    mean_delay: float = 60.0
    """Current mean reconnect delay T (adapted)."""
    observed_rate: float = 0.0
    """Last measured check-ins per second at this selector."""
    population: float = 0.0
    """Estimated devices cycling through this selector (rate x T)."""
    _window_start: float = math.nan
    _count: int = 0
    _handed: float = 0.0
    """Sum of the delays (window midpoints) handed out since the last update."""
    _handed_count: int = 0
    _bounded: bool = False
    """Whether a window since the last update was shortened to the round's duration."""
    opening_headroom: float = 1.5
    """Short rounds: devices sent to each coming selection opening, as a multiple of this
    selector's share of a round."""
    max_promised: int = 100_000
    """Devices whose opening is remembered (beyond that, a device that comes early is sent to
    the next opening with room, as a new one would be)."""
    _promised: dict[str, int] = field(default_factory=dict)
    """Short rounds: device -> the attempt whose selection opening it was sent to."""
    _openings: dict[int, int] = field(default_factory=dict)
    """Short rounds: attempt -> devices sent to its selection opening."""
    _first_opening: int = 0
    """The earliest attempt in ``_openings`` (older ones have opened and are forgotten)."""

    def observe(self, now: float, checkins: int = 1) -> None:
        """Count check-ins; re-estimate the delay once per interval."""
        if math.isnan(self._window_start):
            self._window_start = now
        self._count += checkins

    def update(self, now: float, target_rate: float) -> None:
        """Re-estimate T from the rate seen since the last update (call on a timer)."""
        if math.isnan(self._window_start):
            self._window_start = now
            return
        elapsed = now - self._window_start
        # Devices arriving now were handed windows around the T of one delay ago; measuring
        # over at least half a delay keeps the Little's-law estimate from chasing its own tail.
        if elapsed < max(self.interval, 0.5 * self.mean_delay):
            return
        self.observed_rate = self._count / elapsed
        # Little's law with T, the delay of the windows handed out. When rounds were short
        # enough to bound the windows (``round_seconds``), devices were given far less than T,
        # and taking T would overestimate the population a hundredfold and send every device
        # away for minutes: then the delays actually handed out are used.
        delay = self.mean_delay
        if self._bounded and self._handed_count:
            delay = self._handed / self._handed_count
        self.population = self.observed_rate * delay
        if target_rate > 0 and self.population > 0:
            wanted = min(self.max_delay, max(self.min_delay, self.population / target_rate))
            a = self.smoothing
            self.mean_delay = math.exp((1 - a) * math.log(self.mean_delay) + a * math.log(wanted))
        self._window_start = now
        self._count = 0
        self._handed, self._handed_count, self._bounded = 0.0, 0, False

    def small_population(self, round_share: int) -> bool:
        """True when fewer devices cycle through here than one round's share needs."""
        return self.population < max(1, round_share) * 1.5

    def window(
        self,
        now: float,
        *,
        round_share: int,
        next_open: float,
        reason: str = "not-needed",
        round_seconds: float = 0.0,
        device_id: str = "",
        next_attempt: int = 0,
        next_opening: float = 0.0,
    ) -> Reconnect:
        """The reconnect window for one rejected check-in; the device picks a time inside it.

        ``round_seconds`` (the measured time between commits, 0 if unknown) bounds a small
        population's windows: when rounds take less than ``min_delay`` or
        ``concentrate_jitter``, a device told to wait that long would miss several rounds
        and selection would starve, so it comes back within about one round instead.

        Given the device and ``next_attempt`` (the attempt whose selection opens next,
        expected at ``next_opening``; 0: unknown), rounds that short send the device to one of
        the coming openings instead (:meth:`_opening`): each gets about
        ``opening_headroom`` times this selector's share of a round, arriving just after it
        opens, so selection fills at once and the rest of the population is not asked to
        check in round after round only to be sent away.
        """
        if (
            device_id
            and next_attempt > 0
            and 0 < round_seconds < min(self.min_delay, self.concentrate_jitter)
        ):
            self._bounded = True
            window = self._opening(
                now, device_id, next_attempt, next_opening, round_seconds, round_share, reason
            )
            return self._handed_out(now, window)
        jitter, delay = self.concentrate_jitter, self.min_delay
        if round_seconds > 0:
            jitter = min(jitter, max(0.05, round_seconds))
            delay = min(delay, max(0.05, 0.5 * round_seconds))
            if self.small_population(round_share) and (
                jitter < self.concentrate_jitter or delay < self.min_delay
            ):
                self._bounded = True
        if self.small_population(round_share) and next_open > now:
            start = next_open
            return self._handed_out(now, Reconnect(start, start + jitter, reason))
        if self.small_population(round_share):
            start = now + delay
            return self._handed_out(now, Reconnect(start, start + jitter, reason))
        lo = max(self.min_delay, (1 - self.spread) * self.mean_delay)
        hi = max(lo + 1e-3, (1 + self.spread) * self.mean_delay)
        return self._handed_out(now, Reconnect(now + lo, now + hi, reason))

    def _opening(
        self,
        now: float,
        device_id: str,
        next_attempt: int,
        next_opening: float,
        round_seconds: float,
        round_share: int,
        reason: str,
    ) -> Reconnect:
        """A window just after one of the coming selection openings: the first whose
        ``opening_headroom x round_share`` places are not taken yet, or the one this device
        was already sent to if that has not opened (it came early: the round ran late).
        Openings are expected ``round_seconds`` apart from ``next_opening`` (or from now)."""
        if next_attempt > self._first_opening:  # the openings before it have passed
            self._first_opening = next_attempt
            self._openings = {a: n for a, n in self._openings.items() if a >= next_attempt}
            self._promised = {d: a for d, a in self._promised.items() if a >= next_attempt}
        attempt = self._promised.get(device_id, 0)
        if attempt < next_attempt:
            places = max(1, math.ceil(self.opening_headroom * max(1, round_share)))
            attempt = next_attempt
            while self._openings.get(attempt, 0) >= places:
                attempt += 1
            self._openings[attempt] = self._openings.get(attempt, 0) + 1
            if len(self._promised) < self.max_promised:
                self._promised[device_id] = attempt
        spread = max(0.005, 0.25 * round_seconds)
        opens = (next_opening or now) + (attempt - next_attempt) * round_seconds
        start = max(now + spread, opens)
        return Reconnect(start, start + spread, reason)

    def _handed_out(self, now: float, window: Reconnect) -> Reconnect:
        self._handed += 0.5 * (window.not_before + window.not_after) - now
        self._handed_count += 1
        return window
