"""One executor registry: each kind's facts live on its class, and config, magics, card and
dashboard read them from there (a new backend registered here shows up in all of them)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import flowdapt_nb as fnb
from flowdapt_nb import widgets
from flowdapt_nb.executors import registry
from flowdapt_nb.executors.local import LocalExecutor


@pytest.fixture(scope="module")
def shell():
    sh = InteractiveShell.instance()
    before = set(sh.user_ns)
    sh.extension_manager.load_extension("flowdapt_nb")
    yield sh
    sh.extension_manager.unload_extension("flowdapt_nb")  # closes an executor the magics started
    sh.config.pop("FlowdaptMagics", None)
    for name in set(sh.user_ns) - before:
        sh.user_ns.pop(name, None)


def _help(shell) -> str:
    with capture_output() as cap:
        shell.run_line_magic("flowdapt", "executor --help")
    return cap.stdout


def test_every_kind_has_its_facts_on_its_class():
    table = registry.classes()
    assert list(table)[:3] == ["local", "dask", "ray"]
    for kind, cls in table.items():
        assert issubclass(cls, fnb.Executor) and cls.kind == kind
        assert cls.title and cls.magic_options and cls.aliases
        for alias in (kind, kind.upper(), *cls.aliases):  # every name a config may use
            assert registry.resolve(alias) is cls
            assert fnb.executor_from_config({"target": alias}).kind == kind
    assert table["local"].native_dashboard is None
    assert (table["dask"].native_dashboard, table["ray"].native_dashboard) == (
        "Dask dashboard",
        "Ray dashboard",
    )
    assert "--address" not in table["local"].magic_options and "--address" in table["ray"].magic_options


def test_card_dashboard_and_magic_read_the_class(shell):
    text = _help(shell)
    for kind, cls in registry.classes().items():
        ex = cls()  # not started: the card and dashboard read the class, not a cluster
        card = widgets.ExecutorCard(ex)
        assert cls.title in card._inner_html()
        dash = widgets.Dashboard(ex)
        dash.dashboard_url = "http://127.0.0.1:1/"
        header = dash._header_html()
        assert (f"Open {cls.native_dashboard}" in header) == (cls.native_dashboard is not None)
        dash.close()
        card.close()
        assert kind in text


def test_config_does_not_import_the_executors():
    """config resolves targets through the light registry: no config <-> executors.base loop,
    and nothing heavy loads with it."""
    code = (
        "import sys, flowdapt_nb, flowdapt_nb.config; "
        "print(sorted(m for m in ('flowdapt_nb.executors.base', 'ray', 'dask', 'distributed', 'IPython') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.fixture
def fake():
    """A new backend, defined (and so registered) only for the test that asks for it: the rest
    of the suite never sees a 'fake' kind in its messages."""

    class FakeExecutor(LocalExecutor):
        """A real Executor subclass (it runs stages on the local pool); title, aliases and
        native dashboard come from the base's defaults."""

        kind = "fake"
        magic_options = ("--cpus", "--threads", "--processes")

    yield FakeExecutor
    registry.unregister("fake")


def test_a_registered_backend_shows_up_everywhere(fake, shell):
    FakeExecutor = fake
    assert "fake" in registry.kinds() and FakeExecutor.title == "Fake executor"
    assert FakeExecutor.native_dashboard == "Fake dashboard"
    ex = fnb.executor_from_config("target: fake\nuse_processes: false\ncpus: 1")
    assert type(ex) is FakeExecutor and ex.kind == "fake"
    assert type(fnb.executor_from_config({"target": "flowdapt_nb.FakeExecutor"})) is FakeExecutor
    with pytest.raises(fnb.ConfigError, match=r"unknown executor target 'fak'; did you mean 'fake'\?"):
        fnb.executor_from_config({"target": "fak"})
    with ex:
        wf = fnb.Workflow("one", stages=[fnb.Stage("answer", lambda: 42)])
        assert ex.run(wf).result == 42
        assert "Fake executor" in widgets.ExecutorCard(ex)._inner_html()

    assert "fake" in _help(shell)
    with pytest.raises(UsageError, match=r"valid: local, dask, ray, fake"):
        shell.run_line_magic("flowdapt", "executor spark")
    with pytest.raises(UsageError, match=r"only dask and ray take --address; the fake executor takes --cpus"):
        shell.run_line_magic("flowdapt", "executor fake --address tcp://127.0.0.1:1")
    with capture_output():
        shell.run_line_magic("flowdapt", "executor fake --threads --cpus 1")
    magic_ex = shell.user_ns["flowdapt_executor"]
    assert type(magic_ex) is FakeExecutor and magic_ex.running and magic_ex.config.use_processes is False
    shell.run_line_magic("config", "FlowdaptMagics.executor = 'FAKE'")
    magics = shell.magics_manager.registry["FlowdaptMagics"]
    assert magics.executor == "fake"
    shell.run_line_magic("config", "FlowdaptMagics.executor = 'local'")
    shell.run_line_magic("flowdapt", "stop")
    assert not magic_ex.running


def test_unregistered_backend_is_gone(fake):
    registry.unregister("fake")
    assert "fake" not in registry.kinds()
    with pytest.raises(fnb.ConfigError, match="unknown executor target 'fake'"):
        fnb.executor_from_config({"target": "fake"})
    registry.unregister("local")  # built-ins stay
    assert registry.get("local") is LocalExecutor


def test_a_subclass_repeating_a_builtin_kind_does_not_take_its_name():
    class MyLocal(LocalExecutor):
        kind = "local"  # e.g. a user's subclass that keeps the kind for its runs' records

    assert registry.get("local") is LocalExecutor
    assert type(fnb.executor_from_config({"target": "local"})) is LocalExecutor
    assert registry.is_executor_class(MyLocal) and "local" in registry.kinds()
