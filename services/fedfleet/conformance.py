"""``fedfleet conformance``: a scripted selector that checks whether a device client behaves.

A client written from ``docs/device-protocol.md`` is pointed at this server instead of a real
selector. For its one device it plays a fixed script and judges what the client does:

1. the first check-in gets a reconnect window: the next check-in must not come before it opens;
2. the next gets 503 with ``Retry-After``: the next must not come sooner;
3. the next is selected; the first task poll gets 202, the next the task (the built-in softmax
   task); the checkpoint must be downloaded with the device's token; the report must be a
   well-formed update (float32 arrays of the model's shapes, finite, not all zero) with valid
   headers, and must come exactly once;
4. the next is selected for a task whose privacy plan holds a field no client knows: the
   client must abort it (``POST /v1/aborts``) and report nothing;
5. the next gets a one-hour window, which must be honoured while the kit still listens.

Every check passes, fails with what was seen, or stays pending (the client never got there).
The server holds no job, store or aggregator: it is a test double for clients, never a
selector.
"""

from __future__ import annotations

import argparse
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from fedfleet.core.metrics import MetricsRejected, parse_metrics
from fedfleet.core.serde import SerdeError, decode_arrays, encode_arrays
from fedfleet.core.spec import BUILTIN_TASK_REF, ModelSpec, PlanSpec

__all__ = ["CHECKS", "Kit", "add_arguments", "create_app", "run"]

CHECKS = (
    "authenticates",
    "window-honoured",
    "retry-after-honoured",
    "polls-until-configured",
    "checkpoint-authenticated",
    "report-well-formed",
    "exactly-once",
    "refuses-unknown-privacy",
    "final-window-honoured",
)
"""What the kit judges, in the order the script reaches them."""

SLACK = 0.05
"""Seconds a check-in may come early (clock granularity), never more."""


@dataclass
class Check:
    name: str
    passed: bool | None = None
    detail: str = ""


