"""``%flowdapt`` / ``%%flowdapt``: executors, workflows and runs from notebook cells.

Load with ``%load_ext flowdapt_nb``, then::

    %flowdapt executor ray --cpus 2          start (or attach with --address) and show the card
    %%flowdapt executor                      the cell is YAML: a Flowdapt config or the executor mapping
    %%flowdapt workflow [NAME]               the cell is a workflow resource, stored under its name
    %flowdapt workflows                      the stored workflows
    %flowdapt run NAME --input n=10          run it (Ctrl-C cancels); --background returns at once
    %flowdapt status | dashboard | memory [NS] | stop | help

Names pushed into the notebook's namespace (each can be renamed, or switched off with '',
through ``%config FlowdaptMagics.<trait>``):

- ``flowdapt_executor`` (``executor_variable``): the executor the magics started;
- ``flowdapt_run`` (``run_variable``): the WorkflowRun of the last ``%flowdapt run``, updated in
  place while it runs;
- ``_flowdapt_run`` (``handle_variable``): the RunHandle of the last ``--background`` run
  (``-o VAR`` stores it, or the finished run of a blocking call, under VAR as well).

A user mistake is an ``IPython.core.error.UsageError`` of one line that says what is valid.
"""

from __future__ import annotations

import difflib
import re
import sys
import textwrap
import threading
import time
from typing import TYPE_CHECKING

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Int, Unicode
from traitlets.config import Configurable

from ..errors import ConfigError
from ..executors import registry

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

CELL_SUBCOMMANDS = ("executor", "workflow")
SUBCOMMANDS = (
    "executor",
    "workflow",
    "workflows",
    "run",
    "status",
    "dashboard",
    "memory",
    "stop",
    "runs",
    "compare",
    "cache",
    "help",
)
_START_ERRORS = (ConfigError, ConnectionError, OSError, TimeoutError, RuntimeError)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _usage(exc: ConfigError, where: str, cell: bool = False) -> UsageError:
    """A ConfigError as one UsageError line; YAML lines are the cell's own lines."""
    text = str(exc)
    if cell and exc.line is not None and text.startswith(f"line {exc.line}: "):
        text = f"cell line {exc.line}: " + text[len(f"line {exc.line}: ") :]
    if exc.message.startswith("needs input") and exc.key:
        text = text.split("; pass it in the run input")[0] + f"; pass it with --input {exc.key}=..."
    return UsageError(f"{where}: {_one_line(text)}")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _nearest(word: str, valid) -> str:
    near = difflib.get_close_matches(word, list(valid), n=1)
    return f"did you mean '{near[0]}'? " if near else ""


def _has_kernel(shell) -> bool:
    """True in a Jupyter kernel (display updates reach a front end), False in terminal IPython."""
    return getattr(shell, "kernel", None) is not None


class ExecutorKind(Unicode):
    """A trait holding an executor kind of ``executors.registry`` (any case, kept lower-case)."""

    info_text = "an executor kind (local, dask, ray, or one a registered Executor subclass names)"

    def validate(self, obj, value):
        value = super().validate(obj, value)
        if value.lower() in registry.kinds():
            return value.lower()
        self.error(obj, value)


# Options of '%flowdapt executor' and the executor field each fills (for kinds that take it:
# their class's magic_options); --threads/--processes are the local pool's choice.
_OPTION_FIELDS = {
    "--cpus": "cpus",
    "--gpus": "gpus",
    "--memory": "memory",
    "--resource": "resources",
    "--address": "cluster_address",
}


def _takers(flag: str) -> str:
    """'dask and ray': the kinds whose magic takes an option."""
    names = [k for k, cls in registry.classes().items() if flag in cls.magic_options]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def _kind_help() -> str:
    return f"{' | '.join(registry.kinds())} (default: %%config FlowdaptMagics.executor)"


