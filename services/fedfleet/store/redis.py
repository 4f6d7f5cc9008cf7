"""Redis store for deployments: the shared state of every actor of a job, in one Redis.

It has exactly the semantics of :class:`fedfleet.store.memory.MemoryStore` (both are held to
``tests/contract``). Where the memory store takes a lock, this one runs a Lua script: each
multi-key step (take the lease and issue a token, check the token and write, check the version
and commit) is one script, so Redis runs it atomically and no MULTI/WATCH retry loop exists.

Key layout, all under ``{prefix}:{{job}}:`` — the job is a Redis Cluster hash tag, so every key
of a job lives in one slot and the scripts may touch several of them:

==========================  ======  ================================================
``lease``                   string  ``holder:token``, expires with the lease (PX)
``token``                   string  fencing-token counter (INCR, floored by the server's clock
                                    in ms so it survives Redis losing its data); fenced writes
                                    compare with it
``members:{role}``          zset    actor id, scored by expiry in ms (Redis server time)
``addr:{role}``             hash    actor id -> address
``rounds``                  hash    attempt key -> JSON of :meth:`RoundState.to_dict`
``quotas``                  hash    selector id -> JSON of :meth:`Quota.to_dict`
``count:{attempt}:{kind}``  hash    actor id -> count (HINCRBY)
``kinds:{attempt}``         set     counter kinds used by the attempt (so clearing finds them)
``partials:{attempt}``      hash    aggregator id -> partial-sum bytes
``checkpoint``              hash    ``version``, ``round``, ``data`` (written together)
``metrics``                 list    JSON of each committed round's metrics, oldest first
``attempts``                list    JSON of each finished attempt, oldest first
``state``                   string  JSON job-level record
``loads``                   hash    actor id -> JSON of its latest measured load
``draining``                set     ids of the aggregators being drained
==========================  ======  ================================================

A population's device revocations are not a job's: they live in
``{prefix}:population:{{population}}:revoked``, a hash of device id -> revoked-at (Unix
seconds). Each write drops the entries older than ``REVOCATION_KEEP_S`` (by the server's
clock) and refreshes the key's expiry to that span, so the hash holds at most the revocations
of the last 31 days and vanishes when none is left. The population's gateway routes (its
jobs' selectors) live beside them in ``...:routes`` (a zset of route id -> expiry, server
clock) and ``...:route-entries`` (route id -> JSON), kept like a job's registrations.

Times: lease and registration expiry use the Redis server's clock (PX, ``TIME`` in scripts),
so actors with skewed clocks agree; :meth:`RedisStore.lease` reports ``expires_at`` on the
caller's ``time.time()`` (now plus the remaining PTTL). Values are JSON or raw bytes; nothing
is pickled. Every connection failure surfaces as :class:`StoreUnavailable`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import urlparse

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from fedfleet.core.protocol import Quota, RoundState
from fedfleet.store.base import (
    REVOCATION_KEEP_S,
    Checkpoint,
    Claim,
    ConflictError,
    FencedError,
    Lease,
    StoreUnavailable,
)
from fedfleet.store.redis_events import RedisEvents

__all__ = ["PASSWORD_ENV", "RedisStore"]

PASSWORD_ENV = "FEDFLEET_REDIS_PASSWORD"
"""Environment variable holding the Redis password when the URL carries none (a Secret)."""

_REPORTED = "reported"
_SCAN_BATCH = 500

# -- Lua scripts ----------------------------------------------------------------------------------
# Fenced scripts start with _FENCE and answer {code, value}: code -1 = stale token (value is the
# current token), -2 = version conflict (value is the current version), 0 = done.
_FENCE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) ~= current then return {-1, current} end
"""

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: lease, token. ARGV: holder, ttl_ms. A token is issued only when the lease is taken, so
# a failed attempt never invalidates the current holder's token. A token is never below the
# Redis server's clock in milliseconds: if Redis comes back empty (no persistence, a lost
# volume), the next token still exceeds every token issued before, so a deposed coordinator
# stays fenced and attempt numbers (floored by the token) are never reused.
_ACQUIRE = (
    _NOW_MS
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2])
if token < now then
  token = now
  redis.call('SET', KEYS[2], token)
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
return token
"""
)

# KEYS: lease. ARGV: holder:token, ttl_ms.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: lease. ARGV: holder:token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: token, hash. ARGV: token, field, value, field, value, ...
_FENCED_HSET = (
    _FENCE
    + """
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
return {0, current}
"""
)

# KEYS: token, key. ARGV: token, value.
_FENCED_SET = (
    _FENCE
    + """
