"""The dashboard's HTTP surface on real uvicorn: what it answers, and what it refuses.

Over the memory store (the reference store) and a real redis-server with a password: the API
lists jobs and pages attempts incrementally, refuses writes, unknown jobs, foreign Host headers
and paths outside its few files, sends its security headers, reports a dead store as 503, and
never lets the Redis password out. ``fedfleet dashboard`` itself is run as a process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fedfleet.dashboard.app import LOOPBACK_HOSTS, create_app
from fedfleet.dashboard.views import redact_store_url
from fedfleet.local import free_port
from fedfleet.store.memory import MemoryStore
from fedfleet.store.redis import RedisStore
from tests.redis_server import RedisServer
from tests.uvicorn_thread import serve

pytestmark = pytest.mark.integration

JOB = "team-a/digits"


def _attempt(round_: int, **extra: Any) -> dict[str, Any]:
    return {
        "round": round_,
        "attempt": round_,
        "selected": 11,
        "reported": 8,
        "dropped": 1,
        "abandoned": False,
        "reason": "",
        "opened_at": 10.0 * round_,
        "ended_at": 10.0 * round_ + 2.0,
        "model_version": round_,
        "metrics": {"accuracy": 0.5, "loss": 1.5, "device": {"loss": 1.2}},
        **extra,
    }


@pytest.fixture
def memory() -> Iterator[tuple[MemoryStore, int, str]]:
    store = MemoryStore()
    token = store.acquire_lease(JOB, "c0", ttl=600.0)
    assert token is not None
    store.put_job_state(
        JOB, token, {"phase": "Running", "round": 1, "rounds": 5, "last_metrics": {"loss": 1.5}}
    )
    store.record_attempt(JOB, token, _attempt(1))
    app = create_app(store, store_label="memory://", interval=0.5, allowed_hosts=LOOPBACK_HOSTS)
    with serve(app) as url:
        yield store, token, url


def test_jobs_and_incremental_attempts(memory: tuple[MemoryStore, int, str]) -> None:
    store, token, url = memory
    [job] = httpx.get(f"{url}/api/jobs").json()["jobs"]
    assert (job["key"], job["phase"], job["round"], job["rounds"]) == (JOB, "Running", 1, 5)
    first = httpx.get(f"{url}/api/job", params={"key": JOB}).json()
    assert [a["round"] for a in first["attempts"]] == [1]
    assert first["attempts"][0]["metrics"] == {"accuracy": 0.5, "loss": 1.5, "device.loss": 1.2}
    assert (first["next"], first["more"]) == (1, False)
    store.record_attempt(JOB, token, _attempt(2))
    store.record_attempt(JOB, token, _attempt(3, abandoned=True, reason="job-finished"))
    more = httpx.get(f"{url}/api/job", params={"key": JOB, "start": first["next"]}).json()
    assert [a["round"] for a in more["attempts"]] == [2]  # only what is new, and a real round
    assert more["next"] == 3


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"key": "team-a/none"}, 404),
        ({"key": ""}, 422),
        ({"key": JOB, "start": -1}, 422),
        ({"key": JOB, "start": "x"}, 422),
        ({}, 422),
    ],
)
def test_bad_job_requests_are_refused(
    memory: tuple[MemoryStore, int, str], params: dict[str, Any], status: int
) -> None:
    assert httpx.get(f"{memory[2]}/api/job", params=params).status_code == status


def test_it_is_read_only(memory: tuple[MemoryStore, int, str]) -> None:
    store, _, url = memory
    before = (store.jobs(), store.job_state(JOB), store.attempts(JOB))
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        for path in ("/api/jobs", f"/api/job?key={JOB}", "/"):
            response = httpx.request(method, f"{url}{path}", json={"phase": "Failed"})
            assert response.status_code == 405, (method, path)
    assert (store.jobs(), store.job_state(JOB), store.attempts(JOB)) == before


def test_only_its_own_files_are_served(memory: tuple[MemoryStore, int, str]) -> None:
    url = memory[2]
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in page.text and "<script>" not in page.text  # no inline code
    js = httpx.get(f"{url}/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "innerHTML" not in js.text  # every node is built from text, never parsed HTML
    for path in ("/static/views.py", "/static/..%2Fapp.py", "/static/index.html", "/etc/passwd"):
        assert httpx.get(f"{url}{path}").status_code == 404, path


def test_security_headers(memory: tuple[MemoryStore, int, str]) -> None:
    for path in ("/", "/api/jobs", "/static/app.js"):
        headers = httpx.get(f"{memory[2]}{path}").headers
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert headers["x-content-type-options"] == "nosniff"


def test_foreign_host_headers_are_refused(memory: tuple[MemoryStore, int, str]) -> None:
    """A page on another site that rebinds its name to 127.0.0.1 cannot read the API."""
    url = memory[2]
    port = url.rsplit(":", 1)[1]
    assert httpx.get(f"{url}/api/jobs", headers={"host": "evil.example"}).status_code == 400
    assert httpx.get(f"{url}/api/jobs", headers={"host": f"localhost:{port}"}).status_code == 200


def test_the_redis_password_never_leaves(redis_server: RedisServer, redis_url: str) -> None:
    password = redis_server.password
    assert password and password in redis_url
    store = RedisStore.from_url(redis_url)
    token = store.acquire_lease(JOB, "c0", ttl=60.0)
    assert token is not None
    store.put_job_state(JOB, token, {"phase": "Running", "round": 0})
    try:
        app = create_app(store, store_label=redact_store_url(redis_url))
        with serve(app) as url:
            bodies = [
                httpx.get(f"{url}{path}", params=params)
                for path, params in [
                    ("/", {}),
                    ("/api/config", {}),
                    ("/api/jobs", {}),
                    ("/api/job", {"key": JOB}),
                    ("/api/job", {"key": "a{b}"}),  # refused by the store: no such job
                ]
            ]
        assert [b.status_code for b in bodies] == [200, 200, 200, 200, 404]
        assert bodies[1].json()["store"] == f"redis://{redis_server.host}:{redis_server.port}/0"
        assert JOB in [j["key"] for j in bodies[2].json()["jobs"]]
        assert not any(password in b.text for b in bodies)
    finally:
        store.delete_job(JOB)
        store.close()


def test_a_dead_store_is_503_without_the_url() -> None:
    port = free_port()
    store = RedisStore.from_url(f"redis://:hunter2@127.0.0.1:{port}/0", socket_timeout=0.5)
    with serve(create_app(store)) as url:
        for path, params in [("/api/jobs", {}), ("/api/job", {"key": JOB})]:
            response = httpx.get(f"{url}{path}", params=params)
            assert response.status_code == 503
            assert response.json() == {"error": "store unavailable"}
            assert "hunter2" not in response.text and str(port) not in response.text
    store.close()


def test_the_command_serves_on_loopback_and_stops_on_sigterm(
    redis_server: RedisServer, redis_url: str
) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedfleet.cli",
            "dashboard",
            "--store",
            redis_url,
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 120  # a loaded machine imports slowly; this bounds a hang
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/api/jobs", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the dashboard did not start"
                time.sleep(0.2)
        assert response.status_code == 200 and "jobs" in response.json()
        # listening on loopback only: this machine's other addresses answer nothing
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.2:{port}/api/jobs", timeout=2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert proc.returncode in (0, -signal.SIGTERM), err
    assert f"http://127.0.0.1:{port}/" in err
    assert redis_server.password and redis_server.password not in out + err