@magics_class
class FlowdaptMagics(Magics, Configurable):
    """The ``%flowdapt`` line and ``%%flowdapt`` cell magic. ``%flowdapt help`` lists subcommands."""

    executor = ExecutorKind("local", help="Executor kind started by '%flowdapt executor' with no kind.").tag(
        config=True
    )
    cpus = Int(0, help="Default --cpus for executors the magic starts (0: the executor's 'auto').").tag(
        config=True
    )
    local_processes = Bool(
        False,
        help="'%flowdapt executor local' without --threads/--processes uses "
        "processes (True) or threads (False).",
    ).tag(config=True)
    ray_logging_level = Unicode(
        "error",
        help="logging_level of Ray executors started by the line magic "
        "(keeps Ray's start-up banner out of cells).",
    ).tag(config=True)
    namespace = Unicode("", help="Default run namespace ('': the executor's default).").tag(config=True)
    progress = Bool(
        True, help="Show a live progress display under blocking '%flowdapt run' cells (in a Jupyter kernel)."
    ).tag(config=True)
    widgets = Bool(
        True, help="Show flowdapt_nb.widgets where a widget front end runs; False: HTML/text only."
    ).tag(config=True)
    executor_variable = Unicode(
        "flowdapt_executor", help="User-namespace name of the current executor ('' to not push it)."
    ).tag(config=True)
    run_variable = Unicode(
        "flowdapt_run", help="User-namespace name of the last run's WorkflowRun ('' to not push it)."
    ).tag(config=True)
    handle_variable = Unicode(
        "_flowdapt_run",
        help="User-namespace name of the last background run's RunHandle ('' to not push it).",
    ).tag(config=True)
    full_tracebacks = Bool(
        False,
        help="Show a failed stage's whole traceback, flowdapt_nb's own frames "
        "(worker, engine, magics) included; False: the user's frames "
        "first, ours hidden.",
    ).tag(config=True)

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self.current = None  # the executor the magics started
        self.workflows: dict = {}  # name -> Workflow, from %%flowdapt workflow
        self.last_run = None

    # --- dispatch -------------------------------------------------------------------------------
    @line_cell_magic
    def flowdapt(self, line: str = "", cell: str | None = None):
        __tracebackhide__ = True  # noqa: F841  (IPython hides this frame in tracebacks)
        sub, _, rest = line.strip().partition(" ")
        sub = sub.lower()
        if not sub:
            if cell is not None:
                raise UsageError("%%flowdapt needs a subcommand: %%flowdapt executor or %%flowdapt workflow")
            sub = "help"
        if sub in ("-h", "--help"):
            sub = "help"
        if sub not in SUBCOMMANDS:
            raise UsageError(
                f"unknown subcommand '{sub}'; {_nearest(sub, SUBCOMMANDS)}valid: {', '.join(SUBCOMMANDS)}"
            )
        if cell is not None and sub not in CELL_SUBCOMMANDS:
            raise UsageError(
                f"'{sub}' takes no cell body: use the line magic %flowdapt {sub} "
                f"(cell forms: %%flowdapt executor, %%flowdapt workflow)"
            )
        handler = getattr(self, f"_cmd_{sub}")
        if {"-h", "--help"} & set(rest.split()) and getattr(handler, "parser", None) is not None:
            print(_help_of(handler.parser) + ("\n" + workflow_help() if sub == "workflow" else ""))
            return None
        return handler(rest, cell)

    def _args(self, handler, rest: str):
        """Parse with the subcommand's parser; a quoted value loses its quotes (IPython's
        arg_split keeps them)."""
        try:
            args = parse_argstring(handler, rest)
        except UsageError as exc:
            valid = sorted({s for a in handler.parser._actions for s in a.option_strings})
            unknown = re.search(r"unrecognized arguments: (--?[\w-]+)", str(exc))
            near = ""
            if unknown:  # compare without the dashes, which every option shares
                bare = {v.lstrip("-"): v for v in valid}
                close = difflib.get_close_matches(unknown.group(1).lstrip("-"), list(bare), n=1, cutoff=0.7)
                near = f"did you mean '{bare[close[0]]}'? " if close else ""
            raise UsageError(
                f"%{handler.parser.prog}: {_one_line(exc)}; {near}"
                + (f"valid options: {', '.join(valid)}" if valid else "")
            ) from None
        except ValueError as exc:  # unbalanced quotes
            raise UsageError(f"%{handler.parser.prog}: {exc}") from None
        for key, value in vars(args).items():
            if isinstance(value, str):
                setattr(args, key, _unquote(value))
            elif isinstance(value, list):
                setattr(args, key, [_unquote(v) if isinstance(v, str) else v for v in value])
        return args

    # --- namespace --------------------------------------------------------------------------------
    def _ipython(self) -> InteractiveShell:
        """The IPython shell these magics belong to (IPython sets it when it registers them)."""
        assert self.shell is not None, "the %flowdapt magics need an IPython shell"
        return self.shell

    def _push(self, name: str, value) -> None:
        if name:
            self._ipython().push({name: value}, interactive=True)

    def _require_executor(self, what: str):
        ex = self.current
        if ex is not None and not ex.running and ex.state.startswith(("starting", "failed")):
            try:  # started with --no-wait: wait for it here (its error, if it failed, is raised)
                ex.wait_started()
            except Exception as exc:
                raise UsageError(
                    f"%flowdapt {what}: the {ex.kind} executor did not start: "
                    f"{type(exc).__name__}: {_one_line(exc)}"
                ) from None
        if ex is None or not ex.running:
            raise UsageError(
                f"%flowdapt {what}: no executor yet; start one with "
                f"%flowdapt executor local (or {', '.join(registry.kinds()[1:])}) or a %%flowdapt "
                f"executor YAML cell"
            )
        return ex

    # --- display ----------------------------------------------------------------------------------
    def _show(self, widget: str, executor, into=None) -> None:
        """Display ``flowdapt_nb.widgets.<widget>(executor)`` where a widget front end runs,
        else the executor's own HTML/text view; ``into``: in place of a start feedback."""
        from IPython.display import display

        shown = None
        if self.widgets and _has_kernel(self.shell):
            try:
                from .. import widgets as widget_module

                shown = getattr(widget_module, widget)(executor)
            except Exception:  # no widgets module, ipywidgets or comm: fall back to HTML/text
                shown = None
        if into is not None:  # the start feedback's output becomes the card
            into.finish(shown if shown is not None else executor)
        elif shown is not None:
            display(shown)
        else:
            display(executor)
        if shown is not None:
            return
        if widget in ("Dashboard", "ResourceDashboard"):
            frame = executor.resources()
            if len(frame):
                display(frame)

    # --- executor ---------------------------------------------------------------------------------
    @magic_arguments(name="flowdapt executor")
    @argument("kind", nargs="?", help=_kind_help())
    @argument("--cpus", type=int, help="local: pool size; dask: workers; ray: CPUs (default 'auto')")
    @argument("--gpus", help="dask/ray: GPUs (a number, or 'auto')")
    @argument("--memory", help="dask: memory per worker; ray: memory (e.g. 8GB)")
    @argument("--address", help="dask/ray: attach to the cluster at this address instead of starting one")
    @argument("--threads", action="store_true", help="local: a pool of threads")
    @argument("--processes", action="store_true", help="local: a pool of processes")
    @argument(
        "--resource",
        nargs="+",
        action="extend",
        metavar="NAME=N",
        help="dask/ray: custom resources per worker/node, e.g. --resource hamster_wheels=2",
    )
    @argument(
        "--set",
        nargs="+",
        action="extend",
        metavar="FIELD=VALUE",
        dest="fields",
        help="any other executor field, value read as YAML, e.g. --set include_dashboard=false",
    )
    @argument(
        "--no-wait",
        action="store_true",
        dest="no_wait",
        help="return at once: the output shows the start, then the card; the next magic that "
        "needs the executor (%%flowdapt run) waits for it",
    )
    def _cmd_executor(self, rest: str, cell: str | None = None):
        """Start an executor (or attach to a cluster) and show its card; replaces the current one.
        As a cell magic, the cell is YAML: a whole Flowdapt config or the executor mapping."""
        if cell is not None:
            if rest.strip():
                raise UsageError("%%flowdapt executor takes no options: put every field in the YAML cell")
            new = self._executor_from_cell(cell)
        else:
            args = self._args(self._cmd_executor, rest)
            new = self._executor_from_line(args)
            if args.no_wait:
                self._start_without_waiting(new)
                return
        feedback = self._replace_executor(new)
        self._show("ExecutorCard", new, into=feedback)

    def _start_without_waiting(self, new) -> None:
        """``--no-wait``: start in the background and return; the output shows the start (what
        ``new.state`` says, ticking), then the executor's card, or the error."""
        self._close_current()
        feedback = None
        if self.progress and _has_kernel(self.shell):
            from .progress import StartProgress

            feedback = StartProgress(new)
        new.start(wait=False)
        self.current = new
        self._push(self.executor_variable, new)
        if feedback is None:
            print(f"{new.kind} executor {new.state}; %flowdapt run waits for it")
            return

        def finish():
            starting = new._starting
            if starting is not None:
                starting.wait()
            if new.running:
                self._show("ExecutorCard", new, into=feedback)
            else:
                error = new.start_error
                feedback.finish(
                    error=(f"{type(error).__name__}: {_one_line(error)}" if error is not None else new.state)
                )

        threading.Thread(target=finish, name="flowdapt-nb-start-shown", daemon=True).start()

    def _executor_from_cell(self, cell: str):
        from ..config import executor_from_config
        from ..yamlsrc import parse_yaml

        try:
            return executor_from_config(parse_yaml(cell, line_offset=1))
        except ConfigError as exc:
            raise _usage(exc, "%%flowdapt executor", cell=True) from None

    def _executor_from_line(self, args):
        from ..config import executor_from_config
        from ..run_input import parse_assignments

        where = "%flowdapt executor"
        kind = (args.kind or self.executor).lower()
        kinds = registry.kinds()
        if kind not in kinds:
            raise UsageError(
                f"{where}: unknown executor '{kind}'; {_nearest(kind, kinds)}valid: {', '.join(kinds)}"
            )
        cls = registry.get(kind)
        try:
            resources = parse_assignments(args.resource, "--resource")
            extra = parse_assignments(args.fields, "--set")
        except ConfigError as exc:
            raise _usage(exc, where) from None
        try:
            fields = self._fields_from_options(kind, cls, args, resources)
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}") from None
        fields.update(extra)
        if "target" in fields:
            raise UsageError(f"{where}: the executor kind is the first argument, not --set target=...")
        try:
            return executor_from_config({"target": kind, **fields})
        except ConfigError as exc:
            raise _usage(exc, where) from None

    def _fields_from_options(self, kind: str, cls, args, resources: dict) -> dict:
        """The executor fields the line's options give, for a kind that takes them (its
        class's ``magic_options``); a ValueError says which option this kind doesn't take."""
        takes = cls.magic_options
        values = {
            "--cpus": args.cpus,
            "--gpus": args.gpus,
            "--memory": args.memory,
            "--address": args.address,
            "--resource": resources,
            "--threads": args.threads,
            "--processes": args.processes,
        }
        own = ", ".join(takes)
        pool = [flag for flag in ("--threads", "--processes") if values[flag] and flag not in takes]
        if pool:
            raise ValueError(f"--threads/--processes choose the local executor's pool; {kind} takes {own}")
        refused = [flag for flag, value in values.items() if value and flag not in takes]
        if refused:
            raise ValueError(
                f"only {_takers(refused[0])} take {', '.join(refused)}; the {kind} executor takes {own}"
            )
        if args.threads and args.processes:
            raise ValueError("give --threads or --processes, not both")
        fields: dict = {}
        if "--threads" in takes or "--processes" in takes:
            fields["use_processes"] = (
                True if args.processes else False if args.threads else self.local_processes
            )
        if args.address and "--address" in takes:
            given = [flag for flag in ("--cpus", "--gpus", "--memory", "--resource") if values[flag]]
            if given:
                raise ValueError(
                    f"{', '.join(given)} can't be used with --address: they size a "
                    f"cluster we start; an attached cluster has its own resources"
                )
            fields["cluster_address"] = args.address
        else:  # what a given option (or a default trait) sizes, None where nothing is given
            sized = {
                "--cpus": args.cpus or self.cpus or None,
                "--memory": args.memory or None,
                "--gpus": None if args.gpus is None else int(args.gpus) if args.gpus.isdigit() else args.gpus,
                "--resource": resources or None,
            }
            for flag, value in sized.items():
                if flag in takes and value is not None:
                    fields[_OPTION_FIELDS[flag]] = value
        for trait in self.trait_names():  # e.g. ray_logging_level fills a Ray executor's logging_level
            name = trait.removeprefix(f"{kind}_")
            if trait.startswith(f"{kind}_") and name in cls.Config.model_fields:
                fields[name] = getattr(self, trait)
        return fields

    def _replace_executor(self, new):
        """Close the current executor (ours: the magics started it), then start ``new``, showing
        what happens meanwhile in a kernel; returns that feedback (the card goes in its place)."""
        self._close_current()
        feedback = None
        if self.progress and _has_kernel(self.shell):
            from .progress import StartProgress

            feedback = StartProgress(new)
        try:
            try:
                new.start()
            except BaseException as exc:
                if feedback is not None:
                    feedback.finish(error=_one_line(exc) or type(exc).__name__)
                raise
        except _START_ERRORS as exc:  # unreachable address, Ray already up, a bad value
            raise UsageError(
                f"%flowdapt executor: could not start the {new.kind} executor: {_one_line(exc)}"
            ) from None
        except Exception as exc:  # the engine itself failed to come up (e.g. Ray timed out)
            raise UsageError(
                f"%flowdapt executor: could not start the {new.kind} executor: "
                f"{type(exc).__name__}: {_one_line(exc)}"
            ) from None
        self.current = new
        self._push(self.executor_variable, new)
        return feedback

    def _close_current(self) -> bool:
        old, self.current = self.current, None
        if old is None:
            return False
        was_running = old.running
        try:
            old.close()
        finally:
            ns = self._ipython().user_ns
            if self.executor_variable and ns.get(self.executor_variable) is old:
                del ns[self.executor_variable]
        return was_running

    # --- workflows --------------------------------------------------------------------------------
    @magic_arguments(name="flowdapt workflow")
    @argument("name", nargs="?", help="store (cell) or show (line) the workflow under this name")
    def _cmd_workflow(self, rest: str, cell: str | None = None):
        """As a cell magic: the cell is a workflow resource (or just its list of stages), stored under
        its metadata.name or NAME and shown with its DAG. As a line magic: return a stored workflow."""
        from IPython.display import display

        args = self._args(self._cmd_workflow, rest)
        if cell is None:
            if not args.name:
                raise UsageError(
                    "%flowdapt workflow: give the workflow as a cell (%%flowdapt workflow) "
                    "or the name of a stored one: %flowdapt workflow NAME"
                )
            return self._workflow(args.name, "workflow")
        wf = self._workflow_from_cell(cell, args.name)
        self.workflows[wf.name] = wf
        try:
            wf.resolve(
                self._ipython().user_ns,
                allowed_targets=getattr(getattr(self.current, "config", None), "allowed_targets", None),
            )
        except ConfigError as exc:
            print(f"note: {_one_line(exc)} (needed before %flowdapt run {wf.name})", file=sys.stderr)
        display(wf)

    def _workflow_from_cell(self, cell: str, name: str | None):
        from ..workflow import load_workflow
        from ..yamlsrc import Source, parse_yaml

        where = "%%flowdapt workflow"
        try:
            source = parse_yaml(cell, line_offset=1)
            data = source.data
            if isinstance(data, list):  # just the stages
                source = Source(
                    {"stages": data},
                    {("stages",) + k: v for k, v in source.lines.items()},
                    source.origin,
                    source.line_offset,
                )
                data = source.data
            if name is not None and isinstance(data, dict):
                if "spec" in data:
                    meta = data.get("metadata")
                    if meta is None:
                        data["metadata"] = {"name": name}
                    elif isinstance(meta, dict):
                        meta["name"] = name
                elif "stages" in data:
                    data["name"] = name
            if isinstance(data, dict) and "spec" not in data and "stages" in data and not data.get("name"):
                raise ConfigError("the workflow needs a name: %%flowdapt workflow NAME, or metadata.name")
            return load_workflow(source)
        except ConfigError as exc:
            raise _usage(exc, where, cell=True) from None

    def _workflow(self, name: str, what: str):
        """A stored workflow, a Workflow in the user namespace, or a workflow YAML file."""
        if name in self.workflows:
            return self.workflows[name]
        from ..workflow import Workflow, load_workflow

        value = self._ipython().user_ns.get(name)
        if isinstance(value, Workflow):
            return value
        if name.lower().endswith((".yaml", ".yml")):
            try:
                return load_workflow(name)
            except ConfigError as exc:
                raise _usage(exc, f"%flowdapt {what}") from None
        stored = ", ".join(sorted(self.workflows)) or "none yet"
        raise UsageError(
            f"%flowdapt {what}: unknown workflow '{name}'; {_nearest(name, self.workflows)}"
            f"stored: {stored} (define one with a %%flowdapt workflow cell)"
        )

    def _cmd_workflows(self, rest: str, cell: str | None = None):
        """The stored workflows as a table: name, stages, terminal stages, DAG edges."""
        if rest.strip():
            raise UsageError("%flowdapt workflows takes no arguments")
        import pandas as pd

        rows = [
            {
                "workflow": wf.name,
                "stages": len(wf.stages),
                "terminal": ", ".join(s.name for s in wf.terminal_stages()),
                "dag": "; ".join(
                    f"{s.name}<-{'+'.join(s.depends_on)}" if s.depends_on else s.name for s in wf.stages
                ),
            }
            for wf in self.workflows.values()
        ]
        if not rows:
            print("no workflows yet; define one with a %%flowdapt workflow cell")
        return pd.DataFrame(rows, columns=["workflow", "stages", "terminal", "dag"])

    # --- runs -------------------------------------------------------------------------------------
    @magic_arguments(name="flowdapt run")
    @argument("name", help="a workflow stored by %%flowdapt workflow (or a Workflow variable, a .yaml path)")
    @argument(
        "--input",
        "-i",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="run input, values read as YAML: --input n=10 xs=[1,2]",
    )
    @argument("--input-json", metavar="JSON", help="run input as a JSON object (--input wins per key)")
    @argument("--namespace", "-n", help="cluster memory namespace of the run")
    @argument("--timeout", type=float, help="seconds before the run is failed")
    @argument(
        "--background",
        "-b",
        action="store_true",
        help="return a RunHandle at once (pushed as _flowdapt_run) while the run goes on",
    )
    @argument(
        "-o", "--output", metavar="VAR", help="also store the handle (--background) or the run under VAR"
    )
    @argument(
        "--cache",
        action="store_true",
        help="reuse stored outputs of stages whose fingerprint is unchanged (the stage cache)",
    )
    def _cmd_run(self, rest: str, cell: str | None = None):
        """Run a stored workflow. Blocks with a live progress display and returns the WorkflowRun;
        Ctrl-C (interrupt the kernel) cancels the run. A failing stage raises StageError."""
        __tracebackhide__ = True  # noqa: F841
        args = self._args(self._cmd_run, rest)
        if args.output is not None and not args.output.isidentifier():
            raise UsageError(f"%flowdapt run: -o takes a Python variable name, got {args.output!r}")
        ex = self._require_executor("run")
        wf = self._workflow(args.name, "run")
        run_input = self._run_input(args)
        try:
            handle = ex.submit(
                wf,
                input=run_input,
                namespace=args.namespace or self.namespace or None,
                timeout=args.timeout,
                cache=True if args.cache else None,
            )
        except ConfigError as exc:
            raise _usage(exc, "%flowdapt run") from None
        self.last_run = handle.run
        self._push(self.run_variable, handle.run)
        if args.background:  # the handle is the cell's output; %flowdapt dashboard follows the run
            if self.progress and _has_kernel(self.shell):  # shown as its progress, live to the end
                from .progress import register_live_handles

                register_live_handles(self.shell)
            self._push(self.handle_variable, handle)
            if args.output:
                self._push(args.output, handle)
            return handle
        progress = None
        try:
            if self.progress and _has_kernel(self.shell):
                from .progress import RunProgress

                progress = RunProgress(ex, handle)
            while not handle.done():
                time.sleep(0.02)
        except KeyboardInterrupt:
            handle.cancel()
            self._wait_cancelled(handle)
            if progress is not None:
                progress.finish()
            if args.output:
                self._push(args.output, handle.run)
            raise KeyboardInterrupt(f"run {handle.run.name} {handle.run.state}") from None
        if progress is not None:
            progress.finish()
        if args.output:
            self._push(args.output, handle.run)
        try:
            return handle.wait(0)
        except Exception as exc:  # a failed run: StageError (its cause is the stage's own error)
            from .tracebacks import show_user_frames  # the user's frames first, ours one switch away

            # the same error, its own cause chain kept (from None would drop it)
            raise show_user_frames(exc, self.shell, self).with_traceback(None)  # noqa: B904

    @staticmethod
    def _wait_cancelled(handle, limit: float = 60.0) -> None:
        deadline = time.monotonic() + limit
        while not handle.done() and time.monotonic() < deadline:
            try:
                time.sleep(0.02)
            except KeyboardInterrupt:  # a second Ctrl-C: stop waiting, the run still stops
                return

    @staticmethod
    def _run_input(args) -> dict:
        from ..run_input import input_from_args  # the one run-input parser (CLI, magic, StageMapper)

        try:
            return input_from_args(args.input, args.input_json)
        except ConfigError as exc:
            raise _usage(exc, "%flowdapt run") from None

    # --- status, dashboard, memory, stop, help ---------------------------------------------------
    def _cmd_status(self, rest: str, cell: str | None = None):
        """The executor's card and its recent runs."""
        if rest.strip():
            raise UsageError("%flowdapt status takes no arguments")
        ex = self.current
        if ex is None or not ex.running:
            print(
                f"no executor; start one with %flowdapt executor local (or {', '.join(registry.kinds()[1:])})"
            )
            return None
        self._show("ExecutorCard", ex)
        history = ex.history[-10:]
        if not history:
            print("no runs yet")
            return None
        import pandas as pd

        rows = [
            {
                k: v
                for k, v in r.summary().items()
                if k in ("name", "state", "namespace", "started_at", "duration", "failures", "error")
            }
            for r in history
        ]
        return pd.DataFrame(rows)

    def _cmd_dashboard(self, rest: str, cell: str | None = None):
        """The native dashboard's link (Dask / Ray) and the live resource and task dashboard."""
        if rest.strip():
            raise UsageError("%flowdapt dashboard takes no arguments")
        from IPython.display import display

        ex = self._require_executor("dashboard")
        url = ex.info().get("dashboard_url")
        if url:
            import html

            display(
                {
                    "text/plain": f"{ex.kind} dashboard: {url}",
                    "text/html": f'<a href="{html.escape(url)}" target="_blank">{ex.kind} dashboard: '
                    f"{html.escape(url)}</a>",
                },
                raw=True,
            )
        else:
            print(
                f"the {ex.kind} executor has no native dashboard"
                + (" (started with include_dashboard: false)" if ex.kind == "ray" else "")
            )
        self._show("Dashboard", ex)

    @magic_arguments(name="flowdapt memory")
    @argument("namespace", nargs="?", help="only this namespace (default: all)")
    @argument(
        "--artifacts",
        "-a",
        action="store_true",
        help="also list the object store's artifacts on storage (column 'where')",
    )
    def _cmd_memory(self, rest: str, cell: str | None = None):
        """What cluster memory holds: namespace, key, type, size, time put (with --artifacts, the
        object store's artifacts too)."""
        args = self._args(self._cmd_memory, rest)
        ex = self._require_executor("memory")
        ex.make_current()  # the notebook-level stores below mean this executor
        if args.artifacts:
            from .. import object_store

            return object_store.listing(args.namespace, storage=ex.storage)
        from .. import cluster_memory

        return cluster_memory.listing(args.namespace)

    def _cmd_stop(self, rest: str, cell: str | None = None):
        """Close the executor (a cluster it started stops with it; an attached one is left running)."""
        if rest.strip():
            raise UsageError("%flowdapt stop takes no arguments")
        ex = self.current
        if ex is None:
            print("no executor to stop")
            return
        kind = ex.kind
        self._close_current()
        print(f"{kind} executor stopped")

    def _run_store(self):
        """The run store of the magics' executor, else the default one (runs of earlier kernels too)."""
        return getattr(self.current, "_run_store", None)

    @magic_arguments(name="flowdapt runs")
    @argument("--workflow", "-w", help="only this workflow's runs")
    @argument(
        "--failed", action="store_true", help="only failed runs (and lost ones: their process ended mid-run)"
    )
    @argument(
        "--limit", "-n", type=int, default=20, help="at most this many, newest first (default 20; 0: all)"
    )
    def _cmd_runs(self, rest: str, cell: str | None = None):
        """Stored runs, newest first, of this kernel and earlier ones (the run store)."""
        args = self._args(self._cmd_runs, rest)
        from ..run_history import runs

        try:
            return runs(
                workflow=args.workflow,
                state=("failed", "lost") if args.failed else None,
                store=self._run_store(),
                limit=args.limit or None,
            )
        except ValueError as exc:
            raise UsageError(f"%flowdapt runs: {exc}") from None

    @magic_arguments(name="flowdapt compare")
    @argument("a", help="a run's uid (or a unique prefix of it, or its name)")
    @argument("b", help="the other run")
    def _cmd_compare(self, rest: str, cell: str | None = None):
        """Two stored runs side by side: input, config, workflow diff, per-stage durations."""
        args = self._args(self._cmd_compare, rest)
        from ..run_history import compare

        try:
            return compare(args.a, args.b, store=self._run_store())
        except (KeyError, ValueError) as exc:
            raise UsageError(f"%flowdapt compare: {exc.args[0] if exc.args else exc}") from None

    @magic_arguments(name="flowdapt cache")
    @argument(
        "action",
        nargs="?",
        choices=["list", "clear"],
        default="list",
        help="list (default) the stage cache's stored outputs, or clear them",
    )
    @argument("--namespace", "-n", help="only this namespace (default: all)")
    def _cmd_cache(self, rest: str, cell: str | None = None):
        """The stage cache: its stored outputs (namespace, stage, item, type, size, time, run, key), or
        clear them."""
        args = self._args(self._cmd_cache, rest)
        from .. import stage_cache

        storage = getattr(self.current, "storage", None)
        if args.action == "clear":
            count = stage_cache.clear(args.namespace, storage=storage)
            where = f" of namespace {args.namespace}" if args.namespace else ""
            print(f"cleared {count} cached stage output(s){where}")
            return None
        return stage_cache.listing(args.namespace, storage=storage)

    def _cmd_help(self, rest: str = "", cell: str | None = None):
        """All subcommands, or one: %flowdapt help run."""
        sub = rest.strip().lower()
        parser = getattr(getattr(self, f"_cmd_{sub}", None), "parser", None) if sub in SUBCOMMANDS else None
        if sub and sub not in SUBCOMMANDS:
            raise UsageError(
                f"%flowdapt help: unknown subcommand '{sub}'; {_nearest(sub, SUBCOMMANDS)}"
                f"valid: {', '.join(SUBCOMMANDS)}"
            )
        if sub == "workflow":
            print(_help_of(parser) + "\n" + workflow_help())
            return
        print(_help_of(parser) if parser is not None else help_text())

    # --- extension lifecycle ----------------------------------------------------------------------
    def shutdown(self) -> None:
        """Close the executor and forget the workflows (on unload)."""
        self._close_current()
        self.workflows.clear()


