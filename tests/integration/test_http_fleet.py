"""The device side over real HTTP: a simulated fleet trains a job against real uvicorn servers,
and the device API refuses bad input without touching the aggregate.

The actors run as their FastAPI apps in uvicorn threads (``tests/uvicorn_thread.py``) over one
in-memory store; the Redis-backed variants live with the store's own integration tests. Every
request here crosses a real loopback socket.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from fedfleet.aggregator.app import create_app as aggregator_app
from fedfleet.aggregator.app import dataset_evaluator
from fedfleet.cli import main
from fedfleet.coordinator.app import create_app as coordinator_app
from fedfleet.core.protocol import Assignment, CheckIn, Reconnect, ReportEnvelope, report_ticket
from fedfleet.core.serde import encode_arrays
from fedfleet.core.spec import FLJob, parse_manifest
from fedfleet.device.http_fleet import HttpFleet
from fedfleet.device.http_transport import Refused, SelectorClient, ServerBusy, TaskInfo
from fedfleet.selector.app import create_app as selector_app
from fedfleet.service.keys import JobKeys, new_secret
from fedfleet.store.base import Store, StoreUnavailable
from fedfleet.store.memory import MemoryStore
from fedfleet.tasks import task_of
from tests.redis_server import free_port
from tests.uvicorn_thread import listen, serve

pytestmark = pytest.mark.integration

TICK = 0.05


def _job(name: str, **spec: Any) -> FLJob:
    base: dict[str, Any] = {
        "population": "http-test",
        "model": {"kind": "softmax", "inputs": 64, "classes": 10},
        "plan": {"localEpochs": 2, "batchSize": 10, "learningRate": 0.1},
        "rounds": {
            "total": 5,
            "goalCount": 5,
            "selectionTimeoutSeconds": 10,
            "reportingTimeoutSeconds": 10,
        },
        "eligibility": {
            "requireCharging": False,
            "requireUnmetered": False,
            "requireIdle": False,
            "minExamples": 1,
        },
        "fleet": {
            "devices": 30,
            "dataset": "digits",
            "shardsPerDevice": 0,
            "dropoutRate": 0.1,
            "seed": 11,
        },
        "actors": {"selectors": 1},
    }
    for key, value in spec.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_manifest(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": name},
            "spec": base,
        }
    )


@dataclass
class Deployment:
    job: FLJob
    store: Store
    keys: JobKeys
    selector_urls: list[str]
    aggregator_url: str
    coordinator_url: str
    selector_apps: list[FastAPI]
    aggregator: FastAPI

    @property
    def selector_url(self) -> str:
        return self.selector_urls[0]


@contextmanager
def deployment(
    job: FLJob, *, selectors: int = 1, secret: bytes | None = None
) -> Iterator[Deployment]:
    """Aggregator, coordinator and selectors as real uvicorn servers over one MemoryStore."""
    store = MemoryStore()
    keys = JobKeys.from_secret(secret or new_secret())
    with ExitStack() as stack:
        sock, agg_url = listen()
        agg = aggregator_app(
            job,
            store,
            keys,
            actor_id="aggregator-0",
            address=agg_url,
            tick_seconds=TICK,
            evaluator=dataset_evaluator(job),
        )
        stack.enter_context(serve(agg, sock=sock))
        coord = coordinator_app(
            job, store, actor_id="coordinator-0", tick_seconds=TICK, lease_ttl=2
        )
        coord_url = stack.enter_context(serve(coord))
        apps, urls = [], []
        for i in range(selectors):
            sock, url = listen()
            app = selector_app(
                job, store, keys, actor_id=f"selector-{i}", address=url, tick_seconds=TICK
            )
            stack.enter_context(serve(app, sock=sock))
            apps.append(app)
            urls.append(url)
        yield Deployment(job, store, keys, urls, agg_url, coord_url, apps, agg)


# -- a whole job, driven by the HTTP fleet ----------------------------------------------------


def _run_fleet(d: Deployment, fleet: HttpFleet, limit: float) -> float:
    def finished() -> bool:
        return d.store.job_state(d.job.key).get("phase") in ("Succeeded", "Failed")

    started = time.monotonic()
    asyncio.run(fleet.run(time.monotonic() + limit, stop_when=finished))
    return time.monotonic() - started


@pytest.mark.timeout(240)
def test_http_fleet_trains_a_five_round_job() -> None:
    job = _job("http-fleet")
    with deployment(job) as d:
        fleet = HttpFleet(job, d.selector_urls, d.keys, time_scale=0.01)
        seconds = _run_fleet(d, fleet, limit=180)
        state = d.store.job_state(job.key)
        history = d.store.metrics(job.key)
        version = d.store.model_version(job.key)
    stats = fleet.stats
    accuracy = [round(float(m["accuracy"]), 3) for m in history]
    print(f"\n5-round job over HTTP: {seconds:.1f}s, accuracy {accuracy}; {stats.line()}")
    assert state.get("phase") == "Succeeded", (state, stats.line())
    assert version == 5
    assert len(history) == 5
    assert 0.0 <= float(history[-1]["accuracy"]) <= 1.0
    assert float(history[-1]["accuracy"]) > 0.5
    # Every report the rounds committed came from this fleet. A round commits at its goal (5)
    # or, once every selected device has reported or dropped out, or at the reporting deadline,
    # with at least its minimum (4); which one depends on drop-outs and the machine's load.
    committed = sum(int(m["reports"]) for m in history)
    assert stats.reported >= committed >= 5 * job.spec.rounds.minimum_count
    assert all(
        job.spec.rounds.minimum_count <= int(m["reports"]) <= job.spec.rounds.goal_count
        for m in history
    )
    assert stats.selected >= stats.configured >= stats.reported
    assert stats.aborted >= 0  # 10% drop-out: usually a few, never required
    assert stats.connection_errors == 0
    assert stats.protocol_errors == 0
    # One checkpoint download per model version trained from, not one per device.
    assert 1 <= fleet.weights.downloads <= 5


def _checkins_served(selector_url: str) -> float:
    """Check-ins a selector answered, from its Prometheus metrics."""
    text = httpx.get(f"{selector_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("fedfleet_checkins_total{")
    )


@pytest.mark.timeout(240)
def test_http_fleet_spreads_over_selectors_and_skips_a_dead_one() -> None:
    job = _job("http-fleet-two", rounds={"total": 2})
    dead = f"http://127.0.0.1:{free_port()}"
    with deployment(job, selectors=2) as d:
        fleet = HttpFleet(job, [*d.selector_urls, dead], d.keys, time_scale=0.01)
        _run_fleet(d, fleet, limit=120)
        state = d.store.job_state(job.key)
        version = d.store.model_version(job.key)
        served = [_checkins_served(u) for u in d.selector_urls]
    assert state.get("phase") == "Succeeded", (state, fleet.stats.line())
    assert version == 2
    assert fleet.stats.connection_errors > 0  # the dead selector was tried, and skipped
    assert all(served)


# -- fedfleet simulate ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_simulate_command_runs_until_the_job_succeeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _job("http-simulate", rounds={"total": 2})
    secret = new_secret()
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        yaml.safe_dump(job.model_dump(mode="json", by_alias=True, exclude_none=True))
    )
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret.hex())
    with deployment(job, secret=secret) as d:
        argv = [
            "simulate",
            str(manifest),
            "--selector",
            d.selector_url,
            "--secret-file",
            str(secret_file),
            "--time-scale",
            "0.01",
            "--duration",
            "90",
            "--coordinator",
            d.coordinator_url,
            "--stats-every",
            "1",
        ]
        status = main(argv)
        version = d.store.model_version(job.key)
    out = capsys.readouterr().out
    assert status == 0, out
    assert version == 2
    assert "stopped (job Succeeded)" in out
    assert "reported=" in out


def test_simulate_command_needs_a_selector(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        yaml.safe_dump(BAD_JOB.model_dump(mode="json", by_alias=True, exclude_none=True))
    )
    secret_file = tmp_path / "secret"
    secret_file.write_text(new_secret().hex())
    assert main(["simulate", str(manifest), "--secret-file", str(secret_file)]) == 2
    assert "--selector" in capsys.readouterr().err
    status = main(
        [
            "simulate",
            str(manifest),
            "--secret-file",
            str(secret_file),
            "--selector",
            "http://127.0.0.1:1",
            "--devices",
            "5:50",
        ]
    )
    assert status == 2
    assert "fleet.devices" in capsys.readouterr().err


# -- the transport against a live selector -------------------------------------------------------


class FlakyStore:
    """A MemoryStore that can be switched off, as a Redis outage looks to the actors."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StoreUnavailable("store switched off by the test")
            return attr(*args, **kwargs)

        return call


