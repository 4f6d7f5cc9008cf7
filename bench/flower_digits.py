"""The shared workload on Flower 1.42's Simulation Engine (Ray backend), for comparison.

Runs in its own virtualenv (``flwr[simulation]==1.42.0``, scikit-learn, numpy; no fedfleet),
which ``bench/embedded.py`` creates and caches. The clients and the server evaluation run the
floor's numpy code (``bench/floor.py``), so Flower and the floor differ only by Flower itself.

API, as confirmed in the installed flwr 1.42.0 source:

- ``flwr.simulation.run_simulation(server_app, client_app, num_supernodes, backend_name="ray",
  backend_config=None, ...)`` (flwr/simulation/run_simulation.py);
- ``ClientApp(client_fn=...)`` with ``client_fn(context: Context) -> Client``; the simulated
  node's partition is ``context.node_config["partition-id"]`` (flwr/clientapp/client_app.py,
  flwr/server/superlink/fleet/vce/vce_api.py);
- ``ServerApp(server_fn=...)`` returning ``ServerAppComponents(strategy, config)``
  (flwr/serverapp/server_app.py, flwr/compat/server/serverapp_components.py);
- the NumPyClient-era ``flwr.server.strategy.FedAvg(fraction_fit, fraction_evaluate,
  min_fit_clients, min_available_clients, evaluate_fn, on_fit_config_fn, initial_parameters)``
  (flwr/server/strategy/fedavg.py). Its ``evaluate_fn`` also runs before round 1; that call
  returns None so the evaluation work matches the other implementations (one per round).

Flower and Ray serialize with pickle internally; that is Flower's business, fedfleet does not.
Offline: Flower's telemetry and Ray's usage stats are switched off (they would only try the
network). Prints one JSON line: wall seconds around ``run_simulation`` and final accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

# Before flwr or ray are imported: both read these at import time.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray's actor processes import this module's neighbours (workload, floor) by name.
_HERE = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_HERE, os.environ.get("PYTHONPATH", "")) if p
)

import numpy as np  # noqa: E402
from flwr.app import Context  # noqa: E402
from flwr.client import Client, NumPyClient  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common import NDArrays, Scalar, ndarrays_to_parameters  # noqa: E402
from flwr.server import ServerAppComponents, ServerConfig  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402

import floor  # noqa: E402
import workload as w  # noqa: E402


class DigitsClient(NumPyClient):
    """One simulated device: local SGD on its two shards, no client-side evaluation."""

    def __init__(self, device: int) -> None:
        self.device = device

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return list(floor.zeros())

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        x, y = w.load().device(self.device)
        params = (parameters[0].astype(np.float32), parameters[1].astype(np.float32))
        rng = floor.client_rng(int(config["round"]), self.device)
        return list(floor.local_train(params, x, y, rng)), len(y), {}


def client_fn(context: Context) -> Client:
    return DigitsClient(int(context.node_config["partition-id"])).to_client()


def make_server_app(rounds: int, accuracies: list[float]) -> ServerApp:
    """FedAvg over 10 of 100 nodes per round, evaluated on the server after each round."""

    def evaluate(
        server_round: int, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]] | None:
        if server_round == 0:
            return None
        data = w.load()
        acc = floor.accuracy((parameters[0], parameters[1]), data.x_test, data.y_test)
        accuracies.append(acc)
        return 1.0 - acc, {"accuracy": acc}

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = FedAvg(
            fraction_fit=w.DEVICES_PER_ROUND / w.DEVICES,
            fraction_evaluate=0.0,
            min_fit_clients=w.DEVICES_PER_ROUND,
            min_evaluate_clients=0,
            min_available_clients=w.DEVICES,
            evaluate_fn=evaluate,
            on_fit_config_fn=lambda r: {"round": r},
            initial_parameters=ndarrays_to_parameters(list(floor.zeros())),
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    return ServerApp(server_fn=server_fn)


def main() -> None:
    from flwr.simulation import run_simulation

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=w.ROUNDS)
    parser.add_argument("--verbose", action="store_true", help="keep Flower's INFO logs")
    args = parser.parse_args()
    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)

    accuracies: list[float] = []
    server_app = make_server_app(args.rounds, accuracies)
    client_app = ClientApp(client_fn=client_fn)
    start = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=w.DEVICES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    wall = time.perf_counter() - start
    if len(accuracies) != args.rounds:
        sys.exit(f"flower ran {len(accuracies)} evaluated rounds, expected {args.rounds}")
    print(
        json.dumps(
            {
                "implementation": "flower",
                "flwr_version": _flwr_version(),
                "wall_seconds": wall,
                "final_accuracy": accuracies[-1],
                "accuracies": accuracies,
            }
        ),
        flush=True,
    )


def _flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


if __name__ == "__main__":
    main()
