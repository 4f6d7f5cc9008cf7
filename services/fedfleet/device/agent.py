"""One real device taking part in its population's federated learning, for as long as it runs.

:class:`DeviceAgent` is the public entry point for an app on a Linux device (and the reference
that mobile SDKs follow). It is configured once — server URL, population, state directory,
Example Store, the tasks it may run, where its eligibility comes from — and then loops:

1. enroll once (``POST /v1/enroll``) and keep the identity in the state directory; renew the
   credential once half its lifetime has passed;
2. check in only when the device is eligible and the persisted reconnect time has come (the
   time is picked inside the server's window by :class:`~fedfleet.device.runtime.FLRuntime`);
3. back off on 503 / 429 (``Retry-After``) and on connection errors (exponential, 1-60 s, with
   jitter) without ever giving up: a job ending and its selector going away is normal;
4. when selected, run the task with :class:`FLRuntime` on the Example Store, re-checking the
   signals before every epoch and aborting (``POST /v1/aborts``) when eligibility is lost, and
   report at most once per round (the round key is written to the state before the upload).

Security: a device only runs the tasks it was configured to run (the built-in ones unless told
otherwise); any other task ref is refused locally and the assignment aborted, so a server cannot
make a device import arbitrary modules. A task's ``path`` from the server is ignored for the same
reason (allowed tasks must be installed). A 401 with a stored credential stops the agent with
:class:`CredentialRefused`: it never re-enrolls on its own (that is ``re_enroll=True``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Collection

import numpy as np

from fedfleet.core.protocol import Assignment, Reconnect
from fedfleet.core.spec import BUILTIN_TASK_REF, EligibilitySpec, TaskSpec
from fedfleet.device.enroll_client import EnrollmentClient
from fedfleet.device.enrollment import (
    CREDENTIAL_REFUSED,
    CredentialRefused,
    Enrollment,
    EnrollmentRefused,
    when,
)
from fedfleet.device.http_transport import (
    ProtocolError,
    Refused,
    SelectorClient,
    ServerBusy,
    TaskInfo,
    TransportError,
)
from fedfleet.device.runtime import (
    DeviceConditions,
    ExampleSource,
    FLRuntime,
    SecureContribution,
    TaskAborted,
)
from fedfleet.device.scheduling import backoff_delay, retry_after_delay
from fedfleet.device.signals import ConditionsError, ConditionsSource
from fedfleet.device.state import Identity, StateDir
from fedfleet.device.upload import (
    Ineligible,
    Interruptible,
    Stopped,
    abort_task,
    upload_report,
    walk_secure_aggregation,
)
from fedfleet.tasks import LoadedTask, TaskError, load_task

__all__ = [
    "BUILTIN_TASKS",
    "CREDENTIAL_REFUSED",
    "ConditionsSource",
    "CredentialRefused",
    "DeviceAgent",
    "EnrollmentRefused",
]

log = logging.getLogger("fedfleet.device")

BUILTIN_TASKS: frozenset[str] = frozenset({BUILTIN_TASK_REF})
"""The task refs every device runs unless configured otherwise."""


class DeviceAgent:
    """A device of ``population`` at ``server``, with its state in ``state``.

    ``examples`` is the Example Store the app feeds; ``conditions`` reads the eligibility
    signals; ``allowed_tasks`` are the task refs it may run; ``enroll_token`` is needed only
    until the device is enrolled. ``policy`` is the device's own eligibility gate (charging,
    unmetered, idle and at least one example by default: the server applies the job's own on
    top). The ``*_seconds`` knobs: how long an ineligible device waits before it looks again,
    how long it rests after a report, how long it waits for a plan once selected.
    """

    def __init__(
        self,
        server: str,
        population: str,
        state: StateDir,
        examples: ExampleSource,
        *,
        conditions: ConditionsSource,
        allowed_tasks: Collection[str] = BUILTIN_TASKS,
        enroll_token: str | None = None,
        re_enroll: bool = False,
        policy: EligibilitySpec | None = None,
        recheck_seconds: float = 60.0,
        rest_seconds: float = 10.0,
        task_wait_seconds: float = 600.0,
        poll_wait: float = 10.0,
        secagg_poll_seconds: float = 0.5,
        seed: int | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.ca_file = ca_file
        """A private CA to trust for an https:// server, besides the system's."""
        self.population = population
        self.state = state
        self.examples = examples
        self.conditions = conditions
        self.allowed_tasks = frozenset(allowed_tasks)
        self.enroll_token = enroll_token
        self.re_enroll = re_enroll
        self.policy = policy or EligibilitySpec()
        self.recheck_seconds = recheck_seconds
        self.rest_seconds = rest_seconds
        self.task_wait_seconds = task_wait_seconds
        self.poll_wait = poll_wait
        self.secagg_poll_seconds = secagg_poll_seconds
        self.rng = random.Random(seed)
        self._np_rng = np.random.default_rng(seed)
        self.identity: Identity | None = None
        self.reported: list[str] = state.load_reported()
        self.next_checkin = state.load_next_checkin()
        self._failures = 0
        self._last_ineligible: str | None = None
        self._stop = threading.Event()
        self._waits = Interruptible(self._stop)
        self._abort_reason: str | None = None
        """Why the last eligibility check during a task said no (None: it never did)."""
        self._runtime: FLRuntime | None = None

    # -- public API ------------------------------------------------------------------------------
    def enroll_if_needed(self, stop: threading.Event | None = None) -> Identity | None:
        """The stored identity, or a new one from ``POST /v1/enroll`` (retried while the server
        is unreachable or busy; None if ``stop`` was set meanwhile). Raises
        :class:`EnrollmentRefused` when it cannot succeed."""
        self._stop = stop or threading.Event()
        self._waits = Interruptible(self._stop)
        try:
            return asyncio.run(self._enroll_once())
        except Stopped:
            return None

    def run(self, stop: threading.Event) -> None:
        """Take part until ``stop`` is set (then abort a running task and return). Raises
        :class:`CredentialRefused` on a 401 with the stored credential."""
        self._stop = stop
        self._waits = Interruptible(stop)
        asyncio.run(self._main())

    # -- plumbing --------------------------------------------------------------------------------
    def _enrollment(self, client: EnrollmentClient) -> Enrollment:
        return Enrollment(
            client,
            self.state,
            self.server,
            self.population,
            self.enroll_token,
            self._waits,
            self.rng,
        )

    async def _enroll_once(self) -> Identity:
        client = EnrollmentClient(self.server)
        try:
            return await self._identity(self._enrollment(client))
        finally:
            await client.aclose()

    async def _identity(self, enrollment: Enrollment) -> Identity:
        """The stored identity, or a fresh one (which starts with a clean schedule)."""
        identity = enrollment.stored(self.re_enroll)
        self.re_enroll = False
        if identity is None:
            identity = await enrollment.enroll()
            self.reported, self.next_checkin = [], 0.0
            self._save_schedule()
        self.identity = identity
        return identity

    def _save_schedule(self) -> None:
        self.state.save_schedule(self.next_checkin, self.reported)

    def _later(self, delay: float, why: str) -> None:
        self.next_checkin = time.time() + delay
        self._save_schedule()
        log.info("%s; next check-in in %.1fs", why, delay)

    def _failed(self, exc: Exception, what: str, *, credential: bool = False) -> None:
        """Schedule the retry after a failed request (never gives up). A 401 to a request
        that carried the credential (``credential``) is :class:`CredentialRefused`."""
        if credential and isinstance(exc, Refused) and exc.status == 401:
            raise CredentialRefused
        self._failures += 1
        if isinstance(exc, ServerBusy | Refused) and (
            isinstance(exc, ServerBusy) or exc.status == 429
        ):
            delay = retry_after_delay(exc.retry_after, self._failures, self.rng)
        else:
            delay = backoff_delay(self._failures, self.rng)
        self._later(delay, f"{what}: {type(exc).__name__}: {exc}")

    # -- the loop --------------------------------------------------------------------------------
    async def _main(self) -> None:
        enroller = EnrollmentClient(self.server, ca_file=self.ca_file)
        client = SelectorClient(
            self.server,
            max_connections=4,
            max_long_polls=2,
            poll_wait=self.poll_wait,
            ca_file=self.ca_file,
        )
        try:
            enrollment = self._enrollment(enroller)
            identity = await self._identity(enrollment)
            runtime = FLRuntime(
                identity.device_id,
                self.population,
                self.examples,
                policy=self.policy,
                rng=self._np_rng,
                tasks=self._load_task,
            )
            runtime.next_checkin = self.next_checkin
            self._runtime = runtime
            while not self._stop.is_set():
                identity = self.identity = await enrollment.renew_if_due(identity)
                try:
                    await self._step(client, runtime)
                except (CredentialRefused, Stopped):
                    raise
                except Exception:  # a bug must not end a device that runs for months
                    log.exception("unexpected error; carrying on")
                    self._failures += 1
                    self._later(backoff_delay(self._failures, self.rng), "after the error")
        except Stopped:
            pass
        finally:
            self._save_schedule()
            await client.aclose()
            await enroller.aclose()
        log.info("stopped")

    async def _give_back(self, client: SelectorClient, a: Assignment, reason: str) -> None:
        assert self.identity is not None
        await abort_task(client, a, self.identity.device_id, reason)

    def _load_task(self, spec: TaskSpec) -> LoadedTask:
        """Only the allowed tasks, and only as installed (a server-given ``path`` is ignored)."""
        if spec.ref not in self.allowed_tasks:
            raise TaskError(f"task {spec.ref} is not allowed on this device")
        return load_task(spec.model_copy(update={"path": None}))

    def _read_conditions(self, busy: bool = False) -> DeviceConditions | str:
        try:
            return self.conditions(busy=busy)
        except ConditionsError as exc:
            return f"conditions-unreadable ({exc})"

    async def _step(self, client: SelectorClient, runtime: FLRuntime) -> None:
        now = time.time()
        if now < self.next_checkin:
            # Wake at least once a minute: a renewal may come due meanwhile.
            await self._waits.sleep(min(self.next_checkin - now, 60.0))
            return
        conditions = self._read_conditions()
        reason = (
            conditions
            if isinstance(conditions, str)
            else runtime.ineligible_because(conditions, now)
        )
        if reason is not None or isinstance(conditions, str):
            if reason != self._last_ineligible:
                log.info("not eligible: %s", reason)
                self._last_ineligible = reason
            await self._waits.sleep(self.recheck_seconds * self.rng.uniform(0.5, 1.5))
            return
        self._last_ineligible = None
        assert self.identity is not None
        try:
            answer = await self._waits.guard(
                client.checkin(runtime.checkin(conditions, now), self.identity.credential)
            )
        except TransportError as exc:
            self._failed(exc, "check-in", credential=True)
            return
        self._failures = 0
        if isinstance(answer, Reconnect):
            runtime.on_reconnect(answer)
            self.next_checkin = runtime.next_checkin
            self._save_schedule()
            log.info(
                "check-in: reconnect (%s) at %s", answer.reason or "-", when(self.next_checkin)
            )
            return
        log.info("check-in: selected for round %s", answer.round_key)
        await self._participate(client, runtime, answer)

    async def _participate(
        self, client: SelectorClient, runtime: FLRuntime, assignment: Assignment
    ) -> None:
        identity = self.identity
        assert identity is not None
        device_id, key = identity.device_id, assignment.round_key
        try:
            # Eligibility is watched while the device waits for its plan, as during training.
            info = await self._waits.guard(
                client.wait_task(assignment, device_id, give_up_after=self.task_wait_seconds),
                check=lambda: self._ineligible(busy=False),
            )
        except ProtocolError as exc:  # a task this device cannot understand: give it back
            await self._give_back(client, assignment, "bad-task")
            self._failed(exc, f"the plan of {key}")
            return
        except TransportError as exc:
            self._failed(exc, f"waiting for the plan of {key}")
            return
        except Ineligible as exc:
            await self._give_back(client, assignment, f"eligibility-lost: {exc.reason}"[:200])
            self._later(self.recheck_seconds, f"round {key}: not eligible any more")
            return
        except Stopped:
            await self._give_back(client, assignment, "stopped")
            raise
        if info is None:
            self._later(backoff_delay(1, self.rng), f"round {key}: released before its plan")
            return
        if isinstance(info, Reconnect):
            runtime.on_reconnect(info)
            self._later(max(0.0, runtime.next_checkin - time.time()), f"round {key} ended")
            return
        refusal = self._refusal(info)
        if refusal is not None:
            log.warning("round %s: refusing task %s: %s", key, info.task.ref, refusal)
            await self._give_back(client, assignment, refusal)
            self._later(self.recheck_seconds, f"round {key}: task refused")
            return
        try:
            await self._train_and_report(client, runtime, assignment, info)
        except Stopped:
            await self._give_back(client, assignment, "stopped")
            raise

    def _refusal(self, info: TaskInfo) -> str | None:
        if info.task.ref not in self.allowed_tasks:
            return "task-not-allowed"
        if info.round_key in self.reported:
            return "already-reported"
        return None

    async def _train_and_report(
        self, client: SelectorClient, runtime: FLRuntime, assignment: Assignment, info: TaskInfo
    ) -> None:
        identity = self.identity
        assert identity is not None
        key = assignment.round_key
        try:
            task = await self._waits.guard(
                client.task(assignment, info, identity.device_id, identity.credential)
            )
        except TransportError as exc:
            await self._give_back(client, assignment, "checkpoint-unavailable")
            self._failed(exc, f"checkpoint {info.model_version} of {key}", credential=True)
            return
        self._abort_reason = None
        try:
            outcome = await asyncio.to_thread(runtime.execute, task, time.time(), self._eligible)
        except TaskAborted as exc:
            if self._stop.is_set():
                raise Stopped from None
            log.info("round %s: task aborted: %s", key, exc)
            # Eligibility lost (the checks said no), or the task itself cannot run here.
            reason = self._abort_reason or f"task-error: {exc}"[:200]
            await self._give_back(client, assignment, reason)
            self._later(self.recheck_seconds, f"round {key}: aborted")
            return
        except Exception as exc:  # the task's own code failed on this device's data
            log.warning("round %s: task failed: %s: %s", key, type(exc).__name__, exc)
            await self._give_back(client, assignment, "task-error")
            self._later(self.recheck_seconds, f"round {key}: task failed")
            return
        # At most once: the key is in the state before any byte of the report leaves.
        self.reported.append(key)
        self._save_schedule()
        if isinstance(outcome, SecureContribution):
            ok = await walk_secure_aggregation(
                client,
                outcome,
                self._waits,
                poll_seconds=self.secagg_poll_seconds,
                give_up_seconds=self.task_wait_seconds,
            )
            what = "secure aggregation completed" if ok else "left secure aggregation"
        else:
            ok = await upload_report(client, outcome, info.aggregator, self._waits, self.rng)
            what = "reported" if ok else "report not accepted"
        log.info("round %s: %s", key, what)
        self._later(self.rest_seconds * self.rng.uniform(0.5, 1.5), f"round {key} done")

    def _ineligible(self, busy: bool) -> str | None:
        """Why the device may not work now (None: it may)."""
        conditions = self._read_conditions(busy=busy)
        if isinstance(conditions, str):
            return conditions
        runtime = self._runtime
        assert runtime is not None
        return runtime.ineligible_because(conditions, time.time())

    def _eligible(self, epoch: int) -> bool:
        """Asked by the training thread before every epoch."""
        if self._stop.is_set():
            self._abort_reason = "stopped"
            return False
        reason = self._ineligible(busy=True)
        if reason is not None:
            self._abort_reason = f"eligibility-lost: {reason}"[:200]
            return False
        return True
