"""A live round to attack: real redis-server, real uvicorn actors, raw loopback sockets.

:func:`live_round` starts a coordinator, two aggregators and two selectors as uvicorn servers
(``tests/uvicorn_thread.py``, the services' own server configuration) over a
:class:`~fedfleet.store.redis.RedisStore` on the session's ``redis-server``, selects a round's
devices through the real device API, and yields the round in its reporting phase with a long
timeout, so every attack meets a round that is open. :func:`raw_exchange` speaks HTTP/1.1 over
a plain socket, because the attacks (lying lengths, endless chunked bodies, thousands of
headers, bytes one at a time) are what an HTTP client library refuses to send.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
from fastapi import FastAPI

from fedfleet.aggregator.app import create_app as aggregator_app
from fedfleet.coordinator.app import create_app as coordinator_app
from fedfleet.core.protocol import Assignment, CheckIn
from fedfleet.core.serde import encode_arrays
from fedfleet.core.spec import FLJob, parse_manifest
from fedfleet.device.http_transport import SelectorClient, TaskInfo
from fedfleet.selector.app import create_app as selector_app
from fedfleet.service.keys import JobKeys, new_secret
from fedfleet.service.server import ServerLimits
from fedfleet.store.history import checkpoint_bytes
from fedfleet.store.redis import RedisStore
from fedfleet.tasks.builtin import weight_shapes
from tests.uvicorn_thread import listen, serve

__all__ = ["LIMITS", "Live", "RawAnswer", "hostile_job", "live_round", "raw_exchange"]

TICK = 0.05
LIMITS = ServerLimits(header_timeout=1.0, body_idle_timeout=1.0, keep_alive=2)
"""Short timeouts so slow-connection attacks end within a test; the bounds are the defaults."""
UPDATE_LIMIT = 64 * 1024


def hostile_job(name: str, **spec: Any) -> FLJob:
    """Goal 3 (4 selections) over two aggregators; rounds stay open for minutes."""
    base: dict[str, Any] = {
        "population": "hostile",
        "model": {"kind": "softmax", "inputs": 64, "classes": 10},
        "plan": {"localEpochs": 1, "batchSize": 10, "learningRate": 0.1},
        "rounds": {
            "total": 3,
            "goalCount": 3,
            "minReportFraction": 1.0,
            "selectionTimeoutSeconds": 300,
            "reportingTimeoutSeconds": 300,
        },
        "aggregation": {"maxUpdateBytes": UPDATE_LIMIT},
        "eligibility": {"requireCharging": False, "requireUnmetered": False, "requireIdle": False},
        "fleet": {"devices": 12, "dataset": "digits", "shardsPerDevice": 0, "seed": 5},
        "actors": {"selectors": 2, "devicesPerAggregator": 2},
    }
    for key, value in spec.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_manifest(
        {"apiVersion": "fedfleet.dev/v1alpha1", "kind": "FLJob", "metadata": {"name": name},
         "spec": base}
    )  # fmt: skip


@dataclass
class Live:
    job: FLJob
    store: RedisStore
    keys: JobKeys
    selector_urls: list[str]
    aggregator_urls: dict[str, str]
    aggregator_apps: dict[str, FastAPI]
    round_key: str
    model_version: int
    tickets: dict[str, str]
    assigned: dict[str, str]
    """device -> the aggregator the selection assigned it."""

    @property
    def selector_url(self) -> str:
        return self.selector_urls[0]

    def folded(self) -> int:
        """Reports folded into the round's partial sums, over every aggregator."""
        total = 0
        for app in self.aggregator_apps.values():
            partial = app.state.aggregator.partial(self.round_key)
            total += 0 if partial is None else int(partial.count)
        return total

    def committed(self) -> tuple[int, bytes]:
        cp = self.store.checkpoint(self.job.key)
        return (0, b"") if cp is None else (cp.version, checkpoint_bytes(self.store, cp))

    def other_aggregator(self, device: str) -> str:
        return next(a for a in self.aggregator_urls if a != self.assigned[device])

    def report(
        self,
        device: str,
        *,
        aggregator: str | None = None,
        body: bytes | None = None,
        selector: int = 0,
    ) -> httpx.Response:
        return httpx.post(
            f"{self.selector_urls[selector]}/v1/reports/{self.round_key}",
            content=good_update(self.job) if body is None else body,
            headers={
                "content-type": "application/octet-stream",
                "x-fedfleet-device": device,
                "x-fedfleet-ticket": self.tickets[device],
                "x-fedfleet-examples": "10",
                "x-fedfleet-aggregator": aggregator or self.assigned[device],
            },
            timeout=30,
        )

    def abort(self, device: str, *, selector: int = 0) -> httpx.Response:
        return httpx.post(
            f"{self.selector_urls[selector]}/v1/aborts/{self.round_key}",
            json={"device_id": device, "reason": "eligibility-lost"},
            headers={"x-fedfleet-device": device, "x-fedfleet-ticket": self.tickets[device]},
            timeout=30,
        )

    def ticketed_headers(self, device: str) -> dict[str, str]:
        return {
            "x-fedfleet-device": device,
            "x-fedfleet-ticket": self.tickets[device],
            "x-fedfleet-examples": "10",
            "x-fedfleet-aggregator": self.assigned[device],
        }


