"""Artifacts: values kept on storage (any fsspec URL) so they outlive an executor.

Where artifacts live comes from the config (``services.storage``, or ``artifacts:`` beside the
executor) as a URL (``/data/artifacts``, ``s3://bucket/prefix``, ``memory://``) or a mapping::

    services:
      storage: {url: s3://bucket/prefix, options: {endpoint_url: http://127.0.0.1:9000}}
      # Flowdapt's spelling works too: {protocol: s3, base_path: bucket/prefix, parameters: {...}}

Without one, a folder in the user's data directory (``~/.local/share/flowdapt_nb/artifacts`` on
Linux), or the location in the environment variable ``FLOWDAPT_NB_ARTIFACTS``. Credentials come
from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``...) or the fsspec options.

Layout: ``<root>/<namespace>/<key>/`` holds the value (``<stamp>.pkl`` via cloudpickle, or
``<stamp>.parquet`` for a pandas DataFrame when pyarrow is installed) and ``meta.json``, which
names the value's file, its type, size, creation time and the run that wrote it. Writing is
atomic: the value's file is written under a new name (a temporary file renamed into place on a
local disk; a single PUT on object stores), then ``meta.json`` is replaced the same way. A reader
only follows ``meta.json``, so it never meets a half-written file, and a writer that dies midway
leaves the previous value in place. With a bucket-less S3/GCS/Azure URL (``s3://``) each
namespace is a bucket, as in Flowdapt.

``memory://`` lives inside one process: fine for a thread pool, invisible to worker processes.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import io
import json
import os
import posixpath
import socket
import sys
import threading
import time
import uuid
from typing import Any

from .errors import ConfigError

ENV_VAR = "FLOWDAPT_NB_ARTIFACTS"
META = "meta.json"
TMP_PREFIX = ".tmp-"
STALE_SECONDS = 3600.0  # leftovers of a crashed writer older than this are swept by the next put
_BUCKET_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "r2"}
# Stores where one write of a whole object is atomic (an object appears complete or not at all).
_ATOMIC_PUT_PROTOCOLS = _BUCKET_PROTOCOLS | {"memory"}
_SETTING_KEYS = ("url", "path", "protocol", "base_path", "options", "storage_options", "parameters")


# --- where -------------------------------------------------------------------------------------


def user_data_dir() -> str:
    """The per-user data folder for flowdapt_nb (platformdirs' convention)."""
    try:
        import platformdirs

        return platformdirs.user_data_dir("flowdapt_nb", appauthor=False)
    except ImportError:  # pragma: no cover - platformdirs comes with Jupyter
        if sys.platform == "win32":
            base = os.environ.get("LOCALAPPDATA") or os.path.expanduser(r"~\AppData\Local")
        elif sys.platform == "darwin":
            base = os.path.expanduser("~/Library/Application Support")
        else:
            base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
        return os.path.join(base, "flowdapt_nb")


def default_location() -> str:
    """``$FLOWDAPT_NB_ARTIFACTS`` when set, else ``<user data dir>/artifacts``."""
    return os.environ.get(ENV_VAR) or os.path.join(user_data_dir(), "artifacts")


def _is_url(text: str) -> bool:
    return "://" in text or text.startswith("file:")


def _is_local_url(url: str) -> bool:
    return not _is_url(url) or url.startswith(("file:", "local:"))


def _absolute(location: str) -> str:
    """Local paths become absolute here, so a worker with another working directory agrees."""
    if _is_url(location):
        return location
    return os.path.abspath(os.path.expanduser(location))


def parse_setting(setting, *, key: str = "storage", line: int | None = None) -> tuple[str, dict]:
    """``(url, fsspec options)`` from a storage setting: None (the default), a URL or path, or a
    mapping ``{url | protocol + base_path, options | parameters}``. Bad input: ConfigError."""
    if setting is None:
        return _absolute(default_location()), {}
    if isinstance(setting, ArtifactStore):
        return setting.url, dict(setting.options)
    if isinstance(setting, os.PathLike):
        setting = os.fspath(setting)
    if isinstance(setting, str):
        if not setting.strip():
            raise ConfigError(
                f"'{key}' is empty; give a folder or an fsspec URL such as s3://bucket/prefix",
                key=key,
                line=line,
            )
        return _absolute(setting.strip()), {}
    if not isinstance(setting, dict):
        raise ConfigError(
            f"'{key}' must be a URL or a mapping {{url, options}}, not {type(setting).__name__}",
            key=key,
            line=line,
        )
    return _parse_mapping(setting, key, line)


def _parse_mapping(setting: dict, key: str, line: int | None) -> tuple[str, dict]:
    """``parse_setting`` for a mapping ``{url | protocol + base_path, options | parameters}``."""
    for name in setting:
        if name not in _SETTING_KEYS:
            near = difflib.get_close_matches(str(name), _SETTING_KEYS, n=1, cutoff=0.6)
            hint = f"did you mean '{near[0]}'?" if near else "valid keys: " + ", ".join(_SETTING_KEYS)
            raise ConfigError(f"unknown key '{name}' in '{key}'", key=f"{key}.{name}", line=line, hint=hint)
    given = [n for n in ("options", "storage_options", "parameters") if setting.get(n) is not None]
    if len(given) > 1:
        raise ConfigError(f"'{key}' gives {' and '.join(given)}; give one of them", key=key, line=line)
    options = setting.get(given[0]) if given else {}
    if not isinstance(options, dict):
        raise ConfigError(
            f"'{key}.{given[0]}' must be a mapping of fsspec options", key=f"{key}.{given[0]}", line=line
        )
    if setting.get("url") is not None and (
        setting.get("path") is not None or setting.get("base_path") is not None
    ):
        raise ConfigError(
            f"'{key}' gives 'url' and a path; give the whole location as 'url'", key=key, line=line
        )
    url = setting.get("url")
    if url is None:
        path = setting.get("base_path", setting.get("path"))
        protocol = setting.get("protocol")
        if protocol in (None, "file", "local"):
            url = default_location() if path is None else str(path)
        else:
            url = f"{protocol}://{str(path or '').lstrip('/')}"
    if not isinstance(url, (str, os.PathLike)) or not str(url).strip():
        raise ConfigError(f"'{key}.url' must be a folder or an fsspec URL", key=f"{key}.url", line=line)
    return _absolute(os.fspath(url).strip()), dict(options)


def normalize_setting(setting, *, key: str = "storage", line: int | None = None):
    """The setting checked, with local paths made absolute; what the executor keeps."""
    if setting is None:
        return None
    url, options = parse_setting(setting, key=key, line=line)
    return {"url": url, "options": options} if options else url


# --- names -------------------------------------------------------------------------------------

_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def encode_name(name: str) -> str:
    """A key or namespace as one path segment: unusual characters percent-encoded, and a
    leading dot too (names starting with a dot are ours: temporary files)."""
    out = "".join(ch if ch in _SAFE else "".join(f"%{b:02X}" for b in ch.encode()) for ch in name)
    if out.startswith("."):
        out = "%2E" + out[1:]
    return out


def decode_name(segment: str) -> str:
    from urllib.parse import unquote

    return unquote(segment)


MAX_NAME_BYTES = 200  # one path segment once encoded: file systems allow 255 bytes, some fewer


def check_name(name, what: str = "key") -> str:
    """A key or namespace: a non-empty string that fits in one path segment once encoded."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"object store {what}s are non-empty strings, got {name!r}")
    size = len(encode_name(name))
    if size > MAX_NAME_BYTES:
        raise ValueError(
            f"object store {what} {name[:40]!r}... is too long: {size} characters once "
            f"encoded (unusual characters count 3 each, as %XX), at most {MAX_NAME_BYTES}"
        )
    return name


def _data_file(meta: dict, key: str, namespace: str) -> str:
    """The value's file named by ``meta.json``: a plain file name in the artifact's own folder.
    Anything else (``../../victim.txt``, an absolute path) is a tampered or foreign meta.json and is
    refused, so a reader never reads, and a writer never deletes, outside the store."""
    name = meta.get("data") if isinstance(meta, dict) else None
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or name.startswith(TMP_PREFIX)
        or name == META
        or any(c in name for c in "/\\\0")
        or posixpath.basename(name) != name
    ):
        raise ValueError(
            f"artifact {key!r} in namespace '{namespace}' has a meta.json whose data file is "
            f"{name!r}, not a file of its own folder: refusing to use it (was meta.json edited?)"
        )
    return name


# --- values ------------------------------------------------------------------------------------


def _parquet_safe(frame) -> bool:
    """True when Parquet keeps this DataFrame exactly (else it travels pickled)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    import pandas as pd
    from pandas.api import types as pt

    if frame.attrs or not all(isinstance(c, str) for c in frame.columns) or not frame.columns.is_unique:
        return False
    if isinstance(frame.columns, pd.MultiIndex):
        return False

    def simple(values) -> bool:
        dtype = values.dtype
        if isinstance(dtype, pd.CategoricalDtype):
            return simple(dtype.categories)
        if pt.is_bool_dtype(dtype) or pt.is_datetime64_any_dtype(dtype) or pt.is_timedelta64_dtype(dtype):
            return True
        if pt.is_numeric_dtype(dtype):
            return not pt.is_complex_dtype(dtype)
        if pt.is_string_dtype(dtype) or pt.is_object_dtype(dtype):
            return pd.api.types.infer_dtype(values, skipna=True) in ("string", "empty")
        return False

    index = frame.index
    levels = [index.get_level_values(i) for i in range(index.nlevels)]
    if isinstance(index, pd.RangeIndex):
        levels = []
    if any(name is not None and not isinstance(name, str) for name in index.names):
        return False
    return all(simple(frame[c]) for c in frame.columns) and all(simple(level) for level in levels)


def _is_frame(value) -> bool:
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(value, pd.DataFrame)


def _dump(value, f) -> str:
    """Write ``value`` into the open binary file ``f``; returns its format."""
    from . import pickling

    if _is_frame(value) and _parquet_safe(value):
        start = f.tell()
        try:
            value.to_parquet(f, index=True)
            return "parquet"
        except Exception:  # a type Parquet can't hold after all: pickle it instead
            f.seek(start)
            f.truncate()
    pickling.dump(
        value, f, "artifacts hold"
    )  # an unpicklable value: one TypeError, as the object store says it
    return "cloudpickle"


def _load(f, fmt: str):
    if fmt == "parquet":
        import pandas as pd

        return pd.read_parquet(f)
    if fmt == "cloudpickle":
        import cloudpickle

        return cloudpickle.load(f)
    raise ValueError(f"unknown artifact format {fmt!r} (written by a newer flowdapt_nb?)")


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")


def _mtime(entry: dict) -> float | None:
    for name in ("mtime", "LastModified", "last_modified", "created", "updated"):
        value = entry.get(name)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, _dt.datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                pass
    return None


# --- the store ---------------------------------------------------------------------------------


class ArtifactStore:
    """Values by (namespace, key) under one fsspec location.

    >>> store = ArtifactStore("/tmp/fnb-artifacts")        # doctest: +SKIP
    >>> store.put("default", "model", {"w": 1})            # doctest: +SKIP
    >>> store.get("default", "model")                      # doctest: +SKIP
    {'w': 1}
    """

    def __init__(self, url: str | None = None, options: dict | None = None):
        self.url, self.options = parse_setting(url if options is None else {"url": url, "options": options})
        self._fs = None
        self._root: str | None = None
        self._made: set = set()

    def __reduce__(self):
        return (ArtifactStore, (self.url, self.options or None))

    def __repr__(self) -> str:
        return f"<ArtifactStore {self.url}>"

    # --- file system ---
    def _open_fs(self):
        if self._fs is None:
            from fsspec.core import url_to_fs

            options = dict(self.options)
            if not _is_local_url(self.url):
                # Other processes write here too: a cached listing would hide their files.
                options.setdefault("use_listings_cache", False)
            fs, root = url_to_fs(self.url, **options)
            self._root = root.rstrip("/") if root.strip("/") else ""
            self._fs = fs
        return self._fs

    @property
    def fs(self):
        return self._open_fs()

    @property
    def root(self) -> str:
        self._open_fs()
        assert self._root is not None  # set by _open_fs
        return self._root

    @property
    def protocol(self) -> str:
        proto = self.fs.protocol
        return proto[0] if isinstance(proto, (tuple, list)) else proto

    @property
    def local(self) -> bool:
        from fsspec.implementations.local import LocalFileSystem

        return isinstance(self.fs, LocalFileSystem)

    @property
    def bucket_per_namespace(self) -> bool:
        """A bucket-less object-store URL (``s3://``): each namespace is a bucket."""
        return self.root == "" and self.protocol in _BUCKET_PROTOCOLS

    def _ns_path(self, namespace: str) -> str:
        segment = encode_name(check_name(namespace, "namespace"))
        if self.bucket_per_namespace:
            return segment
        root = self.root or self.fs.root_marker or ""
        return posixpath.join(root, segment) if root else segment

    def _dir(self, namespace: str, key: str) -> str:
        return posixpath.join(self._ns_path(namespace), encode_name(check_name(key)))

    def location(self, namespace: str, key: str) -> str:
        """The URL of the folder holding one artifact."""
        return self.fs.unstrip_protocol(self._dir(namespace, key))

    # --- low-level atomic writes ---
    def _ensure_dir(self, path: str) -> None:
        if self.local:  # always: another process may have deleted it meanwhile
            os.makedirs(path, exist_ok=True)
            return
        if path in self._made:
            return
        if self.bucket_per_namespace:
            bucket = path.split("/", 1)[0]
            if not self.fs.exists(bucket):
                self.fs.mkdir(bucket)
        elif self.protocol not in _ATOMIC_PUT_PROTOCOLS:
            self.fs.makedirs(path, exist_ok=True)
        self._made.add(path)

    def _write(self, directory: str, name, fill) -> int:
        """Write a file atomically: ``fill(f)`` streams into a temporary name that is then renamed
        (local disk), or into memory and one PUT (object stores). ``name`` may be a callable,
        asked after ``fill``. Returns the bytes written."""
        self._ensure_dir(directory)
        final = lambda: posixpath.join(directory, name() if callable(name) else name)  # noqa: E731
        tmp = posixpath.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex}")
        if self.local:
            try:
                with open(tmp, "wb") as f:
                    fill(f)
                    f.flush()
                    os.fsync(f.fileno())
                    size = f.tell()
                os.replace(tmp, final())
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            try:  # make the rename itself durable
                fd = os.open(directory, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass
            return size
        buf = io.BytesIO()
        fill(buf)
        data = buf.getvalue()
        if self.protocol in _ATOMIC_PUT_PROTOCOLS:
            self.fs.pipe_file(final(), data)
        else:  # other remote file systems: write aside, then move into place
            self.fs.pipe_file(tmp, data)
            try:
                self.fs.mv(tmp, final())
            except BaseException:
                try:
                    self.fs.rm_file(tmp)
                except Exception:
                    pass
                raise
        return len(data)

    def _read_bytes(self, path: str) -> bytes:
        if self.local:
            with open(path, "rb") as f:
                return f.read()
        return self.fs.cat_file(path)

    # --- the API ---
    def meta(self, namespace: str, key: str) -> dict | None:
        """The metadata of an artifact, or None when there is none."""
        try:
            return json.loads(self._read_bytes(posixpath.join(self._dir(namespace, key), META)))
        except FileNotFoundError:
            return None

    def exists(self, namespace: str, key: str) -> bool:
        return self.meta(namespace, key) is not None

    def put(
        self, namespace: str, key: str, value: Any, run: str | None = None, stage: str | None = None
    ) -> dict:
        """Store ``value``; returns its metadata. Readers see the old value until this returns."""
        directory = self._dir(namespace, key)
        try:
            previous = self.meta(namespace, key)
        except ValueError:  # an unreadable meta.json (edited by hand): replace it
            previous = None
        stamp = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        fmt: list = []

        def fill(f):
            fmt.append(_dump(value, f))

        # The file's name says its format, known once the value is written (before it is named).
        size = self._write(directory, lambda: stamp + (".parquet" if fmt[0] == "parquet" else ".pkl"), fill)
        final_name = stamp + (".parquet" if fmt[0] == "parquet" else ".pkl")
        meta = {
            "key": key,
            "namespace": namespace,
            "type": type(value).__qualname__,
            "module": type(value).__module__,
            "format": fmt[0],
            "data": final_name,
            "size": size,
            "created": _now_iso(),
            "run": str(run) if run is not None else None,
            "stage": stage,
            "host": socket.gethostname(),
            "version": 1,
        }
        payload = json.dumps(meta, indent=1).encode()
        self._write(directory, META, lambda f: f.write(payload))
        if previous and previous.get("data") and previous["data"] != final_name:
            try:
                self._remove(self._inside(directory, _data_file(previous, key, namespace)))
            except ValueError:  # a tampered meta.json names a file elsewhere: never delete it
                pass  # (the sweep removes old files of this folder itself)
        self._sweep(directory, keep={META, final_name})
        return meta

    def _inside(self, directory: str, name: str) -> str:
        """``directory/name``, checked to stay inside the store's root on a local disk (a symlink
        planted in the store can't point a reader or writer elsewhere)."""
        path = posixpath.join(directory, name)
        if self.local:
            root = os.path.realpath(self.root or os.sep)
            real = os.path.realpath(path)
            if os.path.commonpath([root, real]) != root:
                raise ValueError(f"{path} resolves to {real}, outside the artifact store {root}: refusing it")
        return path

    def _remove(self, path: str) -> None:
        try:
            if self.local:
                os.unlink(path)
            else:
                self.fs.rm_file(path)
        except OSError:  # already gone, or not ours to remove: the sweep retries later
            pass

    def _sweep(self, directory: str, keep: set) -> None:
        """Remove what crashed or raced writers left behind, once it is old enough."""
        now = time.time()
        try:
            entries: list[tuple[str, float | None]]
            if self.local:
                entries = []
                with os.scandir(directory) as it:
                    for e in it:
                        if e.name not in keep and e.is_file():
                            entries.append((e.path, e.stat().st_mtime))
            else:
                self.fs.invalidate_cache(directory)
                entries = [
                    (e["name"], _mtime(e))
                    for e in self.fs.ls(directory, detail=True)
                    if posixpath.basename(e["name"].rstrip("/")) not in keep and e.get("type") == "file"
                ]
        except (FileNotFoundError, NotImplementedError, OSError):
            return
        for path, mtime in entries:
            if mtime is not None and now - mtime > STALE_SECONDS:
                self._remove(path)

    def get(self, namespace: str, key: str):
        """The value; a missing artifact raises KeyError."""
        directory = self._dir(namespace, key)
        meta = None
        for attempt in range(20):
            meta = self.meta(namespace, key)
            if meta is None:
                break
            path = self._inside(directory, _data_file(meta, key, namespace))
            try:
                if self.local:
                    with open(path, "rb") as f:
                        return _load(f, meta["format"])
                return _load(io.BytesIO(self.fs.cat_file(path)), meta["format"])
            except FileNotFoundError:  # replaced by a writer between reading meta and value
                time.sleep(0.01 * (attempt + 1))
                continue
        if meta is not None:
            raise KeyError(
                f"artifact {key!r} in namespace '{namespace}' ({self.url}) is damaged: its value "
                f"file {meta.get('data')!r} is missing"
            )
        raise KeyError(f"{key!r} is not an artifact in namespace '{namespace}' ({self.url})")

    def delete(self, namespace: str, key: str) -> bool:
        """Remove an artifact; True if there was one."""
        directory = self._dir(namespace, key)
        meta_path = posixpath.join(directory, META)
        existed = self.exists(namespace, key)
        self._remove(meta_path)  # the commit point: from here on the artifact is gone
        try:
            if self.local:
                import shutil

                shutil.rmtree(directory, ignore_errors=True)
            else:
                self.fs.invalidate_cache(directory)
                if self.fs.exists(directory):
                    self.fs.rm(directory, recursive=True)
        except (FileNotFoundError, OSError):
            pass
        self._made.discard(directory)
        return existed

    def _meta_paths(self, namespace: str | None) -> list[str]:
        fs = self.fs
        if namespace is not None:
            bases = [self._ns_path(namespace)]
            depth = 2
        elif self.bucket_per_namespace:
            fs.invalidate_cache()
            bases = [b["name"].rstrip("/") for b in fs.ls("", detail=True) if b.get("type") == "directory"]
            depth = 2
        else:
            bases = [self.root or fs.root_marker]
            depth = 3
        out = []
        for base in bases:
            fs.invalidate_cache(base)
            try:
                found = fs.find(base, withdirs=False)
            except (FileNotFoundError, OSError):
                continue
            prefix = base.rstrip("/") + "/"
            for path in found:
                rel = path[len(prefix) :] if path.startswith(prefix) else None
                if rel is None:
                    continue
                parts = rel.split("/")
                if len(parts) == depth and parts[-1] == META and not any(p.startswith(".") for p in parts):
                    out.append(path)
        return sorted(out)

    def _read_metas(self, paths: list[str]) -> list[dict]:
        if not paths:
            return []
        if self.local:
            blobs = {}
            for p in paths:
                try:
                    blobs[p] = self._read_bytes(p)
                except FileNotFoundError:
                    pass
        else:
            blobs = self.fs.cat(paths, on_error="omit")
        metas = []
        for p in paths:
            blob = blobs.get(p)
            if not blob:
                continue
            try:
                meta = json.loads(blob)
            except ValueError:
                continue
            meta["location"] = self.fs.unstrip_protocol(posixpath.dirname(p))
            metas.append(meta)
        return metas

    def keys(self, namespace: str) -> list[str]:
        """Keys with an artifact in ``namespace``, sorted."""
        return sorted(decode_name(p.rsplit("/", 2)[-2]) for p in self._meta_paths(namespace))

    def listing(self, namespace: str | None = None) -> list[dict]:
        """Metadata of every artifact (of one namespace when given), with its ``location``."""
        return self._read_metas(self._meta_paths(namespace))


_stores: dict = {}
_stores_lock = threading.Lock()


def store_for(setting=None) -> ArtifactStore:
    """The ArtifactStore for a storage setting (None: the default location); one per process."""
    if isinstance(setting, ArtifactStore):
        return setting
    url, options = parse_setting(setting)
    cache_key = (url, json.dumps(options, sort_keys=True, default=repr))
    with _stores_lock:
        store = _stores.get(cache_key)
        if store is None:
            store = _stores[cache_key] = ArtifactStore(url, options or None)
        return store
