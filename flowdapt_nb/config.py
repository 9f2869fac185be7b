"""Executor configuration: Flowdapt-compatible pydantic models, and ``executor_from_config``.

Every Flowdapt 0.1.52 field loads; each is honoured or, where it means nothing here, named in a
warning. An unknown key is an error naming it, its YAML line and the nearest valid key.
"""

from __future__ import annotations

import difflib
import os
import typing
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .executors import registry
from .units import parse_bytes
from .yamlsrc import Source, read_source

Auto = Literal["auto"]
EXECUTOR_PATH = ("services", "compute", "executor")


def _str_map(value):
    """env_vars: YAML gives ``OMP_NUM_THREADS: 1``; environment values are strings."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of NAME: value")
    return {str(k): ("true" if v is True else "false" if v is False else str(v)) for k, v in value.items()}


def _size_or_auto(value):
    if value is None or value == "auto":
        return value
    parse_bytes(value)  # raises ValueError with a clear message
    return value


def _resource_map(value):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of resource name to amount, e.g. {hamster_wheels: 2}")
    out = {}
    for name, amount in value.items():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise ValueError(f"resource '{name}' needs a non-negative number, got {amount!r}")
        out[str(name)] = amount
    return out


def _none_is(default):
    """A validator: Flowdapt writes ``null`` for "its default"; read it as ours (``list``: a new [])."""

    def fill(cls, v):
        if v is not None:
            return v
        return default() if callable(default) else default

    return fill


def _null_means(default, *fields: str) -> Any:
    """A 'before' validator of ``fields`` that reads null as ``default`` (see ``_none_is``)."""
    return field_validator(*fields, mode="before")(classmethod(_none_is(default)))


def _allowed_targets(value):
    from .workflow import check_allowed_prefixes

    return check_allowed_prefixes(value)


def _count_or_auto(name: str):
    """A validator: ``auto`` or a whole number >= 1."""

    def check(cls, v):
        if v != "auto" and v < 1:
            raise ValueError(f"{name} must be 'auto' or a whole number >= 1")
        return v

    return field_validator(name)(classmethod(check))


class ExecutorFields(BaseModel):
    """Fields every executor takes, beyond Flowdapt's own."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    history_limit: int = Field(100, ge=1, description="runs kept in ex.history")
    history_bytes: str | int = Field(
        "256MB",
        description="results kept in ex.history, in bytes: "
        "older runs past it keep their record, not their result",
    )
    _v_history_bytes = field_validator("history_bytes", mode="before")(
        classmethod(lambda cls, v: (parse_bytes(v), v)[1])
    )  # a size: parse_bytes says what is valid
    sample_interval: float = Field(1.0, gt=0, description="seconds between resource samples")
    resource_history_limit: int = Field(600, ge=1, description="samples kept per worker")
    allowed_targets: list[str] | None = Field(
        None,
        description="import-path prefixes every stage target must start with, e.g. "
        "[mypkg., __main__]; checked before anything is imported (None: any target)",
    )
    runs: bool | str | None = Field(
        None,
        description="the run store (SQLite) this executor records runs in: a file path, ':memory:', or "
        "off/false (None: $FLOWDAPT_NB_RUNS, else <user data dir>/runs.sqlite)",
    )

    _v_allowed = field_validator("allowed_targets", mode="before")(
        classmethod(lambda cls, v: _allowed_targets(v))
    )

    # Fields accepted for Flowdapt compatibility that have no effect here, with the reason.
    _inert: dict = {}
    # Flowdapt 0.1.52's defaults of those fields: a config that spells a default out gets no warning.
    _flowdapt_defaults: dict = {}

    def inert_fields_set(self) -> dict:
        return {
            name: why
            for name, why in self._inert.items()
            if name in self.model_fields_set
            and getattr(self, name) not in (None, [], {}, False)
            and getattr(self, name) != self._flowdapt_defaults.get(name, object())
        }