def good_update(job: FLJob, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    shapes = weight_shapes(job.spec.model)
    return encode_arrays([rng.normal(0, 0.01, s).astype(np.float32) for s in shapes])


@contextmanager
def live_round(job: FLJob, redis_url: str, prefix: str, devices: int = 6) -> Iterator[Live]:
    """The actors of ``job`` serving one round in its reporting phase (see module doc)."""
    store = RedisStore.from_url(redis_url, prefix=prefix)
    keys = JobKeys.from_secret(new_secret())
    with ExitStack() as stack:
        stack.callback(store.close)
        aggregator_urls: dict[str, str] = {}
        aggregator_apps: dict[str, FastAPI] = {}
        for i in range(2):
            sock, url = listen()
            app = aggregator_app(
                job, store, keys, actor_id=f"aggregator-{i}", address=url, tick_seconds=TICK
            )
            stack.enter_context(serve(app, sock=sock, limits=LIMITS))
            aggregator_urls[f"aggregator-{i}"] = url
            aggregator_apps[f"aggregator-{i}"] = app
        # Both aggregators registered before the coordinator sizes the first round.
        deadline = time.monotonic() + 20
        while len(store.members(job.key, "aggregator")) < 2:
            assert time.monotonic() < deadline, "aggregators never registered"
            time.sleep(0.05)
        coord = coordinator_app(job, store, actor_id="coordinator-0", tick_seconds=TICK)
        stack.enter_context(serve(coord, limits=LIMITS))
        selector_urls = []
        for i in range(2):
            sock, url = listen()
            app = selector_app(
                job, store, keys, actor_id=f"selector-{i}", address=url, tick_seconds=TICK
            )
            stack.enter_context(serve(app, sock=sock, limits=LIMITS))
            selector_urls.append(url)
        names = [f"dev-{i}" for i in range(devices)]
        assignments = asyncio.run(_select(selector_urls[0], keys, names, job))
        infos = asyncio.run(_configured(selector_urls[0], assignments))
        keys_seen = {a.round_key for a in assignments.values()}
        assert len(keys_seen) == 1, keys_seen
        info = next(iter(infos.values()))
        yield Live(
            job=job,
            store=store,
            keys=keys,
            selector_urls=selector_urls,
            aggregator_urls=aggregator_urls,
            aggregator_apps=aggregator_apps,
            round_key=info.round_key,
            model_version=info.model_version,
            tickets={d: a.ticket for d, a in assignments.items()},
            assigned={d: i.aggregator for d, i in infos.items()},
        )


async def _select(url: str, keys: JobKeys, names: list[str], job: FLJob) -> dict[str, Assignment]:
    target = job.spec.rounds.selection_target
    chosen: dict[str, Assignment] = {}
    async with SelectorClient(url, poll_wait=2.0) as client:
        deadline = time.monotonic() + 30
        while len(chosen) < target:
            assert time.monotonic() < deadline, f"only {len(chosen)} selected"
            for dev in names:
                if dev in chosen or len(chosen) >= target:
                    continue
                msg = CheckIn(dev, job.spec.population, True, True, True, 20)
                answer = await client.checkin(msg, keys.device_token(dev))
                if isinstance(answer, Assignment):
                    chosen[dev] = answer
            await asyncio.sleep(0.05)
    return chosen


async def _configured(url: str, chosen: dict[str, Assignment]) -> dict[str, TaskInfo]:
    async with SelectorClient(url, poll_wait=2.0) as client:
        infos = await asyncio.gather(
            *(client.wait_task(a, dev, give_up_after=30) for dev, a in chosen.items())
        )
    out: dict[str, TaskInfo] = {}
    for dev, info in zip(chosen, infos, strict=True):
        assert isinstance(info, TaskInfo), info
        out[dev] = info
    return out


# -- raw HTTP ----------------------------------------------------------------------------------


@dataclass
class RawAnswer:
    status: int | None
    """The response's status, or None when the server closed without one."""
    head: bytes
    body: bytes
    sent: int
    """Bytes of the request this client managed to send before the answer (or the close)."""


def _status(data: bytes) -> int | None:
    if not data.startswith(b"HTTP/1.1 "):
        return None
    return int(data[9:12])


def raw_exchange(
    url: str,
    head: bytes,
    chunks: Iterable[bytes] = (),
    *,
    timeout: float = 30.0,
) -> RawAnswer:
    """Send ``head`` then ``chunks`` one by one, stopping as soon as the server answers or
    closes; read the whole answer (until it closes the connection or ``timeout``)."""
    parts = urlparse(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    sent = 0
    data = b""
    try:
        sock.sendall(head)
        sent += len(head)
        sock.setblocking(False)
        for chunk in chunks:
            try:
                got = sock.recv(65536)
                data += got
                if data or got == b"":
                    break
            except BlockingIOError:
                pass
            try:
                sock.setblocking(True)
                sock.settimeout(timeout)
                sock.sendall(chunk)
                sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            finally:
                sock.setblocking(False)
        sock.setblocking(True)
        sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                break
            if not got:
                break
            data += got
            if b"\r\n\r\n" in data and _complete(data):
                break
    finally:
        sock.close()
    head_part, _, body = data.partition(b"\r\n\r\n")
    return RawAnswer(_status(data), head_part, body, sent)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def request_head(
    method: str, path: str, headers: dict[str, str], *, extra: Iterable[tuple[str, str]] = ()
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunked(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A chunked body of ``total`` bytes (then the last chunk), produced lazily."""
    piece = b"x" * size
    left = total
    while left > 0:
        n = min(size, left)
        yield f"{n:x}\r\n".encode() + piece[:n] + b"\r\n"
        left -= n
    yield b"0\r\n\r\n"


def streamed(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A plain body of ``total`` bytes in pieces, produced lazily."""
    piece = b"x" * size
    left = total
    while left > 0:
        n = min(size, left)
        yield piece[:n]
        left -= n