def _wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.timeout(60)
def test_checkin_answers_503_with_retry_after_while_the_store_is_down() -> None:
    job = _job("http-flaky")
    store = FlakyStore()
    store.down = True
    keys = JobKeys.from_secret(new_secret())
    app = selector_app(job, store, keys, actor_id="s-0", address="", tick_seconds=TICK)
    msg = CheckIn("dev-1", "http-test", True, True, True, 20)

    async def checkin(url: str) -> Assignment | Reconnect:
        async with SelectorClient(url) as client:
            return await client.checkin(msg, keys.device_token("dev-1"))

    with serve(app) as url:
        with pytest.raises(ServerBusy) as busy:
            asyncio.run(checkin(url))
        assert busy.value.retry_after == 5.0
        store.down = False
        _wait_for(lambda: app.state.ticker.store_ok, what="the selector to reach the store")
        before = time.time()
        answer = asyncio.run(checkin(url))
    assert isinstance(answer, Reconnect)
    assert before <= answer.not_before <= answer.not_after  # absolute, on this clock


@pytest.mark.timeout(60)
def test_checkpoint_is_downloaded_once_for_many_devices() -> None:
    job = _job("http-checkpoint")
    store = MemoryStore()
    keys = JobKeys.from_secret(new_secret())
    app = selector_app(job, store, keys, actor_id="s-0", address="", tick_seconds=TICK)

    async def many(url: str) -> list[Any]:
        async with SelectorClient(url) as client:
            got = await asyncio.gather(
                *(client.checkpoint(0, f"d-{i}", keys.device_token(f"d-{i}")) for i in range(200))
            )
            assert client.weights.downloads == 1
            return got

    with serve(app) as url:
        results = asyncio.run(many(url))
    first = results[0]
    assert all(r is first for r in results)
    assert [w.shape for w in first] == task_of(job).shapes
    assert not any(w.flags.writeable for w in first)


