"""Figures quoted in prose come from their recorded data.

docs/benchmarks.md, docs/numerics.md and README.md quote numbers measured on a GPU
(docs/bench.json, docs/numerics.json) or on the CPU (docs/numerics_mpmath.json), and
constants of the error model (hla_core/error_model.py). The data cannot be regenerated
without a GPU, so the prose is checked against it instead: every quoted figure below is
found in its document by a pattern and recomputed from the data; the printed value must
be the data rounded to the digits it shows. A figure that drifts from its data (or prose
that stops quoting it) fails here. The tables of both documents must be exactly what
their printers (`kernels.bench.print_table`, `kernels.numerics.tables`) print.

Figures the documents mark as coming from a run log (not recorded) are not checked;
three of the benchmark's run-to-run spread figures are recorded in earlier commits'
docs/bench.json and are checked against git history when it is available.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from hla_core import error_model as em

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BENCH = json.loads((DOCS / "bench.json").read_text())
NUM = json.loads((DOCS / "numerics.json").read_text())["rows"]
MPM = json.loads((DOCS / "numerics_mpmath.json").read_text())
NUMB = json.loads((DOCS / "numerics_backward.json").read_text())["rows"]

NUM_RE = r"(\d+(?:\.\d+)?(?:e[+-]?\d+)?)"


def ms(T: int, d: int, method: str) -> float:
    rows = [r for r in BENCH["rows"] if (r["T"], r["d"], r["method"]) == (T, d, method)]
    assert len(rows) == 1, (T, d, method)
    return rows[0]["ms"]


def num_row(op, gamma, dtype, T) -> dict:
    rows = [r for r in NUM if (r["op"], r["gamma"], r["dtype"], r["T"]) == (op, gamma, dtype, T)]
    assert len(rows) == 1, (op, gamma, dtype, T)
    return rows[0]


def beta_of(row) -> float:
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[row["dtype"]]
    return em.beta(dtype, row["T"], 64, 64, row["gamma"], op="hla3" if row["op"] == "hla3" else None)


def fp16_crossing() -> float:
    """T at which HLA3's largest output (γ = 1) reaches fp16's 65504, on the log-log line
    through T = 4K and 16K."""
    a, b = num_row("hla3", 1.0, "fp32", 4096)["out_max"], num_row("hla3", 1.0, "fp32", 16384)["out_max"]
    slope = math.log(b / a) / math.log(4)
    return 4096 * (65504 / a) ** (1 / slope)


def shown(printed: str, value: float, sig: int | None = None) -> bool:
    """Is `printed` the value rounded to the digits it shows (or to `sig` significant
    digits)?"""
    x = float(printed)
    if sig is not None:
        if value == 0:
            return x == 0
        step = 10 ** (math.floor(math.log10(abs(value))) - sig + 1)
    else:
        mant, _, exp = printed.partition("e")
        decimals = len(mant.split(".")[1]) if "." in mant else 0
        step = 10.0 ** (int(exp or 0) - decimals)
    return abs(x - value) <= step / 2 * (1 + 1e-9)


@dataclass(frozen=True)
class Figure:
    name: str
    doc: str
    pattern: str                   # a regex; its groups are the quoted numbers
    values: Callable[[], tuple]    # the same numbers from the data
    sig: int | None = None         # compare at this many significant digits

    def check(self):
        text = " ".join((ROOT / self.doc).read_text().split())   # line breaks as spaces
        m = re.search(self.pattern, text)
        assert m, f"{self.doc}: the prose no longer quotes {self.name!r} (pattern {self.pattern!r})"
        want = self.values()
        assert len(m.groups()) == len(want), self.name
        for got, val in zip(m.groups(), want):
            assert shown(got, val, self.sig), (
                f"{self.doc}: {self.name}: the prose says {got}, the data give {val:.6g}")


N = NUM_RE
FIGURES = [
    # docs/benchmarks.md
    Figure("setup", "docs/benchmarks.md", r"torch (\S+), triton (\S+),",
           lambda: (BENCH["torch"], BENCH["triton"])),
    Figure("hla2 / fla at (16K, 128)", "docs/benchmarks.md",
           rf"1\.22 ms against 0\.74 ms, {N}×", lambda: (ms(16384, 128, "chunk_hla2") / ms(16384, 128, "fla_chunk_simple_gla"),)),
    Figure("hla2 and fla ms", "docs/benchmarks.md", rf"not met\.\*\* {N} ms against {N} ms",
           lambda: (ms(16384, 128, "chunk_hla2"), ms(16384, 128, "fla_chunk_simple_gla"))),
    Figure("SDPA / hla2", "docs/benchmarks.md", rf"{N} / {N} = {N}× in the table",
           lambda: (ms(16384, 128, "sdpa_causal"), ms(16384, 128, "chunk_hla2"),
                    ms(16384, 128, "sdpa_causal") / ms(16384, 128, "chunk_hla2"))),
    Figure("SDPA / hla2 at d = 64", "docs/benchmarks.md", rf"{N}× at d = 64",
           lambda: (ms(16384, 64, "sdpa_causal") / ms(16384, 64, "chunk_hla2"),)),
    Figure("first-order LA vs fla", "docs/benchmarks.md", rf"faster than fla's at the largest shape \({N} vs {N} ms",
           lambda: (ms(16384, 128, "first_order_la"), ms(16384, 128, "fla_chunk_simple_gla"))),
    Figure("hla2 in first-order LAs", "docs/benchmarks.md", rf"chunk_hla2 costs {N} of them",
           lambda: (ms(16384, 128, "chunk_hla2") / ms(16384, 128, "first_order_la"),)),
    Figure("speed history, latest", "docs/benchmarks.md",
           rf"LA chain {N} ms; chunk_ahla 2\.65 → {N} ms; .*?→ {N} ms\.",
           lambda: (ms(16384, 128, "chunk_hla2"), ms(16384, 128, "chunk_ahla"), ms(16384, 128, "chunk_hla3"))),
    Figure("recorded first_order_la beside the sweep", "docs/benchmarks.md",
           rf"recorded `first_order_la` row \({N} ms at \(16K, 128\)\)", lambda: (ms(16384, 128, "first_order_la"),)),
    Figure("open: hla2 / fla", "docs/benchmarks.md", rf"chunk_hla2 at \(16K, 128\) is {N}× fla's",
           lambda: (ms(16384, 128, "chunk_hla2") / ms(16384, 128, "fla_chunk_simple_gla"),)),
    Figure("spread, current run", "docs/benchmarks.md",
           rf"chunk_hla2 {N} / {N} / {N} / {N} ms, fla {N} / {N} / {N} / {N} ms, SDPA {N} / {N} / {N} / {N} ms",
           lambda: (ms(16384, 128, "chunk_hla2"), ms(16384, 128, "fla_chunk_simple_gla"),
                    ms(16384, 128, "sdpa_causal")), sig=None),
    Figure("spread, fla at (4K, 64) now", "docs/benchmarks.md", rf"took {N}, {N} and {N} ms in the three recorded",
           lambda: (ms(4096, 64, "fla_chunk_simple_gla"),)),
    Figure("B·H", "docs/benchmarks.md", rf"at B·H = {N}", lambda: (BENCH["B"] * BENCH["H"],)),
    Figure("TF32 operand roundoff = the model's", "docs/benchmarks.md", r"the error model counts 2\^-(\d+)",
           lambda: (-math.log2(em.OPERAND_ROUNDOFF["float16"]),)),
    # README.md
    Figure("README timings", "README.md",
           rf"chunk_hla2 {N} ms, chunk_ahla {N} ms, chunk_hla3 {N} ms; fla's first-order chunk_simple_gla {N} ms, "
           rf"SDPA causal {N} ms",
           lambda: tuple(ms(16384, 128, m) for m in ("chunk_hla2", "chunk_ahla", "chunk_hla3",
                                                    "fla_chunk_simple_gla", "sdpa_causal"))),
    # docs/numerics.md
    Figure("float64 reference bound", "docs/numerics.md", rf"u = 2\^-53 \(about {N} of \|op\| at T=16K\)",
           lambda: (em.beta("float64", 16384, 64, 64, 1.0),), sig=1),
    Figure("float64 vs mpmath", "docs/numerics.md", rf"≤ {N} \(chunked\) and ≤ {N} \(recurrent\)",
           lambda: (max(r["chunk_f64_rel"] for r in MPM), max(r["fused_recurrent_f64_rel"] for r in MPM))),
    Figure("β at T = 16K", "docs/numerics.md",
           rf"β = {N} for bf16, {N} for fp32 at T=16K, γ=1, second order; {N} and {N} for HLA3",
           lambda: (em.beta("bfloat16", 16384, 64, 64, 1.0), em.beta("float32", 16384, 64, 64, 1.0),
                    em.beta("bfloat16", 16384, 64, 64, 1.0, op="hla3"),
                    em.beta("float32", 16384, 64, 64, 1.0, op="hla3"))),
    Figure("bf16 and fp32 error ranges", "docs/numerics.md",
           rf"bf16 stays at {N}–{N}e-3 .*? fp32 stays at {N}–{N}e-7",
           lambda: (min(r["chunk_rel"] for r in NUM if r["dtype"] == "bf16") * 1e3,
                    max(r["chunk_rel"] for r in NUM if r["dtype"] == "bf16") * 1e3,
                    min(r["chunk_rel"] for r in NUM if r["dtype"] == "fp32") * 1e7,
                    max(r["chunk_rel"] for r in NUM if r["dtype"] == "fp32") * 1e7)),
    Figure("HLA2 fp32 growth", "docs/numerics.md", rf"\(HLA2 {N} → {N}\)",
           lambda: (num_row("hla2", 1.0, "fp32", 256)["chunk_rel"], num_row("hla2", 1.0, "fp32", 16384)["chunk_rel"])),
    Figure("max |err|/|op| and margin under the bound", "docs/numerics.md",
           rf"≤ {N} \(bf16\) and ≤ {N} \(fp32\), at least {N}× and {N}×",
           lambda: (max(r["chunk_vs_absop"] for r in NUM if r["dtype"] == "bf16"),
                    max(r["chunk_vs_absop"] for r in NUM if r["dtype"] == "fp32"),
                    min(beta_of(r) / r["chunk_vs_absop"] for r in NUM if r["dtype"] == "bf16"),
                    min(beta_of(r) / r["chunk_vs_absop"] for r in NUM if r["dtype"] == "fp32")), sig=2),
    Figure("state growth without decay", "docs/numerics.md",
           rf"HLA2's KK_QV {N} → {N} \(KK itself {N} → {N}, like T\), AHLA's KQ_KV {N} → {N}, and "
           rf"HLA3's KK_QQ_KV {N} → {N}",
           lambda: tuple(num_row(op, 1.0, "fp32", T)["state_max_by"][s]
                         for op, s in (("hla2", "KK_QV"), ("hla2", "KK"), ("ahla", "KQ_KV"), ("hla3", "KK_QQ_KV"))
                         for T in (256, 16384)), sig=2),
    Figure("fp16 overflow of HLA3's output", "docs/numerics.md",
           rf"output is {N} at T=4K and {N} at 16K, and crosses 65504 at T ≈ {N}",
           lambda: (num_row("hla3", 1.0, "fp32", 4096)["out_max"], num_row("hla3", 1.0, "fp32", 16384)["out_max"],
                    fp16_crossing())),
    Figure("fp16 overflow, in words", "docs/numerics.md", r"overflow near T ≈ (\d+)K", lambda: (fp16_crossing() / 1e3,)),
    Figure("states with decay", "docs/numerics.md",
           rf"at T=16K KK_QV {N}, KQ_KV {N}, KK_QQ_KV {N}, and the largest entry of any state {N} \(KK\)",
           lambda: (num_row("hla2", 0.99, "fp32", 16384)["state_max_by"]["KK_QV"],
                    num_row("ahla", 0.99, "fp32", 16384)["state_max_by"]["KQ_KV"],
                    num_row("hla3", 0.99, "fp32", 16384)["state_max_by"]["KK_QQ_KV"],
                    max(r["state_max"] for r in NUM if r["gamma"] == 0.99 and r["T"] == 16384)), sig=2),
    Figure("|op| / |o|", "docs/numerics.md", rf"{N} for HLA2, {N} for AHLA, {N} for HLA3\)",
           lambda: tuple(num_row(op, 0.99, "fp32", 16384)["absop_over_out"] for op in ("hla2", "ahla", "hla3")),
           sig=2),
    Figure("paper form vs ours", "docs/numerics.md", rf"\(e\.g\. {N} against {N} chunked and {N} recurrent at T=4K, γ=1\)",
           lambda: (num_row("hla2", 1.0, "fp32", 4096)["paper_form_fp32_rel"],
                    num_row("hla2", 1.0, "fp32", 4096)["chunk_rel"],
                    num_row("hla2", 1.0, "fp32", 4096)["recurrent_rel"])),
]


@pytest.mark.parametrize("fig", FIGURES, ids=[f"{f.doc.split('/')[-1]}: {f.name}" for f in FIGURES])
def test_prose_figure_matches_its_data(fig):
    if fig.name == "setup":
        text = (ROOT / fig.doc).read_text()
        assert f"torch {BENCH['torch']}, triton {BENCH['triton']}" in text
        assert BENCH["gpu"].split()[-1] in text
        return
    if fig.name.startswith("spread"):
        _check_spread(fig)
        return
    fig.check()


def _check_spread(fig):
    """The listed calls include the current run (last) and, where git history is there,
    the recorded runs of earlier commits; the ratio ranges follow from the listed calls."""
    text = " ".join((ROOT / fig.doc).read_text().split())
    m = re.search(fig.pattern, text)
    assert m, f"{fig.doc}: the prose no longer quotes {fig.name!r}"
    got = [float(x) for x in m.groups()]
    if fig.name == "spread, current run":
        h, f, s = got[0:4], got[4:8], got[8:12]
        for printed, val in zip((m.group(4), m.group(8), m.group(12)), fig.values()):
            assert shown(printed, val), (fig.name, printed, val)
        r1 = [a / b for a, b in zip(h, f)]
        r2 = [a / b for a, b in zip(s, h)]
        rng = re.search(rf"hla2 / fla {N}–{N} and SDPA / hla2 {N}–{N}", text)
        assert rng, "the spread's ratio ranges are no longer quoted"
        for printed, val in zip(rng.groups(), (min(r1), max(r1), min(r2), max(r2))):
            assert shown(printed, val), ("spread ratio", printed, val)
        recorded = {"aae141b": (h[0], f[0], s[0]), "fecd8f6": (h[1], f[1], s[1])}
    else:
        assert shown(m.group(3), fig.values()[0]), (fig.name, m.group(3))
        recorded = {"aae141b": (got[0],), "fecd8f6": (got[1],)}
    for commit, want in recorded.items():
        old = _bench_at(commit)
        if old is None:
            continue
        methods = ("chunk_hla2", "fla_chunk_simple_gla", "sdpa_causal")
        shape = (16384, 128) if len(want) == 3 else (4096, 64)
        if len(want) == 1:
            methods = ("fla_chunk_simple_gla",)
        by = {r["method"]: r["ms"] for r in old["rows"] if (r["T"], r["d"]) == shape}
        for meth, w in zip(methods, want):
            digits = f"{w:g}"
            assert shown(digits, by[meth]), (commit, meth, w, by[meth])


def _bench_at(commit: str):
    try:
        out = subprocess.run(["git", "show", f"{commit}:docs/bench.json"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return json.loads(out.stdout) if out.returncode == 0 else None


def _printed(fn, *args) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*args)
    return buf.getvalue()


def test_benchmark_table_is_the_printers():
    from kernels.bench import print_table
    table = _printed(print_table, BENCH["rows"]).strip()
    assert table in (DOCS / "benchmarks.md").read_text(), \
        "docs/benchmarks.md's table differs from `python -m kernels.bench --table docs/bench.json`"


def test_numerics_tables_are_the_printers():
    from kernels.numerics import tables
    text = (DOCS / "numerics.md").read_text()
    for block in _printed(tables, DOCS / "numerics.json", DOCS / "numerics_mpmath.json").strip().split("\n\n"):
        assert block.strip() in text, \
            "docs/numerics.md's tables differ from `python -m kernels.numerics --tables --out docs`"


@pytest.mark.parametrize("name", ["bench_train.json", "bench_train_870184b.json", "bench_train_sweep.json"])
def test_training_table_is_the_printer(name):
    from kernels.bench import print_train_table
    rows = json.loads((DOCS / name).read_text())["rows"]
    table = _printed(print_train_table, rows).strip()
    assert table in (DOCS / "benchmarks.md").read_text(), \
        f"docs/benchmarks.md's training table differs from `python -m kernels.bench --train-table docs/{name}`"


@pytest.mark.parametrize("name", ["bench_cp.json", "bench_cp_512k.json"])
def test_context_parallel_table_is_the_printer(name):
    from kernels.bench_cp import table
    rows = json.loads((DOCS / name).read_text())["rows"]
    printed = table(rows).split("\n\nLongest")[0].strip()  # the table, without the line after it
    assert printed in (DOCS / "benchmarks.md").read_text(), \
        f"docs/benchmarks.md's context-parallel table differs from `python -m kernels.bench_cp --table docs/{name}`"


def test_numerics_backward_table_is_the_printer():
    from kernels.numerics import backward_tables
    table = _printed(backward_tables, DOCS / "numerics_backward.json").strip()
    assert table in (DOCS / "numerics.md").read_text(), \
        "docs/numerics.md's gradient table differs from `python -m kernels.numerics --backward-tables --out docs`"


def _bwd_range(dtype, key):
    vals = [r[f"d{n}_{key}"] for r in NUMB if r["dtype"] == dtype for n in "qkv" if f"d{n}_{key}" in r]
    return min(vals), max(vals)


BACKWARD_FIGURES = [
    Figure("bf16 and fp32 gradient ranges", "docs/numerics.md",
           rf"bf16 {N} – {N} from T = 256 to 16K for all three operators, with and without decay \(the "
           rf"same level as the forward's outputs\); fp32 {N} – {N},",
           lambda: _bwd_range("bf16", "rel") + _bwd_range("fp32", "rel"), sig=2),
    Figure("recurrent gradient ranges", "docs/numerics.md",
           rf"recurrent kernels' bf16 gradients are {N} – {N} .*?; fp32 {N} – {N}\.",
           lambda: _bwd_range("bf16", "rec_rel") + _bwd_range("fp32", "rec_rel"), sig=2),
    Figure("margin under the backward bound", "docs/numerics.md",
           rf"at least {N}× under the model's bound for bf16 \(AHLA, T = 256\) and at least {N}× for fp32",
           lambda: tuple(min(r["rho_b"] / r["max_vs_gabs"] for r in NUMB if r["dtype"] == dt)
                         for dt in ("bf16", "fp32")), sig=2),
    Figure("backward rho at the GPU test shape", "docs/numerics.md",
           rf"second order / HLA3: bf16 {N} / {N}, fp16 \(TF32 operands\) {N} / {N}, fp32 {N} / {N}\.",
           lambda: tuple(em.backward_normwise_coefficient(dt, T=300, d=64, chunk_size=64, gamma=0.95, op=op)
                         for dt in ("bfloat16", "float16", "float32") for op in (None, "hla3")), sig=2),
]


@pytest.mark.parametrize("fig", BACKWARD_FIGURES, ids=[f.name for f in BACKWARD_FIGURES])
def test_backward_figure_matches_its_data(fig):
    fig.check()


def test_shown_rounds_like_the_prose():
    assert shown("1.64", 1.6438) and not shown("1.63", 1.6438)
    assert shown("2.7e-2", 0.0270) and not shown("2.3e-2", 0.0270)
    assert shown("4.5e-15", 4.5499e-15) and not shown("4.6e-15", 4.5499e-15)
    assert shown("1.5e3", 1516.8, sig=2) and not shown("50", 1516.8, sig=2)
