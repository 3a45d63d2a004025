"""Generated references: quadratic ≡ recurrent ≡ chunked, float64 and mpmath, state hand-off.

Tolerances come from hla_core.error_model: `output_bound` is the forward bound of a
float64 evaluation against the *exact* output, element-wise, proportional to the
operator evaluated on absolute values (normalized outputs: through the denominator
margin). Two float64 evaluations are each within that bound of the exact value, so
they differ by at most twice it (factor 2); one float64 evaluation against an exact
value uses factor 1.
"""
from fractions import Fraction

import mpmath
import numpy as np
import pytest
from hypothesis import given, strategies as st

import hla_core
from derivations.definitions import brute_numeric
from hla_core.error_model import UNIT_ROUNDOFF, beta, output_bound

OPS = sorted(hla_core.OPERATORS)
FORMS = ("quadratic", "recurrent", "chunked")
EPS = 1e-6           # the default eps of hla_core.evaluate, used by every normalized run here
DPS_EXACT = 50       # the brute-force sums
DPS_FORMS = 30       # the generated forms on the mpmath backend


def model_op(op):
    """The error model's constants: third-order ones for the hla3 operators."""
    return "hla3" if op.startswith("hla3") else None


@st.composite
def problems(draw, min_T=1, max_T=10):
    T = draw(st.integers(min_T, max_T))
    d = draw(st.integers(1, 4))
    dv = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3]))
    q, k, v = (rng.standard_normal((T, n)) * scale for n in (d, d, dv))
    gamma = draw(st.one_of(st.just(1.0), st.floats(0.25, 1.0)))
    # a split strictly inside the sequence (both halves non-empty) whenever there is one
    split = draw(st.integers(1, T - 1)) if T >= 2 else None
    return dict(q=q, k=k, v=v, gamma=gamma, normalize=draw(st.booleans()),
                chunk=draw(st.integers(1, 6)), split=split)


def bound(op, p, o_ref, factor=2.0):
    """Error-model bound for a float64 evaluation (times `factor` for two evaluations)."""
    q, k, v, g = p["q"], p["k"], p["v"], p["gamma"]
    T, d = q.shape
    num_abs = hla_core.evaluate(op, np.abs(q), np.abs(k), np.abs(v), gamma=g)
    kw = dict(T=T, d=d, chunk_size=p["chunk"], gamma=g, op=model_op(op))
    if p["normalize"]:
        ones = np.ones((T, 1))
        den = hla_core.evaluate(op, q, k, ones, gamma=g)[:, 0]
        den_abs = hla_core.evaluate(op, np.abs(q), np.abs(k), ones, gamma=g)[:, 0]
        b = output_bound("float64", o_ref=o_ref, num_abs=num_abs, normalize=True,
                         den_ref=den, den_abs=den_abs, **kw)
    else:
        b = output_bound("float64", o_ref=o_ref, num_abs=num_abs, **kw)
    return factor * b


# --- the definition, by brute force ---------------------------------------------------

def brute_mp(pattern, q, k, v, gamma):
    """o_t = Σ over the pattern's index tuples (Pattern.valuations) of γ^e times the
    chain of dot products, in mpmath at the current precision; inputs are float64
    arrays, converted exactly. Indices run over 0..t (the operators are causal).
    Nothing here comes from the derivation or the generated code."""
    T = q.shape[0]
    rows = {name: [[mpmath.mpf(float(x)) for x in r] for r in a] for name, a in (("q", q), ("k", k), ("v", v))}
    rows["1"] = [[mpmath.mpf(1)] for _ in range(T)]
    g = mpmath.mpf(float(gamma))
    dots = {}

    def dot(a, i, b, j):
        key = (a, i, b, j)
        if key not in dots:
            dots[key] = mpmath.fsum(x * y for x, y in zip(rows[a][i], rows[b][j]))
        return dots[key]

    width = len(rows[pattern.slots[-1].out_vec][0])
    out = []
    for t in range(T):
        acc = [mpmath.mpf(0)] * width
        for val, expo in pattern.valuations(range(t + 1), t):
            w = g ** (int(expo) if expo.denominator == 1 else mpmath.mpf(expo.numerator) / expo.denominator)
            vec, tok = pattern.t_vec, t
            for s in pattern.slots:
                w *= dot(vec, tok, s.in_vec, val[s.var])
                vec, tok = s.out_vec, val[s.var]
            acc = [a + w * x for a, x in zip(acc, rows[vec][tok])]
        out.append(acc)
    return np.array(out, dtype=object).reshape(T, width)