def test_client_maps_answers_to_core_types() -> None:
    """The answers a real selector gives only in rare states (202 then 410, a 404, a 4xx with a
    detail, a 503 without Retry-After), played by a small real server."""
    polls: list[str] = []
    app = FastAPI()

    @app.get("/v1/tasks/{round_key}")
    async def task(round_key: str, wait: str) -> JSONResponse:
        if round_key == "a2":
            return JSONResponse({"detail": "no selection held"}, 404)
        polls.append(wait)
        if len(polls) < 3:
            return JSONResponse({"detail": "waiting"}, 202)
        body = {"outcome": "reconnect", "reconnect_after_s": 5, "reconnect_within_s": 15}
        return JSONResponse(body, 410)

    @app.post("/v1/reports/{round_key}")
    async def report(round_key: str) -> JSONResponse:
        return JSONResponse({"detail": f"round {round_key} is closed (closing)"}, 409)

    @app.post("/v1/aborts/{round_key}")
    async def abort(round_key: str) -> JSONResponse:
        return JSONResponse({"detail": "store down"}, 503)

    async def scenario(url: str) -> None:
        async with SelectorClient(url) as client:
            before = time.time()
            released = await client.wait_task(Assignment("a1", "agg", "t"), "dev-1", wait=0.5)
            assert isinstance(released, Reconnect)
            assert before + 5 <= released.not_before <= time.time() + 5
            assert released.not_after - released.not_before == pytest.approx(10, abs=0.01)
            assert len(polls) == 3 and polls[0] == "0.500"
            assert await client.wait_task(Assignment("a2", "agg", "t"), "dev-1") is None
            env = ReportEnvelope("dev-1", "a1", "t", 3, b"")
            with pytest.raises(Refused) as refused:
                await client.report(env, "agg")
            assert refused.value.status == 409
            assert refused.value.detail == "round a1 is closed (closing)"
            with pytest.raises(ServerBusy) as busy:
                await client.abort("a1", "dev-1", "t")
            assert busy.value.retry_after == 5.0  # the default when Retry-After is missing

    with serve(app) as url:
        asyncio.run(scenario(url))


