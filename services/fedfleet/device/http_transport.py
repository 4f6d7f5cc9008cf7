"""The device side of the HTTP device API: what a phone's FL runtime says to a Selector.

The runtime (:mod:`fedfleet.device.runtime`) only decides and computes; this module carries its
messages over HTTP to one Selector service (``fedfleet.selector.app``): check-in, the long-poll
for the plan, the checkpoint download, the report upload and the abort. Answers come back as the
same core types the embedded runner passes around (:class:`Assignment`, :class:`Reconnect`,
:class:`Task`), so the fleet simulator drives a deployment with the same runtime code.

Why it is shaped this way:

* **Two connection pools.** A selected device holds a long-poll open until its round is
  configured (that can take a whole reporting timeout, since selection is pipelined). If those
  polls shared a pool with check-ins, a few hundred waiting devices would starve everybody
  else's check-ins, so polls get their own pool.
* **Reconnect windows are absolute.** The server answers in seconds from now (clocks of phones
  are not trusted); they are turned into wall-clock times on arrival with :func:`time.time`.
* **One download per checkpoint version.** Thousands of simulated devices in one process train
  from the same checkpoint; :class:`WeightsCache` fetches and decodes a version once (concurrent
  requests wait for the same download) and hands out read-only arrays.
* **Typed failures.** 503 (the store or an aggregator is down) is :class:`ServerBusy` carrying
  ``Retry-After``; any other refusal is :class:`Refused` with the status and the server's
  ``detail``; a selector that cannot be reached is :class:`Unreachable` (a
  :class:`ConnectionError`), so callers can try another selector.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlencode

import numpy as np
from pydantic import ValidationError

from fedfleet.core.models import Weights
from fedfleet.core.protocol import (
    Assignment,
    CheckIn,
    PrivacyPlan,
    Reconnect,
    ReportEnvelope,
    Task,
)
from fedfleet.core.serde import SerdeError, decode_arrays
from fedfleet.core.spec import PlanSpec, TaskSpec
from fedfleet.http11 import AnswerTooLarge, Http11Client, HttpError, Response

__all__ = [
    "ProtocolError",
    "Refused",
    "SelectorClient",
    "ServerBusy",
    "TaskInfo",
    "TransportError",
    "Unreachable",
    "WeightsCache",
]

DEFAULT_RETRY_AFTER = 5.0
"""Seconds to back off after a 503 that carries no usable ``Retry-After``."""


class TransportError(Exception):
    """Base of everything this module raises about the conversation with a selector."""


class Unreachable(TransportError, ConnectionError):
    """The selector could not be reached, or the connection broke before an answer came."""


class ServerBusy(TransportError):
    """503: the server cannot serve now (its store or the aggregator is down); retry later."""

    def __init__(self, retry_after: float, detail: str = "") -> None:
        super().__init__(f"503: {detail or 'service unavailable'} (retry after {retry_after}s)")
        self.status = 503
        self.retry_after = retry_after
        self.detail = detail


class Refused(TransportError):
    """Any other non-success answer: ``status`` and the server's ``detail``; a 429 carries the
    server's ``Retry-After`` in ``retry_after`` (None otherwise)."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class ProtocolError(TransportError):
    """The server answered something this client does not understand (a version mismatch)."""


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """The configuration a selected device received: the plan, and where its checkpoint is."""

    round_key: str
    model_version: int
    checkpoint_url: str
    task: TaskSpec
    plan: PlanSpec
    aggregator: str
    privacy: PrivacyPlan | None = None
    evaluate: bool = False