redis.call('SET', KEYS[2], ARGV[2])
return {0, current}
"""
)

# KEYS: token, list. ARGV: token, value.
_FENCED_RPUSH = (
    _FENCE
    + """
redis.call('RPUSH', KEYS[2], ARGV[2])
return {0, current}
"""
)

# KEYS: token, checkpoint, metrics. ARGV: token, expected version, round, data, metrics JSON.
# The client writes model_version = expected + 1 into the metrics JSON: it is the new version
# whenever the version check passes, so Lua never re-encodes JSON (cjson would round floats).
_COMMIT = (
    _FENCE
    + """
local version = tonumber(redis.call('HGET', KEYS[2], 'version') or '0')
if version ~= tonumber(ARGV[2]) then return {-2, version} end
redis.call('HSET', KEYS[2], 'version', version + 1, 'round', ARGV[3], 'data', ARGV[4])
redis.call('RPUSH', KEYS[3], ARGV[5])
return {0, version + 1}
"""
)

# KEYS: members zset, address hash. ARGV: actor id, address, ttl_ms.
_REGISTER = (
    _NOW_MS
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 0
"""
)

# KEYS: members zset, address hash. Prunes the expired, answers id, address, id, address, ...
_MEMBERS = (
    _NOW_MS
    + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(dead) do redis.call('HDEL', KEYS[2], id) end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
end
return out
"""
)

# KEYS: counter hash, kinds set. ARGV: actor id, n, kind.
_ADD_COUNT = """
redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
return 0
"""

# A device's claim on an attempt (reported or aborted) lives in the attempt's claims hash until
# clear_round; the expiry only bounds what an attempt that is never cleared can leave behind.
_CLAIMS_TTL_MS = 7 * 86_400_000

# KEYS: "reported" counter hash, kinds set, claims hash. ARGV: aggregator id, goal, kind,
# device id, claims ttl_ms. Answers a Claim value.
_CLAIM = """
local prior = redis.call('HGET', KEYS[3], ARGV[4])
if prior then return prior end
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(v) end
if total >= tonumber(ARGV[2]) then return 'full' end
redis.call('HSET', KEYS[3], ARGV[4], 'reported')
redis.call('PEXPIRE', KEYS[3], ARGV[5])
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('SADD', KEYS[2], ARGV[3])
return 'taken'
"""

# KEYS: claims hash. ARGV: device id, claims ttl_ms. 1 when the abort is recorded now.
_ABORT = """
if redis.call('HSETNX', KEYS[1], ARGV[1], 'aborted') == 0 then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: rounds hash, kinds set, partials hash, claims hash. ARGV: attempt key, counter-key prefix.
# The counter keys are built from the kinds set; they share the job's hash tag (same slot).
_CLEAR_ROUND = """
for _, kind in ipairs(redis.call('SMEMBERS', KEYS[2])) do redis.call('DEL', ARGV[2] .. kind) end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
redis.call('HDEL', KEYS[1], ARGV[1])
return 0
"""

# KEYS: revoked hash. ARGV: device id, revoked-at (s), keep_ms. The latest revocation of a device
# wins; entries older than the keep span (server clock) are dropped and the expiry refreshed.
_REVOKE = (
    _NOW_MS
    + """
local prior = redis.call('HGET', KEYS[1], ARGV[1])
if (not prior) or tonumber(prior) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local cutoff = (now - tonumber(ARGV[3])) / 1000
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) < cutoff then redis.call('HDEL', KEYS[1], all[i]) end
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 0
"""
)


def _ms(seconds: float) -> int:
    """A TTL in whole milliseconds, at least 1 (Redis refuses PX 0)."""
    return max(1, math.ceil(seconds * 1000))


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays (an evaluator's accuracy, a sum of weights) without importing numpy
    for name in ("item", "tolist"):
        method = getattr(value, name, None)
        if callable(method):
            return method()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, separators=(",", ":"))


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)