class ClusterMemoryActor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    num_cpus: float = Field(0, ge=0)
    max_concurrency: int = Field(1000, ge=1)
    resources: dict = {}

    _v_resources = field_validator("resources", mode="before")(_resource_map)


class LocalConfig(ExecutorFields):
    use_processes: bool = True
    cpus: Auto | int = "auto"
    cluster_memory_socket_path: str | None = None

    _inert = {"cluster_memory_socket_path": "cluster memory is served by the executor itself"}
    _flowdapt_defaults = {"cluster_memory_socket_path": "/tmp/flowdapt-cluster-memory.sock"}
    _v_use_processes = _null_means(True, "use_processes")
    _v_cpus_none = _null_means("auto", "cpus")

    _v_cpus = _count_or_auto("cpus")


class _ClusterFields(ExecutorFields):
    cluster_address: str | None = None
    cpus: Auto | int = "auto"
    gpus: Literal["disabled", "auto"] | int = "disabled"
    memory: Auto | str | int = "auto"
    resources: dict = {}
    env_vars: dict = {}
    pip: list[str] = []
    connect_timeout: float = Field(10.0, gt=0, description="seconds to reach a cluster_address")

    _v_env = field_validator("env_vars", mode="before")(_str_map)
    _v_res = field_validator("resources", mode="before")(_resource_map)
    _v_mem = field_validator("memory", mode="before")(
        classmethod(lambda cls, v: _size_or_auto("auto" if v is None else v))
    )
    _v_pip = _null_means(list, "pip")
    _v_cpus_none = _null_means("auto", "cpus")
    _v_gpus_none = _null_means("disabled", "gpus")

    _v_cpus = _count_or_auto("cpus")

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v):
        if isinstance(v, int) and v < 0:
            raise ValueError("gpus must be 'disabled', 'auto' or a whole number >= 0")
        return v


class DaskConfig(_ClusterFields):
    threads: Auto | int = "auto"
    adaptive: bool = False
    scheduler_host: str = "127.0.0.1"
    scheduler_port: int = Field(0, ge=0, le=65535)
    dashboard_port: int | None = Field(None, ge=0, le=65535)
    scheduler_scheme: str = "tcp"
    upload_plugins: bool | list | None = False
    # TLS for attaching to a scheduler started with `--protocol tls` (distributed.security.Security's names)
    tls_ca_file: str | None = Field(
        None,
        description="PEM file of the CA that signed the scheduler's and "
        "workers' certificates (Security(tls_ca_file=...)); with cluster_address tls://...",
    )
    tls_client_cert: str | None = Field(
        None,
        description="PEM certificate this client presents, signed by a CA "
        "the scheduler trusts (Security(tls_client_cert=...))",
    )
    tls_client_key: str | None = Field(
        None,
        description="PEM private key of tls_client_cert "
        "(Security(tls_client_key=...)); may be left out if tls_client_cert holds it",
    )

    _inert = {
        "upload_plugins": "Flowdapt plugins are not used by flowdapt_nb",
        "pip": "install packages into the environment the workers run in",
    }
    _flowdapt_defaults = {"upload_plugins": False, "pip": []}
    _v_threads_none = _null_means("auto", "threads")
    _v_adaptive_none = _null_means(False, "adaptive")
    _v_host_none = _null_means("127.0.0.1", "scheduler_host")
    _v_scheme_none = _null_means("tcp", "scheduler_scheme")
    _v_port_none = _null_means(0, "scheduler_port")

    _v_threads = _count_or_auto("threads")

    @field_validator("tls_ca_file", "tls_client_cert", "tls_client_key")
    @classmethod
    def _pem_file(cls, v):
        if v is None:
            return v
        path = os.path.expanduser(str(v))
        if not os.path.isfile(path):
            raise ValueError(f"no such file {v!r}")
        return os.path.abspath(path)


