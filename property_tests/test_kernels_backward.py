"""Backward of the HLA kernels (kernels/backward.py) against the engine and independent lines.

- Structure, for every T (symbolic): the chain's backward (kernels.backward.VJP_RULES
  applied stage by stage in reverse, as chain_backward runs them) expanded into sums over
  index tuples equals the engine's derived gradient terms (derivations/gradients.py),
  compared as weights on index tuples by order types (derivations/weights.compare), for
  the numerator and the v -> 1 denominator. A wrong rule (dropped, wrong direction in
  time, wrong decay) is rejected.
- Algorithm (float64): kernel gradients of q, k, v within 1e-10 relative of hla_core.vjp
  (the engine's generated VJP), per sequence and head, chunk and recurrent kernels, plain
  and normalized, per-head gamma, cu_seqlens, several sequence segments (the summary and
  fold path of the reversed LAs, forced with segment_chunks=1). Initial-state gradients
  and cotangents on the returned final state (hla_core.vjp has neither): against float64
  torch autograd through the token-by-token recurrence of the generated reference module
  (hla_core/generated/<op>.py, its update functions run on torch tensors), also through a
  chunk -> recurrent state hand-off. torch.autograd.gradcheck on tiny shapes.
- Rounding (fp32 / fp16 / bf16), unnormalized: the backward error model of
  hla_core/error_model.py (stated in docs/numerics.md): every gradient entry is a
  positively weighted sum of products of q, k, v, do entries, so
  |g_hat - g| <= beta_b |g|abs + u_out (|g| + beta_b |g|abs) + eta_out/2 with |g|abs the
  gradient on |q|, |k|, |v|, |do| and beta_b from the backward chain's counted m (the
  forward's: 6, HLA3 9; property_tests/test_error_model.py counts it from CHAIN and
  VJP_RULES) and nb = n(T, max(d, dv)) + stages - 1. Random signs: element-wise;
  nonnegative q, k, v, do: also norm-wise per head, ||g_hat - g|| <= rho_b ||g||.
  bf16 (GPU only: the interpreter's bf16 dot is wrong, kernels._common.dot_dtype), fp16
  (TF32 operands), fp32 (IEEE dots, CPU and GPU).
- Arguments: gamma that requires grad raises; scale must be a finite real; scale s equals
  running on s q (output and gradients); inside torch.autocast the kernels compute in the
  autocast dtype and the gradients come back in the inputs' dtypes.

CPU: TRITON_INTERPRET=1 with small shapes (`ci` profile, about a minute); `thorough` draws
more shapes; HYPOTHESIS_PROFILE=gpu without TRITON_INTERPRET runs on CUDA with larger ones.
"""
from __future__ import annotations

import itertools
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import Phase, given, note, settings
from hypothesis import strategies as st

import hla_core
import kernels
from hla_core import error_model

ON_GPU = os.environ.get("HYPOTHESIS_PROFILE") == "gpu" and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] != "1":
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1", allow_module_level=True)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

OPS = ("hla2", "ahla", "hla3")
FNS = {("hla2", "chunk"): kernels.chunk_hla2, ("hla2", "recurrent"): kernels.fused_recurrent_hla2,
       ("ahla", "chunk"): kernels.chunk_ahla, ("ahla", "recurrent"): kernels.fused_recurrent_ahla,
       ("hla3", "chunk"): kernels.chunk_hla3, ("hla3", "recurrent"): kernels.fused_recurrent_hla3}
