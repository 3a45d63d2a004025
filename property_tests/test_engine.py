"""The engine on operators it has never seen, ⊕ on random segments, and its proofs' power to fail."""
import dataclasses
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import sympy
from hypothesis import given, strategies as st

from derivations import OutOfReach, Pattern, PatternError, derive
from derivations.definitions import brute_numeric
from derivations.proofs import prove_associativity, prove_combine, prove_streaming
from derivations.summaries import Term
from hla_core import runtime
from hla_core.error_model import output_bound

ROOT = Path(__file__).resolve().parent.parent
LETTERS = "iujwx"


@st.composite
def patterns(draw, max_factors=4):
    """Random chains of 1-4 factors (an index may come back: sandwich maps), random
    order relations, random decay."""
    n = draw(st.integers(1, max_factors))
    chain = []
    for pos in range(n):
        fresh = LETTERS[len(set(chain))]
        back = [x for x in set(chain) if x != (chain[-1] if chain else None)]
        chain.append(draw(st.sampled_from(back + [fresh] * 3)) if back else fresh)
    idx = list(dict.fromkeys(chain))
    vec = lambda: draw(st.sampled_from("qk"))
    dots, prev = [], ("t", vec())
    for x in chain:
        a = vec()
        dots.append(f"dot({prev[1]}_{prev[0]},{a}_{x})")
        prev = (x, vec())
    expr = " * ".join(dots + [f"v_{chain[-1]}"])
    clauses = []
    for x in idx:
        clauses.append(f"{x} {draw(st.sampled_from(['<=', '<=', '<']))} t")
    for a, b in zip(idx, idx[1:]):
        rel = draw(st.sampled_from(["", "<=", ">=", "<", ">"]))
        if rel:
            clauses.append(f"{a} {rel} {b}")
    # fractional coefficients too: γ^(1/2) etc. must work end to end, not only prove
    decay = " + ".join(f"{draw(st.sampled_from(['0', '1', '2', '1/2', '3/2']))}*(t-{x})" for x in idx)
    return Pattern(expr, where=", ".join(clauses), decay=decay)


@given(p=patterns(), seed=st.integers(0, 10**6), normalize=st.booleans())
def test_unseen_patterns_derive_prove_and_match_brute_force(p, seed, normalize):
    try:
        d = derive(p, exact_T=3, gradients=False)   # gradients: test_gradients.py
    except OutOfReach as exc:
        assert "engine does not synthesize" in str(exc)
        return
    failed = [c for c in d.certificates if not c.holds]
    assert not failed, [(c.identity, c.details) for c in failed]
    rng = np.random.default_rng(seed)
    T, dd, dv = 6, 2, 2
    q, k, v = rng.standard_normal((T, dd)), rng.standard_normal((T, dd)), rng.standard_normal((T, dv))
    g = 0.7 if p.has_decay else 1.0
    num = brute_numeric(p, q, k, v, g).astype(float)
    den = brute_numeric(p.denominator(), q, k, np.ones((T, 1)), g).astype(float)[:, 0]
    want = num / (den[:, None] + 1e-6) if normalize else num
    num_abs = brute_numeric(p, np.abs(q), np.abs(k), np.abs(v), g).astype(float)
    den_abs = brute_numeric(p.denominator(), np.abs(q), np.abs(k), np.ones((T, 1)), g).astype(float)[:, 0]
    # brute force and generated code are each within the model's bound of the exact value
    tol = 2 * output_bound("float64", o_ref=want, num_abs=num_abs, T=T, d=dd, chunk_size=4, gamma=g,
                           normalize=normalize, den_ref=den, den_abs=den_abs)
    for form in ("quadratic", "recurrent", "chunked"):
        got = d.reference(form)(q, k, v, gamma=g, normalize=normalize, chunk_size=4)
        assert np.all(np.abs(got - want) <= tol), form


