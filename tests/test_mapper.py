"""StageMapper, headless: driven through its traits and buttons (``button.click()``) like a user,
with real runs on local threads (and one on the shared Dask cluster). Covers the run input box
(the forms ``%flowdapt run --input`` and the CLI take), the dependencies "Add as stage" proposes,
one current status line, a DataFrame result drawn as a table, and Enter adding a dependency."""

from __future__ import annotations

import html

import pytest
from conftest import make_executor, poll

import flowdapt_nb as fnb
from flowdapt_nb import cli
from flowdapt_nb.errors import ConfigError
from flowdapt_nb.run_input import FORMS, input_from_args, parse_assignments, parse_run_input

widgets = pytest.importorskip("flowdapt_nb.widgets")


def status_text(mapper) -> str:
    return html.unescape(mapper.status_w.value)


@pytest.fixture
def threads():
    ex = make_executor("threads")
    yield ex
    ex.close()


# --- the one run-input parser -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("n=200 max_degree=6", {"n": 200, "max_degree": 6}),
        ("n=200, max_degree=6", {"n": 200, "max_degree": 6}),
        ("n = 200  max_degree = 6", {"n": 200, "max_degree": 6}),
        ('{"n": 200, "max_degree": 6}', {"n": 200, "max_degree": 6}),
        ("{'n': 200, 'max_degree': 6, 'exact': True}", {"n": 200, "max_degree": 6, "exact": True}),
        ('xs=[1, 2], name="a b" mode=fast', {"xs": [1, 2], "name": "a b", "mode": "fast"}),
        ("xs=1,2 flag=true empty=", {"xs": "1,2", "flag": True, "empty": ""}),
        ("", {}),
    ],
)
def test_run_input_forms(text, expected):
    assert parse_run_input(text) == expected


@pytest.mark.parametrize(
    "text, bad",
    [
        ("n=200 oops", "got 'oops'"),
        ("n=200 max-degree=6", "got 'max-degree=6'"),
        ("[1, 2]", "must be a dict, not list"),
        ("{n: 1}", "'{n: 1}' is neither a JSON object nor a Python dict"),
    ],
)
def test_run_input_errors_name_the_token_and_the_valid_forms(text, bad):
    with pytest.raises(ConfigError) as info:
        parse_run_input(text)
    message = str(info.value)
    assert bad in message and FORMS in message and "\n" not in message


def test_cli_and_magic_read_input_with_the_same_parser():
    # the magic and the CLI get --input as separate words; the mapper gets one line: same dict
    assert input_from_args(["n=200", "max_degree=6"]) == parse_run_input("n=200 max_degree=6")
    assert input_from_args(["xs=[1,2]"], '{"xs": 0, "n": 3}') == {"xs": [1, 2], "n": 3}  # --input wins
    assert cli.parse_assignments is parse_assignments
    with pytest.raises(ConfigError, match=r"--input takes key=value .* got 'n'; e.g. --input n=10"):
        input_from_args(["n"])
    with pytest.raises(ConfigError, match=r"--input-json must be a JSON object"):
        input_from_args([], "[1]")


# --- the input box, with real runs ---------------------------------------------------------------


def test_input_box_takes_every_form_and_runs(threads):
    def power(n, max_degree=1):
        return n**max_degree

    mapper = widgets.StageMapper(namespace={"power": power}, executor=threads)
    try:
        mapper.add_stage("power", "power")
        for text in (
            "n=2 max_degree=6",
            "n=2, max_degree=6",
            '{"n": 2, "max_degree": 6}',
            "{'n': 2, 'max_degree': 6}",
        ):
            mapper.input_w.value = text
            mapper.run_w.click()
            assert mapper._handle is not None, status_text(mapper)
            run = mapper._handle.wait(30)
            assert run.input == {"n": 2, "max_degree": 6} and run.result == 64, text
            poll(
                lambda: mapper.run_state == "finished",
                before=threads.events.flush,
                what="the mapper run finished",
            )
        # a bad token: one line naming it and the forms, and no run
        mapper.input_w.value = "n=2 oops"
        mapper.run_w.click()
        text = status_text(mapper)
        assert "got 'oops'" in text and "n=200 max_degree=6" in text and mapper._handle is None
    finally:
        mapper.close()


# --- "Add as stage": roots and proposed dependencies ----------------------------------------------