STATE_CLS = {"hla2": kernels.HLA2State, "ahla": kernels.AHLAState, "hla3": kernels.HLA3State}
F64 = torch.float64


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _inputs(B, T, H, d, dv, *, positive=False, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = (lambda *s: torch.rand(*s, generator=g, dtype=F64) + 0.05) if positive else \
        (lambda *s: torch.randn(*s, generator=g, dtype=F64))
    q, k = mk(B, T, H, d), mk(B, T, H, d)
    v, do = mk(B, T, H, dv), mk(B, T, H, dv)
    return [x.to(DEVICE, dtype) for x in (q, k, v, do)]


def _segments(T, cu):
    return [(0, T)] if cu is None else list(zip(cu[:-1], cu[1:]))


# ---------------------------------------------------------------------------
# Structure: the chain's backward equals the engine's gradient terms, every T.

def _symbolic_grads(chain, ones=False, rules=None):
    """{wrt: row expansions} of the chain's backward (VJP rules per stage, stages in
    reverse) for the loss sum_t do_t . o_t: each term (lead, free var, factors,
    constraints, decay {var: coeff}) is the row sum lead_s^T F_1 ... F_n over its bound
    indices. ones: the v -> 1 chain (value v becomes the vector 1, the cotangent a scalar)."""
    from derivations.gradients import Factor
    from derivations.pattern import Constraint
    from kernels.backward import VJP_RULES
    rules = VJP_RULES if rules is None else rules
    n = itertools.count()

    def fresh():
        return f"x{next(n)}"

    def tok(name):
        return [(name, "_", (), (), {})]

    def inst(expr, at):
        out = []
        for lead, free, fac, cons, lin in expr:
            names = {f.var for f in fac} | {c.a for c in cons} | {c.b for c in cons} | set(lin) | {free}
            ren = {x: fresh() for x in names}
            ren[free] = at
            out.append((lead, at, tuple(Factor(f.in_vec, f.out_vec, ren[f.var]) for f in fac),
                        tuple(Constraint(ren[c.a], c.op, ren[c.b]) for c in cons),
                        {ren[x]: c for x, c in lin.items()}))
        return out

    def la(X, Y, Z, power, reverse):
        s, j = fresh(), fresh()
        out = []
        for (lx, _, fx, cx, dx), (ly, _, fy, cy, dy), (lz, _, fz, cz, dz) in itertools.product(
                inst(X, s), inst(Y, j), inst(Z, j)):
            fac = fx + tuple(f.transposed() for f in reversed(fy)) + (Factor(ly, lz, j),) + fz
            rel = Constraint(s, "<=", j) if reverse else Constraint(j, "<=", s)
            lin = {}
            for part in (dx, dy, dz, {s: Fraction(power), j: Fraction(-power)} if not reverse
                         else {j: Fraction(power), s: Fraction(-power)}):
                for x, c in part.items():
                    lin[x] = lin.get(x, 0) + c
            out.append((lx, s, fac, cx + cy + cz + (rel,), lin))
        return out

    out = {"q": tok("q"), "k": tok("k"), "v": tok("1" if ones else "v")}
    for s in chain:
        out[s.state] = la(out["q"], out[s.key], out[s.value], s.power, False)
    cot = {chain[-1].state: tok("o")}
    for s in reversed(chain):
        roles = {"q": out["q"], "a": out[s.key], "b": out[s.value], "dN": cot.pop(s.state, [])}
        for r in rules:
            tgt = {"q": "q", "a": s.key, "b": s.value}[r.target]
            cot.setdefault(tgt, []).extend(la(roles[r.query], roles[r.key], roles[r.value], s.power, r.reverse))
    if ones:
        cot.pop("v", None)
    return cot


def _as_grad_terms(wrt, expr):
    """Row expansions as engine GradTerms: the cotangent's index becomes the output index t."""
    from derivations.gradients import OUT, Factor, GradTerm
    from derivations.pattern import Constraint
    terms = []
    for lead, free, fac, cons, lin in expr:
        t = free if lead == "o" else next(f.var for f in fac if "o" in (f.in_vec, f.out_vec))
        r = lambda x: OUT if x == t else x  # noqa: E731
        decay = tuple((r(x), -c) for x, c in sorted(lin.items()) if c and x != t)
        terms.append(GradTerm(wrt, r(free), lead, tuple(Factor(f.in_vec, f.out_vec, r(f.var)) for f in fac),
                              tuple(Constraint(r(c.a), c.op, r(c.b)) for c in cons), decay, "chain"))
    return terms


def _backward_matches_engine(op, ones, rules=None):
    from derivations.gradients import _cycle_psums, closed_cycle, gradient_terms
    from derivations.weights import Context, Fresh, compare
    from hla_core.registry import OPERATORS
    chain = {"hla2": kernels.hla2.CHAIN, "ahla": kernels.ahla.CHAIN, "hla3": kernels.hla3.CHAIN}[op]
    pattern = OPERATORS[op].pattern
    if ones:
        pattern = pattern.denominator()
    mine = _symbolic_grads(chain, ones, rules)
    ctx = Context(["p0", "p1"], set(), {"P": 1})
    for wrt in ("q", "k", "v"):
        ref = gradient_terms(pattern, wrt)
        got = _as_grad_terms(wrt, mine.get(wrt, []))
        lhs = _cycle_psums([(closed_cycle(t), t.constraints, t.decay) for t in got], Fresh("a"))
        rhs = _cycle_psums([(closed_cycle(t), t.constraints, t.decay) for t in ref], Fresh("b"))
        if not compare(lhs, rhs, ctx, True)["holds"]:
            return False
    return True


SYMBOLIC = pytest.mark.skipif(ON_GPU, reason="symbolic, device-independent: runs in the CPU suite")


@SYMBOLIC
@pytest.mark.parametrize("ones", [False, True], ids=["numerator", "v->1"])
@pytest.mark.parametrize("op", OPS)
def test_chain_backward_is_the_derived_gradient(op, ones):
    """The composition of the stage VJPs (three LAs each) is the engine's derived gradient,
    for every T (order types): numerator, and the v -> 1 channel the normalized operators
    add (whose cotangent is the quotient rule's scalar)."""
    assert _backward_matches_engine(op, ones)


def _wrong_rules():
    from kernels.backward import VJP_RULES, Rule
    r1, r2, r3 = VJP_RULES
    return {"dropped dk rule": (r1, r3),
            "dq read backward in time": (r1._replace(reverse=True), r2, r3),
            "dv read forward in time": (r1, r2, r3._replace(reverse=False)),
            "dk with value a for q": (r1, r2._replace(value="a"), r3)}


@SYMBOLIC
@pytest.mark.parametrize("name", list(_wrong_rules()))
def test_a_wrong_backward_rule_is_rejected(name):
    assert not _backward_matches_engine("hla2", False, _wrong_rules()[name])


# ---------------------------------------------------------------------------
# float64 against the engine's generated VJP

def _check_vs_vjp(op, mode, B, T, H, d, dv, gammas, normalize, cu=None, chunk_size=16, positive=None,
                  seed=0, segment_chunks=None, form=None):
    positive = normalize if positive is None else positive
    form = form or ("quadratic" if T <= 20 else "recurrent")  # the engine's VJP, summed or streamed
    q, k, v, do = _inputs(B, T, H, d, dv, positive=positive, seed=seed)
    for x in (q, k, v):
        x.requires_grad_(True)
    kw = dict(gamma=torch.tensor(gammas, dtype=F64), normalize=normalize, chunk_size=chunk_size)
    if cu is not None:
        kw["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    if segment_chunks is not None:
        kw["segment_chunks"] = segment_chunks
    o, _ = FNS[(op, mode)](q, k, v, **kw)
    (o * do).sum().backward()
    worst = 0.0
    for b in range(B):
        for lo, hi in _segments(T, cu):
            for h in range(H):
                sl = (b, slice(lo, hi), h)
                if form == "autograd":  # larger drawn shapes (GPU): the streamed VJP's d^4 states are slow
                    ref = _autograd_ref(op, *(x[sl].detach().cpu() for x in (q, k, v, do)), gammas[h], normalize)
                else:
                    ref = hla_core.vjp(op, *(x[sl].detach().cpu().numpy() for x in (q, k, v, do)), form=form,
                                       gamma=gammas[h], normalize=normalize, chunk_size=chunk_size)
                scales = _grad_scales(op, *(x[sl].detach().cpu() for x in (q, k, v, do)), gammas[h], normalize) \
                    if normalize else [np.linalg.norm(r) for r in ref]
                for name, x, r, sc in zip("qkv", (q, k, v), ref, scales):
                    e = float(np.linalg.norm(x.grad[sl].cpu().numpy() - r)) / max(sc, 1e-300)
                    worst = max(worst, e)
                    assert e <= 1e-10, f"{op} {mode} d{name} (b={b}, seq {lo}:{hi}, h={h}): rel {e:.2e}"
    return worst


VJP_CASES = [  # (op, mode, normalize, cu_seqlens): every op and mode, plain and normalized
    ("hla2", "chunk", False, None), ("hla2", "chunk", True, [0, 7, 19]),
    ("ahla", "chunk", False, [0, 12, 19]), ("ahla", "chunk", True, None),
    ("hla3", "chunk", False, None), ("hla3", "chunk", True, [0, 3, 19]),
    ("hla2", "recurrent", True, None), ("ahla", "recurrent", False, [0, 4, 9]),
    ("hla3", "recurrent", True, [0, 5, 9]), ("hla3", "recurrent", False, None),
]


@pytest.mark.parametrize("op,mode,normalize,cu", VJP_CASES)
def test_float64_grads_equal_the_derived_vjp(op, mode, normalize, cu):
    """dq, dk, dv of the kernels = hla_core.vjp (float64, <= 1e-10 relative), per-head gamma."""
    T = (cu[-1] if cu else 19) if mode == "chunk" else (cu[-1] if cu else 9)
    B = 1 if cu else 2
    _check_vs_vjp(op, mode, B, T, 2, 5, 3, [0.9, 0.6], normalize, cu,
                  form="recurrent" if mode == "recurrent" else "quadratic")


@pytest.mark.parametrize("op", OPS)
def test_float64_grads_with_sequence_segments(op):
    """Several parallel segments per sequence (segment_chunks=1, chunk 16, T = 40): the
    reversed LAs' segment summaries (with the query/key side channel) and the fold."""
    _check_vs_vjp(op, "chunk", 1, 40, 1, 4, 3, [0.85], op != "ahla", segment_chunks=1,
                  cu=[0, 35, 40] if op == "hla3" else None)


@pytest.mark.parametrize("op", OPS)
def test_fused_key_value_launch_equals_two_launches(op, monkeypatch):
    """kernels/backward_pair.py (a stage's key and value rules in one reversed launch, on by
    default where it applies) against the two reversed launches, float64 to 1e-12: varlen,
    forced segments, a per-head decay, a cotangent on the final state (the fused launch's
    carry in); and where it applies (kernels.backward._pair_stages)."""
    import kernels.backward as kb
    from kernels.hla2 import CHAIN as C2
    from kernels.hla3 import CHAIN as C3
    T, H, d, dv = 45, 2, 4, 3
    q, k, v, do = _inputs(1, T, H, d, dv, seed=5)
    g = torch.tensor([0.9, 0.6], dtype=F64, device=DEVICE)
    cu = torch.tensor([0, 30, 45], device=DEVICE)
    res = {}
    for fused in (True, False):
        monkeypatch.setattr(kb, "PAIR", fused)
        xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
        o, fin = FNS[(op, "chunk")](*xs, gamma=g, chunk_size=16, cu_seqlens=cu, segment_chunks=1,
                                    output_final_state=True)
        gen = torch.Generator().manual_seed(9)
        loss = (o * do).sum() + sum((x * torch.randn(x.shape, generator=gen, dtype=F64).to(x.device)).sum()
                                    for x in fin if x is not None)
        loss.backward()
        res[fused] = [x.grad for x in xs]
    for name, a, b in zip("qkv", res[True], res[False]):
        assert _rel(a.cpu(), b.cpu()) <= 1e-12, (op, name)
    monkeypatch.setattr(kb, "PAIR", True)

    class _La:  # the attributes _pair_stages reads
        mode, cp, p = "chunk", None, {"d": 4, "dv": 3}
    all_need = dict(q=True, k=True, v=True, init=False)
    for chain, nz, want in ((C2, False, {0, 1}), (C2, True, {0}), (C3, False, {0, 1, 2}), (C3, True, {0})):
        none = {s.state: False for s in chain}
        steps = kb._plan(chain, all_need, none)
        assert kb._pair_stages(chain, _La, steps, nz, none) == want, (chain, nz)
    # a stage whose key rule is not needed (no grad for k in HLA2's key stage), an
    # initial-state gradient, recurrent mode: two launches
    steps = kb._plan(C2, dict(q=True, k=False, v=True, init=False), {s.state: False for s in C2})
    assert kb._pair_stages(C2, _La, steps, False, {s.state: False for s in C2}) == {1}
    steps = kb._plan(C2, all_need, {s.state: False for s in C2})
    assert kb._pair_stages(C2, _La, steps, False, {"KK": False, "KK_QV": True}) == {0}

    class _Wide(_La):  # head size 128: only the key stages (a = b = k) are fused
        p = {"d": 128, "dv": 128}
    assert kb._pair_stages(C2, _Wide, steps, False, {s.state: False for s in C2}) == {0}
    steps3 = kb._plan(C3, all_need, {s.state: False for s in C3})
    assert kb._pair_stages(C3, _Wide, steps3, False, {s.state: False for s in C3}) == {0}

    class _Rec(_La):
        mode = "recurrent"
    assert kb._pair_stages(C2, _Rec, steps, False, {s.state: False for s in C2}) == set()


@pytest.mark.parametrize("op", OPS)
def test_query_pair_launch_equals_separate_launches(op, monkeypatch):
    """kernels/backward_query.py (two stages' query rules in one forward launch, on by
    default where it applies) against one launch per stage, float64 to 1e-12: varlen,
    forced segments (both terms' summaries and folds), a per-head decay with the stages'
    different powers, an initial state (each term's carry in) and its gradient (without
    one, every float64 test against the derived VJP runs the query pair, on by default);
    and where it applies (kernels.backward._query_pairs)."""
    import kernels.backward as kb
    from kernels.hla2 import CHAIN as C2
    from kernels.hla3 import CHAIN as C3
    T, H, d, dv = 45, 2, 4, 3
    q, k, v, do = _inputs(1, T, H, d, dv, seed=6)
    g = torch.tensor([0.9, 0.6], dtype=F64, device=DEVICE)
    cu = torch.tensor([0, 30, 45], device=DEVICE)
    res = {}
    for fused in (True, False):
        monkeypatch.setattr(kb, "QUERY_PAIR", fused)
        xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
        s0 = _random_state(op, 2, H, d, dv, False, False, seed=4)
        o, _ = FNS[(op, "chunk")](*xs, gamma=g, chunk_size=16, cu_seqlens=cu, segment_chunks=1, initial_state=s0)
        (o * do).sum().backward()
        res[fused] = [x.grad for x in xs] + [x.grad for x in s0 if x is not None]
    assert len(res[True]) >= 5  # q, k, v and two or more state fields
    for i, (a, b) in enumerate(zip(res[True], res[False])):
        assert _rel(a.cpu(), b.cpu()) <= 1e-12, (op, i)
    monkeypatch.setattr(kb, "QUERY_PAIR", True)

    class _La:  # the attributes _query_pairs reads
        mode, cp, p = "chunk", None, {"d": 4, "dv": 3}
    need = dict(q=True, k=True, v=True, init=False)
    for chain, nz, want in ((C2, False, {1: 0, 0: 1}), (C2, True, {}), (C3, False, {2: 1, 1: 2}),
                            (C3, True, {})):
        steps = kb._plan(chain, need, {s.state: False for s in chain})
        assert kb._query_pairs(chain, _La, steps, nz) == want, (chain, nz)
    steps = kb._plan(C2, need, {s.state: False for s in C2})

    class _Cp(_La):  # context parallelism: the same plan (each term's carry is exchanged)
        cp = object()
    assert kb._query_pairs(C2, _Cp, steps, False) == {1: 0, 0: 1}
    # no dq wanted, recurrent mode, head size 1: one launch per stage (or none)
    no_q = kb._plan(C2, dict(need, q=False), {s.state: False for s in C2})
    assert kb._query_pairs(C2, _La, no_q, False) == {}

    class _Rec(_La):
        mode = "recurrent"

    class _One(_La):
        p = {"d": 4, "dv": 1}
    assert kb._query_pairs(C2, _Rec, steps, False) == {}
    assert kb._query_pairs(C2, _One, steps, False) == {}


def examples(ci: int, gpu: int = 10):
    if ON_GPU:
        return settings(max_examples=gpu, phases=[Phase.explicit, Phase.reuse, Phase.generate])
    return settings(max_examples=max(1, round(ci * settings.default.max_examples / 25)))


MAX_T = 160 if ON_GPU else 40
MAX_D = 40 if ON_GPU else 8


@pytest.mark.skipif(PROFILE == "ci", reason="drawn shapes: thorough and gpu profiles")
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("op", OPS)
@examples(ci=2)
@given(data=st.data())
def test_float64_grads_drawn_shapes(op, mode, data):
    T = data.draw(st.integers(1, MAX_T if mode == "chunk" or ON_GPU else 24), label="T")
    d = data.draw(st.integers(1, MAX_D), label="d")
    dv = data.draw(st.integers(1, MAX_D), label="dv")
    H = data.draw(st.integers(1, 3), label="H")
    gammas = data.draw(st.lists(st.floats(0.05, 1.0), min_size=H, max_size=H), label="gammas")
    normalize = data.draw(st.booleans(), label="normalize")
    cs = data.draw(st.sampled_from([16, 32, 64]), label="chunk_size")
    cut = data.draw(st.integers(0, T - 1), label="cut") if T > 1 else 0
    cu = [0, cut, T] if cut else None
    seg = data.draw(st.sampled_from([None, 1, 2]), label="segment_chunks") if mode == "chunk" else None
    form = "quadratic" if T <= 20 and max(d, dv) <= 8 else "autograd"
    note(f"worst {_check_vs_vjp(op, mode, 1 if cu else 2, T, H, d, dv, gammas, normalize, cu, cs, segment_chunks=seg, form=form)}")


# ---------------------------------------------------------------------------
# Initial state and final state: float64 autograd through the generated recurrence

def torch_recurrence(op, q, k, v, g, normalize, eps, init):
    """o (T, dv) and the final state {field: tensor} of one head by the token-by-token
    update of the generated reference module, on torch tensors (float64 autograd)."""
    mod = hla_core.module(op)
    parts = [mod.NUM] + ([mod.DEN] if normalize else [])
    d, dv = q.shape[1], v.shape[1]
    dims = {"d": d, "dv": dv, "1": 1}
    state = {}
    for part in parts:
        for name, shp in part["state"].items():
            state[name] = init[name] if init is not None else torch.zeros([dims[x] for x in shp], dtype=q.dtype)
    outs = [[] for _ in parts]
    one = torch.ones(1, dtype=q.dtype)
    for t in range(q.shape[0]):
        vec = {"q": q[t], "k": k[t], "v": v[t], "1": one}
        new = {}
        for part in parts:
            F = {f: torch.outer(vec[f[0]], vec[f[1]]) for f in part["factors"]}
            new.update(part["update"](state, F, g))
        state = new
        for i, part in enumerate(parts):
            outs[i].append(q[t] @ part["readout"](state))
    o = torch.stack(outs[0])
    if normalize:
        o = o / (torch.stack(outs[1]) + eps)
    return o, state


def _autograd_ref(op, q, k, v, do, gamma, normalize):
    """(dq, dk, dv) of one head by float64 autograd through torch_recurrence."""
    q, k, v = (x.double().requires_grad_(True) for x in (q, k, v))
    o, _ = torch_recurrence(op, q, k, v, gamma, normalize, 1e-6, None)
    (o * do.double()).sum().backward()
    return [x.grad.numpy() for x in (q, k, v)]


def _grad_scales(op, q, k, v, do, gamma, normalize, eps=1e-6):
    """Normalized operators: the gradient is the numerator channel's part (cotangent
    do / (D + eps)) plus the denominator channel's (cotangent -(do . o) / (D + eps)); where
    D >> eps (a one-token sequence, say) the two cancel to O(eps / D) of either, so the
    float64 check is relative to ||part N|| + ||part D|| (float64 autograd through the
    generated recurrence), the size of what was summed."""
    q, k, v = (x.double().requires_grad_(True) for x in (q, k, v))
    N, _ = torch_recurrence(op, q, k, v, gamma, False, eps, None)
    D = torch_recurrence(op, q, k, v[:, :1] * 0 + 1, gamma, False, eps, None)[0][:, 0]
    den = (D + eps).detach()
    o = (N / den[:, None]).detach()
    cN = do.double() / den[:, None]
    cD = -(do.double() * o).sum(-1) / den
    gN = torch.autograd.grad((N * cN).sum(), (q, k, v), allow_unused=True, retain_graph=True)
    gD = torch.autograd.grad((D * cD).sum(), (q, k, v), allow_unused=True)
    nrm = lambda g: 0.0 if g is None else float(g.norm())  # noqa: E731
    return [nrm(a) + nrm(b) for a, b in zip(gN, gD)]


def _random_state(op, N, H, d, dv, normalize, positive, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = hla_core.state_shapes(op, d, dv, normalize)
    fields = {}
    for name in STATE_CLS[op]._fields:
        if name not in shapes:
            fields[name] = None
            continue
        x = torch.rand((N, H) + tuple(shapes[name]), generator=g, dtype=F64)
        x = x if positive else 2 * x - 1
        fields[name] = x.to(DEVICE).requires_grad_(True)
    return STATE_CLS[op](**fields)


def _state_case(op, modes, T, cut, H, d, dv, gammas, normalize, cu, seed=1, chunk_size=16, segment_chunks=None):
    """Loss = sum o*do + sum <final state, dS> of one call (modes = (m,)) or of two calls
    handing the state over at token `cut` (modes = (m1, m2)); every gradient (q, k, v,
    initial state) against autograd through torch_recurrence."""
    N = len(cu) - 1 if cu else 1
    q, k, v, do = _inputs(1, T, H, d, dv, positive=normalize, seed=seed)
    for x in (q, k, v):
        x.requires_grad_(True)
    leaves = _random_state(op, N, H, d, dv, normalize, normalize, seed + 1)
    s0 = leaves
    gt = torch.tensor(gammas, dtype=F64)
    kw = dict(gamma=gt, normalize=normalize, chunk_size=chunk_size, output_final_state=True)
    if cu:
        kw["cu_seqlens"] = torch.tensor(cu, dtype=torch.int64, device=DEVICE)
    if len(modes) == 1:
        o, fin = FNS[(op, modes[0])](q, k, v, initial_state=s0, segment_chunks=segment_chunks, **kw) \
            if modes[0] == "chunk" and segment_chunks else FNS[(op, modes[0])](q, k, v, initial_state=s0, **kw)
    else:
        o1, mid = FNS[(op, modes[0])](q[:, :cut], k[:, :cut], v[:, :cut], initial_state=s0, **kw)
        o2, fin = FNS[(op, modes[1])](q[:, cut:], k[:, cut:], v[:, cut:], initial_state=mid, **kw)
        o = torch.cat([o1, o2], 1)
    g = torch.Generator().manual_seed(seed + 2)
    dS = {n: torch.randn(x.shape, generator=g, dtype=F64).to(DEVICE) for n, x in fin._asdict().items()
          if x is not None}
    loss = (o * do).sum() + sum((getattr(fin, n) * w).sum() for n, w in dS.items())
    loss.backward()
    # the reference, per sequence and head
    Q, K, V = (x.detach().cpu().clone().requires_grad_(True) for x in (q, k, v))
    L0 = {n: x.detach().cpu().clone().requires_grad_(True) for n, x in leaves._asdict().items() if x is not None}
    S0 = dict(L0)
    S0 = {n: x for n, x in S0.items() if x is not None}
    ref_loss = 0
    for n_, (lo, hi) in enumerate(_segments(T, cu)):
        for h in range(H):
            init = {name: x[n_, h] for name, x in S0.items()}
            o_r, fin_r = torch_recurrence(op, Q[0, lo:hi, h], K[0, lo:hi, h], V[0, lo:hi, h], gammas[h],
                                          normalize, 1e-6, init)
            ref_loss = ref_loss + (o_r * do[0, lo:hi, h].cpu()).sum()
            ref_loss = ref_loss + sum((fin_r[name] * w[n_, h].cpu()).sum() for name, w in dS.items())
    ref_loss.backward()
    for name, x, r in (("q", q, Q), ("k", k, K), ("v", v, V)):
        e = _rel(x.grad.cpu().numpy(), r.grad.numpy())
        assert e <= 1e-10, f"{op} {modes} d{name}: rel {e:.2e}"
    for name, x in L0.items():
        got = getattr(leaves, name).grad
        assert got is not None, f"no gradient for initial_state.{name}"
        e = _rel(got.cpu().numpy(), x.grad.numpy())
        assert e <= 1e-10, f"{op} {modes} d initial_state.{name}: rel {e:.2e}"


STATE_CASES = [  # (op, modes, normalize, cu_seqlens)
    ("hla2", ("chunk",), True, [0, 11, 20]), ("ahla", ("chunk",), True, None),
    ("hla3", ("chunk",), False, [0, 9, 20]), ("hla2", ("recurrent",), False, None),
    ("ahla", ("recurrent",), False, [0, 3, 7]), ("hla3", ("recurrent",), True, None),
    ("hla2", ("chunk", "recurrent"), True, None),
]


@pytest.mark.parametrize("op,modes,normalize,cu", STATE_CASES)
def test_state_gradients_equal_autograd_of_the_recurrence(op, modes, normalize, cu):
    """Initial-state gradients, final-state cotangents, and the chunk -> recurrent hand-off
    (gradients through the handed-over state), float64, <= 1e-10 relative."""
    T = (cu[-1] if cu else 20) if "chunk" in modes else (cu[-1] if cu else 7)
    if len(modes) == 2:
        T = 12
    _state_case(op, modes, T, 5, 2, 3, 2, [0.8, 0.95], normalize, cu)


def test_state_gradients_with_sequence_segments():
    """Reversed LAs started from the final-state cotangent (SHIFT) across several segments."""
    _state_case("hla3", ("chunk",), 40, 0, 1, 3, 2, [0.9], True, None, segment_chunks=1)


def test_gradcheck_tiny():
    """torch.autograd.gradcheck (fast mode, float64), normalized, with the initial and the
    final state among inputs and outputs (ci: chunk_hla2 without the state; others: all)."""
    ops = [("hla2", "chunk")] if PROFILE == "ci" else list(FNS)
    for op, mode in ops:
        q, k, v, _ = _inputs(1, 5, 1, 2, 2, positive=True, seed=3)
        s0 = _random_state(op, 1, 1, 2, 2, True, True, 4)
        names = [n for n, x in s0._asdict().items() if x is not None] if PROFILE != "ci" else []

        def f(q, k, v, *fields):
            st0 = STATE_CLS[op](**dict(zip(names, fields))) if names else None
            o, fin = FNS[(op, mode)](q, k, v, gamma=0.8, normalize=True, chunk_size=16, initial_state=st0,
                                     output_final_state=bool(names))
            return (o,) + tuple(getattr(fin, n) for n in names)
        args = [x.requires_grad_(True) for x in (q, k, v)] + [getattr(s0, n) for n in names]
        assert torch.autograd.gradcheck(f, args, fast_mode=True, eps=1e-6, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------
# Rounding: nonnegative inputs, the backward error bound

def _model_op(op):
    return "hla3" if op == "hla3" else None


LOW = [torch.float32] + ([torch.bfloat16, torch.float16] if ON_GPU else [])


@pytest.mark.parametrize("dtype", LOW, ids=lambda x: str(x).split(".")[-1])
@pytest.mark.parametrize("op,mode", [("hla2", "chunk"), ("ahla", "chunk"), ("hla3", "chunk"),
                                     ("hla3", "recurrent")] if ON_GPU else [("hla2", "chunk")])
def test_low_precision_gradients_within_the_bound(op, mode, dtype):
    T, H, d = (300, 2, 64) if ON_GPU else (24, 1, 6)
    gamma, C = 0.95, 64
    q, k, v, do = _inputs(1, T, H, d, d, positive=True, seed=7)
    q, k, v = (x / d ** 0.5 for x in (q, k, v))
    grads = {}
    for dt in (F64, dtype):
        xs = [x.to(dt).requires_grad_(True) for x in (q.to(dtype).double(), k.to(dtype).double(),
                                                     v.to(dtype).double())]
        o, _ = FNS[(op, mode)](*xs, gamma=gamma, chunk_size=C)
        (o * do.to(dtype).to(dt)).sum().backward()
        assert all(x.grad.dtype == dt for x in xs)
        grads[dt] = [x.grad.double() for x in xs]
    rho = error_model.backward_normwise_coefficient(dtype, T=T, d=d, chunk_size=C, gamma=gamma, op=_model_op(op))
    for name, g, r in zip("qkv", grads[dtype], grads[F64]):
        for h in range(H):
            e = _rel(g[0, :, h].cpu().numpy(), r[0, :, h].cpu().numpy())
            assert e <= rho, f"{op} {mode} {dtype} d{name} head {h}: rel {e:.2e} > bound {rho:.2e}"


@pytest.mark.parametrize("dtype", LOW, ids=lambda x: str(x).split(".")[-1])
@pytest.mark.parametrize("op,mode", [("hla2", "chunk"), ("ahla", "chunk"), ("hla3", "chunk"),
                                     ("hla2", "recurrent")] if ON_GPU else [("hla3", "chunk")])
def test_low_precision_gradients_within_the_elementwise_bound(op, mode, dtype):
    """Random-sign inputs: every gradient entry inside the element-wise backward bound,
    relative to the gradient on absolute values (float64 kernel on |q|, |k|, |v|, |do|)."""
    T, H, d = (300, 2, 64) if ON_GPU else (40, 1, 5)
    gamma, C = 0.9, 64 if ON_GPU else 16
    q, k, v, do = _inputs(1, T, H, d, d, seed=11)
    q, k, v = (x / d ** 0.5 for x in (q, k, v))
    q, k, v, do = (x.to(dtype).double() for x in (q, k, v, do))

    def grads(xs, dt, cot):
        xs = [x.detach().to(dt).clone().requires_grad_(True) for x in xs]
        o, _ = FNS[(op, mode)](*xs, gamma=gamma, chunk_size=C)
        (o * cot.to(dt)).sum().backward()
        return [x.grad.double().cpu().numpy() for x in xs]
    got = grads((q, k, v), dtype, do)
    ref = grads((q, k, v), F64, do)
    gabs = grads((q.abs(), k.abs(), v.abs()), F64, do.abs())
    for name, g, r, ga in zip("qkv", got, ref, gabs):
        bound = error_model.gradient_bound(dtype, g_ref=r, g_abs=ga, T=T, d=d, chunk_size=C,
                                           gamma=gamma, op=_model_op(op))
        err = np.abs(g - r)
        i = np.unravel_index(np.argmax(err / bound), err.shape)
        assert np.all(err <= bound), (f"{op} {mode} {dtype} d{name}: |err| {err[i]:.3e} > bound {bound[i]:.3e} "
                                      f"at {i} (|g|abs {ga[i]:.3e})")


# ---------------------------------------------------------------------------
# Arguments and conventions

@pytest.mark.parametrize("fn", [kernels.chunk_ahla, kernels.fused_recurrent_hla3])
def test_gamma_that_requires_grad_raises(fn):
    q, k, v, _ = _inputs(1, 4, 2, 3, 2)
    g = torch.tensor([0.5, 0.9], dtype=F64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="gamma requires grad.*constant"):
        fn(q.requires_grad_(True), k, v, gamma=g)
    with torch.no_grad():
        fn(q, k, v, gamma=g)
    fn(q.detach(), k, v, gamma=g.detach())


@pytest.mark.parametrize("bad,exc", [("0.5", TypeError), (float("nan"), ValueError), (True, TypeError),
                                     (float("inf"), ValueError)])
def test_bad_scale_raises(bad, exc):
    q, k, v, _ = _inputs(1, 4, 1, 3, 2)
    with pytest.raises(exc, match="scale must be"):
        kernels.chunk_hla2(q, k, v, scale=bad)


def test_scale_multiplies_q():
    """scale s: the same output as q -> s q, gradients dq = s dq(s q)."""
    q, k, v, do = _inputs(1, 17, 2, 4, 3, seed=5)
    s = 0.37
    q1 = q.clone().requires_grad_(True)
    o1, _ = kernels.chunk_ahla(q1, k, v, gamma=0.9, scale=s, chunk_size=16)
    (o1 * do).sum().backward()
    q2 = (q * s).requires_grad_(True)
    o2, _ = kernels.chunk_ahla(q2, k, v, gamma=0.9, chunk_size=16)
    (o2 * do).sum().backward()
    assert _rel(o1.detach().cpu(), o2.detach().cpu()) <= 1e-13
    assert _rel(q1.grad.cpu(), s * q2.grad.cpu()) <= 1e-13


def test_autocast_computes_in_the_autocast_dtype():
    """Under torch.autocast(bf16) fp32 inputs are cast: output in bf16, gradients in fp32;
    float64 inputs are left in float64."""
    q, k, v, do = _inputs(1, 18, 1, 4, 4, positive=True, seed=6)
    xs = [x.float().requires_grad_(True) for x in (q, k, v)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        o, fin = kernels.chunk_hla2(*xs, gamma=0.9, chunk_size=16, output_final_state=True)
    assert o.dtype == torch.bfloat16 and fin.KK.dtype == torch.float32
    (o.float() * do.float()).sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.float32 for x in xs)
    want, _ = kernels.chunk_hla2(*(x.detach().bfloat16() for x in xs), gamma=0.9, chunk_size=16)
    assert torch.equal(o, want)
    xd = [x.requires_grad_(True) for x in (q.clone(), k.clone(), v.clone())]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        od, _ = kernels.fused_recurrent_hla2(*xd, gamma=0.9)
    assert od.dtype == F64


# ---------------------------------------------------------------------------
# The autograd contract: what autograd saves, in-place changes, double backward, overflow

@pytest.mark.parametrize("op,mode", [("hla2", "chunk"), ("hla3", "recurrent")])
@pytest.mark.parametrize("changed", ["q", "k", "v"])
def test_input_changed_in_place_after_the_forward_raises(op, mode, changed):
    """As for torch's own ops: the backward needs q, k, v, and changing one in place
    between forward and backward is autograd's error, never silently wrong gradients."""
    q, k, v, do = _inputs(1, 9, 1, 3, 2, seed=11)
    xs = dict(q=q.requires_grad_(True), k=k.requires_grad_(True), v=v.requires_grad_(True))
    o, _ = FNS[(op, mode)](xs["q"], xs["k"], xs["v"], gamma=0.9, chunk_size=16)
    with torch.no_grad():
        xs[changed].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (o * do).sum().backward()


@pytest.mark.parametrize("op,mode", [("hla2", "chunk"), ("hla3", "chunk"), ("ahla", "recurrent")])
def test_backward_reads_only_what_autograd_saved(op, mode):
    """Every tensor the backward reads goes through saved-tensor hooks (what
    torch.autograd.graph.save_on_cpu and checkpointing rely on): with the token tensors
    replaced by zeros on unpacking, every gradient is exactly zero (each VJP term has a
    saved token factor); a tensor kept outside save_for_backward would leave some nonzero.
    With hooks that pass values through, the gradients are those of a run without hooks."""
    q, k, v, do = _inputs(1, 20, 2, 3, 4, seed=12)
    B, T, H = q.shape[:3]

    def grads(unpack):
        xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
            o, _ = FNS[(op, mode)](*xs, gamma=0.9, chunk_size=16)
        (o * do).sum().backward()
        return [x.grad for x in xs]

    plain = grads(lambda t: t)
    assert all(float(g.abs().max()) > 0 for g in plain)
    zeroed = grads(lambda t: torch.zeros_like(t) if t.dim() == 4 and tuple(t.shape[:3]) == (B, T, H) else t)
    for name, g in zip("qkv", zeroed):
        assert float(g.abs().max()) == 0.0, f"d{name} read a tensor that autograd did not save"
    xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o, _ = FNS[(op, mode)](*xs, gamma=0.9, chunk_size=16)
    (o * do).sum().backward()
    for a, b in zip(plain, (x.grad for x in xs)):
        assert torch.equal(a, b)


def test_double_backward_raises_and_create_graph_is_unaffected():
    """The gradients are not differentiable: building on them under create_graph=True (a
    gradient penalty) raises rather than silently dropping the term; a create_graph=True
    backward that does not differentiate them gives the usual gradients."""
    q, k, v, do = _inputs(1, 9, 1, 3, 2, seed=13)
    xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o, _ = kernels.chunk_hla2(*xs, gamma=0.9, chunk_size=16)
    gq, gk, gv = torch.autograd.grad((o * do).sum(), xs, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable.*double backward"):
        (gq.pow(2).sum() + gk.sum()).backward()
    ys = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o2, _ = kernels.chunk_hla2(*ys, gamma=0.9, chunk_size=16)
    want = torch.autograd.grad((o2 * do).sum(), ys)
    for a, b in zip((gq, gk, gv), want):
        assert torch.equal(a.detach(), b)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_cotangent_propagates(bad):
    """A non-finite cotangent is not an error: it reaches the gradients (as through torch's
    own ops), which is how torch.amp.GradScaler detects an fp16 overflow and skips the step."""
    q, k, v, do = _inputs(1, 9, 1, 3, 2, seed=14)
    do[0, 4, 0, 1] = bad
    xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o, _ = kernels.chunk_ahla(*xs, gamma=0.9, chunk_size=16)
    o.backward(do)
    assert not all(bool(torch.isfinite(x.grad).all()) for x in xs)
