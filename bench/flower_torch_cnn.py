"""The PyTorch CNN workload on Flower 1.42's Simulation Engine (Ray backend), for comparison.

Runs in its own virtualenv (``flwr[simulation]==1.42.0``, torch, numpy; no fedfleet), which
``bench/torch_cnn.py`` creates and caches. It trains the same network as
``examples/pytorch-cnn/mnist_cnn/task.py`` (the class is repeated in ``flower_torch_client.py``
because that module imports fedfleet; the parameter count is printed so the driver can check
they match) on the
data split the driver wrote (the fleet's own shards, as an ``.npz``), with the manifest's
hyper-parameters (given as ``--config`` JSON; with a ``schedule`` file, each round trains the
devices, with the batch-order seeds, of fedfleet's run of the same job: see ``ReplayFedAvg``):
each client trains like fedfleet's PyTorch
adapter (``TorchTask.train``: a fresh SGD optimizer per round, shuffled minibatches, one thread)
and the server evaluates the global model on the held-out set after every round.

Flower and Ray serialize with pickle internally; that is Flower's business, fedfleet does not.
Offline: Flower's telemetry and Ray's usage stats are switched off. Prints one JSON line: wall
seconds around ``run_simulation``, the clients' own train seconds, final accuracy.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
_HERE = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_HERE, os.environ.get("PYTHONPATH", "")) if p
)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Context  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common import FitIns, NDArrays, Parameters, Scalar, ndarrays_to_parameters  # noqa: E402
from flwr.server import ClientManager, ServerAppComponents, ServerConfig  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402

from flower_torch_client import Net, _config, _data, _images, _load, _weights, client_fn  # noqa: E402

_EVAL_BATCH = 1000


class ReplayFedAvg(FedAvg):
    """FedAvg whose round r trains exactly the devices (and batch-order seeds) that made
    fedfleet's model version r: the simulated nodes are interchangeable workers, and each is
    told in its fit config which device's shard to train. Aggregation is FedAvg's own."""

    def __init__(self, schedule: list[list[list[int]]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.schedule = schedule

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        plan = self.schedule[server_round - 1]
        clients = client_manager.sample(num_clients=len(plan), min_num_clients=len(plan))
        return [
            (client, FitIns(parameters, {"round": server_round, "device": d, "seed": seed}))
            for client, (d, seed) in zip(clients, plan, strict=True)
        ]


def make_server_app(cfg: dict[str, Any], accuracies: list[float], train: list[float]) -> ServerApp:
    data = _data()
    x_test, y_test = _images(data["x_test"]), torch.from_numpy(data["y_test"].astype(np.int64))
    initial = [data[f"init_{i}"] for i in range(int(data["init_count"]))]  # fedfleet's version 0

    def evaluate(
        server_round: int, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]] | None:
        if server_round == 0:
            return None
        model = Net(cfg["channels"])
        _load(model, parameters)
        model.eval()
        correct = 0
        with torch.no_grad():
            for s in range(0, len(y_test), _EVAL_BATCH):
                out = model(x_test[s : s + _EVAL_BATCH])
                correct += int((out.argmax(-1) == y_test[s : s + _EVAL_BATCH]).sum())
        acc = correct / len(y_test)
        accuracies.append(acc)
        return 1.0 - acc, {"accuracy": acc}

    def fit_metrics(results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
        train.extend(float(m["train_seconds"]) for _, m in results)
        return {}

    def server_fn(context: Context) -> ServerAppComponents:
        replay = cfg.get("schedule")
        schedule = json.loads(Path(replay).read_text()) if replay else None
        rounds = len(schedule) if schedule is not None else cfg["rounds"]
        kind: Any = FedAvg if schedule is None else functools.partial(ReplayFedAvg, schedule)
        strategy = kind(
            fraction_fit=cfg["goal"] / cfg["devices"],
            fraction_evaluate=0.0,
            min_fit_clients=cfg["goal"],
            min_evaluate_clients=0,
            min_available_clients=cfg["devices"],
            evaluate_fn=evaluate,
            on_fit_config_fn=lambda r: {"round": r},
            fit_metrics_aggregation_fn=fit_metrics,
            initial_parameters=ndarrays_to_parameters(initial),
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    return ServerApp(server_fn=server_fn)


def main() -> None:
    from flwr.simulation import run_simulation

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help=".npz the driver wrote")
    parser.add_argument("--config", required=True, help="hyper-parameters as JSON")
    args = parser.parse_args()
    os.environ["FEDFLEET_BENCH_DATA"] = args.data  # Ray's workers inherit the environment
    os.environ["FEDFLEET_BENCH_CONFIG"] = args.config
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    cfg = _config()
    accuracies: list[float] = []
    train: list[float] = []
    server_app = make_server_app(cfg, accuracies, train)
    start = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=cfg["devices"],
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    wall = time.perf_counter() - start
    replay = cfg.get("schedule")
    rounds = len(json.loads(Path(replay).read_text())) if replay else cfg["rounds"]
    if len(accuracies) != rounds:
        sys.exit(f"flower ran {len(accuracies)} evaluated rounds, expected {rounds}")
    params = sum(int(np.prod(p.shape)) for p in _weights(Net(cfg["channels"])))
    print(
        json.dumps(
            {
                "wall_seconds": wall,
                "final_accuracy": accuracies[-1],
                "accuracies": accuracies,
                "client_train_seconds": sum(train),
                "client_trainings": len(train),
                "parameters": params,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
