"""Store events over Redis pub/sub: the deployed form of :mod:`fedfleet.store.events`.

One channel per job and topic (``{prefix}:events:{job}:{topic}``). Publishing never makes the
writer wait: announcements go to a queue, and one thread sends whatever is queued in one
pipeline, in the order first announced (a burst of reports becomes one PUBLISH). Each
subscription has a listener thread; when its connection drops it reconnects with backoff and
then calls back once per topic, since it may have missed announcements meanwhile. Pub/sub is
fire and forget: an announcement nobody hears is lost, and the subscriber's next tick reads
the state anyway.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

import redis

from fedfleet.store.events import Callback

__all__ = ["RedisEvents"]

log = logging.getLogger("fedfleet.store.events")


class RedisEvents:
    subscribe_timeout = 2.0
    """Seconds :meth:`subscribe` waits for Redis to confirm the subscription."""

    def __init__(self, client: redis.Redis, *, prefix: str = "fedfleet") -> None:
        self._r = client
        self._prefix = prefix
        self._lock = threading.Lock()
        self._queued: dict[str, None] = {}
        """Channels to announce, in the order first queued (an ordered set)."""
        self._ready = threading.Event()
        self._closed = False
        self._sender: threading.Thread | None = None

    def channel(self, job: str, topic: str) -> str:
        return f"{self._prefix}:events:{job}:{topic}"

    # -- publishing -------------------------------------------------------------------------
    def publish(self, job: str, topic: str) -> None:
        with self._lock:
            if self._closed:
                return
            self._queued.setdefault(self.channel(job, topic))
            if self._sender is None:
                self._sender = threading.Thread(
                    target=self._send, name="store-events-publish", daemon=True
                )
                self._sender.start()
        self._ready.set()

    def _send(self) -> None:
        while True:
            self._ready.wait()
            with self._lock:
                self._ready.clear()
                channels, self._queued = self._queued, {}
                if self._closed:
                    return
            if not channels:
                continue
            try:
                pipe = self._r.pipeline(transaction=False)
                for ch in channels:
                    pipe.publish(ch, b"")
                pipe.execute()
            except redis.exceptions.RedisError as exc:  # lost: the ticks catch up
                log.debug("store events: publish failed: %s", exc)

    # -- subscribing ------------------------------------------------------------------------
    def subscribe(self, job: str, topics: Iterable[str], callback: Callback) -> Callable[[], None]:
        by_channel = {self.channel(job, t): t for t in topics}
        stop, ready = threading.Event(), threading.Event()
        thread = threading.Thread(
            target=self._listen,
            args=(by_channel, callback, stop, ready),
            name=f"store-events-{job}",
            daemon=True,
        )
        thread.start()
        # Announcements are heard from here on once Redis confirmed the subscription; when
        # it is down, the listener keeps trying and the ticks carry on meanwhile.
        ready.wait(self.subscribe_timeout)

        def unsubscribe() -> None:
            stop.set()
            thread.join(2.0)

        return unsubscribe

    def _listen(
        self,
        by_channel: dict[str, str],
        callback: Callback,
        stop: threading.Event,
        ready: threading.Event,
    ) -> None:
        backoff = 0.1
        missed = False
        while not stop.is_set():
            pubsub = self._r.pubsub()  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(*by_channel)
                confirmed = 0
                while not stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is None:
                        continue
                    kind = message.get("type")
                    if kind == "subscribe":
                        confirmed += 1
                        if confirmed == len(by_channel):
                            ready.set()
                            backoff = 0.1
                            if missed:  # announcements may have been lost while disconnected
                                missed = False
                                for every in by_channel.values():
                                    callback(every)
                        continue
                    if kind != "message":
                        continue
                    channel = message["channel"]
                    name = channel.decode() if isinstance(channel, bytes) else str(channel)
                    heard = by_channel.get(name)
                    if heard is not None:
                        callback(heard)
            except (redis.exceptions.RedisError, OSError) as exc:
                log.debug("store events: subscription lost: %s", exc)
                missed = True
                stop.wait(backoff)
                backoff = min(2.0, 2 * backoff)
            finally:
                try:
                    pubsub.close()
                except (redis.exceptions.RedisError, OSError):
                    pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._ready.set()
