"""``flowdapt-nb run`` and ``flowdapt-nb validate``: the same YAML, headless."""

from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
import traceback
from pathlib import Path

from .cli_progress import TICK, make_view
from .cli_result import FORMATS, failure_text, failures_table, output_format, write_result
from .cli_result import jsonable as _jsonable  # noqa: F401  (kept importable here)
from .cli_streams import PREFIX_ENV, OutputPipe, install_stage_prefix
from .errors import ClusterLostError, ConfigError, ExecutorClosedError, RunTimeoutError, StageError
from .run_input import input_from_args, parse_assignments  # noqa: F401  (parse_assignments: kept importable here)

EXIT_OK = 0  # the run finished
EXIT_FAILED = 1  # a stage failed (or --timeout passed)
EXIT_USAGE = 2  # bad usage, or a bad config / workflow file / run input
EXIT_EXECUTOR = 3  # the executor could not be reached or started (or its cluster was lost)
EXIT_INTERRUPTED = 130  # Ctrl-C: the run was cancelled and what it started was stopped
EXIT_CODES_HELP = """\
exit codes:
  0    the run finished (its result is on stdout, or in --output FILE)
  1    a stage failed, or --timeout passed (the failed stage and its traceback are on stderr)
  2    bad usage, or a bad config file, workflow file or run input
  3    the executor could not be reached or started, or its cluster was lost during the run
  130  interrupted (Ctrl-C): the run was cancelled, then what the run started was stopped"""


def _kind_of(data) -> str:
    if isinstance(data, dict) and (
        str(data.get("kind", "")).lower() == "workflow" or "stages" in data or "spec" in data
    ):
        return "workflow"
    return "config"


def _error_line(path, exc: ConfigError) -> str:
    """``error: FILE: message``, the file named once (YAML errors already start with it)."""
    return f"error: {exc}" if str(path) in str(exc) else f"error: {path}: {exc}"


def cmd_validate(args) -> int:
    """Check each file; workflows after configs, so ``--resolve`` honours their allowed_targets."""
    from .config import executor_from_config
    from .workflow import load_workflow
    from .yamlsrc import read_source

    status = 0
    sources = {}
    for path in args.files:
        try:
            if not Path(path).is_file():
                raise ConfigError(f"file not found: {path}")
            sources[path] = read_source(Path(path))  # parsed once
        except ConfigError as exc:
            print(_error_line(path, exc), file=sys.stderr)
            status = 1
    allow_lists = []  # every config's allowed_targets: a target must pass each
    for path, source in sources.items():
        if _kind_of(source.data) == "config":
            try:
                ex = executor_from_config(source)
                if ex.config.allowed_targets is not None:
                    allow_lists.append(ex.config.allowed_targets)
                print(f"{path}: ok ({ex.kind} executor config)")
            except ConfigError as exc:
                print(_error_line(path, exc), file=sys.stderr)
                status = 1
    for path, source in sources.items():
        if _kind_of(source.data) == "workflow":
            try:
                wf = load_workflow(source)
                for allowed in allow_lists:  # refused before anything is imported
                    _check_allowed(wf, allowed)
                if args.resolve:
                    for allowed in allow_lists or [None]:
                        wf.resolve(namespace={}, allowed_targets=allowed)
                print(f"{path}: ok (workflow '{wf.name}', {len(wf.stages)} stage(s))")
            except ConfigError as exc:
                print(_error_line(path, exc), file=sys.stderr)
                status = 1
    return status


def _check_allowed(wf, allowed) -> None:
    from .workflow import check_target_allowed

    for stage in wf.stages:
        check_target_allowed(stage, allowed)


