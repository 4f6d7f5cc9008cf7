"""The ``fedfleet`` command: run, demo and validate FLJob manifests.

Subcommands live in one table, :data:`SUBCOMMANDS` (name -> :class:`Subcommand`), so the
actor commands (``selector``, ``coordinator``, ``aggregator``, ``up``, ``simulate``,
``operator``) are added as entries without touching the parser. Each handler returns the exit
status: 0 success, 1 a job that ran but did not succeed, 2 a usage or manifest error. A bad
manifest is reported as one line per offending field, never as a traceback. Heavy imports
(the embedded runner, matplotlib) happen inside the handlers so ``fedfleet --help`` and
``fedfleet validate`` stay fast.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fedfleet import __version__
from fedfleet.core.spec import FLJob, ManifestError, load_manifest, with_base_dir
from fedfleet.results import JobResult, ProgressSink
from fedfleet.store.base import StoreUnavailable

__all__ = ["EXAMPLES", "SUBCOMMANDS", "Subcommand", "build_parser", "main"]

EXAMPLES = ("digits", "digits-private", "mnist")
"""Example manifests shipped as package data in ``fedfleet/examples/<name>.yaml``."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Subcommand:
    """One ``fedfleet <name>`` subcommand: its help line, its arguments and its handler."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    """Runs the command and returns the process exit status."""


class _UsageError(Exception):
    """A problem the user can fix (bad file, bad manifest); printed without a traceback."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("\n".join(lines))


def _error(lines: list[str]) -> int:
    # Plain print, not rich: manifest messages may contain [brackets] that rich takes as markup,
    # and rich wraps long lines at 80 columns when stderr is not a terminal.
    for line in lines:
        print(line, file=sys.stderr)
    return EXIT_USAGE


# --- loading manifests ---------------------------------------------------------------------


def _parse(text: str, source: str) -> FLJob:
    try:
        return load_manifest(text)
    except ManifestError as exc:
        raise _UsageError(
            [f"error: invalid FLJob in {source}:", *(f"  - {p}" for p in exc.problems)]
        ) from None


def _memory_limit(value: str) -> int:
    from fedfleet.core.budget import parse_bytes

    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _args_memory(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-memory",
        type=_memory_limit,
        default=os.environ.get("FEDFLEET_MAX_MEMORY", "16Gi"),
        metavar="SIZE",
        help="refuse a job whose estimated memory exceeds SIZE, e.g. 16Gi or 512Mi "
        "(FEDFLEET_MAX_MEMORY; default 16Gi)",
    )


def _fits(job: FLJob, args: argparse.Namespace, source: str) -> FLJob:
    """``job``, unless its memory estimate exceeds ``--max-memory`` (a usage error)."""
    from fedfleet.core.budget import memory_problem

    limit = args.max_memory
    limit = limit if isinstance(limit, int) else _memory_limit(limit)
    problem = memory_problem(job.spec, limit, _parameters(job))
    if problem is not None:
        raise _UsageError([f"error: invalid FLJob in {source}:", f"  - {problem}"])
    return job


def _parameters(job: FLJob) -> int:
    """The model's parameter count: a built-in model's from its spec, without allocating it;
    the user's task's from its initial weights (loading it: a task that fails to load is the
    usage error that names spec.task)."""
    from fedfleet.tasks import TaskError, task_of
    from fedfleet.tasks.builtin import weight_shapes

    if job.spec.task is None:
        return sum(math.prod(shape) for shape in weight_shapes(job.spec.model))
    try:
        return task_of(job).num_parameters
    except TaskError as exc:
        raise _UsageError([f"error: {exc}"]) from None


