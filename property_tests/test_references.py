"""Generated references: quadratic ≡ recurrent ≡ chunked, float64 and mpmath, state hand-off.

Tolerances come from hla_core.error_model (forward bound scaled by the operator
evaluated on absolute values); two float64 evaluations are each within that
bound of the exact value, so they differ by at most twice it.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import hla_core
from derivations.definitions import brute_numeric
from hla_core.error_model import beta, output_bound

OPS = sorted(hla_core.OPERATORS)


@st.composite
def problems(draw, max_T=10):
    T = draw(st.integers(1, max_T))
    d = draw(st.integers(1, 4))
    dv = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3]))
    q, k, v = (rng.standard_normal((T, n)) * scale for n in (d, d, dv))
    gamma = draw(st.one_of(st.just(1.0), st.floats(0.25, 1.0)))
    return dict(q=q, k=k, v=v, gamma=gamma, normalize=draw(st.booleans()),
                chunk=draw(st.integers(1, 6)), split=draw(st.integers(0, T)))


def bound(op, p, o_ref, factor=2.0):
    """Error-model bound for a float64 evaluation (times `factor` for two evaluations)."""
    q, k, v, g = p["q"], p["k"], p["v"], p["gamma"]
    T, d = q.shape
    num_abs = hla_core.evaluate(op, np.abs(q), np.abs(k), np.abs(v), gamma=g)
    kw = dict(T=T, d=d, chunk_size=p["chunk"], gamma=g)
    if p["normalize"]:
        ones = np.ones((T, 1))
        den = hla_core.evaluate(op, q, k, ones, gamma=g)[:, 0]
        den_abs = hla_core.evaluate(op, np.abs(q), np.abs(k), ones, gamma=g)[:, 0]
        b = output_bound("float64", o_ref=o_ref, num_abs=num_abs, normalize=True,
                         den_ref=den, den_abs=den_abs, **kw)
    else:
        b = output_bound("float64", o_ref=o_ref, num_abs=num_abs, **kw)
    return factor * b


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
@given(p=problems(max_T=6))
def test_mpmath_matches_float64(op, p):
    kw = dict(gamma=p["gamma"], normalize=p["normalize"], chunk_size=p["chunk"])
    exact = hla_core.evaluate(op, p["q"], p["k"], p["v"], form="chunked", backend="mpmath", dps=40, **kw)
    exact = exact.astype(np.float64)
    tol = bound(op, p, exact, factor=1.0)
    for form in ("quadratic", "recurrent"):
        o = hla_core.evaluate(op, p["q"], p["k"], p["v"], form=form, **kw)
        assert np.all(np.abs(o - exact) <= tol)


@pytest.mark.parametrize("op", OPS)
def test_matches_definition_exactly(op):
    """Rational inputs, mpmath at high precision: the generated code equals the
    pattern's own brute-force sum (independent of the derivation)."""
    from fractions import Fraction
    rng = np.random.default_rng(3)
    T, d, dv = 5, 2, 2
    q, k, v = (rng.integers(-3, 4, (T, n)).astype(float) for n in (d, d, dv))
    frac = lambda a: np.array([[Fraction(int(x)) for x in row] for row in a], dtype=object)
    want = brute_numeric(hla_core.OPERATORS[op].pattern, frac(q), frac(k), frac(v), Fraction(1, 2))
    for form in ("quadratic", "recurrent", "chunked"):
        got = hla_core.evaluate(op, q, k, v, form=form, gamma=0.5, backend="mpmath", dps=60, chunk_size=2)
        err = max(abs(float(g - float(w))) for g, w in zip(got.ravel(), want.ravel()))
        assert err <= 1e-40 * max(1.0, float(np.max(np.abs(want.astype(float))))), (form, err)


@pytest.mark.parametrize("op", OPS)
@given(p=problems(), first=st.sampled_from(["quadratic", "recurrent", "chunked"]),
       second=st.sampled_from(["recurrent", "chunked"]))
def test_state_handoff(op, p, first, second):
    """Split at any token, continue in any mode: same outputs as one pass."""
    q, k, v, s = p["q"], p["k"], p["v"], p["split"]
    kw = dict(gamma=p["gamma"], normalize=p["normalize"], chunk_size=p["chunk"])
    full = hla_core.evaluate(op, q, k, v, form="recurrent", **kw)
    tol = bound(op, p, full)
    if s == 0 or s == q.shape[0]:
        return  # no split inside the sequence (T = 0 halves are rejected, tested elsewhere)
    o1, state = hla_core.evaluate(op, q[:s], k[:s], v[:s], form=first, return_state=True, **kw)
    assert set(state) == set(hla_core.state_shapes(op, q.shape[1], v.shape[1], p["normalize"]))
    o2 = hla_core.evaluate(op, q[s:], k[s:], v[s:], form=second, initial_state=state, **kw)
    assert np.all(np.abs(np.concatenate([o1, o2]) - full) <= tol)


@pytest.mark.parametrize("op", OPS)
def test_state_is_prefix_summary(op):
    """The returned state equals each summary evaluated directly on the prefix."""
    rng = np.random.default_rng(11)
    q, k, v = rng.standard_normal((7, 3)), rng.standard_normal((7, 3)), rng.standard_normal((7, 2))
    _, a = hla_core.evaluate(op, q, k, v, form="quadratic", gamma=0.8, normalize=True, return_state=True)
    _, b = hla_core.evaluate(op, q, k, v, form="recurrent", gamma=0.8, normalize=True, return_state=True)
    _, c = hla_core.evaluate(op, q, k, v, form="chunked", gamma=0.8, normalize=True, chunk_size=3,
                             return_state=True)
    _, absolute = hla_core.evaluate(op, np.abs(q), np.abs(k), np.abs(v), form="quadratic", gamma=0.8,
                                    normalize=True, return_state=True)
    b_rel = 2 * beta("float64", 7, 3, 3, 0.8)
    for name in a:
        tol = b_rel * absolute[name]
        assert np.all(np.abs(a[name] - b[name]) <= tol)
        assert np.all(np.abs(a[name] - c[name]) <= tol)