@pytest.mark.parametrize("op", ["hla2", "ahla", "hla3", "hla2_unmasked", "hla3_unmasked"])
@given(cuts=st.lists(st.integers(1, 11), min_size=2, max_size=2, unique=True), seed=st.integers(0, 999),
       gamma=st.floats(0.3, 1.0))
def test_combine_associative_on_random_segments(op, cuts, seed, gamma):
    """Summaries of three random segments: (A⊕B)⊕C = A⊕(B⊕C) = the summary of ABC."""
    import hla_core
    mod = hla_core.module(op)
    part = mod.NUM
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((12, 3)), rng.standard_normal((12, 3)), rng.standard_normal((12, 2))
    a, b = sorted(cuts)
    be = runtime.Backend("numpy")
    segs = [(0, a), (a, b), (b, 12)]
    names = part["scan"]
    summ = [{n: runtime.masked_sum(part["specs"][n], q[lo:hi], k[lo:hi], v[lo:hi], gamma, be, per_t=False)
             for n in names} for lo, hi in segs]
    rho = [gamma ** (hi - lo) for lo, hi in segs]
    comb = part["combine_scan"]
    left = comb(comb(summ[0], summ[1], rho[1]), summ[2], rho[2])
    right = comb(summ[0], comb(summ[1], summ[2], rho[2]), rho[1] * rho[2])
    whole = {n: runtime.masked_sum(part["specs"][n], q, k, v, gamma, be, per_t=False) for n in names}
    absw = {n: runtime.masked_sum(part["specs"][n], np.abs(q), np.abs(k), np.abs(v), gamma, be, per_t=False)
            for n in names}
    from hla_core.error_model import beta
    for n in names:
        tol = 4 * beta("float64", 12, 3, 12, gamma) * absw[n]
        assert np.all(np.abs(left[n] - whole[n]) <= tol)
        assert np.all(np.abs(right[n] - whole[n]) <= tol)


@pytest.mark.parametrize("op", ["hla2", "ahla", "hla3", "hla2_unmasked", "hla3_unmasked"])
@given(cuts=st.lists(st.integers(1, 13), max_size=5, unique=True), seed=st.integers(0, 999))
def test_random_segmentations_give_the_same_state(op, cuts, seed):
    """Any segmentation of one sequence, folded with ⊕ left to right, gives the serial state."""
    import hla_core
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((14, 2)), rng.standard_normal((14, 2)), rng.standard_normal((14, 2))
    _, serial = hla_core.evaluate(op, q, k, v, gamma=0.9, return_state=True)
    bounds = [0] + sorted(cuts) + [14]
    state = None
    for lo, hi in zip(bounds, bounds[1:]):
        _, state = hla_core.evaluate(op, q[lo:hi], k[lo:hi], v[lo:hi], form="chunked", gamma=0.9,
                                     chunk_size=3, initial_state=state, return_state=True)
    _, absolute = hla_core.evaluate(op, np.abs(q), np.abs(k), np.abs(v), gamma=0.9, return_state=True)
    from hla_core.error_model import beta
    for n in serial:
        assert np.all(np.abs(state[n] - serial[n]) <= 2 * beta("float64", 14, 2, 3, 0.9) * absolute[n])


# --- the proofs can fail ------------------------------------------------------

HLA2 = Pattern("dot(q_t,k_i) * dot(k_i,q_j) * v_j", where="i <= j <= t", decay="(t-i) + (t-j)")


def test_proofs_reject_a_wrong_combine():
    d = derive(HLA2, prove=False)
    syn = d.num
    bad = dict(syn.combine)
    bad["KK_QV"] = [t for t in bad["KK_QV"] if len(t.seq) != 2]          # drop the cross term
    broken = dataclasses.replace(syn, combine=bad)
    assert not prove_combine(broken, "numerator", True).holds
    assert prove_combine(syn, "numerator", True).holds