def _load_file(path: Path) -> FLJob:
    from fedfleet.core.manifest_yaml import YamlLimits

    limit = YamlLimits().max_bytes
    try:
        if path.is_file() and path.stat().st_size > limit:  # refused unread
            raise _UsageError(
                [f"error: invalid FLJob in {path}:", f"  - (document): more than {limit} bytes"]
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _UsageError([f"error: manifest not found: {path}"]) from None
    except IsADirectoryError:
        raise _UsageError([f"error: manifest is a directory, not a file: {path}"]) from None
    except UnicodeDecodeError as exc:
        raise _UsageError([f"error: manifest {path} is not UTF-8 text: {exc}"]) from None
    except OSError as exc:
        raise _UsageError([f"error: cannot read manifest {path}: {exc.strerror or exc}"]) from None
    job = _parse(text, str(path))
    # Relative task and data paths are the manifest's directory's, wherever fedfleet runs.
    return with_base_dir(job, str(path.resolve().parent))


def _check_task_and_data(job: FLJob) -> None:
    """Load the job's task and data and check they fit, before any work starts (the error
    names the manifest field and the shapes)."""
    from fedfleet.device.datasets import DataError, prepare
    from fedfleet.tasks import TaskError, task_of
    from fedfleet.tasks.validation import check_job_data

    try:
        task_of(job)
        data = prepare(job.spec.fleet, job.spec.evaluation)
        check_job_data(job, data.train, data.test)
    except (TaskError, DataError) as exc:
        raise _UsageError([f"error: {exc}"]) from None


def example_text(name: str) -> str:
    """The text of a packaged example manifest (one of :data:`EXAMPLES`)."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; choose from {', '.join(EXAMPLES)}")
    return (resources.files("fedfleet") / "examples" / f"{name}.yaml").read_text(encoding="utf-8")


# --- run / demo ----------------------------------------------------------------------------


def _safe_stem(name: str) -> str:
    # metadata.name is free text; keep it from naming a path outside the output folder.
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "job"


def _embedded(job: FLJob, progress: ProgressSink) -> JobResult:
    from fedfleet.embedded import run_job

    return run_job(job, progress=progress)


def _run(
    job: FLJob,
    *,
    out: Path | None,
    report: Path | None,
    quiet: bool,
    runner: Callable[[FLJob, ProgressSink], JobResult] = _embedded,
) -> int:
    """Run a job with ``runner`` (embedded by default) and write the model, plot and report."""
    from rich.console import Console
    from rich.table import Table

    from fedfleet.progress import QuietProgress, make_progress
    from fedfleet.report import summary_rows, write_plot, write_report
    from fedfleet.tasks.weights_file import WEIGHT_SUFFIXES

    stem = _safe_stem(job.name)
    weights_path: Path | None = None
    if out is not None and out.suffix in WEIGHT_SUFFIXES:  # --out model.safetensors
        weights_path, out = out, (out.parent if str(out.parent) else Path("."))
    out_dir = out if out is not None else Path("runs") / stem
    weights_path = weights_path or out_dir / f"{stem}.safetensors"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)  # fail before training, not after
    except OSError as exc:
        return _error([f"error: cannot create output folder {out_dir}: {exc.strerror or exc}"])

    console = Console()
    display = QuietProgress() if quiet else make_progress(job.spec.rounds.total, console)
    try:
        with display:
            result: JobResult = runner(job, display)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ValueError as exc:
        from fedfleet.device.datasets import DataError
        from fedfleet.tasks import TaskError

        if isinstance(exc, TaskError | DataError):  # the task or data do not fit: no traceback
            return _error([f"error: {exc}"])
        raise
    except StoreUnavailable as exc:  # an outage that outlasted the job's timeout
        print(f"error: the store stayed unavailable: {exc}", file=sys.stderr)
        return EXIT_FAILED

    files: list[tuple[str, Path]] = [
        ("model", out_dir / f"{stem}.model"),
        ("plot", out_dir / f"{stem}.png"),
        ("report", out_dir / f"{stem}.json"),
    ]
    files[0][1].write_bytes(result.model_bytes)
    write_plot(result, files[1][1])
    write_report(result, files[2][1])
    _write_weights(job, result, weights_path)
    files.append(("weights", weights_path))
    if report is not None:
        write_report(result, report)
        files.append(("report", report))

    table = Table(title=f"FLJob {job.name}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, value in summary_rows(result):
        table.add_row(label, value)
    console.print(table)
    for kind, path in files:
        console.print(f"wrote {kind:<6} {path}", markup=False, highlight=False, soft_wrap=True)
    return EXIT_OK if result.succeeded else EXIT_FAILED


def _write_weights(job: FLJob, result: JobResult, path: Path) -> None:
    """The final weights under the task's names (version 0 if nothing was committed)."""
    from fedfleet.core.checkpoint import unpack_checkpoint
    from fedfleet.tasks import task_of
    from fedfleet.tasks.weights_file import save_weights

    loaded = task_of(job)
    weights = (
        unpack_checkpoint(result.model_bytes, loaded.shapes)[0]
        if result.model_bytes
        else loaded.initial
    )
    meta = {"format": "fedfleet", "job": job.name, "model_version": str(result.model_version)}
    save_weights(path, loaded.names, weights, meta)


def _args_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR|FILE",
        help="folder for <job>.model, <job>.safetensors (the final weights), <job>.png and "
        "<job>.json (default: ./runs/<job-name>); a path ending in .safetensors or .npz "
        "names the weights file itself (the rest goes next to it)",
    )
    parser.add_argument(
        "--report", type=Path, metavar="PATH", help="also write the JSON report to PATH"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no per-round progress; only the final summary"
    )
    _args_memory(parser)


def _args_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, metavar="MANIFEST", help="FLJob YAML file")
    _args_output(parser)


def _cmd_run(args: argparse.Namespace) -> int:
    job = _fits(_load_file(args.manifest), args, str(args.manifest))
    _check_task_and_data(job)  # before the output folder exists
    return _run(job, out=args.out, report=args.report, quiet=args.quiet)


