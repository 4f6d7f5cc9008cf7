"""What keeping a model history costs per commit, on each storage backend.

Times :func:`fedfleet.store.history.commit_model` — the durable write of the model's bytes, the
fenced commit of its reference in a real redis-server, and the pruning and ``index.json``
rewrite of ``spec.checkpoints`` (keep 3 + best) — for models of 1 MB and 16 MB, against the
bare ``Store.commit_checkpoint`` of the same bytes inline (what fedfleet did before histories).
Backends: Redis (the store itself), a directory on this machine's disk (fsync included) and
versitygw, a real S3-compatible server on loopback (built by ``deploy/build-s3-server.sh``).

Median of ``--commits`` commits per case, in milliseconds. A report, not a test: it exits 0
whatever the figures.

    python bench/model_storage.py [--commits N]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.s3_server import S3Server

from fedfleet.core.model_history import CheckpointsSpec
from fedfleet.redis_server import RedisServer
from fedfleet.store.history import ModelStorage, commit_model
from fedfleet.store.history.files import FileModels
from fedfleet.store.history.redis_models import models_in_store
from fedfleet.store.redis import RedisStore

JOB = "bench/models"


def _median_ms(commits: int, step: Callable[[int], object]) -> float:
    times = []
    for i in range(commits):
        t0 = time.perf_counter()
        step(i)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _case(
    store: RedisStore,
    models: ModelStorage | None,
    policy: CheckpointsSpec,
    token: int,
    data: list[bytes],
    commits: int,
) -> float:
    """Median milliseconds of ``commits`` commits (``models`` None: the bytes inline)."""

    def step(i: int) -> None:
        blob, metrics = data[i % 2], {"accuracy": i / commits}
        if models is None:
            store.commit_checkpoint(JOB, token, i, i + 1, blob, metrics)
        else:
            commit_model(store, models, policy, JOB, token, i, i + 1, blob, metrics)

    return _median_ms(commits, step)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=20)
    args = parser.parse_args()
    policy = CheckpointsSpec(keep=3)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with (
            RedisServer(workdir=work / "redis", password=secrets.token_hex(8)) as redis,
            S3Server(work / "s3") as s3,
        ):
            os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = (
                s3.credentials[0],
                s3.credentials[1],
            )
            print(
                f"{'model':>6}  {'inline (before)':>15}  {'redis':>8}  {'directory':>9}  {'s3':>8}"
            )
            for mb in (1, 16):
                data = [os.urandom(mb << 20) for _ in range(2)]
                row = [f"{mb:>4}MB"]
                for kind in ("inline", "redis", "directory", "s3"):
                    store = RedisStore.from_url(redis.url, prefix=f"b{secrets.token_hex(3)}")
                    token = store.acquire_lease(JOB, "bench", 600)
                    assert token is not None
                    models: ModelStorage | None = {
                        "inline": None,
                        "redis": models_in_store(store),
                        "directory": FileModels(work / "models"),
                        "s3": s3.models(prefix=f"b{secrets.token_hex(3)}"),
                    }[kind]

                    row.append(f"{_case(store, models, policy, token, data, args.commits):.1f} ms")
                    if models is not None:
                        models.delete_job(JOB)
                        models.close()
                    store.delete_job(JOB)
                    store.close()
                print(f"{row[0]:>6}  {row[1]:>15}  {row[2]:>8}  {row[3]:>9}  {row[4]:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