def test_proofs_reject_a_wrong_decay_power():
    d = derive(HLA2, prove=False)
    syn = d.num
    bad = dict(syn.stream)
    bad["KK_QV"] = [Term(sympy.Symbol("gamma", positive=True), t.seq) if t.coef != 1 and len(t.seq) == 1
                    else t for t in bad["KK_QV"]]
    broken = dataclasses.replace(syn, stream=bad)
    assert not prove_streaming(broken, "numerator", True).holds
    assert prove_streaming(broken, "numerator", False).holds   # the same update is right at γ = 1


def test_proofs_reject_a_non_associative_combine():
    d = derive(HLA2, prove=False)
    syn = d.num
    bad = dict(syn.combine)
    rho = sympy.Symbol("rho_B", positive=True)
    bad["KK_QV"] = [Term(rho ** 3, t.seq) if len(t.seq) == 2 else t for t in bad["KK_QV"]]
    assert not prove_associativity(dataclasses.replace(syn, combine=bad), "numerator", True).holds


def test_the_summaries_are_smaller_than_the_papers():
    d = derive(Pattern("dot(q_t,k_i)*dot(k_i,q_u)*dot(q_u,k_j)*v_j", where="i<=u, j<=u, u<=t"), gradients=False)
    assert sorted(d.num.stream_state) == ["KK", "KK_QQ_KV", "KV"]
    assert not any(s.holes for s in d.num.summaries.values())


def test_sandwich_summaries_are_synthesized():
    d = derive(Pattern("dot(q_t,k_i)*dot(k_i,q_j)*dot(q_j,k_i)*v_i", where="i<=j<=t"), gradients=False)
    assert d.proved
    assert any(s.holes for s in d.num.summaries.values())


def test_crossing_components_are_out_of_reach():
    p = Pattern("dot(q_t,k_i)*dot(k_i,q_j)*dot(q_j,k_i)*dot(k_i,q_j)*v_j", where="i <= t, j <= t")
    with pytest.raises(OutOfReach, match="engine does not synthesize"):
        derive(p)


# --- malformed patterns ------------------------------------------------------------

@pytest.mark.parametrize("kwargs, arg, text", [
    (dict(expr=""), "expr", "non-empty"),
    (dict(expr="dot(q_t,k_i) * v_j"), "expr", "chain"),
    (dict(expr="dot(q_t,k_i) * dot(k_i,q_j)"), "expr", "no value row"),
    (dict(expr="dot(q_t,k_i) * v_i * v_i"), "expr", "exactly one value"),
    (dict(expr="dot(q_t,k_i * v_i"), "expr", "unbalanced"),
    (dict(expr="dot(q_t,x_i) * v_i"), "expr", "expected a vector"),
    (dict(expr="dot(q_i,k_j) * v_j"), "expr", "output index t"),
    (dict(expr="dot(q_t,k_i) * v_i", where="i <= j"), "where", "does not occur"),
    (dict(expr="dot(q_t,k_i) * v_i", where="i =< t"), "where", ""),
    (dict(expr="dot(q_t,k_i) * v_i", where="i <= j <= t"), "where", "does not occur"),
    (dict(expr="dot(q_t,k_i) * v_i", where="i <= t", decay="t*i"), "decay", "linear"),
    (dict(expr="dot(q_t,k_i) * v_i", where="i <= t", decay="t"), "decay", "differences"),
    (dict(expr="dot(q_t,k_i) * v_i", where="i <= t", decay="i-t"), "decay", "negative"),
    (dict(expr="dot(q_t,k_i) * v_i", where="i <= t", decay="t-z"), "decay", "unknown"),
    (dict(expr="dot(q_t,k_and) * v_and", where="and <= t"), "expr", "'and'"),
    (dict(expr=" * ".join(["dot(q_t,k_i)"] + ["dot(q_i,k_i)"] * 12 + ["v_i"])), "expr", "at most"),
])
def test_malformed_patterns_are_rejected(kwargs, arg, text):
    with pytest.raises(PatternError) as exc:
        Pattern(**kwargs)
    assert str(exc.value).startswith(arg + ":")
    assert text in str(exc.value)