HELP = """\
%flowdapt executor [local|dask|ray] [--cpus N] [--gpus N] [--memory 8GB] [--address ADDR]
                   [--threads | --processes] [--resource NAME=N ...] [--set FIELD=VALUE ...]
    Start an executor (or attach to a Dask/Ray cluster with --address) and show its card.
    Running it again closes the current executor first.
%%flowdapt executor
    The cell is YAML: a whole Flowdapt config (services.compute.executor) or the executor
    mapping (target: local|dask|ray|a class path, and its fields).
%%flowdapt workflow [NAME]
    The cell is a workflow resource (kind/metadata/spec, or just the list of stages); targets
    may name functions defined in the notebook. Stored under NAME or metadata.name; shows the DAG.
%flowdapt workflow NAME         return a stored workflow
%flowdapt workflows             the stored workflows as a table
%flowdapt run NAME [--input KEY=VALUE ...] [--input-json JSON] [--namespace NS] [--timeout S]
                   [--background] [-o VAR] [--cache]
    Run a workflow with a live progress display and return its WorkflowRun; interrupting the
    kernel (Ctrl-C, the stop button) cancels the run and its remote tasks. A failing stage raises
    StageError. --background returns a RunHandle at once (%flowdapt dashboard follows the run).
%flowdapt status                the executor's card and its recent runs
%flowdapt dashboard             the native dashboard's link and the live dashboards
%flowdapt memory [NAMESPACE] [--artifacts]  what cluster memory (and storage) holds: key, type, size
%flowdapt stop                  close the executor (a cluster it started stops with it)
%flowdapt runs [--workflow NAME] [--failed] [-n N]  stored runs, newest first, earlier kernels' too
%flowdapt compare UID UID       two stored runs side by side: input, config, workflow diff, stages
%flowdapt cache [clear] [--namespace NS]  the stage cache's stored outputs (run --cache uses them)
%flowdapt help [SUBCOMMAND]     this text, or one subcommand's options (also: SUBCOMMAND --help);
                                %flowdapt help workflow lists a workflow's fields, with an example

Defaults: %config FlowdaptMagics.<trait>: executor (kind), cpus, local_processes,
ray_logging_level, namespace, progress, widgets, executor_variable, run_variable,
handle_variable, full_tracebacks (a failed stage shows the user's frames; True: ours too).
"""


