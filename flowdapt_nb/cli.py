"""``flowdapt-nb run`` and ``flowdapt-nb validate``: the same YAML, headless."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import traceback
from pathlib import Path

from .errors import ConfigError, RunTimeoutError, StageError


from .run_input import input_from_args, parse_assignments  # noqa: F401  (parse_assignments: kept importable here)


def _jsonable(value) -> tuple[str, str | None]:
    """The result as one valid JSON text, and a note for stderr when it had to be changed:
    NaN and infinities become null; a value JSON can't hold becomes its repr as a JSON string."""
    try:
        return json.dumps(value, default=_fallback, allow_nan=False), None
    except ValueError:  # NaN or an infinity somewhere: JSON has no such numbers
        try:
            text = json.dumps(_finite(json.loads(json.dumps(value, default=_fallback))), allow_nan=False)
            return text, "the result holds NaN or infinite numbers; JSON has none, so they print as null"
        except (TypeError, ValueError, RecursionError):
            pass
    except (TypeError, RecursionError):
        pass
    return json.dumps(repr(value)), (f"the result ({type(value).__name__}) is not JSON; printed its repr "
                                     f"as a JSON string")


def _finite(value):
    """Plain JSON data with NaN / infinities replaced by None (iterative: no recursion limit)."""
    root = [value]
    stack = [(root, 0)]
    while stack:
        holder, key = stack.pop()
        item = holder[key]
        if isinstance(item, float) and not math.isfinite(item):
            holder[key] = None
        elif isinstance(item, list):
            stack.extend((item, i) for i in range(len(item)))
        elif isinstance(item, dict):
            stack.extend((item, k) for k in item)
    return root[0]


def _fallback(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError


def _kind_of(data) -> str:
    if isinstance(data, dict) and (str(data.get("kind", "")).lower() == "workflow" or "stages" in data
                                   or "spec" in data):
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


@contextlib.contextmanager
def _stdout_to_stderr():
    """While stages run, what anything prints (threads, worker processes started now, Dask and
    Ray output forwarded to the driver) goes to stderr: stdout carries only the JSON result."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all
        yield
        return
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 1)
        os.close(saved)


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
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
        return 2
    with _stdout_to_stderr():
        code, run = _start_and_run(ex, wf, run_input, args)
    if run is None:
        return code
    for f in run.failures:
        print(f"warning: stage '{f.stage}' dropped item {f.item}: {f.error}", file=sys.stderr)
    text, note = _jsonable(run.result)
    if note:
        print(f"note: {note}", file=sys.stderr)
    print(text)
    return 0


def _start_and_run(ex, wf, run_input, args):
    """(exit code, run): the run when it finished, else None and the code of its error."""
    try:
        ex.start()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2, None
    except (ConnectionError, OSError, TimeoutError, RuntimeError) as exc:  # unreachable address, ...
        print(f"error: could not start the {ex.kind} executor: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1, None
    try:
        with ex:
            return 0, ex.run(wf, input=run_input, namespace=args.namespace, timeout=args.timeout)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2, None
    except StageError as exc:
        print(f"error: run failed: {exc}", file=sys.stderr)
        return 1, None
    except RunTimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        print("error: cancelled", file=sys.stderr)
        return 130, None


def _security_note() -> str:
    import textwrap
    from .workflow import TARGETS_ARE_CODE
    return "\n".join(textwrap.wrap(TARGETS_ARE_CODE, 78))


def build_parser() -> argparse.ArgumentParser:
    note = _security_note()
    parser = argparse.ArgumentParser(prog="flowdapt-nb", description="Run Flowdapt workflows headless.",
                                     epilog=note, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a workflow and print its result as JSON (stage prints go to stderr)",
                         description="Run a workflow and print its result as JSON on stdout; what stages "
                                     "print goes to stderr.", epilog=note,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("workflow", help="workflow resource YAML file")
    run.add_argument("--config", "-c", help="executor config YAML (default: local executor)")
    run.add_argument("--input", "-i", action="append", metavar="KEY=VALUE", help="run input (repeatable)")
    run.add_argument("--input-json", help="run input as a JSON object")
    run.add_argument("--namespace", "-n", default=None)
    run.add_argument("--timeout", type=_positive_seconds, default=None, help="seconds before the run is failed")
    run.add_argument("--path", action="append", help="extra folder to import stage targets from")
    run.set_defaults(func=cmd_run)
    val = sub.add_parser("validate", help="check config and workflow files",
                         description="Check config and workflow files. Given with configs, workflows are "
                                     "checked against their allowed_targets.", epilog=note,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    val.add_argument("files", nargs="+")
    val.add_argument("--resolve", action="store_true",
                     help="also import every stage target (this runs their modules' import-time code)")
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
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