def test_indices_are_causal_without_saying_so():
    a = Pattern("dot(q_t,k_i) * dot(k_i,q_j) * v_j")
    b = Pattern("dot(q_t,k_i) * dot(k_i,q_j) * v_j", where="i <= t, j <= t")
    assert set(a.constraints) == set(b.constraints)


def test_derive_rejects_non_patterns():
    with pytest.raises(TypeError, match="pattern"):
        derive("dot(q_t,k_i) * v_i")


def test_reference_rejects_bad_form_and_backend():
    d = derive(HLA2, prove=False)
    with pytest.raises(ValueError, match="form"):
        d.reference("fast")
    with pytest.raises(ValueError, match="backend"):
        d.reference("recurrent", "cuda")


# --- the paper's verdicts ------------------------------------------------------------

def test_failed_claim_counterexample_recomputes():
    """sec4.3: recompute the paper's decayed recurrence by hand on the stored inputs."""
    c = {c["id"]: c for c in json.loads((ROOT / "docs" / "paper_claims.json").read_text())}[
        "sec4.3-decay-masked-operator"]["counterexample"]
    F = lambda a: np.array([[Fraction(x) for x in row] for row in a], dtype=object)
    q, k, v, g = F(c["q"]), F(c["k"]), F(c["v"]), Fraction(c["gamma"])
    d, dv = q.shape[1], v.shape[1]
    S = np.zeros((d, d), dtype=object) * Fraction(0)
    C = np.zeros((d, dv), dtype=object) * Fraction(0)
    G = np.zeros((d, dv), dtype=object) * Fraction(0)
    for t in range(c["at_token"]):
        G = g * G + np.outer(k[t], k[t]) @ C          # uses C_{t-1}
        S = g * S + np.outer(k[t], k[t])
        C = g * C + np.outer(q[t], v[t])
    paper = q[c["at_token"] - 1] @ (S @ C - G)
    want = brute_numeric(HLA2, q, k, v, g)[c["at_token"] - 1]
    assert [str(x) for x in paper] == c["claimed"]
    assert [str(x) for x in want] == c["definition"]
    assert list(paper) != list(want)


# --- engine defects that once slipped through (issue 9) ------------------------------

FIVE = Pattern("dot(q_t,k_i)*dot(k_i,q_j)*dot(q_j,k_u)*dot(k_u,q_w)*v_w", where="i<j<u<w<t",
               decay="(t-i)+(t-j)+(t-u)+(t-w)")


def test_translation_is_proved_for_every_T(monkeypatch):
    """A pattern that needs five distinct positions is invisible to the T ≤ 4 exact check:
    only the universal translation certificate links the top summary to the Pattern."""
    from derivations import summaries
    d = derive(FIVE, gradients=False)
    assert d.proved
    assert [c.holds for c in d.certificates if c.identity.startswith("translation")] == [True, True]
    real = summaries.make_summary

    def doubled(slots, pairs, decay):   # the translation doubles every decay coefficient
        return real(slots, pairs, {x: 2 * c for x, c in decay.items()})
    monkeypatch.setattr(summaries, "pattern_summary",
                        lambda p: doubled([("f", s.factor, s.var) for s in p.slots],
                                          [(summaries.END if c.a == "t" else c.a, c.op,
                                            summaries.END if c.b == "t" else c.b) for c in p.constraints],
                                          dict(p.decay_coeffs)))
    bad = derive(FIVE, gradients=False)
    failed = {c.identity.split(" (")[0] for c in bad.certificates if not c.holds}
    assert failed == {"translation"}       # every other certificate starts from the wrong summary