class RayConfig(_ClusterFields):
    object_store_memory: str | int | None = None
    log_to_driver: bool = True
    logging_level: str | int = "warning"
    working_dir: str | None = None
    py_modules: list[str] = []
    conda: Any = None
    container: Any = None
    runtime_env_config: dict | None = None
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int | None = Field(None, ge=0, le=65535)
    include_dashboard: bool = True
    cluster_memory_actor: ClusterMemoryActor | None = None
    strategy: str | None = None
    mapper_actor: Any = None
    tasks_per_worker: int | None = None
    upload_plugins: bool | list | None = True
    connection_monitor_interval: float | None = None
    max_reconnect_retries: int | None = None
    base_reconnect_delay: float | None = None
    max_reconnect_delay: float | None = None
    ping_timeout: float | None = None
    ping_failure_threshold: int | None = None

    _inert = {
        "strategy": "tasks are placed by Ray's default scheduling",
        "mapper_actor": "parameterized stages fan out as plain Ray tasks",
        "tasks_per_worker": "parameterized stages fan out as plain Ray tasks",
        "upload_plugins": "Flowdapt plugins are not used by flowdapt_nb",
        # connection_monitor_interval, ping_timeout, ping_failure_threshold drive the head monitor
        "max_reconnect_retries": "a lost head fails the runs and disconnects; start() attaches again",
        "base_reconnect_delay": "a lost head fails the runs and disconnects; start() attaches again",
        "max_reconnect_delay": "a lost head fails the runs and disconnects; start() attaches again",
    }
    _flowdapt_defaults = {
        "strategy": "group_by_group",
        "upload_plugins": True,
        "connection_monitor_interval": 15,
        "max_reconnect_retries": 2048,
        "base_reconnect_delay": 5.0,
        "max_reconnect_delay": 60.0,
        "ping_timeout": 10.0,
        "ping_failure_threshold": 3,
    }

    _v_osm = field_validator("object_store_memory", mode="before")(_size_or_auto)
    # Flowdapt's Ray default is gpus: null, which lets Ray count the GPUs: our 'auto'
    _v_gpus_none = _null_means("auto", "gpus")
    _v_lists_none = _null_means(list, "py_modules")
    _v_level_none = _null_means("warning", "logging_level")
    _v_bools_none = _null_means(True, "log_to_driver", "include_dashboard")
    _v_host_none = _null_means("127.0.0.1", "dashboard_host")

    @field_validator("logging_level")
    @classmethod
    def _level(cls, v):
        names = ("debug", "info", "warning", "error", "critical")
        if isinstance(v, str) and v.lower() not in names:
            raise ValueError(f"logging_level must be one of {', '.join(names)}")
        return v


# --- executor targets ---------------------------------------------------------------------------


def resolve_executor_class(target: str, line: int | None = None):
    """Map a target (short name, Flowdapt class path or our own dotted path) to a class
    (the table is ``executors.registry``)."""
    return registry.resolve(target, line)


def validate_fields(model_cls, data: dict, source: Source | None = None, prefix=()):
    """Validate executor fields into ``model_cls``; unknown keys name their nearest valid key."""
    source = source or Source(data)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping of executor fields, got {type(data).__name__}", line=source.line_of(prefix)
        )
    valid = list(model_cls.model_fields)
    for key in data:
        if key not in valid:
            near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hint = f"did you mean '{near[0]}'?" if near else "valid keys: " + ", ".join(valid)
            raise ConfigError(
                f"unknown key '{key}'", key=str(key), line=source.line_of(prefix + (key,)), hint=hint
            )
    try:
        model = model_cls(**data)
    except ValidationError as exc:
        raise _field_error(model_cls, exc, data, source, prefix) from None
    for name, why in model.inert_fields_set().items():
        warnings.warn(
            f"executor field '{name}' is accepted for Flowdapt compatibility but has no effect here: {why}",
            UserWarning,
            stacklevel=3,
        )
    return model


