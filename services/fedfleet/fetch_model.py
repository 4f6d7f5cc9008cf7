"""``fedfleet fetch-model``: copy any kept model of a job out of its storage.

A job's models live under the job key ``<namespace>/<name>`` (``FLJob.key``), not in Kubernetes:
in the store's Redis, a directory or an S3 bucket (``spec.checkpoints.storage``); the FLJob's
``.status.model.fetch`` prints the command. ``--version`` picks ``latest`` (the default),
``best`` or a kept version number, read from the job's ``index.json`` beside the models. The
models outlive the job's store record, so ``--storage`` reads a directory or bucket without a
store at all. ``--store-secret NS/NAME`` reads the Redis password from a Kubernetes Secret (with
``kubectl``), so no command line ever carries it. The file is the checkpoint
exactly as committed — the model's weights and the server optimizer's state, in the format of
:mod:`fedfleet.core.checkpoint` (no pickle) — unless the output path ends in ``.safetensors`` or
``.npz``: then it holds the model's weights alone, named as the job's task names them when
``--manifest`` is given (else ``w.0``, ``w.1``, ...), ready to load into the user's framework.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fedfleet.store.base import Store, StoreUnavailable
from fedfleet.store.history import (
    ModelRef,
    ModelStorage,
    ModelStorageError,
    open_models,
    read_index,
    select_model,
)
from fedfleet.store.history.base import object_name
from fedfleet.store.history.redis_models import models_in_store
from fedfleet.store.redis import PASSWORD_ENV
from fedfleet.store_args import add_store_argument, store_from_args
from fedfleet.tasks.weights_file import (
    WEIGHT_SUFFIXES,
    checkpoint_weights,
    default_names,
    save_weights,
)

__all__ = ["add_arguments", "run"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_argument(parser)
    parser.add_argument(
        "--job",
        required=True,
        metavar="NS/NAME",
        help="the job key: <namespace>/<name> of the FLJob (see its .status.model.key)",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        metavar="PATH",
        help="file to write: PATH.safetensors or PATH.npz for the weights alone, any other "
        "name for the raw checkpoint",
    )
    parser.add_argument(
        "--version",
        default="latest",
        metavar="N|best|latest",
        help="which kept model: a version number, 'best' (by spec.checkpoints.metric) or "
        "'latest' (default)",
    )
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="read the models straight from their storage, without the store: "
        "file:///DIR or s3://BUCKET/PREFIX?endpoint=URL&region=R (credentials from "
        "$AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY); default: where the store's pointer says",
    )
    parser.add_argument(
        "--store-secret",
        metavar="NS/NAME[:KEY]",
        help="read the Redis password from this Kubernetes Secret with kubectl (key "
        "redis-password): the job's own Secret is <ns>/<name>-secret",
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        metavar="FLJOB",
        help="the job's manifest, to name the weights as its task does (safetensors/npz)",
    )


def _write_atomically(path: Path, data: bytes) -> None:
    """Write next to the target and rename, so a failed fetch never leaves half a model."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _weight_names(manifest: Path | None) -> tuple[str, ...] | int | None:
    """The task's weight names, None without a manifest, or an exit status on error."""
    if manifest is None:
        return None
    from fedfleet.core.spec import ManifestError, load_manifest, with_base_dir
    from fedfleet.tasks import TaskError, task_of

    try:
        job = load_manifest(manifest.read_text(encoding="utf-8"))
        return task_of(with_base_dir(job, str(manifest.resolve().parent))).names
    except (OSError, ManifestError, TaskError) as exc:
        print(f"error: --manifest {manifest}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _write_weights(path: Path, names: tuple[str, ...] | None, data: bytes, version: int) -> None:
    weights = checkpoint_weights(data)
    if names is not None and len(names) != len(weights):
        raise ValueError(
            f"the checkpoint holds {len(weights)} arrays, the manifest's task {len(names)}"
        )
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=directory)
    os.close(fd)
    try:
        save_weights(
            Path(tmp),
            list(names) if names is not None else default_names(len(weights)),
            weights,
            {"format": "fedfleet", "model_version": str(version)},
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _NoStore(Exception):
    """--store is unusable (store_from_args said why)."""


def storage_from_url(url: str) -> ModelStorage:
    """``file:///DIR`` or ``s3://BUCKET/PREFIX?endpoint=...&region=...`` (ValueError if not)."""
    parts = urlsplit(url)
    if parts.scheme == "file" and parts.path.startswith("/") and not parts.netloc:
        return open_models({"kind": "filesystem", "path": parts.path})
    if parts.scheme == "s3" and parts.hostname:
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        location: dict[str, Any] = {
            "kind": "s3",
            "bucket": parts.hostname,
            "prefix": parts.path.strip("/"),
            "endpoint": query.get("endpoint"),
            "region": query.get("region", "us-east-1"),
        }
        return open_models(location)
    raise ValueError(f"--storage {url!r}: file:///DIR or s3://BUCKET/PREFIX?endpoint=URL")


def password_from_secret(ref: str) -> str:
    """The Redis password in a Kubernetes Secret ``NS/NAME[:KEY]``, read with kubectl."""
    where, _, key = ref.partition(":")
    namespace, _, name = where.partition("/")
    key = key or "redis-password"
    if not namespace or not name or "/" in name:
        raise ValueError(f"--store-secret {ref!r}: NAMESPACE/NAME[:KEY]")
    kubectl = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not kubectl:
        raise ValueError("--store-secret needs kubectl on PATH (or $KUBECTL)")
    jsonpath = "{.data." + key.replace(".", "\\.") + "}"
    out = subprocess.run(
        [kubectl, "get", "secret", name, "-n", namespace, "-o", f"jsonpath={jsonpath}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if out.returncode != 0 or not out.stdout.strip():
        raise ValueError(
            f"--store-secret {ref}: no key {key!r} read ({out.stderr.strip() or 'empty'})"
        )
    try:
        return base64.b64decode(out.stdout.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"--store-secret {ref}: key {key!r} is not base64 text") from exc


def _models_of(args: argparse.Namespace) -> tuple[ModelStorage, Store | None]:
    """Where the job's models are: ``--storage``, else where the store's pointer says."""
    if args.storage:
        return storage_from_url(args.storage), None
    if args.store_secret:
        os.environ[PASSWORD_ENV] = password_from_secret(args.store_secret)
    store = store_from_args(args)
    if store is None:
        raise _NoStore
    checkpoint = store.checkpoint(args.job)
    if checkpoint is not None and ModelRef.is_ref(checkpoint.data):
        return open_models(ModelRef.decode(checkpoint.data).location, store), store
    return models_in_store(store), store  # Redis; also once the job's record is gone


def _fetch(args: argparse.Namespace) -> tuple[dict[str, Any], bytes]:
    """The chosen index entry and its bytes, checked against the hash in its name."""
    models, store = _models_of(args)
    try:
        index = read_index(models, args.job)
        if index is None and store is not None:
            checkpoint = store.checkpoint(args.job)
            if checkpoint is not None and args.version in ("latest", str(checkpoint.version)):
                # a model committed before fedfleet kept histories: the pointer holds it
                legacy: dict[str, Any] = {"version": checkpoint.version, "round": checkpoint.round}
                return legacy, checkpoint.data
        if index is None:
            raise ModelStorageError(
                f"no model for job {args.job!r} in {models.describe()} (no round committed "
                "yet, a wrong key, or models deleted with the job)"
            )
        entry = select_model(index, args.version)
        data = models.get(args.job, str(entry["object"]))
        if object_name(int(entry["version"]), data) != entry["object"]:
            raise ModelStorageError(f"{args.job}/{entry['object']}: bytes do not match its hash")
        return entry, data
    finally:
        models.close()
        if store is not None:
            store.close()


def run(args: argparse.Namespace) -> int:
    """Fetch a kept model; 1 when there is none (or storage is down), 2 on bad usage."""
    if not args.storage and not args.store:
        print("error: --store (or $FEDFLEET_STORE_URL) or --storage is required", file=sys.stderr)
        return EXIT_USAGE
    try:
        entry, data = _fetch(args)
    except (StoreUnavailable, ModelStorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except _NoStore:
        return EXIT_USAGE
    except ValueError as exc:  # --version, --storage or --store-secret unusable
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    version = int(entry["version"])
    try:
        if args.output.suffix in WEIGHT_SUFFIXES:
            names = _weight_names(args.manifest)
            if isinstance(names, int):
                return names
            _write_weights(args.output, names, data, version)
        else:
            _write_atomically(args.output, data)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"error: cannot write {args.output}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"wrote {args.output}: model version {version} (round {entry.get('round')}), "
        f"{len(data)} bytes",
        file=sys.stderr,
    )
    return EXIT_OK