@dataclass
class Kit:
    """The script's state for one device; every route handler goes through :meth:`step`."""

    device: str
    token: str
    model: ModelSpec
    window_s: float = 2.0
    retry_after_s: int = 2
    final_listen_s: float = 3.0
    checks: dict[str, Check] = field(default_factory=lambda: {n: Check(n) for n in CHECKS})
    checkins: int = 0
    not_before: float = 0.0
    polls: dict[str, int] = field(default_factory=dict)
    reports: dict[str, int] = field(default_factory=dict)
    finished_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    # -- verdicts --------------------------------------------------------------------------------
    def _set(self, name: str, passed: bool, detail: str = "") -> None:
        check = self.checks[name]
        if check.passed is False:
            return  # a failure sticks
        check.passed, check.detail = passed, detail or check.detail

    @property
    def done(self) -> bool:
        return self.finished_at is not None and time.monotonic() >= (
            self.finished_at + self.final_listen_s
        )

    def results(self) -> list[dict[str, Any]]:
        if self.done and self.checks["final-window-honoured"].passed is None:
            self._set("final-window-honoured", True)
        return [
            {"check": c.name, "passed": c.passed, "detail": c.detail} for c in self.checks.values()
        ]

    # -- helpers ---------------------------------------------------------------------------------
    def weights(self) -> list[np.ndarray[Any, Any]]:
        w = np.linspace(-0.05, 0.05, self.model.inputs * self.model.classes, dtype=np.float32)
        return [
            w.reshape(self.model.inputs, self.model.classes),
            np.zeros(self.model.classes, np.float32),
        ]

    def ticket(self, round_key: str) -> str:
        return hmac.new(self.token.encode(), round_key.encode(), "sha256").hexdigest()

    def authenticated(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return (
            scheme.lower() == "bearer"
            and hmac.compare_digest(token.strip(), self.token)
            and request.headers.get("x-fedfleet-device") == self.device
        )

    def ticketed(self, request: Request, round_key: str, device: str | None) -> bool:
        ticket = request.headers.get("x-fedfleet-ticket", "")
        return device == self.device and hmac.compare_digest(ticket, self.ticket(round_key))

    def task(self, round_key: str) -> dict[str, Any]:
        privacy = (
            {"weight_cap": 100, "future_step": {"mandatory": True}} if round_key == "a2" else None
        )
        return {
            "round_key": round_key,
            "model_version": 1 if round_key == "a1" else 2,
            "checkpoint_url": "/v1/checkpoints/1",
            "task": {
                "ref": BUILTIN_TASK_REF,
                "config": self.model.model_dump(mode="json", by_alias=True),
            },
            "plan": PlanSpec(local_epochs=1, batch_size=10, learning_rate=0.1).model_dump(
                mode="json", by_alias=True
            ),
            "evaluate": False,
            "aggregator": "aggregator-conformance",
            "privacy": privacy,
        }

    # -- the script ------------------------------------------------------------------------------
    def checkin(self, request: Request, body: dict[str, Any]) -> Response:
        now = time.monotonic()
        if not self.authenticated(request) or body.get("device_id") != self.device:
            self._set("authenticates", False, "a check-in without the device's token and id")
            return JSONResponse({"detail": "missing or invalid device token"}, 401)
        self._set("authenticates", True)
        self.checkins += 1
        n = self.checkins
        early = self.not_before - now
        judged = {2: "window-honoured", 3: "retry-after-honoured"}.get(n)
        if n >= 6:
            judged = "final-window-honoured"
        if judged is not None:
            if early > SLACK:
                self._set(judged, False, f"check-in {n} came {early:.2f} s before it was allowed")
            else:
                self._set(judged, True)
        if n == 1:
            self.not_before = now + self.window_s
            after = self.window_s
            return JSONResponse(
                {
                    "outcome": "reconnect",
                    "reconnect_after_s": after,
                    "reconnect_within_s": after + 1,
                    "reason": "not-needed",
                }
            )
        if n == 2:
            self.not_before = now + self.retry_after_s
            return JSONResponse(
                {"detail": "the shared store is unreachable; retry later"},
                503,
                headers={"Retry-After": str(self.retry_after_s)},
            )
        if n in (3, 4):
            round_key = f"a{n - 2}"
            self.not_before = 0.0
            return JSONResponse(
                {
                    "outcome": "selected",
                    "round_key": round_key,
                    "ticket": self.ticket(round_key),
                    "aggregator": "aggregator-conformance",
                }
            )
        if n == 5:
            self.finished_at = now
            if self.checks["refuses-unknown-privacy"].passed is None:
                self._set(
                    "refuses-unknown-privacy", False, "checked in again without aborting round a2"
                )
        self.not_before = now + 3600
        return JSONResponse(
            {
                "outcome": "reconnect",
                "reconnect_after_s": 3600.0,
                "reconnect_within_s": 3660.0,
                "reason": "not-needed",
            }
        )

    def poll(self, request: Request, round_key: str) -> Response:
        if round_key not in ("a1", "a2") or not self.ticketed(
            request, round_key, request.query_params.get("device_id")
        ):
            return JSONResponse({"detail": "invalid ticket for this device and round"}, 403)
        polls = self.polls[round_key] = self.polls.get(round_key, 0) + 1
        if round_key == "a1" and polls == 1:
            return JSONResponse({"detail": "waiting for the round to start"}, 202)
        if round_key == "a1":
            self._set("polls-until-configured", True)
        return JSONResponse(self.task(round_key))

    def checkpoint(self, request: Request, version: str) -> Response:
        if not self.authenticated(request):
            self._set("checkpoint-authenticated", False, "a download without the device's token")
            return JSONResponse({"detail": "missing or invalid device token"}, 401)
        if version != "1":
            return JSONResponse({"detail": "no such version"}, 404)
        self._set("checkpoint-authenticated", True)
        return Response(
            encode_arrays(self.weights()),
            media_type="application/octet-stream",
            headers={"ETag": '"v1"'},
        )

    def report(self, request: Request, round_key: str, body: bytes) -> Response:
        device = request.headers.get("x-fedfleet-device")
        if round_key not in ("a1", "a2") or not self.ticketed(request, round_key, device):
            self._set("report-well-formed", False, f"a report for {round_key} without its ticket")
            return JSONResponse({"detail": "invalid ticket for this device and round"}, 403)
        count = self.reports[round_key] = self.reports.get(round_key, 0) + 1
        if count > 1:
            self._set("exactly-once", False, f"{count} reports for round {round_key}")
            return JSONResponse({"detail": "this device already reported for this round"}, 409)
        if round_key == "a2":
            self._set(
                "refuses-unknown-privacy", False, "reported a task whose privacy it cannot know"
            )
            return JSONResponse({"detail": "accepted"}, 202)
        problem = self._report_problem(request, body)
        self._set("report-well-formed", problem is None, problem or "")
        self._set("exactly-once", True)
        if problem:
            return JSONResponse({"detail": problem}, 422)
        return JSONResponse({"status": "accepted"}, 202)

    def _report_problem(self, request: Request, body: bytes) -> str | None:
        shapes = [(self.model.inputs, self.model.classes), (self.model.classes,)]
        try:
            update = decode_arrays(body, expected_shapes=shapes, expected_dtype=np.float32)
        except SerdeError as exc:
            return f"update: {exc}"
        if not all(np.isfinite(a).all() for a in update):
            return "update holds NaN or infinity"
        if not any(np.any(a) for a in update):
            return "update is all zero (expected new minus old weights)"
        examples = request.headers.get("x-fedfleet-examples", "")
        if not examples.isdigit() or int(examples) < 1:
            return f"x-fedfleet-examples {examples!r} is not an integer >= 1"
        if request.headers.get("x-fedfleet-aggregator") != "aggregator-conformance":
            return "x-fedfleet-aggregator is not the task's aggregator"
        if request.headers.get("content-type", "").split(";")[0] != "application/octet-stream":
            return "content-type is not application/octet-stream"
        metrics = request.headers.get("x-fedfleet-metrics")
        if metrics:
            try:
                parse_metrics(metrics)
            except MetricsRejected as exc:
                return f"x-fedfleet-metrics: {exc}"
        return None

    def abort(self, request: Request, round_key: str, body: dict[str, Any]) -> Response:
        device = request.headers.get("x-fedfleet-device")
        if not self.ticketed(request, round_key, device) or body.get("device_id") != device:
            return JSONResponse({"detail": "invalid ticket for this device and round"}, 403)
        if round_key == "a2" and not self.reports.get("a2"):
            self._set("refuses-unknown-privacy", True)
        return JSONResponse({"status": "noted"}, 202)


async def _json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > 1024:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def create_app(kit: Kit) -> FastAPI:
    """The kit's device API (``/v1``) and ``GET /conformance`` with the verdicts so far."""
    app = FastAPI(title="fedfleet conformance kit", openapi_url=None)

    @app.post("/v1/checkin")
    async def checkin(request: Request) -> Response:
        body = await _json(request)
        with kit.lock:
            return kit.checkin(request, body)

    @app.get("/v1/tasks/{round_key}")
    def poll(request: Request, round_key: str) -> Response:
        with kit.lock:
            return kit.poll(request, round_key)

    @app.get("/v1/checkpoints/{version}")
    def checkpoint(request: Request, version: str) -> Response:
        with kit.lock:
            return kit.checkpoint(request, version)

    @app.post("/v1/reports/{round_key}")
    async def report(request: Request, round_key: str) -> Response:
        body = await request.body()
        with kit.lock:
            return kit.report(request, round_key, body)

    @app.post("/v1/aborts/{round_key}")
    async def abort(request: Request, round_key: str) -> Response:
        body = await _json(request)
        with kit.lock:
            return kit.abort(request, round_key, body)

    @app.get("/conformance")
    def verdicts() -> dict[str, Any]:
        with kit.lock:
            return {"done": kit.done, "checks": kit.results()}

    return app


# -- the command ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8099, help="port to listen on")
    parser.add_argument("--device", default="conformance-1", help="the device id the client uses")
    parser.add_argument("--token", required=True, help="the device token the client presents")
    parser.add_argument("--inputs", type=int, default=64, help="features per example of the task")
    parser.add_argument("--classes", type=int, default=10, help="classes of the task")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for the client"
    )
    parser.add_argument("--report", default=None, help="write the verdicts as JSON to this file")


def run(args: argparse.Namespace) -> int:
    """Serve the kit until the script ends or ``--timeout``; print the verdicts; 0 iff all pass."""
    import uvicorn

    kit = Kit(args.device, args.token, ModelSpec(inputs=args.inputs, classes=args.classes))
    server = uvicorn.Server(
        uvicorn.Config(create_app(kit), host=args.host, port=args.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    print(f"conformance kit on http://{args.host}:{args.port} for device {args.device}", flush=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and not kit.done:
        time.sleep(0.2)
    server.should_exit = True
    thread.join(10)
    with kit.lock:
        results = kit.results()
    for r in results:
        mark = {True: "pass", False: "FAIL", None: "pending"}[r["passed"]]
        print(f"{mark:8} {r['check']:26} {r['detail']}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"checks": results}, f, indent=1)
    return 0 if all(r["passed"] for r in results) else 1