def _positive_seconds(text: str) -> float:
    """--timeout: a finite number of seconds above zero (not nan, inf or -1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _prepare_stage_output() -> None:
    """What stages print: unbuffered in the worker processes started now, and prefixed with the
    stage and item there and in this process (see cli_streams)."""
    os.environ["PYTHONUNBUFFERED"] = "1"
    os.environ[PREFIX_ENV] = "1"
    for stream in (sys.stdout, sys.stderr):  # ours too: lines reach the pipe in the order written
        reconfigure = getattr(stream, "reconfigure", None)  # a replaced stream may not have it
        if reconfigure is not None:
            try:
                reconfigure(line_buffering=True)
            except ValueError:
                pass
    install_stage_prefix()


def cmd_run(args) -> int:
    from .config import executor_from_config
    from .executors.local import LocalExecutor
    from .workflow import load_workflow

    if args.path:
        for extra in args.path:
            sys.path.insert(0, str(Path(extra).resolve()))
    sys.path.insert(0, str(Path(args.workflow).resolve().parent))
    try:
        run_input = input_from_args(args.input, args.input_json)  # the one run-input parser
        for what, path in (("workflow", args.workflow), ("config", args.config)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{what} file not found: {path}")
        fmt = output_format(args.output, args.format)
        if fmt != "json" and args.output is None:
            raise ConfigError(f"--format {fmt} writes a file: give --output FILE")
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:  # the file goes first in these errors: each has its own line numbers
        where = args.workflow
        wf = load_workflow(Path(args.workflow))
        where = args.config
        ex = executor_from_config(Path(args.config)) if args.config else LocalExecutor()
        where = args.workflow
        if ex.config.allowed_targets is not None:  # before the executor starts or anything is imported
            _check_allowed(wf, ex.config.allowed_targets)
    except ConfigError as exc:
        print(_error_line(where, exc), file=sys.stderr)
        return EXIT_USAGE
    _prepare_stage_output()
    view = make_view(args.progress, sys.stderr)
    with OutputPipe(view.output_line) as pipe:
        code, run, error = _start_and_run(ex, wf, run_input, args, view, pipe)
    if error:
        print(error, file=sys.stderr)
    if run is not None:
        _report_failed_items(run)
    if code != EXIT_OK:
        return code
    try:
        write_result(
            run.result, args.output, fmt, sys.stdout, lambda text: print(f"note: {text}", file=sys.stderr)
        )
    except (ValueError, TypeError, OSError, pickle.PicklingError) as exc:
        print(f"error: the run finished but its result could not be written: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _report_failed_items(run) -> None:
    """Items dropped under allow_partial_failure, as a short table on stderr."""
    rows = [{"stage": f.stage, "item": f.item, "error": f.error} for f in run.failures]
    if rows:
        print(
            failures_table(
                rows, f"warning: {len(rows)} item(s) failed and were dropped (allow_partial_failure):"
            ),
            file=sys.stderr,
        )


def _start_and_run(ex, wf, run_input, args, view, pipe):
    """(exit code, run or None, error text or None). Ctrl-C cancels the run, then stops the
    executor (and what it started) before 130 is returned."""
    try:
        ex.start()
    except ConfigError as exc:
        return EXIT_USAGE, None, f"error: {exc}"
    except KeyboardInterrupt:
        _ignore_sigint()
        ex.close()  # whatever it had started by then
        return EXIT_INTERRUPTED, None, "error: interrupted while the executor was starting"
    except Exception as exc:  # unreachable address, a cluster that would not start, ...
        return (
            EXIT_EXECUTOR,
            None,
            (f"error: could not start the {ex.kind} executor: {' '.join(str(exc).split())}"),
        )
    try:
        with ex:  # closed on the way out, whatever happened: remote tasks cancelled, clusters stopped
            view.open(pipe.stderr, ex, wf)
            try:
                return EXIT_OK, _drive(ex, wf, run_input, args, view), None
            finally:
                if ex.kind == "ray":  # its workers' last lines come a moment later, from log files
                    view.wait_quiet(RAY_OUTPUT_QUIET, RAY_OUTPUT_WAIT)
                pipe.drain()  # lines still in the pipe go out before the view's last one
                view.close()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED, None, "error: interrupted; the run was cancelled and the executor stopped"
    except ConfigError as exc:
        return EXIT_USAGE, None, f"error: {exc}"
    except StageError as exc:
        text = failure_text(exc, verbose=args.verbose)
        tracker = view.feed.tracker if view.feed is not None else None
        failed = tracker.failed_tasks() if tracker is not None else []
        if len(failed) > 1:
            text += "\n" + failures_table(failed, f"{len(failed)} task(s) failed:")
        code = EXIT_EXECUTOR if isinstance(exc.__cause__, ClusterLostError) else EXIT_FAILED
        return code, exc.run, text
    except RunTimeoutError as exc:
        return EXIT_FAILED, getattr(exc, "run", None), f"error: {exc}"
    except ClusterLostError as exc:
        return EXIT_EXECUTOR, None, f"error: lost the {ex.kind} executor's cluster: {exc}"
    except ExecutorClosedError as exc:
        return EXIT_EXECUTOR, None, f"error: the {ex.kind} executor stopped during the run: {exc}"


def _drive(ex, wf, run_input, args, view):
    """Submit the run and redraw the progress until it ends; its WorkflowRun, or the run's error.
    On Ctrl-C the run is cancelled (its remote tasks too) before KeyboardInterrupt goes on."""
    handle = None
    try:
        handle = ex.submit(wf, input=run_input, namespace=args.namespace, timeout=args.timeout)
        view.follow(handle.run)
        while not handle._finished.wait(TICK):
            view.tick()
    except KeyboardInterrupt:
        _ignore_sigint()  # a second Ctrl-C must not break the stopping half-way
        view.note("interrupted: cancelling the run and stopping the executor...")
        if handle is not None:
            handle.cancel()
            handle._finished.wait(30)
        raise
    return handle.wait()


def cmd_status(args) -> int:
    """Workers and resources of a running Dask or Ray cluster (connects, reads, disconnects:
    the cluster itself is left running)."""
    from .config import executor_from_config

    address = args.address
    kind = args.kind or (
        "dask" if address.startswith(("tcp://", "tls://", "ucx://", "ws://", "wss://")) else "ray"
    )
    try:
        ex = executor_from_config(
            {"target": kind, "cluster_address": address, "connect_timeout": args.timeout}
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    import threading

    outcome: dict = {}

    def look():  # in a thread: a client that hangs while connecting must not hang the command
        try:
            ex.start()
            try:
                outcome["info"] = ex.info()
            finally:
                ex.close()
        except BaseException as exc:
            outcome["error"] = exc

    looker = threading.Thread(target=look, name="flowdapt-nb-status", daemon=True)
    looker.start()
    looker.join(args.timeout + STATUS_GRACE)
    if looker.is_alive():
        print(
            f"error: could not reach the {kind} cluster at {address}: no answer within "
            f"{args.timeout + STATUS_GRACE:g} s",
            file=sys.stderr,
        )
        sys.stderr.flush()
        os._exit(EXIT_EXECUTOR)  # the connecting thread can't be stopped; it started nothing here
    error = outcome.get("error")
    if isinstance(error, ConfigError):
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if error is not None:
        print(
            f"error: could not reach the {kind} cluster at {address}: {' '.join(str(error).split())}",
            file=sys.stderr,
        )
        return EXIT_EXECUTOR
    print(status_text(outcome["info"]))
    return EXIT_OK


RAY_OUTPUT_QUIET = 1.0  # seconds without output before a Ray executor is closed after its run...
RAY_OUTPUT_WAIT = 3.0  # ...waiting at most this long
STATUS_GRACE = 20.0  # seconds past --timeout that `status` waits for a client still connecting


def status_text(info: dict) -> str:
    """The cluster's kind, address and dashboard, then one row per worker and the totals."""
    import pandas as pd

    lines = [
        f"{info['kind']} cluster at {info.get('address')}",
        f"dashboard: {info.get('dashboard_url') or 'none'}",
        f"workers: {len(info.get('workers') or [])}",
    ]
    workers = info.get("workers") or []
    if workers:
        frame = pd.DataFrame([{k: _cell(k, v) for k, v in w.items()} for w in workers])
        lines.append(frame.to_string(index=False))
    totals = info.get("resources") or {}
    if totals:
        lines.append(
            "resources: "
            + ", ".join(
                f"{name} {amount:g}" if isinstance(amount, (int, float)) else f"{name} {amount}"
                for name, amount in totals.items()
            )
        )
    return "\n".join(lines)