def exact_reference(op, p):
    """(exact output (mpmath, DPS_EXACT), its error-model bound for one float64 evaluation).

    The bound's ingredients (|op|, the exact denominator and its |.| version) are brute
    force sums too, so neither the value nor the tolerance comes from the code under test."""
    pat = hla_core.OPERATORS[op].pattern
    q, k, v, g = p["q"], p["k"], p["v"], p["gamma"]
    T, d = q.shape
    f64 = lambda a: np.array(a, dtype=np.float64)
    with mpmath.workdps(DPS_EXACT):
        num = brute_mp(pat, q, k, v, g)
        num_abs = brute_mp(pat, np.abs(q), np.abs(k), np.abs(v), g)
        kw = dict(T=T, d=d, chunk_size=p["chunk"], gamma=g, op=model_op(op))
        if not p["normalize"]:
            return num, output_bound("float64", o_ref=f64(num), num_abs=f64(num_abs), **kw)
        ones = np.ones((T, 1))
        den = brute_mp(pat.denominator(), q, k, ones, g)[:, 0]
        den_abs = brute_mp(pat.denominator(), np.abs(q), np.abs(k), ones, g)[:, 0]
        o = num / (den + mpmath.mpf(EPS))[:, None]
        tol = output_bound("float64", o_ref=f64(o), num_abs=f64(num_abs), normalize=True,
                           den_ref=f64(den), den_abs=f64(den_abs), eps=EPS, **kw)
    return o, tol


def abs_error(got, exact):
    """|got - exact| element-wise, formed in mpmath (float64 `got` converts exactly)."""
    with mpmath.workdps(DPS_EXACT):
        return np.array([[float(abs(mpmath.mpf(a) - b)) for a, b in zip(r, s)]
                         for r, s in zip(np.asarray(got), exact)], dtype=np.float64).reshape(exact.shape)


# --- tests ----------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@given(p=problems())
def test_forms_agree(op, p):
    kw = dict(gamma=p["gamma"], normalize=p["normalize"], chunk_size=p["chunk"])
    ref = hla_core.evaluate(op, p["q"], p["k"], p["v"], form="quadratic", **kw)
    tol = bound(op, p, ref)
    for form in ("recurrent", "chunked"):
        o = hla_core.evaluate(op, p["q"], p["k"], p["v"], form=form, **kw)
        assert o.shape == ref.shape
        assert np.all(np.abs(o - ref) <= tol), (form, np.max(np.abs(o - ref) - tol))


@pytest.mark.parametrize("op", OPS)
@given(p=problems(max_T=6), mp_form=st.sampled_from(FORMS))
def test_forms_match_brute_force(op, p, mp_form):
    """Every generated form, float64 and mpmath, against the pattern's own brute-force
    sum over index tuples (`brute_mp`, mpmath at DPS_EXACT digits; independent of the
    derivation and of the generated code).

    float64: |o - exact| <= output_bound (factor 1: one float64 evaluation against the
    exact value). mpmath at DPS_FORMS digits: the same bound scaled by
    10^-DPS_FORMS / 2^-53. The model's bound is first order in the unit roundoff u
    (β ≈ (m + 2n)u; the normalized margin |D + ε| − β|D|abs only grows as u shrinks), so
    the scaled float64 bound is at least the bound at u = 10^-DPS_FORMS; the exact
    value's own error (10^-DPS_EXACT) is far below it. An mpmath form that loses
    precision anywhere (a float64 intermediate) fails this.

    Every example checks the three float64 forms; the mpmath backend (slow) runs one
    drawn form per example, so each run covers all three."""
    exact, tol64 = exact_reference(op, p)
    tol_mp = tol64 * (10.0 ** -DPS_FORMS / UNIT_ROUNDOFF["float64"])
    kw = dict(gamma=p["gamma"], normalize=p["normalize"], eps=EPS, chunk_size=p["chunk"])
    for form in FORMS:
        o = hla_core.evaluate(op, p["q"], p["k"], p["v"], form=form, **kw)
        assert o.shape == exact.shape
        err = abs_error(o, exact)
        assert np.all(err <= tol64), ("float64", form, np.max(err - tol64))
    o = hla_core.evaluate(op, p["q"], p["k"], p["v"], form=mp_form, backend="mpmath", dps=DPS_FORMS, **kw)
    assert o.shape == exact.shape
    err = abs_error(o, exact)
    assert np.all(err <= tol_mp), ("mpmath", mp_form, np.max(err - tol_mp))