class Answer(Protocol):
    """What the helpers below read of an answer (this module's, or httpx's for enrollment)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...
    def json(self) -> Any: ...


def _json_body(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _retry_after(response: Answer) -> float:
    raw = response.headers.get("retry-after", "")
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_RETRY_AFTER  # absent, or an HTTP date: a selector never sends one
    return value if math.isfinite(value) and value >= 0 else DEFAULT_RETRY_AFTER


def _detail(response: Answer) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return detail if isinstance(detail, str) else str(detail)[:500]
    return str(body)[:500]


def _fail(response: Answer) -> TransportError:
    if response.status_code == 503:
        return ServerBusy(_retry_after(response), _detail(response))
    if response.status_code == 429:
        return Refused(429, _detail(response), _retry_after(response))
    return Refused(response.status_code, _detail(response))


def _json(response: Answer) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise ProtocolError(f"expected JSON, got {response.text[:200]!r}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"expected a JSON object, got {type(body).__name__}")
    return body


def _reconnect(body: dict[str, Any], now: float) -> Reconnect:
    """A reconnect answer (relative seconds) as an absolute window on this device's clock."""
    try:
        after = float(body.get("reconnect_after_s") or 0.0)
        within = float(body.get("reconnect_within_s") or after)
    except (TypeError, ValueError):
        raise ProtocolError(f"bad reconnect window in {body!r}") from None
    if not (math.isfinite(after) and math.isfinite(within)):
        raise ProtocolError(f"bad reconnect window in {body!r}")
    after = max(0.0, after)
    return Reconnect(now + after, now + max(after, within), str(body.get("reason") or ""))


