"""Every case of the bad-input catalogue (tests/bad_inputs.py) through its real entry point:
one line naming the problem, exit status 2 on the command line, no traceback, no output left
behind; valid edge cases (prime sizes, one voxel thick) run. docs/errors.md is up to date."""

from pathlib import Path

import pytest
from bad_inputs import CASES, RUNS, _as_a_fresh_process, _snapshot, markdown, run_case, shown

from workbench.errors import USER_ERRORS

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
SEEN: dict[str, str] = {}


def test_the_catalogue_is_big_enough_and_ids_are_unique():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {c.surface for c in CASES} >= {"cli", "python", "panel", "napari", "dataset", "checkpoint",
                                         "result folder", "multi-process"}  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path):
    if case.surface == "napari":
        pytest.importorskip("napari")
    before = None
    if case.setup is not None:  # built once here to know what was there; run_case builds nothing twice
        case.setup(tmp_path)
        before = _snapshot(tmp_path)
        case = type(case)(**{**case.__dict__, "setup": None})
    got = run_case(case, tmp_path)
    assert "Traceback" not in got.stderr
    if case.expect == RUNS:
        assert got.status in (0, RUNS), got.stderr
        assert case.check(tmp_path)
        SEEN[case.id] = ""
        return
    assert case.expect in got.message, got.message
    if case.argv:
        assert got.status == 2, got.stderr
        lines = got.stderr.strip().splitlines()
        if lines[0].startswith("usage:"):  # argparse: its usage (maybe wrapped), then one line
            assert lines[-1].startswith(f"workbench {case.argv[0]}: error: argument ")
        else:
            assert len(lines) == 1 and lines[0].startswith("workbench: error: "), lines
        out = tmp_path / "out"
        assert (
            not out.exists() or (before or {}).get("out") is not None or any(k.startswith("out/") for k in before or {})
        )
        after = _snapshot(tmp_path)
        assert after == (before or {}), "the failed command left files behind"
        assert not list(tmp_path.glob(".*tmp*")), "staging leftovers"
    else:
        assert got.status in ("raised", "shown") and "\n" not in got.message
    SEEN[case.id] = shown(got.message, tmp_path)


def test_debug_prints_the_traceback_only_for_bugs(tmp_path, capsys):
    """A user error under --debug is still one line (a bad input has no traceback to show)."""
    from workbench.cli import main

    assert main(["--debug", "infer", str(tmp_path / "nope.npy"), "--mesh", "2x2x2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_user_errors_are_value_errors():
    assert all(issubclass(t, ValueError) for t in USER_ERRORS)


def test_docs_errors_md_is_up_to_date(tmp_path_factory):
    """docs/errors.md holds each case's message (regenerate: python -m tests.bad_inputs --write docs/errors.md)."""
    for c in CASES:
        if c.id not in SEEN:  # run alone (-k): compute what is missing
            tmp = tmp_path_factory.mktemp(c.id)
            SEEN[c.id] = "" if c.expect == RUNS else shown(run_case(c, tmp).message, tmp)
    assert DOC.read_text() == markdown(SEEN), "run: python -m tests.bad_inputs --write docs/errors.md"


def test_library_output_is_held_for_the_internal_error_file(tmp_path, monkeypatch, capsys):
    """A library's log record or warning never reaches the terminal between a command's output
    and its one line: it is kept in the internal-error file (or printed with --debug)."""
    import logging
    import re
    import tempfile
    import warnings

    from workbench.cli import infer, main

    def run(args):
        logging.getLogger("tifffile").warning("a library's own line")
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
        raise RuntimeError("boom")

    monkeypatch.setattr(infer, "run", run)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    argv = ["infer", "phantom:16", "--mesh", "2x2x2", "--out", str(tmp_path / "out")]
    with _as_a_fresh_process():
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a library's" not in err, err
    kept = Path(re.search(r"traceback written to (\S+);", err).group(1)).read_text()
    assert "WARNING tifffile: a library's own line" in kept and "a library's warning" in kept
    assert "RuntimeError: boom" in kept
    with _as_a_fresh_process():
        assert main(["--debug", *argv]) == 1
    err = capsys.readouterr().err
    assert "WARNING tifffile: a library's own line" in err and "Traceback" in err