@pytest.mark.parametrize("op", OPS)
def test_matches_definition_exactly(op):
    """Rational inputs, mpmath at high precision: the generated code equals the
    pattern's own brute-force sum (independent of the derivation)."""
    rng = np.random.default_rng(3)
    T, d, dv = 5, 2, 2
    q, k, v = (rng.integers(-3, 4, (T, n)).astype(float) for n in (d, d, dv))
    frac = lambda a: np.array([[Fraction(int(x)) for x in row] for row in a], dtype=object)
    want = brute_numeric(hla_core.OPERATORS[op].pattern, frac(q), frac(k), frac(v), Fraction(1, 2))
    for form in FORMS:
        got = hla_core.evaluate(op, q, k, v, form=form, gamma=0.5, backend="mpmath", dps=60, chunk_size=2)
        err = max(abs(float(g - float(w))) for g, w in zip(got.ravel(), want.ravel()))
        assert err <= 1e-40 * max(1.0, float(np.max(np.abs(want.astype(float))))), (form, err)


@pytest.mark.parametrize("op", OPS)
@given(p=problems(min_T=2), first=st.sampled_from(FORMS), second=st.sampled_from(["recurrent", "chunked"]))
def test_state_handoff(op, p, first, second):
    """Split strictly inside the sequence, continue in any mode from the returned state:
    the same outputs and the same final state as one recurrent pass."""
    q, k, v, s = p["q"], p["k"], p["v"], p["split"]
    T, d = q.shape
    assert 1 <= s < T
    kw = dict(gamma=p["gamma"], normalize=p["normalize"], chunk_size=p["chunk"])
    full, full_state = hla_core.evaluate(op, q, k, v, form="recurrent", return_state=True, **kw)
    tol = bound(op, p, full)
    o1, state = hla_core.evaluate(op, q[:s], k[:s], v[:s], form=first, return_state=True, **kw)
    names = set(hla_core.state_shapes(op, d, v.shape[1], p["normalize"]))
    assert set(state) == names
    o2, state2 = hla_core.evaluate(op, q[s:], k[s:], v[s:], form=second, initial_state=state,
                                   return_state=True, **kw)
    err = np.abs(np.concatenate([o1, o2]) - full)
    assert np.all(err <= tol), ("output", np.max(err - tol))
    # final state: each entry is a positively weighted sum, so the model's relative
    # bound applies to it against the same state on absolute values (two evaluations)
    _, absolute = hla_core.evaluate(op, np.abs(q), np.abs(k), np.abs(v), form="quadratic",
                                    return_state=True, **kw)
    b_rel = 2 * beta("float64", T, d, p["chunk"], p["gamma"], op=model_op(op))
    assert set(state2) == set(full_state) == names
    for name in names:
        e = np.abs(state2[name] - full_state[name])
        assert np.all(e <= b_rel * absolute[name]), ("state", name, np.max(e - b_rel * absolute[name]))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("op", OPS)
def test_state_is_prefix_summary(op, normalize):
    """The returned state equals each summary evaluated directly on the prefix (the
    quadratic form's state), for the numerator alone and with the denominator."""
    rng = np.random.default_rng(11)
    q, k, v = rng.standard_normal((7, 3)), rng.standard_normal((7, 3)), rng.standard_normal((7, 2))
    kw = dict(gamma=0.8, normalize=normalize, return_state=True)
    _, a = hla_core.evaluate(op, q, k, v, form="quadratic", **kw)
    _, b = hla_core.evaluate(op, q, k, v, form="recurrent", **kw)
    _, c = hla_core.evaluate(op, q, k, v, form="chunked", chunk_size=3, **kw)
    _, absolute = hla_core.evaluate(op, np.abs(q), np.abs(k), np.abs(v), form="quadratic", **kw)
    b_rel = 2 * beta("float64", 7, 3, 3, 0.8, op=model_op(op))
    assert set(a) == set(b) == set(c) == set(hla_core.state_shapes(op, 3, 2, normalize=normalize))
    for name in a:
        tol = b_rel * absolute[name]
        assert np.all(np.abs(a[name] - b[name]) <= tol), (name, "recurrent")
        assert np.all(np.abs(a[name] - c[name]) <= tol), (name, "chunked")