def _where(url: str) -> str:
    """``host:port`` (or the socket path) of a URL, for messages: never the password."""
    parts = urlparse(url)
    if parts.scheme == "unix":
        return parts.path
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{parts.port or 6379}"


class RedisStore:
    """The :class:`~fedfleet.store.base.Store` on one Redis (standalone, or a Cluster slot)."""

    def __init__(self, client: redis.Redis, *, prefix: str = "fedfleet", where: str = "") -> None:
        if not prefix or any(c in prefix for c in "{}"):
            raise ValueError(f"key prefix {prefix!r} must be non-empty and have no braces")
        self._r = client
        self._prefix = prefix
        self._where = where or "redis"
        register = client.register_script
        self._acquire = register(_ACQUIRE)
        self._renew = register(_RENEW)
        self._release = register(_RELEASE)
        self._fenced_hset = register(_FENCED_HSET)
        self._fenced_set = register(_FENCED_SET)
        self._fenced_rpush = register(_FENCED_RPUSH)
        self._commit = register(_COMMIT)
        self._register = register(_REGISTER)
        self._members = register(_MEMBERS)
        self._add_count = register(_ADD_COUNT)
        self._claim = register(_CLAIM)
        self._abort = register(_ABORT)
        self._clear_round = register(_CLEAR_ROUND)
        self._revoke = register(_REVOKE)
        self._events: RedisEvents | None = None
        self._parsed_rounds: dict[str, dict[bytes, RoundState]] = {}
        """Per job, the round states the last :meth:`rounds` read, by their stored bytes."""

    def events(self) -> RedisEvents:
        """Pub/sub announcements of the job's writes (:mod:`fedfleet.store.redis_events`)."""
        if self._events is None:
            self._events = RedisEvents(self._r, prefix=self._prefix)
        return self._events

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "fedfleet", socket_timeout: float = 2.0
    ) -> RedisStore:
        """Connect to ``redis://[:password@]host:port/db``, ``rediss://`` (TLS) or ``unix://``.

        The password comes from the URL, else from ``$FEDFLEET_REDIS_PASSWORD``. Connecting is
        lazy. A dead Redis fails fast: one immediate retry on a connection error (it replaces
        a pooled connection that a Redis restart broke), none on a timeout (the command may
        have run; repeating a counter increment would count twice).
        """
        parts = urlparse(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"store URL scheme must be redis://, rediss:// or unix://: {url!r}")
        kwargs: dict[str, Any] = {}
        password = os.environ.get(PASSWORD_ENV)
        if parts.password is None and password:
            kwargs["password"] = password  # a password in the URL (or its query) wins
        client = redis.Redis.from_url(
            url,
            decode_responses=False,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            health_check_interval=10,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            **kwargs,
        )
        return cls(client, prefix=prefix, where=_where(url))

    # -- plumbing ---------------------------------------------------------------------------------
    def _key(self, job: str, *parts: str) -> str:
        if not job or any(c in job for c in "{}"):
            raise ValueError(f"job name {job!r} must be non-empty and have no braces")
        return ":".join((self._prefix, f"{{{job}}}", *parts))

    @contextmanager
    def _io(self) -> Iterator[None]:
        try:
            yield
        except redis.exceptions.AuthenticationError as exc:
            raise StoreUnavailable(
                f"redis at {self._where} refused the credentials ({exc}); "
                f"check the password in the store URL or ${PASSWORD_ENV}"
            ) from exc
        except (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.ReadOnlyError,  # a replica during failover: transient as well
        ) as exc:
            raise StoreUnavailable(f"redis at {self._where} is unavailable: {exc}") from exc

    def _run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        with self._io():
            return script(keys=keys, args=args)

    def _fenced(self, script: Script, keys: list[str], token: int, args: list[Any]) -> int:
        code, value = self._run(script, keys, [token, *args])
        if code == -1:
            raise FencedError(f"fencing token {token} is stale (current {value})")
        if code == -2:
            raise ConflictError(f"model version is {value}, expected {args[0]}")
        return int(value)

    # -- lease ------------------------------------------------------------------------------------
    def acquire_lease(self, job: str, holder: str, ttl: float) -> int | None:
        keys = [self._key(job, "lease"), self._key(job, "token")]
        token = self._run(self._acquire, keys, [holder, _ms(ttl)])
        return None if token is None else int(token)

    def renew_lease(self, job: str, holder: str, token: int, ttl: float) -> bool:
        done = self._run(self._renew, [self._key(job, "lease")], [f"{holder}:{token}", _ms(ttl)])
        return bool(done)

    def release_lease(self, job: str, holder: str, token: int) -> None:
        self._run(self._release, [self._key(job, "lease")], [f"{holder}:{token}"])

    def lease(self, job: str) -> Lease | None:
        key = self._key(job, "lease")
        with self._io():
            pipe = self._r.pipeline(transaction=True)
            pipe.get(key)
            pipe.pttl(key)
            raw, pttl = pipe.execute()
        if raw is None or pttl < 0:
            return None
        holder, _, token = bytes(raw).decode().rpartition(":")
        return Lease(holder, int(token), time.time() + pttl / 1000)

    # -- registration -----------------------------------------------------------------------------
    def register(self, job: str, role: str, actor_id: str, address: str, ttl: float) -> None:
        keys = [self._key(job, "members", role), self._key(job, "addr", role)]
        self._run(self._register, keys, [actor_id, address, _ms(ttl)])

    def deregister(self, job: str, role: str, actor_id: str) -> None:
        with self._io():
            pipe = self._r.pipeline(transaction=True)
            pipe.zrem(self._key(job, "members", role), actor_id)
            pipe.hdel(self._key(job, "addr", role), actor_id)
            pipe.execute()

    def members(self, job: str, role: str) -> dict[str, str]:
        keys = [self._key(job, "members", role), self._key(job, "addr", role)]
        flat: list[bytes] = self._run(self._members, keys, [])
        pairs = zip(flat[::2], flat[1::2], strict=True)
        return dict(sorted((k.decode(), v.decode()) for k, v in pairs))

    # -- the aggregator pool ----------------------------------------------------------------------
    def put_actor_load(self, job: str, actor_id: str, load: dict[str, Any]) -> None:
        with self._io():
            self._r.hset(self._key(job, "loads"), actor_id, _dumps(load))

    def actor_loads(self, job: str) -> dict[str, dict[str, Any]]:
        with self._io():
            raw = cast(dict[bytes, bytes], self._r.hgetall(self._key(job, "loads")))
        return dict(sorted((k.decode(), dict(json.loads(v))) for k, v in raw.items()))

    def set_draining(self, job: str, actor_ids: list[str]) -> None:
        key = self._key(job, "draining")
        with self._io():
            pipe = self._r.pipeline(transaction=True)
            pipe.delete(key)
            if actor_ids:
                pipe.sadd(key, *actor_ids)
            pipe.execute()

    def draining(self, job: str) -> set[str]:
        with self._io():
            raw = cast(set[bytes], self._r.smembers(self._key(job, "draining")))
        return {m.decode() for m in raw}

    # -- rounds -----------------------------------------------------------------------------------
    def put_round(self, job: str, token: int, state: RoundState) -> None:
        keys = [self._key(job, "token"), self._key(job, "rounds")]
        self._fenced(self._fenced_hset, keys, token, [state.key, _dumps(state.to_dict())])

    def rounds(self, job: str) -> list[RoundState]:
        with self._io():
            raw = cast(list[bytes], self._r.hvals(self._key(job, "rounds")))
        # Every actor reads the whole hash many times a round, and finished attempts stay in
        # it for the coordinator's linger (dozens of them when rounds are short): decode only
        # what changed since the last read. RoundState is frozen, so sharing one is safe.
        known = self._parsed_rounds.get(job, {})
        parsed = {v: known.get(v) or RoundState.from_dict(json.loads(v)) for v in raw}
        self._parsed_rounds[job] = parsed
        return sorted(parsed.values(), key=lambda s: (s.round, s.attempt))

    def clear_round(self, job: str, round_key: str) -> None:
        keys = [
            self._key(job, "rounds"),
            self._key(job, "kinds", round_key),
            self._key(job, "partials", round_key),
            self._key(job, "claims", round_key),
        ]
        self._run(self._clear_round, keys, [round_key, self._key(job, "count", round_key, "")])

    # -- quotas and counters ----------------------------------------------------------------------
    def put_quotas(self, job: str, token: int, quotas: dict[str, Quota]) -> None:
        keys = [self._key(job, "token"), self._key(job, "quotas")]
        args: list[Any] = []
        for selector_id, quota in quotas.items():
            args += [selector_id, _dumps(quota.to_dict())]
        self._fenced(self._fenced_hset, keys, token, args)

    def quota(self, job: str, selector_id: str) -> Quota | None:
        with self._io():
            raw = cast(bytes | None, self._r.hget(self._key(job, "quotas"), selector_id))
        return None if raw is None else Quota.from_dict(json.loads(raw))

    def add_count(self, job: str, round_key: str, kind: str, actor_id: str, n: int) -> None:
        keys = [self._key(job, "count", round_key, kind), self._key(job, "kinds", round_key)]
        self._run(self._add_count, keys, [actor_id, int(n), kind])

    def counts(self, job: str, round_key: str, kind: str) -> dict[str, int]:
        with self._io():
            raw = cast(
                dict[bytes, bytes], self._r.hgetall(self._key(job, "count", round_key, kind))
            )
        return {k.decode(): int(v) for k, v in raw.items()}

    def claim_report(
        self, job: str, round_key: str, aggregator_id: str, goal: int, device_id: str
    ) -> Claim:
        keys = [
            self._key(job, "count", round_key, _REPORTED),
            self._key(job, "kinds", round_key),
            self._key(job, "claims", round_key),
        ]
        args = [aggregator_id, int(goal), _REPORTED, device_id, _CLAIMS_TTL_MS]
        answer = self._run(self._claim, keys, args)
        return Claim(answer.decode() if isinstance(answer, bytes) else str(answer))

    def claim_abort(self, job: str, round_key: str, device_id: str) -> bool:
        keys = [self._key(job, "claims", round_key)]
        return bool(self._run(self._abort, keys, [device_id, _CLAIMS_TTL_MS]))

    # -- partial sums -----------------------------------------------------------------------------
    def put_partial(self, job: str, round_key: str, aggregator_id: str, data: bytes) -> None:
        with self._io():
            self._r.hset(self._key(job, "partials", round_key), aggregator_id, bytes(data))

    def partials(self, job: str, round_key: str) -> dict[str, bytes]:
        with self._io():
            raw = cast(dict[bytes, bytes], self._r.hgetall(self._key(job, "partials", round_key)))
        return {k.decode(): bytes(v) for k, v in raw.items()}

    # -- checkpoints ------------------------------------------------------------------------------
    def commit_checkpoint(
        self,
        job: str,
        token: int,
        expected_version: int,
        round_: int,
        data: bytes,
        metrics: dict[str, Any],
    ) -> int:
        record = _dumps({**metrics, "round": round_, "model_version": expected_version + 1})
        keys = [self._key(job, "token"), self._key(job, "checkpoint"), self._key(job, "metrics")]
        args = [int(expected_version), int(round_), bytes(data), record]
        return self._fenced(self._commit, keys, token, args)

    def checkpoint(self, job: str) -> Checkpoint | None:
        with self._io():
            raw = self._r.hmget(self._key(job, "checkpoint"), ["version", "round", "data"])
        version, round_, data = cast(list[bytes | None], raw)
        if version is None or round_ is None or data is None:
            return None
        return Checkpoint(int(version), int(round_), bytes(data))

    def model_version(self, job: str) -> int:
        with self._io():
            raw = cast(bytes | None, self._r.hget(self._key(job, "checkpoint"), "version"))
        return 0 if raw is None else int(raw)

    def metrics(self, job: str) -> list[dict[str, Any]]:
        with self._io():
            raw = cast(list[bytes], self._r.lrange(self._key(job, "metrics"), 0, -1))
        return [json.loads(m) for m in raw]

    def record_attempt(self, job: str, token: int, record: dict[str, Any]) -> None:
        keys = [self._key(job, "token"), self._key(job, "attempts")]
        self._fenced(self._fenced_rpush, keys, token, [_dumps(record)])

    def attempts(self, job: str, start: int = 0) -> list[dict[str, Any]]:
        with self._io():
            raw = cast(list[bytes], self._r.lrange(self._key(job, "attempts"), start, -1))
        return [json.loads(a) for a in raw]

    # -- job --------------------------------------------------------------------------------------
    def put_job_state(self, job: str, token: int, state: dict[str, Any]) -> None:
        keys = [self._key(job, "token"), self._key(job, "state")]
        self._fenced(self._fenced_set, keys, token, [_dumps(state)])

    def job_state(self, job: str) -> dict[str, Any]:
        with self._io():
            raw = cast(bytes | None, self._r.get(self._key(job, "state")))
        return {} if raw is None else dict(json.loads(raw))

    def jobs(self) -> list[str]:
        """Jobs with a ``state`` key, found with SCAN (never KEYS) under this store's prefix.

        SCAN walks the whole keyspace (O(keys) per call), which is fine for a dashboard's
        refresh of a store that holds tens of jobs; no index set is kept, since a set spanning
        jobs would sit outside every job's hash slot.
        """
        head = f"{self._prefix}:{{"
        pattern = _glob_escape(head) + "*}:state"
        found: set[str] = set()
        with self._io():
            for raw in self._r.scan_iter(match=pattern, count=_SCAN_BATCH):
                key = bytes(raw).decode()
                job = key[len(head) : -len("}:state")]
                if job and not any(c in job for c in "{}"):
                    found.add(job)
        return sorted(found)

    def delete_job(self, job: str) -> int:
        """UNLINK every key under the job's prefix (found with SCAN, never KEYS)."""
        pattern = _glob_escape(self._key(job, "")) + "*"
        removed = 0
        with self._io():
            batch: list[bytes] = []
            for key in self._r.scan_iter(match=pattern, count=_SCAN_BATCH):
                batch.append(key)
                if len(batch) >= _SCAN_BATCH:
                    removed += int(self._r.unlink(*batch))
                    batch.clear()
            if batch:
                removed += int(self._r.unlink(*batch))
        return removed

    # -- population -------------------------------------------------------------------------
    def _population_key(self, population: str, part: str) -> str:
        if not population or any(c in population for c in "{}"):
            raise ValueError(f"population name {population!r} must be non-empty, no braces")
        return f"{self._prefix}:population:{{{population}}}:{part}"

    def revoke_device(self, population: str, device_id: str, at: float) -> None:
        key = self._population_key(population, "revoked")
        self._run(self._revoke, [key], [device_id, repr(float(at)), _ms(REVOCATION_KEEP_S)])

    def revoked_devices(self, population: str) -> dict[str, float]:
        key = self._population_key(population, "revoked")
        with self._io():
            raw = cast(dict[bytes, bytes], self._r.hgetall(key))
        cutoff = time.time() - REVOCATION_KEEP_S
        found = {k.decode(): float(v) for k, v in raw.items()}
        return {k: at for k, at in found.items() if at >= cutoff}

    def announce_route(self, population: str, route: str, entry: str, ttl: float) -> None:
        keys = [
            self._population_key(population, "routes"),
            self._population_key(population, "route-entries"),
        ]
        self._run(self._register, keys, [route, entry, _ms(ttl)])

    def withdraw_route(self, population: str, route: str) -> None:
        with self._io():
            pipe = self._r.pipeline(transaction=True)
            pipe.zrem(self._population_key(population, "routes"), route)
            pipe.hdel(self._population_key(population, "route-entries"), route)
            pipe.execute()

    def population_routes(self, population: str) -> dict[str, str]:
        keys = [
            self._population_key(population, "routes"),
            self._population_key(population, "route-entries"),
        ]
        flat: list[bytes] = self._run(self._members, keys, [])
        pairs = zip(flat[::2], flat[1::2], strict=True)
        return dict(sorted((k.decode(), v.decode()) for k, v in pairs))

    @property
    def client(self) -> redis.Redis:
        """The connection, for model storage in the same Redis (fedfleet.store.history)."""
        return self._r

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
        self._r.close()