WORKFLOW_FIELDS = """\
A workflow resource (a %%flowdapt workflow cell, or a .yaml file):

    kind: workflow
    metadata:
      name: squares                  the workflow's name (letters, digits, '_' and '-')
    spec:
      stages:                        the stages, in any order; each one is a mapping:
        - name: numbers              the stage's name, unique in the workflow
          target: make_numbers       the function it calls: a notebook function's name or an
                                     import path such as mypkg.tasks.make_numbers
        - name: square
          target: square
          type: parameterized        simple (default): one task; parameterized: one task per
                                     item of its first dependency's output (a fan-out)
          depends_on: [numbers]      stages whose outputs are its arguments, in order
          options:
            map_on: values           parameterized: map over this run-input key instead
            allow_partial_failure: true   a failing item is dropped (listed in run.failures)
                                     instead of failing the stage (default true)
            timeout: 60              seconds before the stage fails
          resources: {cpus: 1}       what one task needs: cpus, gpus, memory ('2GB') or a custom
                                     resource the workers declare (--resource licences=1)
        - name: total
          target: sum_all
          depends_on: [square]
      (also per stage: description, version, priority)

Just the list of stages works too (the cell's NAME is the workflow's name):

    %%flowdapt workflow squares
    - {name: numbers, target: make_numbers}
    - {name: square, target: square, type: parameterized, depends_on: [numbers]}

A root stage's parameters come from the run input: %flowdapt run squares --input n=10.
"""