# -- bad input at the device API ------------------------------------------------------------------

BAD_JOB = _job(
    "http-bad-input",
    rounds={
        "total": 5,
        "goalCount": 3,
        "selectionTimeoutSeconds": 300,
        "reportingTimeoutSeconds": 300,
    },
    aggregation={"maxUpdateBytes": 4096},
    fleet={"devices": 10},
)
DEVICES = [f"bad-{i}" for i in range(4)]  # goal 3 x 130% = 4 selections start the round


@dataclass
class Round:
    d: Deployment
    round_key: str
    model_version: int
    tickets: dict[str, str]
    aggregator: str

    def count(self) -> int:
        partial = self.d.aggregator.state.aggregator.partial(self.round_key)
        return 0 if partial is None else int(partial.count)

    def report(
        self,
        device: str,
        body: bytes,
        *,
        ticket: str | None = None,
        round_key: str | None = None,
        metrics: str | None = None,
    ) -> httpx.Response:
        headers = {
            "content-type": "application/octet-stream",
            "x-fedfleet-device": device,
            "x-fedfleet-ticket": self.tickets[device] if ticket is None else ticket,
            "x-fedfleet-examples": "10",
            "x-fedfleet-aggregator": self.aggregator,
        }
        if metrics is not None:
            headers["x-fedfleet-metrics"] = metrics
        return httpx.post(
            f"{self.d.selector_url}/v1/reports/{round_key or self.round_key}",
            content=body,
            headers=headers,
            timeout=10,
        )


def _good_update() -> bytes:
    rng = np.random.default_rng(0)
    shapes = task_of(BAD_JOB).shapes
    return encode_arrays([rng.normal(0, 0.01, s).astype(np.float32) for s in shapes])


@pytest.fixture(scope="module")
def live() -> Iterator[Round]:
    """A round in its reporting phase, with four devices selected through the API."""
    with deployment(BAD_JOB) as d:
        tickets: dict[str, str] = {}
        assignments: dict[str, Assignment] = {}

        async def select_all() -> dict[str, TaskInfo]:
            async with SelectorClient(d.selector_url, poll_wait=2.0) as client:
                deadline = time.monotonic() + 20
                while len(assignments) < len(DEVICES):
                    assert time.monotonic() < deadline, f"only {len(assignments)} selected"
                    for dev in DEVICES:
                        if dev in assignments:
                            continue
                        msg = CheckIn(dev, "http-test", True, True, True, 20)
                        answer = await client.checkin(msg, d.keys.device_token(dev))
                        if isinstance(answer, Assignment):
                            assignments[dev] = answer
                    await asyncio.sleep(0.05)
                infos = await asyncio.gather(
                    *(client.wait_task(a, dev, give_up_after=20) for dev, a in assignments.items())
                )
            out: dict[str, TaskInfo] = {}
            for dev, info in zip(assignments, infos, strict=True):
                assert isinstance(info, TaskInfo), info
                out[dev] = info
            return out

        infos = asyncio.run(select_all())
        keys = {a.round_key for a in assignments.values()}
        assert len(keys) == 1
        tickets = {dev: a.ticket for dev, a in assignments.items()}
        info = next(iter(infos.values()))
        yield Round(d, info.round_key, info.model_version, tickets, info.aggregator)


def _checkin(url: str, body: Any, token: str | None, *, raw: bytes | None = None) -> httpx.Response:
    device = str(body.get("device_id", "bad-9")) if isinstance(body, dict) else "bad-9"
    headers = {"x-fedfleet-device": device}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    if raw is not None:
        headers["content-type"] = "application/json"
        return httpx.post(f"{url}/v1/checkin", content=raw, headers=headers, timeout=10)
    return httpx.post(f"{url}/v1/checkin", json=body, headers=headers, timeout=10)


def _body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "device_id": "bad-9",
        "population": "http-test",
        "charging": True,
        "unmetered": True,
        "idle": True,
        "num_examples": 20,
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def test_checkin_with_malformed_json_is_422(live: Round) -> None:
    token = live.d.keys.device_token("bad-9")
    r = _checkin(live.d.selector_url, None, token, raw=b'{"device_id": "bad-9", ')
    assert r.status_code == 422