def _data_loc(data, loc) -> tuple:
    """The part of a pydantic error location that names keys in ``data`` (drops union tags such
    as ``literal['auto']`` or ``int``)."""
    out: tuple = ()
    node = data
    for part in loc:
        in_dict = isinstance(node, dict) and part in node
        if in_dict or (isinstance(node, list) and isinstance(part, int) and part < len(node)):
            node = node[part]
        else:
            break
        out += (part,)
    return out


def _model_at(model_cls, loc):
    """The pydantic model that holds the fields at ``loc`` (for nested mappings), or None."""
    cls = model_cls
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return None
        candidates = (field.annotation, *typing.get_args(field.annotation))
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return None
    return cls


def _field_error(model_cls, exc: ValidationError, data: dict, source: Source, prefix) -> ConfigError:
    """One ConfigError for a pydantic error: the key as written, its line, what is valid."""
    errors = exc.errors()
    err = errors[0]
    if err["type"] == "extra_forbidden":
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        sub = _model_at(model_cls, loc[:-1])
        valid = list(sub.model_fields) if sub is not None else []
        near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        hint = (
            f"did you mean '{near[0]}'?" if near else ("valid keys: " + ", ".join(valid) if valid else None)
        )
        return ConfigError(f"unknown key '{loc[-1]}'", key=key, line=source.line_of(prefix + loc), hint=hint)
    if err["type"] == "missing":
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        return ConfigError(f"'{key}' is required", key=key, line=source.line_of(prefix + loc))
    loc = _data_loc(data, tuple(err["loc"])) or tuple(err["loc"][:1])
    key = ".".join(str(p) for p in loc)
    # a field that takes several types (e.g. 'auto' or a number) fails once per type: say them together
    same = [e for e in errors if (_data_loc(data, tuple(e["loc"])) or tuple(e["loc"][:1])) == loc]
    if len(same) > 1 and all(e["msg"].startswith("Input should be ") for e in same):
        options = [e["msg"].removeprefix("Input should be ").split(", unable to")[0] for e in same]
        msg = "should be " + " or ".join(dict.fromkeys(options))
    else:
        msg = err["msg"].removeprefix("Value error, ")
    given = err.get("input")
    if repr(given) not in msg:
        msg += f" (got {given!r})"
    return ConfigError(f"'{key}': {msg}", key=key, line=source.line_of(prefix + loc))