def test_add_as_stage_proposes_roots_and_dependencies():
    def load(n=3):
        return list(range(n))

    def read_table(path):
        return path

    def square(x):
        return x * x

    def combine(load, square):
        return load, square

    def add(a, b):
        return a + b

    ns = {"load": load, "read_table": read_table, "square": square, "combine": combine, "add": add}
    mapper = widgets.StageMapper(namespace=ns)
    try:

        def pick(name):
            mapper.functions_w.value = name
            return list(mapper.new_deps_w.value), html.unescape(mapper.proposal_w.value)

        # nothing to depend on yet: a root, its parameters from the run input
        deps, why = pick("square")
        assert deps == [] and "a root (no stages yet): x from the run input" in why
        deps, why = pick("load")
        assert deps == [] and "no required parameter" in why
        mapper.add_fn_w.click()
        # a parameter named in the run input box comes from the run input: a second root
        mapper.input_w.value = "path=data.csv"
        deps, why = pick("read_table")
        assert deps == [] and "path from the run input" in why
        mapper.add_fn_w.click()
        assert list(mapper.stages["read_table"].deps_w.value) == []
        mapper.input_w.value = ""
        # otherwise by position: the latest stage
        deps, why = pick("square")
        assert deps == ["read_table"] and "x ← read_table (latest stage)" in why
        # the user changes the proposal before adding: it is what the stage gets
        mapper.new_deps_w.value = []
        mapper.new_dep_add_w.value = "load"  # typed, Enter
        assert list(mapper.new_deps_w.value) == ["load"] and mapper.new_dep_add_w.value == ""
        mapper.add_fn_w.click()
        assert list(mapper.stages["square"].deps_w.value) == ["load"]
        # parameters named like stages take those stages, whatever their order
        deps, why = pick("combine")
        assert deps == ["load", "square"] and "load ← load (same name)" in why
        mapper.add_fn_w.click()
        # two parameters, no names matching: the two latest stages not yet taken, in order added
        deps, why = pick("add")
        assert deps == ["square", "combine"] and "a ← square" in why and "b ← combine" in why
        assert mapper.errors == {}
        # the proposal follows the stages: with "combine" gone, the latest two are read_table, square
        mapper.remove_stage("combine")
        assert list(mapper.new_deps_w.value) == ["read_table", "square"]
        # a blank stage ("Add stage") is not chained onto the last one
        mapper.add_w.click()
        assert mapper.stage_names()[-1] == "stage4" and list(mapper.stages["stage4"].deps_w.value) == []
        # the rule is in the widget's help text
        assert "Add as stage" in mapper.help_w.value and "root" in mapper.help_w.value
    finally:
        mapper.close()


# --- one current status, and a DataFrame result as a table ----------------------------------------


def test_status_is_only_the_current_run(threads):
    def numbers(n=3, fail=False):
        if fail:
            raise ValueError("asked to fail")
        return list(range(n))

    mapper = widgets.StageMapper(namespace={"numbers": numbers}, executor=threads)
    try:
        mapper.add_stage("numbers", "numbers")
        mapper.input_w.value = "n=4"
        mapper.run_w.click()
        mapper._handle.wait(30)
        poll(
            lambda: mapper.run_state == "finished",
            before=threads.events.flush,
            what="the mapper run finished",
        )
        assert ">finished<" in mapper.status_w.value and "[0, 1, 2, 3]" in status_text(mapper)
        # a bad input after a finished run: the error alone, the old FINISHED line is gone
        mapper.input_w.value = "n=4 oops"
        mapper.run_w.click()
        assert "got 'oops'" in status_text(mapper)
        assert ">finished<" not in mapper.status_w.value and "result:" not in mapper.status_w.value
        assert mapper.run_state == "" and mapper.stages["numbers"].state_w.value == ""
        # a run that fails after a finished one: only its failure
        mapper.input_w.value = "n=4"
        mapper.run_w.click()
        mapper._handle.wait(30)
        poll(
            lambda: mapper.run_state == "finished",
            before=threads.events.flush,
            what="the mapper run finished",
        )
        mapper.input_w.value = "fail=true"
        mapper.run_w.click()
        try:
            mapper._handle.wait(30)
        except fnb.StageError:
            pass
        poll(lambda: mapper.run_state == "failed", before=threads.events.flush, what="the mapper run failed")
        text = status_text(mapper)
        assert ">failed<" in mapper.status_w.value and "asked to fail" in text
        assert ">finished<" not in mapper.status_w.value and "result:" not in text
    finally:
        mapper.close()