def _brute_mp(p: Pattern, q, k, v, gamma, dps=40):
    """o_t from the Pattern's own definition in mpmath (any rational decay)."""
    import mpmath
    with mpmath.workdps(dps):
        g = mpmath.mpf(gamma)
        vec = {"q": q, "k": k, "v": v}
        T = q.shape[0]
        out = []
        for t in range(T):
            acc = np.array([mpmath.mpf(0)] * vec[p.slots[-1].out_vec].shape[1], dtype=object)
            for val, expo in p.valuations(range(T), t):
                x = np.array([mpmath.mpf(float(e)) for e in vec[p.t_vec][t]], dtype=object)
                for s in p.slots:
                    a = np.array([mpmath.mpf(float(e)) for e in vec[s.in_vec][val[s.var]]], dtype=object)
                    b = np.array([mpmath.mpf(float(e)) for e in vec[s.out_vec][val[s.var]]], dtype=object)
                    x = np.dot(x, a) * b
                acc = acc + g ** (mpmath.mpf(expo.numerator) / expo.denominator) * x
            out.append(acc)
        return np.array(out)


@pytest.mark.parametrize("name", ["end", "t0", "x0", "x1", "y1", "p1", "gamma", "rhoB", "g", "I", "oo", "pi", "R", "F", "S"])
def test_index_names_cannot_collide_with_internal_names(name):
    """Any index name gives the operator it says (`end` once gave wrong references)."""
    p = Pattern(f"dot(q_t,k_i) * dot(k_i,q_{name}) * v_{name}", where=f"i < {name} <= t",
                decay=f"(t-i) + 2*(t-{name})")
    ref = Pattern("dot(q_t,k_i) * dot(k_i,q_j) * v_j", where="i < j <= t", decay="(t-i) + 2*(t-j)")
    d = derive(p)
    assert d.proved
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((6, 2)), rng.standard_normal((6, 2)), rng.standard_normal((6, 2))
    want = np.array(_brute_mp(ref, q, k, v, 0.8), dtype=float)
    for form in ("quadratic", "recurrent", "chunked"):
        got = d.reference(form, "mpmath")(q, k, v, gamma=0.8, chunk_size=4)
        assert np.allclose(np.array(got, dtype=float), want, rtol=1e-12, atol=1e-12), form


@pytest.mark.parametrize("decay", ["(t-i)/2", "(t-i)/3 + 2*(t-j)/3", "0.25*(t-i) + 1.5*(t-j)"])
@pytest.mark.parametrize("backend", ["numpy", "mpmath"])
def test_fractional_decays_work_end_to_end(decay, backend):
    """γ^(1/2), γ^(1/3): every form and backend equals the brute-force sum in mpmath."""
    p = Pattern("dot(q_t,k_i) * dot(k_i,q_j) * v_j", where="i <= j <= t", decay=decay)
    d = derive(p)
    assert d.proved
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((7, 2)), rng.standard_normal((7, 2)), rng.standard_normal((7, 3))
    want = np.array(_brute_mp(p, q, k, v, 0.6), dtype=float)
    tol = 1e-30 if backend == "mpmath" else 1e-12
    for form in ("quadratic", "recurrent", "chunked"):
        got = np.array(d.reference(form, backend)(q, k, v, gamma=0.6, chunk_size=3, dps=40), dtype=float)
        assert np.max(np.abs(got - want)) <= tol * max(1.0, np.max(np.abs(want))), form
    if backend == "mpmath":   # the exponent 1/3 itself must not be rounded to float64
        import mpmath
        got = d.reference("recurrent", "mpmath")(q, k, v, gamma=0.6, dps=40)
        exact = _brute_mp(p, q, k, v, 0.6, dps=40)
        with mpmath.workdps(40):
            assert max(abs(a - b) for a, b in zip(got.ravel(), exact.ravel())) < mpmath.mpf(10) ** -30


