"""The conformance harness (hla_core/conformance.py, `python -m hla_core.conformance`).

- This project's kernels pass every property (float64, Triton interpreter on the CPU;
  tiny shapes: the interpreter is slow; the GPU run is recorded in docs/conformance.md).
- Implementations written as a third party would (property_tests/conformance_targets.py,
  plain torch loops) are judged right: the paper's decayed masked recurrences of Section
  4.3 fail for gamma < 1, shrunk to T = 2, d = dv = 1, and pass with --gamma 1; an
  off-by-one inner mask fails (shrunk to T = 1); a hand-off that drops the KK summary fails
  the hand-off property only; a function without options gets "n/a", never "passed".
- The printed reproduction runs and fails by itself; exit status 0 / 1 / 2 with one line
  on stderr for usage errors (bad target, unknown operator, wrong shape, bad signature).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("the CPU conformance tests need TRITON_INTERPRET=1", allow_module_level=True)

import torch  # noqa: E402

from hla_core import conformance as C  # noqa: E402
from property_tests import conformance_targets as T  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGETS = "property_tests/conformance_targets.py"
# torch loops are fast: a few examples per property; the kernels run in the interpreter
LOOP = dict(max_examples=8, max_T=12, max_dim=4, max_batch=2, max_heads=2)
KERNEL = dict(max_examples=1, max_T=20, max_dim=4, max_batch=1, max_heads=2, chunk_sizes=(16,))


def statuses(report):
    return {r.name: r.status for r in report.rows}


@pytest.mark.parametrize("name,op", [("chunk_hla2", "hla2"), ("fused_recurrent_ahla", "ahla"),
                                     ("chunk_hla3", "hla3")])
def test_project_kernels_pass_every_property(name, op):
    import kernels
    report = C.check(getattr(kernels, name), op, **KERNEL)
    assert statuses(report) == {p: C.PASSED for p in C.PROPERTIES}, report.format()
    assert report.exit_code == 0


def test_correct_loop_passes_and_reports_what_it_cannot_express():
    report = C.check(T.hla2_loop, "hla2", **LOOP)
    st = statuses(report)
    assert st.pop("varlen") == C.NA and "cu_seqlens" in report.row("varlen").reason
    assert set(st.values()) == {C.PASSED}, report.format()
    assert all(r.examples > 0 for r in report.rows if r.status == C.PASSED)


def test_function_without_options_gets_not_applicable_never_passed():
    report = C.check(T.plain_hla2, "hla2", **LOOP)
    assert statuses(report) == {"output": C.PASSED, "decay": C.NA, "normalize": C.NA, "handoff": C.NA,
                                "varlen": C.NA, "gradients": C.PASSED, "determinism": C.PASSED}
    assert "gamma" in report.row("decay").reason and "initial_state" in report.row("handoff").reason
    text = report.format()
    assert "3 passed, 0 failed, 4 not applicable" in text


def test_paper_decayed_recurrences_fail_for_decay_and_shrink():
    report = C.check(T.paper_hla2, "hla2", **LOOP)
    st = statuses(report)
    assert st["output"] == C.PASSED and st["determinism"] == C.PASSED  # gamma = 1: right
    for prop in ("decay", "normalize", "handoff", "gradients"):
        assert st[prop] == C.FAILED, report.format()
    case = report.row("decay").case
    assert (case.B, case.T, case.H, case.d, case.dv) == (1, 2, 1, 1, 1) and case.gamma < 1, case
    assert report.exit_code == 1
    assert "smallest failing input: B=1, T=2, H=1, d=1, dv=1" in report.format()


def test_paper_decayed_recurrences_pass_undecayed():
    report = C.check(T.paper_hla2, "hla2", gammas=(1,), **LOOP)
    st = statuses(report)
    assert st.pop("decay") == C.NA and "--gamma 1" in report.row("decay").reason
    assert st.pop("varlen") == C.NA
    assert set(st.values()) == {C.PASSED}, report.format()


def test_off_by_one_mask_fails_at_one_token():
    report = C.check(T.off_by_one_hla2, "hla2", properties=("output",), **LOOP)
    row = report.row("output")
    assert row.status == C.FAILED
    assert (row.case.T, row.case.d, row.case.dv) == (1, 1, 1), row.case


def test_dropped_summary_fails_the_handoff_only():
    report = C.check(T.handoff_drops_kk, "hla2", **LOOP)
    st = statuses(report)
    assert st.pop("handoff") == C.FAILED, report.format()
    assert st.pop("varlen") == C.NA
    assert set(st.values()) == {C.PASSED}, report.format()
    row = report.row("handoff")
    assert row.failure.startswith("output of the hand-off at token 1"), row.failure
    assert (row.case.T, row.case.split, row.case.d, row.case.dv) == (2, 1, 1, 1), row.case


def test_reproduction_snippet_runs_and_fails():
    report = C.check(T.paper_hla2, "hla2", properties=("decay", "handoff", "gradients"), **LOOP)
    for row in report.rows:
        assert "f = load_target('property_tests.conformance_targets:paper_hla2')" in row.snippet
        with pytest.raises(AssertionError):
            exec(compile(row.snippet, f"<snippet {row.name}>", "exec"), {})


def test_float32_judged_by_the_error_model():
    good = C.check(T.hla2_loop, "hla2", dtype="float32", properties=("output", "decay", "normalize", "gradients"),
                   **LOOP)
    assert {r.status for r in good.rows} == {C.PASSED}, good.format()
    bad = C.check(T.paper_hla2, "hla2", dtype="float32", properties=("decay",), **LOOP)
    assert bad.row("decay").status == C.FAILED


def test_layout_bhtd():
    report = C.check(T.hla2_loop_bhtd, "hla2", layout="bhtd", properties=("output", "decay", "gradients"), **LOOP)
    assert {r.status for r in report.rows} == {C.PASSED}, report.format()


# ----------------------------------------------------------------------------- CLI

def cli(capsys, *args):
    rc = C.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_exit_status_and_table(capsys):
    small = ["--max-examples", "4", "--max-T", "8", "--max-dim", "3"]
    rc, out, err = cli(capsys, f"{TARGETS}:paper_hla2", "--op", "hla2", *small)
    assert rc == 1 and "decay        FAILED" in out and "FAILED decay:" in out and "reproduce" in out
    rc, out, err = cli(capsys, f"{TARGETS}:paper_hla2", "--op", "hla2", "--gamma", "1", *small)
    assert rc == 0, out
    assert "decay        n/a" in out


@pytest.mark.parametrize("args,needle", [
    (["no_such_module_xyz:f", "--op", "hla2"], "cannot import no_such_module_xyz"),
    ([f"{TARGETS}:missing", "--op", "hla2"], "has no function 'missing'"),
    ([f"{TARGETS}", "--op", "hla2"], "expected package.module:function"),
    (["does/not/exist.py:f", "--op", "hla2"], "no such file"),
    ([f"{TARGETS}:wrong_shape", "--op", "hla2"], "shape (1, 3, 1, 1), expected (1, 3, 1, 2)"),
    ([f"{TARGETS}:bad_signature", "--op", "hla2"], "cannot be called as f(q, k, v"),
    ([f"{TARGETS}:raises_always", "--op", "hla2"], "RuntimeError: not implemented"),
    ([f"{TARGETS}:hla2_loop", "--op", "hla9"], "unknown operator 'hla9'"),
    ([f"{TARGETS}:hla2_loop", "--op", "hla2", "--gamma", "1.5"], "must lie in (0, 1]"),
])
def test_cli_usage_errors_exit_2_with_one_line(capsys, args, needle):
    rc, out, err = cli(capsys, *args)
    assert rc == 2
    assert err.count("\n") == 1 and needle in err, err
    assert "Traceback" not in err


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "hla_core.conformance", "no_such_module_xyz:f", "--op", "hla2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot import" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- pytest factory

test_factory_hla2_loop = C.make_test(T.hla2_loop, "hla2", **LOOP)