def test_checkin_missing_a_field_is_422_naming_it(live: Round) -> None:
    body = _body()
    del body["num_examples"]
    r = _checkin(live.d.selector_url, body, live.d.keys.device_token("bad-9"))
    assert r.status_code == 422
    assert "num_examples" in r.json()["detail"][0]["loc"]


def test_checkin_with_a_wrong_type_is_422_naming_it(live: Round) -> None:
    r = _checkin(live.d.selector_url, _body(charging="yes"), live.d.keys.device_token("bad-9"))
    assert r.status_code == 422
    assert any("charging" in e["loc"] for e in r.json()["detail"])


def test_checkin_without_a_token_is_401(live: Round) -> None:
    r = _checkin(live.d.selector_url, _body(), None)
    assert r.status_code == 401
    assert r.headers.get("www-authenticate", "").lower().startswith("bearer")


def test_checkin_with_another_devices_token_is_401(live: Round) -> None:
    r = _checkin(live.d.selector_url, _body(), live.d.keys.device_token("bad-8"))
    assert r.status_code == 401


def test_report_with_a_bad_ticket_is_403(live: Round) -> None:
    before = live.count()
    r = live.report("bad-1", _good_update(), ticket="0" * 64)
    assert r.status_code == 403, r.text
    assert live.count() == before


def test_report_with_a_wrong_shape_is_refused(live: Round) -> None:
    before = live.count()
    body = encode_arrays([np.zeros((3, 3), np.float32)])
    r = live.report("bad-1", body)
    assert r.status_code == 422, r.text
    assert "update refused" in r.json()["detail"]
    assert live.count() == before


def test_report_with_nan_is_refused(live: Round) -> None:
    before = live.count()
    shapes = task_of(BAD_JOB).shapes
    arrays = [np.zeros(s, np.float32) for s in shapes]
    arrays[0][0, 0] = np.nan
    r = live.report("bad-2", encode_arrays(arrays))
    assert r.status_code == 422, r.text
    assert live.count() == before


def test_report_with_infinity_is_refused(live: Round) -> None:
    before = live.count()
    shapes = task_of(BAD_JOB).shapes
    arrays = [np.zeros(s, np.float32) for s in shapes]
    arrays[-1][0] = -np.inf
    r = live.report("bad-2", encode_arrays(arrays))
    assert r.status_code == 422, r.text
    assert live.count() == before


def test_report_of_the_wrong_dtype_is_refused(live: Round) -> None:
    before = live.count()
    shapes = task_of(BAD_JOB).shapes
    # int32: the same size as float32, so the size limit cannot be what refuses it
    r = live.report("bad-2", encode_arrays([np.zeros(s, np.int32) for s in shapes]))
    assert r.status_code == 422, r.text
    assert "int32, expected float32" in r.json()["detail"]
    assert live.count() == before


@pytest.mark.parametrize(
    "metrics", ['{"train_loss": NaN}', '["loss"]', '{"Loss!": 1}', '{"a": "' + "x" * 5000 + '"}']
)
def test_report_with_hostile_metrics_is_refused(live: Round, metrics: str) -> None:
    before = live.count()
    r = live.report("bad-2", _good_update(), metrics=metrics)
    assert r.status_code == 422, r.text
    assert live.count() == before


def test_report_that_is_not_serde_is_refused(live: Round) -> None:
    before = live.count()
    r = live.report("bad-2", b"PK\x03\x04 definitely not an update")
    assert r.status_code == 422, r.text
    assert live.count() == before


def test_oversized_report_is_413(live: Round) -> None:
    before = live.count()
    assert len(_good_update()) <= 4096  # the real update fits; only the big one is refused
    r = live.report("bad-3", b"\0" * 5000)
    assert r.status_code == 413, r.text
    assert live.count() == before


def test_second_report_from_a_device_is_409(live: Round) -> None:
    before = live.count()
    first = live.report("bad-0", _good_update())
    assert first.status_code == 202, first.text
    assert live.count() == before + 1
    again = live.report("bad-0", _good_update())
    assert again.status_code == 409, again.text
    assert live.count() == before + 1


