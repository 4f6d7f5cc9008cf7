"""The web dashboard in a real headless chromium, over a real running job.

A job runs in the deployed shape (redis-server with a password, coordinator and standby,
selectors and aggregators as uvicorn processes, a simulated fleet over HTTP); the dashboard is
served by real uvicorn on loopback over the same Redis; playwright-core drives Debian's
chromium (``dashboard.js``). The page must show the job's committed rounds advancing and its
accuracy plot gaining points without a reload, render a hostile job name as text, never show
the Redis password, load nothing from another origin, and log no error. The screenshot is
written to ``out/browser/dashboard.png`` in the repository (git-ignored) and its path printed.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedfleet.dashboard.app import LOOPBACK_HOSTS, create_app
from fedfleet.dashboard.views import redact_store_url
from fedfleet.store.redis import RedisStore
from tests.browser.playwright import BrowserMissing, run_node_script
from tests.integration.deployed import small_job
from tests.integration.live_job import live_job
from tests.redis_server import RedisServer
from tests.uvicorn_thread import serve

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "out" / "browser" / "dashboard.png"
HOSTILE = 'ns/<img src=x onerror="window.__fedfleetPwned=true">'


@pytest.fixture
def hostile_job(redis_url: str) -> Iterator[str]:
    """A job record whose name and fields are HTML, as a user could name a job."""
    store = RedisStore.from_url(redis_url)
    token = store.acquire_lease(HOSTILE, "someone", ttl=600.0)
    assert token is not None
    store.put_job_state(
        HOSTILE,
        token,
        {"phase": "<b>Running</b>", "round": 1, "reason": "<script>alert(1)</script>"},
    )
    yield HOSTILE
    store.delete_job(HOSTILE)
    store.close()


@pytest.mark.timeout(900)  # bounds a hang on a loaded machine; not a performance check
def test_dashboard_shows_a_running_job_advancing(
    redis_server: RedisServer, redis_url: str, hostile_job: str
) -> None:
    job = small_job(f"browser-{secrets.token_hex(3)}", rounds={"total": 200})
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    reader = RedisStore.from_url(redis_url)
    app = create_app(
        reader,
        store_label=redact_store_url(redis_url),
        interval=0.5,
        allowed_hosts=LOOPBACK_HOSTS,
    )
    try:
        with live_job(job, redis_url) as d, serve(app) as url:
            try:
                seen = run_node_script(
                    Path(__file__).with_name("dashboard.js"),
                    {
                        "url": url,
                        "job": job.key,
                        "hostile": hostile_job,
                        "screenshot": str(SCREENSHOT),
                        "timeoutMs": 240_000,
                    },
                    timeout=600,
                )
            except BrowserMissing as exc:
                pytest.fail(f"cannot run the browser test: {exc}", pytrace=False)
            committed_at_end = d.store.model_version(job.key)
    finally:
        reader.close()

    print(f"dashboard screenshot: {SCREENSHOT}")
    first, second = seen["first"], seen["second"]
    assert first["name"] == second["name"] == job.key
    assert first["phase"] == "Running"
    assert 1 <= first["round"] < second["round"] <= committed_at_end
    assert 1 <= first["accuracyPoints"] < second["accuracyPoints"]
    assert second["accuracyMarkers"] == second["accuracyPoints"]  # one dot per committed round
    charts = {c["id"]: c["points"] for c in seen["charts"]}
    assert {"accuracy", "loss", "participants", "dropouts", "durations", "abandoned"} <= set(charts)
    assert charts["loss"] >= 1 and charts["participants"] >= 1
    # every numeric key of the metrics rows gets a chart (here: reports and examples)
    assert {"metric:reports", "metric:examples"} <= set(charts)
    assert seen["status"] == "live"
    # A hostile job name is text: shown literally, no element made of it, nothing run.
    assert seen["hostileRow"] is not None
    assert seen["hostileRow"]["cells"][0] == hostile_job
    assert seen["hostileRow"]["cells"][1] == "<b>Running</b>"
    assert seen["hostileRow"]["elements"] == 0
    assert seen["pwned"] is False
    assert redis_server.password and redis_server.password not in seen["html"]
    assert redis_server.password not in seen["text"]
    assert seen["foreignRequests"] == []
    assert seen["problems"] == []
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
