"""``fedfleet fetch-model``: copy a job's newest model checkpoint out of the store.

A job's model lives in the store under the job key ``<namespace>/<name>`` (``FLJob.key``), not
in Kubernetes; the FLJob's ``.status.model`` prints this command. The file is the checkpoint
exactly as committed — the model's weights and the server optimizer's state, in the format of
:mod:`fedfleet.core.checkpoint` (no pickle) — unless the output path ends in ``.safetensors`` or
``.npz``: then it holds the model's weights alone, named as the job's task names them when
``--manifest`` is given (else ``w.0``, ``w.1``, ...), ready to load into the user's framework.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from fedfleet.store.base import StoreUnavailable
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


def run(args: argparse.Namespace) -> int:
    """Fetch the checkpoint; 1 when the job has none (or the store is down), 2 on bad usage."""
    store = store_from_args(args)
    if store is None:
        return EXIT_USAGE
    try:
        checkpoint = store.checkpoint(args.job)
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        store.close()
    if checkpoint is None:
        print(
            f"error: no model for job {args.job!r} in the store (no round committed yet, a "
            "wrong key, or the FLJob was deleted)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    try:
        if args.output.suffix in WEIGHT_SUFFIXES:
            names = _weight_names(args.manifest)
            if isinstance(names, int):
                return names
            _write_weights(args.output, names, checkpoint.data, checkpoint.version)
        else:
            _write_atomically(args.output, checkpoint.data)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"error: cannot write {args.output}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"wrote {args.output}: model version {checkpoint.version} (round {checkpoint.round}), "
        f"{len(checkpoint.data)} bytes",
        file=sys.stderr,
    )
    return EXIT_OK