@pytest.mark.parametrize("kind", ["threads", "dask"])
def test_dataframe_result_is_shown_as_a_table(kind, dask_cluster):
    ex = make_executor(kind)

    def frame(rows=25):  # defined here: shipped to Dask workers by value
        import pandas as pd

        return pd.DataFrame({"item": range(rows), "square": [i * i for i in range(rows)]})

    mapper = widgets.StageMapper(namespace={"frame": frame}, executor=ex)
    try:
        mapper.add_stage("frame", "frame")
        mapper.input_w.value = "rows=25"
        mapper.run_w.click()
        assert mapper._handle.wait(120).result.shape == (25, 2)
        poll(lambda: mapper.run_state == "finished", before=ex.events.flush, what="the mapper run finished")
        value = mapper.status_w.value
        assert "<table" in value and "fnb-result-table" in value, value
        assert "DataFrame, 25 rows × 2 columns" in value and "first and last 5 shown" in value
        table = value[value.index("<table") : value.index("</table>")]
        assert table.count("<tr") == 1 + 11  # header, 5 rows, the "..." row, 5 rows
        assert "<td>576</td>" in table and "<td>0</td>" in table  # last and first squares
        assert "result: <" not in value  # no repr squashed onto one line
    finally:
        mapper.close()
        if kind == "threads":
            ex.close()


# --- dependencies typed with Enter; the row's layout ------------------------------------------------


def test_enter_adds_a_dependency():
    def numbers(n=3):
        return list(range(n))

    def total(xs):
        return sum(xs)

    mapper = widgets.StageMapper(namespace={"numbers": numbers, "total": total})
    try:
        mapper.add_stage("numbers", "numbers")
        mapper.add_stage("total", "total")  # no dependency: its xs is missing
        row = mapper.stages["total"]
        assert list(row.dep_add_w.options) == ["numbers"]  # the names it suggests
        # what the page sends when a name is typed and Enter pressed (continuous_update=False)
        row.dep_add_w.value = "numbers"
        assert list(row.deps_w.value) == ["numbers"] and row.dep_add_w.value == ""
        assert mapper.errors == {} and mapper.valid
        row.dep_add_w.value = "numbers"  # once only
        assert list(row.deps_w.value) == ["numbers"]
        # a typo is added and explained, not swallowed
        mapper.set_stage("total", depends_on=[])
        row.dep_add_w.value = "nubmers"
        assert list(row.deps_w.value) == ["nubmers"]
        assert "did you mean 'numbers'?" in mapper.errors["total"]
    finally:
        mapper.close()


def test_row_layout_keeps_the_delete_button_and_the_badge_has_a_fixed_width():
    """The browser check (tests/test_mapper_browser.py) measures it at 1440 px; these are the
    layout settings it relies on."""
    mapper = widgets.StageMapper(namespace={})
    try:
        row = mapper.add_stage("a", "")
        first = row.children[0]
        assert first.layout.flex_flow == "row nowrap" and first.children[-1] is row.remove_w
        assert all(w.layout.min_width for w in (row.name_w, row.target_w, row.type_w))  # they shrink
        assert all(line.layout.flex_flow == "row wrap" for line in row.children[1:3])
        assert row.state_w.layout.width == "92px" and row.state_w.layout.flex == "0 0 92px"
        assert row.remove_w.layout.flex == "0 0 36px"  # never shrunk or pushed away
        row.set_state("finished")
        assert row.state_w.layout.width == "92px"
    finally:
        mapper.close()


def test_finished_run_stays_shown_until_the_stages_change(threads):
    """Every notebook cell re-checks the mapper (post_run_cell): a cell that edits nothing must not
    grey out the last run (tutorial 03 after Run All); editing a stage does."""

    def numbers(n=3):
        return list(range(n))

    mapper = widgets.StageMapper(namespace={"numbers": numbers}, executor=threads)
    try:
        mapper.add_stage("numbers", "numbers")
        mapper.run_w.click()
        mapper._handle.wait(30)
        poll(
            lambda: mapper.run_state == "finished",
            before=threads.events.flush,
            what="the mapper run finished",
        )
        mapper._post_run_cell()  # what IPython calls after any later cell
        assert mapper.run_state == "finished" and mapper.stages["numbers"].state_w.value != ""
        assert ">finished<" in mapper.status_w.value
        mapper.set_stage("numbers", allow_partial_failure=False)
        mapper._post_run_cell()
        assert mapper.run_state == "" and ">finished<" not in mapper.status_w.value
    finally:
        mapper.close()