def _args_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--example",
        choices=EXAMPLES,
        default="digits",
        help="packaged example to run (default: digits)",
    )
    _args_output(parser)


def _cmd_demo(args: argparse.Namespace) -> int:
    name: str = args.example
    source = f"packaged example {name}.yaml"
    job = _fits(_parse(example_text(name), source), args, source)
    return _run(job, out=args.out, report=args.report, quiet=args.quiet)


# --- validate ------------------------------------------------------------------------------


def _args_validate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, metavar="MANIFEST", help="FLJob YAML file")
    _args_memory(parser)


def _cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    job = _fits(_load_file(args.manifest), args, str(args.manifest))
    _check_task_and_data(job)
    doc = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    # stdout stays valid YAML (the note is a comment) so it can be piped into kubectl or a file;
    # unset optional fields (None) are left out rather than written as null.
    sys.stdout.write(f"# {args.manifest}: valid FLJob {job.name!r}; defaults filled in\n")
    sys.stdout.write(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
    return EXIT_OK


def _args_up(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, metavar="MANIFEST", help="FLJob YAML file")
    parser.add_argument(
        "--store", metavar="URL", help="use this Redis (redis://...) instead of starting one"
    )
    parser.add_argument("--selectors", type=int, default=2, help="selector processes (2)")
    parser.add_argument("--aggregators", type=int, default=2, help="aggregator processes (2)")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.01,
        help="real seconds per simulated training second of a device (0.01)",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="give up after this many seconds"
    )
    parser.add_argument(
        "--no-fleet",
        action="store_true",
        help="start only the server side: real devices (`fedfleet device run`) train the job",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="with --no-fleet: keep the population's endpoint (DIR/endpoint.json: url, "
        "population, enrollToken), secret and store here, for this and later jobs",
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="with --state-dir: the selector's address (default: the last job's, else "
        "127.0.0.1 and a free port)",
    )
    _args_output(parser)


def _cmd_up(args: argparse.Namespace) -> int:
    from fedfleet.endpoint import EndpointError, parse_listen
    from fedfleet.local import ActorFailed
    from fedfleet.up import UpOptions, run_up

    if bool(args.no_fleet) != (args.state_dir is not None):
        raise _UsageError(
            [
                "error: --no-fleet and --state-dir DIR go together (real devices "
                "find the server through DIR/endpoint.json)"
            ]
        )
    if args.listen is not None and args.state_dir is None:
        raise _UsageError(["error: --listen needs --no-fleet --state-dir DIR"])
    job = _fits(_load_file(args.manifest), args, str(args.manifest))
    _check_task_and_data(job)  # the server side evaluates the task on the job's data too
    try:
        listen = parse_listen(args.listen)
    except EndpointError as exc:
        raise _UsageError([f"error: {exc}"]) from None
    opts = UpOptions(
        store_url=args.store,
        selectors=args.selectors,
        aggregators=args.aggregators,
        time_scale=args.time_scale,
        timeout=args.timeout,
        no_fleet=args.no_fleet,
        state_dir=args.state_dir,
        listen=listen,
    )
    try:
        return _run(
            job,
            out=args.out,
            report=args.report,
            quiet=args.quiet,
            runner=lambda j, progress: run_up(j, progress, opts),
        )
    except ActorFailed as exc:
        print(f"error: an actor failed to start: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except EndpointError as exc:
        return _error([f"error: {exc}"])


def _args_service(parser: argparse.ArgumentParser) -> None:
    from fedfleet.service.commands import add_service_arguments

    add_service_arguments(parser)


def _cmd_service(role: str, args: argparse.Namespace) -> int:
    from fedfleet.service.commands import run_service

    return run_service(role, args)


def _args_crd(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kind",
        choices=("fljob", "flpopulation"),
        default="fljob",
        help="which CustomResourceDefinition: FLJob (default) or FLPopulation",
    )
    parser.add_argument(
        "--write",
        type=Path,
        action="append",
        metavar="PATH",
        help="write the YAML to PATH instead of stdout (repeat for several copies)",
    )


def _cmd_crd(args: argparse.Namespace) -> int:
    from fedfleet.crdgen import render_crd_yaml
    from fedfleet.crdgen_population import render_population_crd_yaml

    text = render_population_crd_yaml() if args.kind == "flpopulation" else render_crd_yaml()
    paths: list[Path] = args.write or []
    for path in paths:
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)
    if not paths:
        sys.stdout.write(text)
    return EXIT_OK


def _args_operator(parser: argparse.ArgumentParser) -> None:
    from fedfleet_operator.main import add_arguments

    add_arguments(parser)


def _cmd_operator(args: argparse.Namespace) -> int:
    from fedfleet_operator.main import run

    return run(args)