class WeightsCache:
    """Decoded checkpoints by model version, shared by every device (and selector) of a process.

    A version is downloaded once however many devices ask at the same moment: the first request
    starts the download and the others await the same future. Only the newest ``keep`` versions
    are kept. The arrays are read-only because every device trains from the same objects
    (training copies before it updates).
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = max(1, keep)
        self._entries: OrderedDict[int, asyncio.Future[Weights]] = OrderedDict()
        self.downloads = 0
        """Completed downloads (for tests and stats: one per version, not per device)."""

    async def get(self, version: int, fetch: Callable[[], Awaitable[Weights]]) -> Weights:
        """The weights of ``version``; ``fetch()`` is awaited to download them if not cached."""
        fut = self._entries.get(version)
        if fut is not None:
            self._entries.move_to_end(version)
            # shield: a waiter that is cancelled must not cancel everybody else's download.
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._entries[version] = fut
        self._evict()
        try:
            weights = await fetch()
        except BaseException as exc:
            self._entries.pop(version, None)  # the next caller tries again
            failure = exc if isinstance(exc, Exception) else Unreachable("download interrupted")
            fut.set_exception(failure)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        for w in weights:
            w.flags.writeable = False
        self.downloads += 1
        fut.set_result(weights)
        return weights

    def _evict(self) -> None:
        while len(self._entries) > self.keep:
            version, oldest = next(iter(self._entries.items()))
            if not oldest.done():
                return
            del self._entries[version]


MAX_ANSWER_BYTES = 1024 * 1024
"""Most bytes of a JSON answer (a check-in, a task description with its config, an error) a
device reads: a hostile or broken server cannot make it hold more."""
MAX_SECAGG_ANSWER_BYTES = 64 * 1024 * 1024
"""Most bytes of a published Secure Aggregation message (a roster, an inbox of shares)."""
MAX_CHECKPOINT_BYTES = 512 * 1024 * 1024
"""Most bytes of a checkpoint download (default; ``SelectorClient(max_checkpoint_bytes=)``)."""
_FRAMING = frozenset({"content-encoding", "content-length", "transfer-encoding"})
"""Headers that describe the bytes on the wire, not the decoded body a copy holds."""


class SelectorClient:
    """One Selector's device API over HTTP/1.1 keep-alive (:class:`fedfleet.http11.Http11Client`).

    ``max_connections`` bounds the short requests (check-in, report, abort, download);
    ``max_long_polls`` bounds the held plan polls, in a pool of their own: a selected device
    holds its poll until the round is configured, so polls sharing the check-ins' connections
    would starve them. Use it as an async context manager, or call :meth:`aclose`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 3.0,
        max_connections: int = 100,
        max_long_polls: int = 512,
        poll_wait: float = 10.0,
        weights: WeightsCache | None = None,
        max_checkpoint_bytes: int = MAX_CHECKPOINT_BYTES,
        ca_file: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self.poll_wait = poll_wait
        self.timeout = timeout
        self.weights = weights if weights is not None else WeightsCache()
        # One TLS context for both pools (building one costs ~25 ms of CPU).
        tls = ssl.create_default_context()
        if ca_file:  # a private CA (the population's own gateway certificate), besides the system's
            tls.load_verify_locations(cafile=ca_file)
        agent = {"user-agent": "fedfleet-device/1"}
        self._http = Http11Client(
            tls=tls,
            connect_timeout=connect_timeout,
            max_connections=max(1, max_connections),
            queue_timeout=timeout,
            headers=agent,
        )
        # Waiting for a free poll connection is not an error: each frees within ``wait``.
        self._polls = Http11Client(
            tls=tls,
            connect_timeout=connect_timeout,
            max_connections=max(1, max_long_polls),
            queue_timeout=None,
            headers=agent,
        )

    async def __aenter__(self) -> SelectorClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._polls.aclose()

    def __repr__(self) -> str:
        return f"SelectorClient({self.base_url!r})"

    async def _send(
        self,
        method: str,
        url: str,
        *,
        polls: bool = False,
        limit: int = MAX_ANSWER_BYTES,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send, and read the answer up to ``limit`` bytes: a server that declares or streams
        more gets :class:`ProtocolError`, and the device never holds more."""
        client = self._polls if polls else self._http
        path = f"{url}?{urlencode(params)}" if params else url
        try:
            r = await client.request(
                method,
                self.base_url,
                path,
                headers=headers,
                body=body,
                timeout=self.timeout if timeout is None else timeout,
                limit=limit,
            )
        except AnswerTooLarge as exc:
            raise ProtocolError(f"{method} {url}: {exc}") from None
        except HttpError as exc:  # connect, read and write timeouts, resets, malformed answers
            raise Unreachable(f"{self.base_url}: {exc}") from exc
        encoding = r.headers.get("content-encoding", "identity")
        if encoding != "identity":  # never asked for: a device sends no Accept-Encoding
            raise ProtocolError(f"{method} {url}: undecodable answer ({encoding})")
        return r

    # -- the device API ------------------------------------------------------------------------
    async def checkin(self, msg: CheckIn, token: str) -> Assignment | Reconnect:
        """Check in; the answer is a selection, or a reconnect window in wall-clock time."""
        r = await self._send(
            "POST",
            "/v1/checkin",
            body=_json_body(
                {
                    "device_id": msg.device_id,
                    "population": msg.population,
                    "charging": msg.charging,
                    "unmetered": msg.unmetered,
                    "idle": msg.idle,
                    "num_examples": msg.num_examples,
                }
            ),
            headers={
                "authorization": f"Bearer {token}",
                "x-fedfleet-device": msg.device_id,
                "content-type": "application/json",
            },
        )
        if r.status_code != 200:
            raise _fail(r)
        body = _json(r)
        outcome = body.get("outcome")
        if outcome == "selected":
            try:
                return Assignment(
                    str(body["round_key"]), str(body["aggregator"]), str(body["ticket"])
                )
            except KeyError as exc:
                raise ProtocolError(f"selection without {exc.args[0]}") from None
        if outcome == "reconnect":
            return _reconnect(body, time.time())
        raise ProtocolError(f"unknown check-in outcome {outcome!r}")

    async def wait_task(
        self,
        assignment: Assignment,
        device_id: str,
        *,
        wait: float | None = None,
        give_up_after: float | None = None,
    ) -> TaskInfo | Reconnect | None:
        """Long-poll for the plan until the round is configured or the device is released.

        Returns the :class:`TaskInfo`, a :class:`Reconnect` (the round ended before it started:
        410), or ``None`` when the selector holds no selection for this device any more (404:
        it restarted, or forgot the device) or ``give_up_after`` seconds passed.
        """
        wait = self.poll_wait if wait is None else wait
        deadline = None if give_up_after is None else time.monotonic() + give_up_after
        while True:
            left = wait if deadline is None else min(wait, deadline - time.monotonic())
            if left <= 0:
                return None
            r = await self._send(
                "GET",
                f"/v1/tasks/{assignment.round_key}",
                polls=True,
                params={"device_id": device_id, "wait": f"{left:.3f}"},
                headers={"x-fedfleet-ticket": assignment.ticket},
                timeout=left + self.timeout,  # the poll is held up to ``left`` seconds
            )
            if r.status_code == 202:
                continue
            if r.status_code == 200:
                return self._task_info(_json(r))
            if r.status_code == 410:
                return _reconnect(_json(r), time.time())
            if r.status_code == 404:
                return None
            raise _fail(r)

    @staticmethod
    def _task_info(body: dict[str, Any]) -> TaskInfo:
        url = body.get("checkpoint_url")
        if not isinstance(url, str) or not url.startswith("/") or url.startswith("//"):
            # The download carries the device's credential: only ever to the selector itself.
            raise ProtocolError(f"bad task description: checkpoint_url {url!r} is not a path")
        try:
            return TaskInfo(
                round_key=str(body["round_key"]),
                model_version=int(body["model_version"]),
                checkpoint_url=str(body["checkpoint_url"]),
                task=TaskSpec.model_validate(body["task"]),
                plan=PlanSpec.model_validate(body["plan"]),
                aggregator=str(body["aggregator"]),
                privacy=(
                    None if body.get("privacy") is None else PrivacyPlan.from_dict(body["privacy"])
                ),
                evaluate=bool(body.get("evaluate", False)),
            )
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            raise ProtocolError(f"bad task description: {exc}") from None

    async def checkpoint(
        self, version: int, device_id: str, token: str, url: str | None = None
    ) -> Weights:
        """The global model at ``version`` (downloaded once per process, with the credential of
        the device that asked first; read-only arrays)."""

        async def fetch() -> Weights:
            r = await self._send(
                "GET",
                url or f"/v1/checkpoints/{version}",
                limit=self.max_checkpoint_bytes,
                headers={"authorization": f"Bearer {token}", "x-fedfleet-device": device_id},
            )
            if r.status_code != 200:
                raise _fail(r)
            try:
                arrays = decode_arrays(r.content)
            except SerdeError as exc:
                raise ProtocolError(f"checkpoint {version} does not decode: {exc}") from None
            return [np.asarray(a, dtype=np.float32) for a in arrays]

        return await self.weights.get(version, fetch)

    async def task(
        self, assignment: Assignment, info: TaskInfo, device_id: str, token: str
    ) -> Task:
        """The core :class:`Task` for a configured assignment: plan plus downloaded weights
        (fetched with the device's own credential)."""
        weights = await self.checkpoint(info.model_version, device_id, token, info.checkpoint_url)
        return Task(
            Assignment(assignment.round_key, info.aggregator, assignment.ticket),
            info.task,
            info.plan,
            info.model_version,
            weights,
            info.privacy,
            info.evaluate,
        )

    async def report(self, env: ReportEnvelope, aggregator: str) -> None:
        """Upload an update; raises :class:`Refused` / :class:`ServerBusy` unless accepted."""
        r = await self._send(
            "POST",
            f"/v1/reports/{env.round_key}",
            body=env.update,
            headers={
                "content-type": "application/octet-stream",
                "x-fedfleet-device": env.device_id,
                "x-fedfleet-ticket": env.ticket,
                "x-fedfleet-examples": str(env.num_examples),
                "x-fedfleet-aggregator": aggregator,
                "x-fedfleet-metrics": json.dumps(env.metrics),
            },
        )
        if r.status_code not in (200, 202):
            raise _fail(r)

    async def secagg(
        self,
        round_key: str,
        device_id: str,
        ticket: str,
        aggregator: str,
        step: str,
        body: bytes = b"",
    ) -> dict[str, Any] | None:
        """One Secure Aggregation step: a send (``None`` back) or a poll (the published
        message, or ``None`` while it is not published). Refusals raise :class:`Refused`
        (410: this device is no longer part of the session)."""
        r = await self._send(
            "POST",
            f"/v1/secagg/{round_key}/{step}",
            limit=MAX_SECAGG_ANSWER_BYTES,
            body=body,
            headers={
                "content-type": "application/octet-stream",
                "x-fedfleet-device": device_id,
                "x-fedfleet-ticket": ticket,
                "x-fedfleet-aggregator": aggregator,
            },
        )
        if r.status_code == 202:
            return None
        if r.status_code != 200:
            raise _fail(r)
        answer = _json(r)
        return answer if answer else None

    async def abort(
        self, round_key: str, device_id: str, ticket: str, reason: str = "eligibility-lost"
    ) -> None:
        """Tell the selector this device gave up its task (it will not report)."""
        r = await self._send(
            "POST",
            f"/v1/aborts/{round_key}",
            body=_json_body({"device_id": device_id, "reason": reason}),
            headers={
                "x-fedfleet-ticket": ticket,
                "x-fedfleet-device": device_id,
                "content-type": "application/json",
            },
        )
        if r.status_code not in (200, 202):
            raise _fail(r)
