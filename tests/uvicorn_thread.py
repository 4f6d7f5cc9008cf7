"""Real uvicorn servers inside the test process, one background thread each.

The integration tier talks real HTTP to real servers, but starting a process per actor would make
every test pay for interpreter start-up and imports. A ``uvicorn.Server`` runs its own event loop
in a thread instead, on a loopback socket the test binds first (so the port is known before the
app is built — actors advertise their own address — and no other process can take it in
between). :func:`serve` returns once the server accepts connections and stops it gracefully:
the app's lifespan shutdown runs, which is where the actors stop their tick threads.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from fedfleet.service.server import ServerLimits, server_config

__all__ = ["ServerFailed", "listen", "serve"]


class ServerFailed(RuntimeError):
    """The server did not start (or stop) in time."""


def listen(host: str = "127.0.0.1") -> tuple[socket.socket, str]:
    """A listening socket on a free loopback port, and its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(2048)
    port = sock.getsockname()[1]
    return sock, f"http://{host}:{port}"


@contextmanager
def serve(
    app: Any,
    *,
    sock: socket.socket | None = None,
    startup_timeout: float = 15.0,
    shutdown_timeout: float = 15.0,
    graceful_seconds: int = 2,
    limits: ServerLimits | None = None,
) -> Iterator[str]:
    """Serve the ASGI ``app`` on ``sock`` (a fresh one if not given) and yield its base URL."""
    if sock is None:
        sock, url = listen()
    else:
        host, port = sock.getsockname()[:2]
        url = f"http://{host}:{port}"
    # The services' own server configuration (fedfleet.service.server): the same protocol,
    # header and connection limits and timeouts as `fedfleet selector|aggregator|coordinator`.
    config = server_config(
        app,
        limits=limits or ServerLimits(keep_alive=30),
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=graceful_seconds,
    )
    server = uvicorn.Server(config)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"uvicorn-{url}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if errors or not thread.is_alive():
            sock.close()
            raise ServerFailed(f"server at {url} failed to start: {errors or 'thread exited'}")
        if time.monotonic() > deadline:
            server.should_exit = True
            thread.join(shutdown_timeout)
            sock.close()
            raise ServerFailed(f"server at {url} did not start within {startup_timeout}s")
        time.sleep(0.01)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(shutdown_timeout)
        sock.close()
        if thread.is_alive():
            raise ServerFailed(f"server at {url} did not stop within {shutdown_timeout}s")