def _args_fetch_model(parser: argparse.ArgumentParser) -> None:
    from fedfleet.fetch_model import add_arguments

    add_arguments(parser)


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    from fedfleet.fetch_model import run

    return run(args)


# --- the parser ----------------------------------------------------------------------------

SUBCOMMANDS: dict[str, Subcommand] = {
    "run": Subcommand("train an FLJob manifest embedded, in this process", _args_run, _cmd_run),
    "demo": Subcommand("train the packaged digits example embedded", _args_demo, _cmd_demo),
    "validate": Subcommand(
        "check a manifest and print it with defaults filled in", _args_validate, _cmd_validate
    ),
    "crd": Subcommand(
        "print the FLJob CustomResourceDefinition generated from the spec", _args_crd, _cmd_crd
    ),
    "operator": Subcommand("run the FLJob operator (kopf)", _args_operator, _cmd_operator),
    "fetch-model": Subcommand(
        "write a kept model of a job (a version, the best or the newest) to a file",
        _args_fetch_model,
        _cmd_fetch_model,
    ),
    # fedfleet.dashboard: watching jobs from the store (imported when the command runs).
    "dashboard": Subcommand(
        "serve a live web dashboard of the store's jobs (read-only; 127.0.0.1 by default)",
        lambda parser: __import__(
            "fedfleet.dashboard.command", fromlist=["add_arguments"]
        ).add_arguments(parser),
        lambda args: int(__import__("fedfleet.dashboard.command", fromlist=["run"]).run(args)),
    ),
    "report": Subcommand(
        "write the JSON report and PNG plot of a job from the store (e.g. a cluster job)",
        lambda parser: __import__(
            "fedfleet.dashboard.report_cmd", fromlist=["add_arguments"]
        ).add_arguments(parser),
        lambda args: int(__import__("fedfleet.dashboard.report_cmd", fromlist=["run"]).run(args)),
    ),
    "up": Subcommand(
        "run a job through the deployed shape on this machine: redis-server, a coordinator and"
        " a standby, selectors and aggregators as processes, a simulated fleet over HTTP",
        _args_up,
        _cmd_up,
    ),
    **{
        role: Subcommand(
            f"run a {role} service (uvicorn) for a job",
            _args_service,
            lambda args, role=role: _cmd_service(role, args),  # type: ignore[misc]
        )
        for role in ("coordinator", "selector", "aggregator")
    },
    # fedfleet.conformance: a scripted selector that judges a device client.
    "conformance": Subcommand(
        "serve a scripted device API that checks a device client's behaviour (windows, "
        "Retry-After, reports, aborts) and print the verdicts",
        lambda parser: __import__("fedfleet.conformance", fromlist=["x"]).add_arguments(parser),
        lambda args: int(__import__("fedfleet.conformance", fromlist=["x"]).run(args)),
    ),
    # fedfleet.population_cmd: enroll tokens and device revocation (imported when it runs).
    "population": Subcommand(
        "a population's devices: print its enroll token, revoke devices' credentials",
        lambda parser: __import__("fedfleet.population_cmd", fromlist=["x"]).add_arguments(parser),
        lambda args: int(__import__("fedfleet.population_cmd", fromlist=["x"]).run(args)),
    ),
    # Imported lazily: fedfleet.device.simulate_cmd (the fleet itself loads only when it runs).
    "simulate": Subcommand(
        "drive a deployed job with a simulated fleet of devices over HTTP",
        lambda parser: __import__(
            "fedfleet.device.simulate_cmd", fromlist=["add_arguments"]
        ).add_arguments(parser),
        lambda args: int(__import__("fedfleet.device.simulate_cmd", fromlist=["run"]).run(args)),
    ),
    # fedfleet.device.device_cmd: one real device (imported when the command runs).
    "device": Subcommand(
        "run a real device (enroll, check in, train, report), add examples, show its state",
        lambda parser: __import__(
            "fedfleet.device.device_cmd", fromlist=["add_arguments"]
        ).add_arguments(parser),
        lambda args: int(__import__("fedfleet.device.device_cmd", fromlist=["run"]).run(args)),
    ),
}
"""Subcommand name -> definition; the actor commands are added here as they are written."""


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with one subparser per entry of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="fedfleet",
        description="Cross-device federated learning at scale (Bonawitz et al., 2019).",
    )
    parser.add_argument("--version", action="version", version=f"fedfleet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in SUBCOMMANDS.items():
        child = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(child)
        child.set_defaults(handler=command.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedfleet`` script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except _UsageError as exc:
        return _error(exc.lines)
    except BrokenPipeError:
        # The reader went away (`fedfleet validate job.yaml | head -1`): stop quietly. Point
        # stdout at /dev/null so the interpreter's final flush does not complain again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
