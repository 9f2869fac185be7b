"""fnb.object_store and artifacts, on four executors: values cross runs through cluster memory
while the executor lives and through storage after it is gone; namespaces stay apart; a write
that dies midway leaves the previous value; S3 works against a real S3 server (moto) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid

import pandas as pd
import pytest
from conftest import make_executor

import flowdapt_nb as fnb
from flowdapt_nb.artifacts import ENV_VAR, ArtifactStore, default_location, store_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- stages (module level: worker processes import them from here) -------------------------------


def put_value(key, value, strategy=None):
    return fnb.object_store.put(key, value, strategy=strategy)


def get_values(keys, strategy=None):
    out = {}
    for key in keys:
        try:
            out[key] = {
                "found": True,
                "value": fnb.object_store.get(key, strategy=strategy),
                "exists": fnb.object_store.exists(key, strategy=strategy),
            }
        except KeyError:
            out[key] = {"found": False, "exists": fnb.object_store.exists(key, strategy=strategy)}
    return out


def list_keys(strategy=None):
    return fnb.object_store.list(strategy=strategy)


def delete_key(key, strategy=None):
    return fnb.object_store.delete(key, strategy=strategy)


class ExplodingPickle:
    """Pickling it fails after the pickler has already streamed what came before it."""

    def __reduce__(self):
        raise RuntimeError("pickling exploded midway")


def put_exploding(key):
    value = [b"x" * (4 << 20), ExplodingPickle()]
    try:
        fnb.object_store.put(key, value, strategy="artifact")
    except RuntimeError as exc:
        return str(exc)
    return "no error"


PUT = fnb.Workflow("os-put", stages=[fnb.Stage("put", put_value)])
GET = fnb.Workflow("os-get", stages=[fnb.Stage("get", get_values)])
LIST = fnb.Workflow("os-list", stages=[fnb.Stage("list", list_keys)])
DELETE = fnb.Workflow("os-delete", stages=[fnb.Stage("delete", delete_key)])
EXPLODE = fnb.Workflow("os-explode", stages=[fnb.Stage("explode", put_exploding)])

FRAME = pd.DataFrame(
    {
        "x": [1.5, 2.5, 3.5],
        "label": ["a", "b", "c"],
        "when": pd.to_datetime(["2026-01-01", "2026-01-02", "2026-01-03"]),
    },
    index=pd.Index([10, 20, 30], name="id"),
)


def _ns() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def _kind(request) -> str:
    return request.node.callspec.params["executor"]


@pytest.fixture
def storage_of():
    """Point executors at a storage setting for one test; restore what they had afterwards."""
    saved = []

    def set_storage(ex, setting):
        saved.append((ex, ex.storage))
        ex.storage = setting
        return ex

    yield set_storage
    for ex, old in reversed(saved):
        ex.storage = old


def _restart(request, kind, ex):
    """Close ``ex`` and start a new executor of the same kind (the session's, for Dask/Ray)."""
    if kind in ("threads", "processes"):
        ex.close()
        new = make_executor(kind)
        request.addfinalizer(new.close)
        return new
    cluster = request.getfixturevalue(f"{kind}_cluster")
    cluster.close()
    assert not ex.running
    return cluster.get()


# --- across runs ---------------------------------------------------------------------------------


def test_value_crosses_runs_in_cluster_memory(executor, tmp_path, storage_of):
    storage_of(executor, str(tmp_path / "artifacts"))
    ns = _ns()
    model = {"weights": [0.5, 1.5], "name": "m1"}
    assert executor.run(PUT, input={"key": "model", "value": model}, namespace=ns).result == "cluster_memory"
    got = executor.run(GET, input={"keys": ["model", "absent"]}, namespace=ns).result
    assert got["model"] == {"found": True, "value": model, "exists": True}
    assert got["absent"] == {"found": False, "exists": False}
    # It is in cluster memory, and nothing was written to storage.
    assert [r[1] for r in executor.memory_store.listing(ns)] == ["model"]
    assert store_for(str(tmp_path / "artifacts")).keys(ns) == []
    assert executor.run(LIST, namespace=ns).result == ["model"]


def test_artifact_survives_executor_restart(executor, request, tmp_path, storage_of):
    kind = _kind(request)
    storage = str(tmp_path / "artifacts")
    storage_of(executor, storage)
    ns = _ns()
    model = {"weights": list(range(100)), "kind": kind}
    assert (
        executor.run(PUT, input={"key": "model", "value": model, "strategy": "artifact"}, namespace=ns).result
        == "artifact"
    )
    assert (
        executor.run(PUT, input={"key": "frame", "value": FRAME, "strategy": "artifact"}, namespace=ns).result
        == "artifact"
    )
    assert executor.run(PUT, input={"key": "scratch", "value": 42}, namespace=ns).result == "cluster_memory"
    both = executor.run(GET, input={"keys": ["model", "scratch"]}, namespace=ns).result
    assert both["model"]["value"] == model and both["scratch"]["value"] == 42

    store = store_for(storage)
    meta = store.meta(ns, "model")
    assert meta["type"] == "dict" and meta["format"] == "cloudpickle" and meta["size"] > 0
    assert meta["run"] and meta["stage"] == "put" and meta["created"]
    assert store.meta(ns, "frame")["format"] == "parquet"

    new = storage_of(_restart(request, kind, executor), storage)
    assert new is not executor and new.running
    got = new.run(GET, input={"keys": ["model", "frame", "scratch"]}, namespace=ns).result
    assert got["model"] == {"found": True, "value": model, "exists": True}
    pd.testing.assert_frame_equal(got["frame"]["value"], FRAME)
    assert got["scratch"] == {"found": False, "exists": False}  # cluster memory went with the executor
    assert new.run(LIST, namespace=ns).result == ["frame", "model"]
    # Artifact-only reads work too, and a later put to memory shadows the artifact while it lives.
    assert new.run(PUT, input={"key": "model", "value": "newer"}, namespace=ns).result == "cluster_memory"
    got = new.run(GET, input={"keys": ["model"]}, namespace=ns).result
    assert got["model"]["value"] == "newer"
    got = new.run(GET, input={"keys": ["model"], "strategy": "artifact"}, namespace=ns).result
    assert got["model"]["value"] == model


def test_namespaces_stay_apart(executor, tmp_path, storage_of):
    storage_of(executor, str(tmp_path / "artifacts"))
    a, b = _ns(), _ns()
    for ns, value in ((a, "in-a"), (b, "in-b")):
        executor.run(PUT, input={"key": "shared", "value": value}, namespace=ns)
        executor.run(PUT, input={"key": "kept", "value": value, "strategy": "artifact"}, namespace=ns)
    executor.run(PUT, input={"key": "only-a", "value": 1}, namespace=a)
    for ns, value in ((a, "in-a"), (b, "in-b")):
        got = executor.run(GET, input={"keys": ["shared", "kept"]}, namespace=ns).result
        assert got["shared"]["value"] == value and got["kept"]["value"] == value
    assert executor.run(LIST, namespace=a).result == ["kept", "only-a", "shared"]
    assert executor.run(LIST, namespace=b).result == ["kept", "shared"]
    assert executor.run(LIST, input={"strategy": "artifact"}, namespace=b).result == ["kept"]
    assert executor.run(LIST, input={"strategy": "cluster_memory"}, namespace=b).result == ["shared"]

    assert executor.run(DELETE, input={"key": "kept"}, namespace=a).result is True
    assert executor.run(DELETE, input={"key": "kept"}, namespace=a).result is False
    got_a = executor.run(GET, input={"keys": ["kept", "shared"]}, namespace=a).result
    got_b = executor.run(GET, input={"keys": ["kept", "shared"]}, namespace=b).result
    assert got_a["kept"]["found"] is False and got_a["shared"]["value"] == "in-a"
    assert got_b["kept"]["value"] == "in-b" and got_b["shared"]["value"] == "in-b"


def test_failed_write_in_a_stage_keeps_previous_value(executor, tmp_path, storage_of):
    storage = str(tmp_path / "artifacts")
    storage_of(executor, storage)
    ns = _ns()
    executor.run(PUT, input={"key": "model", "value": "v1", "strategy": "artifact"}, namespace=ns)
    assert executor.run(EXPLODE, input={"key": "model"}, namespace=ns).result == "pickling exploded midway"
    got = executor.run(GET, input={"keys": ["model"], "strategy": "artifact"}, namespace=ns).result
    assert got["model"]["value"] == "v1"
    key_dir = tmp_path / "artifacts" / ns / "model"
    assert sorted(p.name for p in key_dir.iterdir() if p.suffix != ".pkl") == ["meta.json"]
    assert len(list(key_dir.glob("*.pkl"))) == 1  # the failed write left nothing behind


# --- crashes and readers -------------------------------------------------------------------------

_SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from flowdapt_nb.artifacts import ArtifactStore

    class Stall:
        def __reduce__(self):            # reached after 16 MB were already streamed to disk
            open(sys.argv[2], "w").close()
            time.sleep(120)
            return (int, (0,))

    ArtifactStore(sys.argv[1]).put("ns", "model", [b"y" * (16 << 20), Stall()])
""")


def test_killed_writer_leaves_previous_value(tmp_path):
    url = str(tmp_path / "artifacts")
    store = ArtifactStore(url)
    store.put("ns", "model", {"version": 1})
    marker = tmp_path / "mid-write"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, url, str(marker)])
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert proc.poll() is None, "the writer ended before it was killed"
            assert time.time() < deadline, "the writer never reached the middle of its write"
            time.sleep(0.05)
        key_dir = tmp_path / "artifacts" / "ns" / "model"
        partial = [p for p in key_dir.iterdir() if p.name.startswith(".tmp-")]
        assert partial and partial[0].stat().st_size >= 16 << 20  # really killed mid-write
        assert store.get("ns", "model") == {"version": 1}  # readers meanwhile: the old value
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    assert store.get("ns", "model") == {"version": 1}
    assert store.keys("ns") == ["model"]
    assert [m["key"] for m in store.listing()] == ["model"]
    store.put("ns", "model", {"version": 2})  # and the next write works
    assert ArtifactStore(url).get("ns", "model") == {"version": 2}


def test_readers_never_see_a_half_written_value(tmp_path):
    store = ArtifactStore(str(tmp_path / "artifacts"))
    size = 1 << 20
    store.put("ns", "blob", bytes([0]) * size)
    stop = threading.Event()
    errors, reads = [], [0]

    def reader():
        other = ArtifactStore(str(tmp_path / "artifacts"))
        while not stop.is_set():
            try:
                value = other.get("ns", "blob")
            except Exception as exc:  # pragma: no cover - the failure we test for
                errors.append(repr(exc))
                return
            if len(value) != size or value.count(value[:1]) != size:
                errors.append(f"torn value: {len(value)} bytes")
                return
            reads[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(1, 40):
            store.put("ns", "blob", bytes([i]) * size)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors
    assert reads[0] > 0
    assert store.get("ns", "blob") == bytes([39]) * size
    files = sorted(p.name for p in (tmp_path / "artifacts" / "ns" / "blob").iterdir())
    assert len(files) == 2 and "meta.json" in files  # old versions removed as they were replaced


# --- the notebook side ---------------------------------------------------------------------------


def test_notebook_side_listing_and_where(tmp_path):
    storage = str(tmp_path / "artifacts")
    ns = _ns()
    with fnb.LocalExecutor(
        use_processes=False, cpus=1, _compute={"storage": storage, "default_namespace": ns}
    ) as ex:
        assert fnb.current_executor() is ex
        assert fnb.object_store.storage_url() == storage
        assert fnb.object_store.put("in-memory", [1, 2]) == "cluster_memory"
        assert fnb.object_store.put("on-disk", FRAME, strategy="artifact") == "artifact"
        assert fnb.object_store.put("both", "mem") == "cluster_memory"
        assert (
            fnb.object_store.put("both", "disk", strategy="artifact") == "artifact"
        )  # drops the memory copy
        assert fnb.object_store.get("both") == "disk"
        fnb.object_store.put("both", "mem")
        assert fnb.object_store.list() == ["both", "in-memory", "on-disk"]
        table = fnb.object_store.listing(ns)
        assert list(table.columns) == [
            "namespace",
            "key",
            "where",
            "type",
            "bytes",
            "created",
            "run",
            "location",
        ]
        rows = {(r.key, r.where) for r in table.itertuples()}
        assert rows == {
            ("both", "memory"),
            ("both", "artifact"),
            ("in-memory", "memory"),
            ("on-disk", "artifact"),
        }
        assert table.loc[table.key == "on-disk", "type"].item() == "DataFrame"
        assert table.loc[table.key == "on-disk", "location"].item().endswith(f"{ns}/on-disk")
        assert str(table["created"].dtype).startswith("datetime64") and table["bytes"].gt(0).all()
        sizes = fnb.object_store.namespace_sizes()
        mine = sizes[sizes.namespace == ns].set_index("where")
        assert mine.loc["memory", "keys"] == 2 and mine.loc["artifact", "keys"] == 2
        with pytest.raises(KeyError, match="absent"):
            fnb.object_store.get("absent")
        with pytest.raises(ValueError, match="did you mean 'artifact'"):
            fnb.object_store.put("x", 1, strategy="artifacts")
        assert fnb.object_store.delete("both") is True
        assert not fnb.object_store.exists("both")
    # The executor is closed: only artifacts are left (from the storage named here).
    assert fnb.object_store.list(ns, storage=storage) == ["on-disk"]
    pd.testing.assert_frame_equal(fnb.object_store.get("on-disk", ns, storage=storage), FRAME)


def test_fallback_when_cluster_memory_dies(tmp_path, caplog):
    """The memory server of a process pool is killed: the default strategy carries on with
    artifacts (and says so); strategy='cluster_memory' reports the failure."""
    storage = str(tmp_path / "artifacts")
    ex = fnb.LocalExecutor(use_processes=True, cpus=1, _compute={"storage": storage}).start()
    try:
        manager = getattr(ex, "_manager", None)
        if manager is None or getattr(manager, "_process", None) is None:
            pytest.skip("this LocalExecutor keeps cluster memory elsewhere")
        assert fnb.object_store.put("k", "v1", "ns") == "cluster_memory"
        os.kill(manager._process.pid, signal.SIGKILL)
        manager._process.join(10)
        with caplog.at_level("WARNING", logger="flowdapt_nb.object_store"):
            assert fnb.object_store.put("k", "v2", "ns") == "artifact"
            assert fnb.object_store.get("k", "ns") == "v2"
            assert fnb.object_store.list("ns") == ["k"]
        assert "writing it as an artifact" in caplog.text
        with pytest.raises((OSError, EOFError)):
            fnb.object_store.put("k", "v3", "ns", strategy="cluster_memory")
    finally:
        ex.close()
    assert fnb.object_store.get("k", "ns", storage=storage) == "v2"


def test_unpicklable_values_are_refused_clearly(tmp_path):
    with fnb.LocalExecutor(use_processes=False, cpus=1, _compute={"storage": str(tmp_path)}):
        for strategy in ("cluster_memory", "artifact", None):
            with pytest.raises(TypeError, match="cloudpickle can pickle; lock is not"):
                fnb.object_store.put("lock", threading.Lock(), "ns", strategy=strategy)
        assert fnb.object_store.list("ns") == []
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing half-kept on storage


_NO_EXECUTOR = textwrap.dedent("""
    import json, os
    import flowdapt_nb as fnb
    out = {"default": fnb.object_store.storage_url()}
    out["put"] = fnb.object_store.put("model", {"w": 1})          # nothing runs: an artifact
    try:
        fnb.object_store.put("x", 1, strategy="cluster_memory")
    except RuntimeError as exc:
        out["memory_error"] = str(exc)
    with fnb.LocalExecutor(use_processes=False, cpus=1) as ex:
        out["get"] = fnb.object_store.get("model")                 # found on storage
        out["put2"] = fnb.object_store.put("model", {"w": 2})      # now into cluster memory
        out["get2"] = fnb.object_store.get("model")
        out["where"] = sorted(fnb.object_store.listing("default")["where"])
    out["after"] = fnb.object_store.get("model")                   # the artifact again
    print(json.dumps(out))
""")


def test_fallback_without_executor_writes_an_artifact(tmp_path):
    env = {**os.environ, ENV_VAR: str(tmp_path / "env-artifacts")}
    proc = subprocess.run(
        [sys.executable, "-c", _NO_EXECUTOR],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["default"] == str(tmp_path / "env-artifacts")
    assert out["put"] == "artifact" and "needs a running executor" in out["memory_error"]
    assert out["get"] == {"w": 1} and out["put2"] == "cluster_memory" and out["get2"] == {"w": 2}
    assert out["where"] == ["artifact", "memory"]
    assert out["after"] == {"w": 1}
    assert (tmp_path / "env-artifacts" / "default" / "model" / "meta.json").is_file()


# --- config --------------------------------------------------------------------------------------


def test_storage_from_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ex = fnb.executor_from_config(
        "services:\n  compute:\n    default_namespace: prod\n"
        "    executor: {target: local}\n  storage: s3://bucket/prefix\n"
    )
    assert ex.default_namespace == "prod" and ex.storage == "s3://bucket/prefix"
    ex = fnb.executor_from_config(
        {
            "services": {
                "compute": {"executor": {"target": "local"}},
                "storage": {
                    "protocol": "s3",
                    "base_path": "bucket/p",
                    "parameters": {"endpoint_url": "http://x"},
                },
            }
        }
    )
    assert ex.storage == {"url": "s3://bucket/p", "options": {"endpoint_url": "http://x"}}
    # `artifacts:` beside the executor; a relative folder is made absolute where the config loads.
    ex = fnb.executor_from_config(
        "services:\n  compute:\n    artifacts: keep\n    executor: {target: local}\n  storage: s3://ignored\n"
    )
    assert ex.storage == str(tmp_path / "keep")
    ex = fnb.executor_from_config("target: local\nuse_processes: false\nartifacts: memory://nb\n")
    assert ex.storage == "memory://nb" and ex.config.use_processes is False
    ex = fnb.executor_from_config("target: local\nartifacts: {url: s3://b, options: {anon: false}}\n")
    assert ex.storage == {"url": "s3://b", "options": {"anon": False}}

    with pytest.raises(
        fnb.ConfigError, match=r"line 5: unknown key 'ur' in 'services.storage'; did you mean 'url'"
    ):
        fnb.executor_from_config(
            "services:\n  compute:\n    executor:\n      target: local\n  storage: {ur: s3://b}\n"
        )
    with pytest.raises(fnb.ConfigError, match="line 2: unknown key 'artifact'"):
        fnb.executor_from_config("target: local\nartifact: /tmp/x\n")
    with pytest.raises(fnb.ConfigError, match="line 2: unknown key 'cpu'; did you mean 'cpus'"):
        fnb.executor_from_config("target: local\ncpu: 2\nartifacts: /tmp/x\n")
    with pytest.raises(fnb.ConfigError, match="'artifacts' must be a URL or a mapping"):
        fnb.executor_from_config("target: local\nartifacts: [1, 2]\n")


def test_default_location(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_location() == str(tmp_path / "xdg" / "flowdapt_nb" / "artifacts")
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_location() == str(tmp_path / "home" / ".local" / "share" / "flowdapt_nb" / "artifacts")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert default_location() == str(tmp_path / "env")
    assert store_for(None).url == str(tmp_path / "env")


def test_odd_keys_stay_in_their_folder(tmp_path):
    store = ArtifactStore(str(tmp_path / "a"))
    for key in ("../escape", ".hidden", "a/b", "ünïcode key", "%41"):
        store.put("ns/../x", key, key)
    assert store.keys("ns/../x") == sorted(["../escape", ".hidden", "a/b", "ünïcode key", "%41"])
    assert all(store.get("ns/../x", k) == k for k in store.keys("ns/../x"))
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["ns%2F..%2Fx"]
    assert not (tmp_path / "escape").exists()


# --- S3 against a real S3 server (moto) on 127.0.0.1 ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None, "moto server exited"
                assert time.time() < deadline, "moto server did not start"
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials and endpoint in the environment, for this test only (moto accepts any)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fnb-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fnb-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    return s3_server


def _make_bucket(name: str):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    fs.mkdir(name)
    return fs


def test_s3_storage_across_runs(executor, s3_env, storage_of):
    bucket = f"fnb-{uuid.uuid4().hex[:10]}"
    _make_bucket(bucket)
    # Cluster workers started before this test don't have its environment: the endpoint and
    # credentials travel as fsspec options, read from the environment here.
    setting = {
        "url": f"s3://{bucket}/artifacts",
        "options": {
            "endpoint_url": s3_env,
            "key": os.environ["AWS_ACCESS_KEY_ID"],
            "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
        },
    }
    storage_of(executor, setting)
    ns = _ns()
    assert (
        executor.run(
            PUT, input={"key": "model", "value": {"v": 1}, "strategy": "artifact"}, namespace=ns
        ).result
        == "artifact"
    )
    assert (
        executor.run(PUT, input={"key": "frame", "value": FRAME, "strategy": "artifact"}, namespace=ns).result
        == "artifact"
    )
    assert executor.run(EXPLODE, input={"key": "model"}, namespace=ns).result == "pickling exploded midway"
    got = executor.run(GET, input={"keys": ["model", "frame"], "strategy": "artifact"}, namespace=ns).result
    assert got["model"]["value"] == {"v": 1}
    pd.testing.assert_frame_equal(got["frame"]["value"], FRAME)
    assert executor.run(LIST, input={"strategy": "artifact"}, namespace=ns).result == ["frame", "model"]

    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/artifacts/{ns}"))
    assert names.count("meta.json") == 2 and len(names) == 4  # one value file each, no leftovers
    meta = json.loads(fs.cat_file(f"{bucket}/artifacts/{ns}/frame/meta.json"))
    assert meta["format"] == "parquet" and meta["stage"] == "put"
    assert executor.run(DELETE, input={"key": "model"}, namespace=ns).result is True
    assert fs.find(f"{bucket}/artifacts/{ns}/model") == []


def test_s3_url_from_the_environment(s3_env, tmp_path):
    """A plain s3:// URL: credentials and endpoint from the environment only; worker processes
    started afterwards inherit them."""
    bucket = f"fnb-{uuid.uuid4().hex[:10]}"
    _make_bucket(bucket)
    url = f"s3://{bucket}/nb"
    ns = _ns()
    assert fnb.object_store.put("model", {"v": 1}, ns, strategy="artifact", storage=url) == "artifact"
    with fnb.LocalExecutor(use_processes=True, cpus=1, _compute={"storage": url}) as ex:
        got = ex.run(GET, input={"keys": ["model"]}, namespace=ns).result
        assert got["model"]["value"] == {"v": 1}
        ex.run(PUT, input={"key": "model", "value": {"v": 2}, "strategy": "artifact"}, namespace=ns)
    assert fnb.object_store.get("model", ns, storage=url) == {"v": 2}
    table = fnb.object_store.listing(ns, storage=url)
    assert list(table["where"]) == ["artifact"] and table["location"][0] == f"s3://{bucket}/nb/{ns}/model"

    # A bucket-less URL: each namespace is a bucket (as in Flowdapt), created when first needed.
    ns_bucket = f"fnb-ns-{uuid.uuid4().hex[:8]}"
    assert fnb.object_store.put("m", [1], ns_bucket, strategy="artifact", storage="s3://") == "artifact"
    assert fnb.object_store.get("m", ns_bucket, storage="s3://") == [1]
    assert fnb.object_store.list(ns_bucket, strategy="artifact", storage="s3://") == ["m"]