def _cell(key: str, value):
    """A worker table cell: resources as name=amount, memory in GiB."""
    if isinstance(value, dict):
        return ", ".join(
            f"{n}={a:g}" if isinstance(a, (int, float)) else f"{n}={a}" for n, a in value.items()
        )
    if "memory" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value / 2**30:.1f} GiB"
    return value


def _ignore_sigint() -> None:
    import signal

    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


def _security_note() -> str:
    import textwrap

    from .workflow import TARGETS_ARE_CODE

    return "\n".join(textwrap.wrap(TARGETS_ARE_CODE, 78))


def build_parser() -> argparse.ArgumentParser:
    note = _security_note()
    parser = argparse.ArgumentParser(
        prog="flowdapt-nb",
        description="Run Flowdapt workflows headless.",
        epilog=note,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run a workflow and print its result as JSON (progress and stage prints go to stderr)",
        description="Run a workflow and print its result as JSON on stdout (or write it to "
        "--output FILE). Live progress and what stages print (prefixed with "
        "'(stage[item])') go to stderr, so stdout is only the result.",
        epilog=EXIT_CODES_HELP + "\n\n" + note,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("workflow", help="workflow resource YAML file")
    run.add_argument("--config", "-c", help="executor config YAML (default: local executor)")
    run.add_argument("--input", "-i", action="append", metavar="KEY=VALUE", help="run input (repeatable)")
    run.add_argument("--input-json", help="run input as a JSON object")
    run.add_argument("--namespace", "-n", default=None)
    run.add_argument(
        "--timeout", type=_positive_seconds, default=None, help="seconds before the run is failed"
    )
    run.add_argument("--path", action="append", help="extra folder to import stage targets from")
    run.add_argument(
        "--progress",
        choices=("auto", "bar", "plain", "none"),
        default="auto",
        help="progress on stderr: a bar redrawn in place (a terminal), a plain line per stage "
        "change and a summary every few seconds (a log), or none; auto (default) picks bar "
        "when stderr is a terminal, else plain",
    )
    run.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="write the result to FILE instead of stdout; the format follows the suffix "
        "(.json, .pkl/.pickle, .parquet/.pq) unless --format says",
    )
    run.add_argument(
        "--format",
        "-f",
        choices=FORMATS,
        default=None,
        help="the result's format: json (default; stdout or --output), pickle or parquet (a "
        "pandas DataFrame) to --output",
    )
    run.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="on failure, show the whole traceback (flowdapt_nb's own frames too)",
    )
    run.set_defaults(func=cmd_run)
    status = sub.add_parser(
        "status",
        help="workers and resources of a running Dask or Ray cluster",
        description="Connect to a running Dask or Ray cluster, print its workers and "
        "resources, and disconnect (the cluster keeps running). Exits 0, or "
        "3 when the cluster can't be reached.",
    )
    status.add_argument(
        "address", help="tcp://HOST:PORT for a Dask scheduler; HOST:PORT or ray://HOST:PORT for Ray"
    )
    status.add_argument(
        "--kind",
        choices=("dask", "ray"),
        default=None,
        help="the cluster's kind (default: dask for tcp:// or tls:// addresses, else ray)",
    )
    status.add_argument(
        "--timeout", type=_positive_seconds, default=10.0, help="seconds to reach it (default 10)"
    )
    status.set_defaults(func=cmd_status)
    val = sub.add_parser(
        "validate",
        help="check config and workflow files",
        description="Check config and workflow files. Given with configs, workflows are "
        "checked against their allowed_targets.",
        epilog=note,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    val.add_argument("files", nargs="+")
    val.add_argument(
        "--resolve",
        action="store_true",
        help="also import every stage target (this runs their modules' import-time code)",
    )
    val.set_defaults(func=cmd_validate)
    from .cli_runs import add_commands as add_run_store_commands  # runs, show

    add_run_store_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception:  # pragma: no cover - an internal fault still says what happened
        traceback.print_exc()
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