def split_config(src) -> tuple[Source, tuple, dict]:
    """Find the executor mapping in a whole Flowdapt config or take the mapping itself.

    Returns the source, the key path of the executor mapping, and the compute settings around it.
    """
    source = read_source(src, "config")
    data = source.data
    if data is None:
        raise ConfigError(
            "the config is empty; give an executor mapping with a 'target', e.g. {target: local}"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping, not {type(data).__name__}", line=source.line_of(()))
    compute: dict = {}
    if (
        "target" not in data
        and "__target__" not in data
        and (str(data.get("kind", "")).lower() == "workflow" or "spec" in data or "stages" in data)
    ):
        raise ConfigError(
            "this is a workflow resource, not an executor config",
            key="kind" if "kind" in data else None,
            line=source.line_of(("kind",) if "kind" in data else ()),
            hint="an executor config has target: local | dask | ray (or a Flowdapt config "
            "with services.compute.executor)",
        )
    if "services" in data:
        prefix: tuple = ()
        node: Any = data
        for key in EXECUTOR_PATH:
            if not isinstance(node, dict) or key not in node:
                raise ConfigError(
                    f"a Flowdapt config needs '{'.'.join(EXECUTOR_PATH)}'; "
                    f"'{'.'.join(prefix + (key,))}' is missing",
                    key=key,
                    line=source.line_of(prefix),
                )
            if key == "executor" and isinstance(node, dict):
                compute = {k: v for k, v in node.items() if k != "executor"}
            node = node[key]
            prefix += (key,)
        storage = data["services"].get("storage") if isinstance(data["services"], dict) else None
        where: tuple = ("services", "storage")
        if "artifacts" in compute:  # our key beside the executor wins over Flowdapt's services.storage
            storage, where = compute.pop("artifacts"), prefix[:-1] + ("artifacts",)
        if storage is not None:
            compute["storage"] = _storage_setting(storage, source, where)
        if isinstance(data["services"], dict) and "database" in data["services"]:
            database = _database_setting(data["services"]["database"], source)
            if database is not _NOT_OURS:
                compute["runs"] = database
        return source, prefix, compute
    return source, (), compute


_NOT_OURS = object()  # a services.database setting for Flowdapt's own server: not the run store's


def _database_setting(setting, source: Source):
    """``services.database``: where Flowdapt keeps its runs, read as the run store's ``runs:``
    setting (a file path, ':memory:', or off/false; null or true: the default database).
    A mapping naming a Flowdapt database class (``__target__``) is for Flowdapt's server: a
    warning says the default run store is used instead."""
    path = ("services", "database")
    if setting is None or isinstance(setting, bool) or (isinstance(setting, str) and setting.strip()):
        return setting
    if isinstance(setting, dict) and ("__target__" in setting or "target" in setting):
        warnings.warn(
            "services.database names a Flowdapt database class, which flowdapt_nb does not use; "
            "runs go to the default run store (give services.database a file path, ':memory:' "
            "or off to choose)",
            UserWarning,
            stacklevel=4,
        )
        return _NOT_OURS
    raise ConfigError(
        f"'services.database' is the run store: a file path, ':memory:', or off "
        f"(the same values as runs:), got {setting!r}",
        key="services.database",
        line=source.line_of(path),
        hint="e.g. services: {database: ~/runs.sqlite}",
    )


def _storage_setting(setting, source: Source, path: tuple):
    """Check a storage setting (URL or mapping) where the config gives it; local paths absolute."""
    from .artifacts import normalize_setting

    return normalize_setting(setting, key=".".join(map(str, path)), line=source.line_of(path))


def executor_from_config(src, **overrides):
    """Build an executor (not started) from YAML text, a path, or a dict.

    ``src`` is a whole Flowdapt config (``services.compute.executor``) or the executor mapping:

    >>> ex = executor_from_config("target: local\\nuse_processes: false\\ncpus: 2")
    >>> ex.kind
    'local'
    """
    source, prefix, compute = split_config(src)
    mapping = source.sub(prefix).data if prefix else source.data
    if not isinstance(mapping, dict):
        raise ConfigError(
            "the executor config must be a mapping with a 'target'", line=source.line_of(prefix)
        )
    mapping = {**mapping, **overrides}
    for name in ("allowed_targets", "runs"):  # services.compute.allowed_targets, services.database
        if name in compute:  # the executor mapping's own key wins
            value = compute.pop(name)
            mapping.setdefault(name, value)
    if "artifacts" in mapping:  # storage for object_store artifacts, given beside the executor fields
        compute["storage"] = _storage_setting(mapping.pop("artifacts"), source, prefix + ("artifacts",))
    if "target" in mapping and "__target__" in mapping:
        raise ConfigError(
            "give 'target' or '__target__', not both",
            key="target",
            line=source.line_of(prefix + ("__target__",)),
        )
    key = "target" if "target" in mapping else "__target__"
    if key not in mapping:
        raise ConfigError(
            "the executor config has no 'target'",
            key="target",
            line=source.line_of(prefix),
            hint=f"valid: {registry.valid_text()}, or flowdapt.compute.executor.<kind>.<Kind>Executor",
        )
    cls = resolve_executor_class(mapping[key], line=source.line_of(prefix + (key,)))
    fields = {k: v for k, v in mapping.items() if k != key}
    model = validate_fields(cls.Config, fields, source, prefix)
    return cls(_config=model, _compute=compute)