def test_decay_strings_are_parsed_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for decay in ['__import__("pathlib").Path("x").touch() or (t-i)',
                  '(lambda: __import__("pathlib").Path("x").touch())() or (t-i)',
                  'open("x", "w").write("1") or (t-i)']:
        with pytest.raises(PatternError, match="^decay:"):
            Pattern("dot(q_t,k_i) * v_i", decay=decay)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("decay", ["sqrt(2)*(t-i)", "(t-i)/0", "nan", "oo*(t-i)", "I*(t-i)",
                                   "1e400*(t-i)", "lambda: 1", "(t-i)**2", "2**(t-i)", "(t-i) if 1 else 0",
                                   "[t-i]", "'t-i'", "True*(t-i)", "(t-i)/(t-i)", "t-i)", "10**7*(t-i)",
                                   "(t-i)/10000000", "-(t-i)", "x.y*(t-i)"])
def test_malformed_decays_name_the_argument(decay):
    with pytest.raises(PatternError) as exc:
        Pattern("dot(q_t,k_i) * v_i", where="i <= t", decay=decay)
    assert str(exc.value).startswith("decay:"), str(exc.value)


@pytest.mark.parametrize("decay, coeff", [("(t-i)", 1), ("2*(t-i)", 2), ("(t-i)*3/2", Fraction(3, 2)),
                                          ("0.5*(t-i)", Fraction(1, 2)), ("-(i-t)", 1), ("t - i + 0", 1),
                                          ("(2*t - 2*i)/4", Fraction(1, 2)), ("+(t-i)", 1)])
def test_wellformed_decays_parse_exactly(decay, coeff):
    assert dict(Pattern("dot(q_t,k_i) * v_i", decay=decay).decay_coeffs) == {"i": coeff}


def _expr_value(expr: str, val: dict, vec: dict, expo, gamma):
    """The expression text evaluated literally: the product of its dots times its value
    row (independent of the chain parser)."""
    import re
    x = None
    for tok in expr.split("*"):
        tok = tok.strip()
        m = re.fullmatch(r"dot\(([qk])_(\w+),([qk])_(\w+)\)", tok.replace(" ", ""))
        if m:
            a, ia, b, ib = m.groups()
            s = vec[a][val[ia]] @ vec[b][val[ib]]
        else:
            s = vec["v"][val[tok.split("_")[1]]]
        x = s if x is None else x * s
    return gamma ** float(expo) * x


@given(p=patterns(), order=st.randoms(use_true_random=False), seed=st.integers(0, 999))
def test_the_order_of_the_dot_factors_does_not_matter(p, order, seed):
    """A product is a product: shuffle the factors and the arguments of each dot, and the
    parsed chain still computes the expression as written."""
    import re
    factors = [f.strip() for f in p.expr.split(" * ")]
    order.shuffle(factors)
    factors = [re.sub(r"dot\((\w+),(\w+)\)", r"dot(\2,\1)", f) if order.random() < 0.5 else f
               for f in factors]
    expr = " * ".join(factors)
    shuffled = Pattern(expr, where=p.where, decay=p.decay)
    rng = np.random.default_rng(seed)
    T = 4
    vec = {"q": rng.standard_normal((T, 2)), "k": rng.standard_normal((T, 2)), "v": rng.standard_normal((T, 2))}
    got = brute_numeric(shuffled, vec["q"], vec["k"], vec["v"], 0.7).astype(float)
    for t in range(T):
        want = sum((_expr_value(expr, val, vec, e, 0.7) for val, e in shuffled.valuations(range(T), t)),
                   np.zeros(2))
        assert np.allclose(got[t], want, rtol=1e-12, atol=1e-12)


def test_a_self_dot_may_come_anywhere_in_the_product():
    a = Pattern("dot(q_t,k_i) * dot(k_i,q_j) * dot(q_i,k_i) * v_j", where="i <= j <= t")
    b = Pattern("dot(q_t,k_i) * dot(q_i,k_i) * dot(k_i,q_j) * v_j", where="i <= j <= t")
    assert derive(a).proved and derive(b).proved
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((5, 2)), rng.standard_normal((5, 2)), rng.standard_normal((5, 2))
    assert np.allclose(derive(a, prove=False).reference("chunked")(q, k, v, chunk_size=2),
                       derive(b, prove=False).reference("chunked")(q, k, v, chunk_size=2), rtol=1e-12)