def _help_of(parser) -> str:
    """A subcommand's help as plain text; the executor kinds listed as registered now."""
    for action in parser._actions:
        if action.dest == "kind" and parser.prog == "flowdapt executor":
            action.help = _kind_help()
    return _plain(parser.format_help())


def _plain(text: str) -> str:
    """Help text without reStructuredText markup: no double backticks, no literal-block '::'."""
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"\A\s*::\s*\n", "", text)  # IPython's usage block starts with a lone '::'
    return re.sub(r"::(\s*\n)", r":\1", text)


def workflow_help() -> str:
    """The workflow resource's fields with an example, and why a workflow file is code."""
    try:
        from ..workflow import TARGETS_ARE_CODE as code_note
    except ImportError:  # pragma: no cover - older workflow module
        code_note = (
            "A workflow file is code: each target names a Python callable that is imported "
            "and called. Run only workflow files you trust."
        )
    return WORKFLOW_FIELDS + "\n" + textwrap.fill(code_note, 96) + "\n"


def help_text() -> str:
    """The text of %flowdapt help and %flowdapt? (plain text, no markup)."""
    doc = _plain(__doc__.strip().split("Load with")[0].strip())
    names = _plain(__doc__[__doc__.index("Names pushed") :].strip())
    return f"{doc}\n\n{HELP}\n{names}"


FlowdaptMagics.flowdapt.__doc__ = help_text()  # what %flowdapt? shows

# A typo must not pass: argparse would take '--cpu' as '--cpus' (any unambiguous prefix).
for _handler in vars(FlowdaptMagics).values():
    if getattr(_handler, "parser", None) is not None:
        _handler.parser.allow_abbrev = False


def load_ipython_extension(ipython) -> None:
    """``%load_ext flowdapt_nb``: register ``%flowdapt`` and ``%%flowdapt``."""
    existing = [c for c in ipython.configurables if isinstance(c, FlowdaptMagics)]
    magics = existing[0] if existing else FlowdaptMagics(shell=ipython)  # joins ipython.configurables
    ipython.register_magics(magics)


def unload_ipython_extension(ipython) -> None:
    """``%unload_ext flowdapt_nb``: close the executor the magics started and remove them."""
    for magics in [c for c in ipython.configurables if isinstance(c, FlowdaptMagics)]:
        try:
            magics.shutdown()
        finally:
            ipython.configurables.remove(magics)
    for kind in ("line", "cell"):
        ipython.magics_manager.magics[kind].pop("flowdapt", None)
    ipython.magics_manager.registry.pop("FlowdaptMagics", None)