def test_report_for_an_unknown_round_is_404(live: Round) -> None:
    unknown = "a999999"
    ticket = report_ticket(live.d.keys.ticket_key, BAD_JOB.key, unknown, "bad-1")
    before = live.count()
    r = live.report("bad-1", _good_update(), ticket=ticket, round_key=unknown)
    assert r.status_code == 404, r.text
    assert live.count() == before


def test_report_for_a_malformed_round_key_is_422(live: Round) -> None:
    r = live.report("bad-1", _good_update(), round_key="round-1")
    assert r.status_code == 422


def test_task_poll_with_a_bad_ticket_is_403(live: Round) -> None:
    r = httpx.get(
        f"{live.d.selector_url}/v1/tasks/{live.round_key}",
        params={"device_id": "bad-1", "wait": 0},
        headers={"x-fedfleet-ticket": "0" * 64},
        timeout=10,
    )
    assert r.status_code == 403


def test_checkpoint_of_a_future_version_is_404(live: Round) -> None:
    device = next(iter(live.tickets))
    r = httpx.get(
        f"{live.d.selector_url}/v1/checkpoints/{live.model_version + 7}",
        headers={
            "authorization": f"Bearer {live.d.keys.device_token(device)}",
            "x-fedfleet-device": device,
        },
        timeout=10,
    )
    assert r.status_code == 404


def test_checkpoint_download_needs_a_valid_device_token(live: Round) -> None:
    url = f"{live.d.selector_url}/v1/checkpoints/{live.model_version}"
    device = next(iter(live.tickets))
    good = {
        "authorization": f"Bearer {live.d.keys.device_token(device)}",
        "x-fedfleet-device": device,
    }
    ok = httpx.get(url, headers=good, timeout=10)
    assert ok.status_code == 200, ok.text
    assert ok.headers["cache-control"].startswith("private")
    refused = [
        httpx.get(url, timeout=10),  # no credential at all
        httpx.get(url, headers={"x-fedfleet-device": device}, timeout=10),
        httpx.get(url, headers={**good, "x-fedfleet-device": "someone-else"}, timeout=10),
        httpx.get(url, headers={**good, "authorization": "Bearer " + "0" * 64}, timeout=10),
    ]
    for r in refused:
        assert r.status_code == 401, r.text
        assert r.headers.get("www-authenticate") == "Bearer"
        assert r.content != ok.content


def _secagg(
    live: Round, device: str, step: str, body: bytes = b"", **headers: str
) -> httpx.Response:
    return httpx.post(
        f"{live.d.selector_url}/v1/secagg/{live.round_key}/{step}",
        content=body,
        headers={
            "x-fedfleet-device": device,
            "x-fedfleet-ticket": live.tickets[device],
            "x-fedfleet-aggregator": live.aggregator,
            **headers,
        },
        timeout=10,
    )


def test_secagg_step_with_a_bad_ticket_is_403(live: Round) -> None:
    r = _secagg(live, "bad-1", "advertise", b"{}", **{"x-fedfleet-ticket": "0" * 64})
    assert r.status_code == 403, r.text


def test_secagg_unknown_step_is_422(live: Round) -> None:
    r = _secagg(live, "bad-1", "reveal-everything")
    assert r.status_code == 422, r.text


def test_secagg_on_a_job_without_it_is_404_and_counts_nothing(live: Round) -> None:
    before = live.count()
    r = _secagg(live, "bad-1", "advertise", b'{"device_id": "bad-1"}')
    assert r.status_code == 404, r.text
    assert "secure aggregation is off" in r.json()["detail"]
    assert live.count() == before


def test_a_report_after_the_round_has_its_goal_is_refused_as_a_straggler(live: Round) -> None:
    """Runs last (keep it at the end of the file): it closes the shared round. Goal 3, four
    devices selected."""
    store = live.d.store
    for dev in ("bad-1", "bad-2"):
        r = live.report(dev, _good_update())
        assert r.status_code == 202, r.text
    late = live.report("bad-3", _good_update())
    assert late.status_code == 409, late.text
    deadline = time.monotonic() + 20
    while store.model_version(BAD_JOB.key) <= live.model_version:
        assert time.monotonic() < deadline, "the full round never committed"
        time.sleep(0.05)
    history = store.metrics(BAD_JOB.key)
    assert history[-1]["reports"] == 3  # exactly the goal; the straggler is not in it
