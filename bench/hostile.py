"""Check-in latency of a selector while unauthenticated clients send huge bodies (issue 12).

A selector (its FastAPI app on the services' own uvicorn configuration, over an in-memory
store: every check-in gets a reconnect window) serves ``--checkins`` legitimate check-ins one
after another, first alone, then while ``--attackers`` threads keep opening connections that
send a check-in without credentials: half declare a 2 MB JSON body, half stream a 200 MB
chunked one. Before the gate, such a body was read and validated before the token was checked
(14-23 s of a blocked event loop per 2 MB request). Everything runs in this process on
127.0.0.1, so the attackers share the interpreter with the server: the figures are an upper
bound of the cost. Prints p50/p99/max latency and what the attackers got; always exits 0.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn

from fedfleet.core.spec import parse_manifest
from fedfleet.selector.app import create_app
from fedfleet.service.keys import JobKeys, new_secret
from fedfleet.service.server import server_config
from fedfleet.store.memory import MemoryStore

JOB = parse_manifest(
    {
        "apiVersion": "fedfleet.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {"name": "bench-hostile"},
        "spec": {"population": "bench", "fleet": {"devices": 100}},
    }
)


def body_chunks(total: int, chunked: bool) -> Iterator[bytes]:
    piece = b"x" * 65536
    left = total
    while left > 0:
        n = min(len(piece), left)
        yield (f"{n:x}\r\n".encode() + piece[:n] + b"\r\n") if chunked else piece[:n]
        left -= n


def attack(port: int, chunked: bool, stop: threading.Event, out: list[tuple[int, int]]) -> None:
    total = (200 << 20) if chunked else (2 << 20)
    framing = "transfer-encoding: chunked" if chunked else f"content-length: {total}"
    head = f"POST /v1/checkin HTTP/1.1\r\nhost: x\r\n{framing}\r\n\r\n".encode()
    while not stop.is_set():
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sent, status = len(head), 0
        try:
            sock.sendall(head)
            sock.setblocking(False)
            for chunk in body_chunks(total, chunked):
                try:
                    data = sock.recv(4096)
                    status = int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else -1
                    break
                except BlockingIOError:
                    pass
                try:
                    sock.setblocking(True)
                    sock.sendall(chunk)
                    sent += len(chunk)
                except OSError:
                    break
                finally:
                    sock.setblocking(False)
        finally:
            sock.close()
        out.append((status, sent))


def checkins(url: str, keys: JobKeys, n: int) -> list[float]:
    latencies = []
    with httpx.Client(timeout=60) as client:
        for i in range(n):
            device = f"bench-{i}"
            started = time.perf_counter()
            r = client.post(
                f"{url}/v1/checkin",
                json={"device_id": device, "population": "bench", "charging": True,
                      "unmetered": True, "idle": True, "num_examples": 5},
                headers={"authorization": f"Bearer {keys.device_token(device)}",
                         "x-fedfleet-device": device},
            )  # fmt: skip
            latencies.append(time.perf_counter() - started)
            assert r.status_code == 200, r.text
    return latencies


def summary(xs: list[float]) -> str:
    ordered = sorted(xs)
    p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)]
    p50, top = statistics.median(xs), max(xs)
    return f"p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, max {top * 1e3:.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--checkins", type=int, default=200, help="legitimate check-ins per phase")
    parser.add_argument("--attackers", type=int, default=20, help="attacking threads (<= 64)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds of attack before")
    args = parser.parse_args()
    keys = JobKeys.from_secret(new_secret())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    app = create_app(JOB, MemoryStore(), keys, actor_id="s0", address=url, tick_seconds=0.2)
    server = uvicorn.Server(server_config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        alone = checkins(url, keys, args.checkins)
        stop, results = threading.Event(), []
        threads = [
            threading.Thread(target=attack, args=(port, i % 2 == 1, stop, results), daemon=True)
            for i in range(min(64, args.attackers))
        ]
        for t in threads:
            t.start()
        time.sleep(args.settle)
        attacked = checkins(url, keys, args.checkins)
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        server.should_exit = True
        thread.join(30)
    print(f"check-ins alone:        {summary(alone)}")
    print(f"check-ins under attack: {summary(attacked)}")
    statuses = sorted({s for s, _ in results})
    print(
        f"attack requests: {len(results)}, answers {statuses}, most bytes the attacker pushed "
        f"before the refusal: {max((b for _, b in results), default=0) / 2**20:.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
