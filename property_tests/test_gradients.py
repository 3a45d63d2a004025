"""Gradients: the derived gradient terms and the generated VJPs against independent lines.

- float64 autograd (torch) through each registered operator's decayed matrix form, written
  here from ../shared/design/operators.md, never from the derivation;
- mpmath central finite differences of the forward reference along a random direction;
- operators the engine has never seen: torch autograd through the Pattern's own
  brute-force sum;
- the derivative certificate rejects a dropped term, a wrong decay and a wrong direction.

Tolerance (unnormalized, float64): every gradient entry is a sum of products of inputs
with positive weights, so by the argument of hla_core/error_model.py each of two float64
evaluations is within β·|g|abs of the exact value, |g|abs the same VJP on |q|, |k|, |v|,
|do|: they differ by at most 2β·|g|abs. Normalized: inputs with positive q, k (denominators
bounded away from 0, as the model requires) and a norm-wise 1e-9 relative check, the same
kind of float64 algorithm check as the kernels' 1e-10 (a 10% error is 10^8 times larger).
"""
import dataclasses

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, note, settings, strategies as st

import hla_core
from derivations import OutOfReach, Pattern, derive
from derivations import gradients as G
from hla_core.error_model import beta
from property_tests.test_engine import patterns

OPS = sorted(hla_core.OPERATORS)


def _decay_mask(T, gamma):
    t = torch.arange(T, dtype=torch.float64)
    diff = t[:, None] - t[None, :]
    return torch.where(diff >= 0, torch.as_tensor(gamma, dtype=torch.float64) ** diff.clamp(min=0),
                       torch.zeros((), dtype=torch.float64))


def matrix_form(op, Q, K, V, gamma, normalize, eps):
    """The operators of operators.md as decayed matrix products (G[t,i] = γ^(t−i), i ≤ t)."""
    T = Q.shape[0]
    Gm = _decay_mask(T, gamma)
    U = torch.triu(torch.ones(T, T, dtype=torch.float64))      # [i <= j]
    QK, KQ = Q @ K.T, K @ Q.T

    def apply(Vx):
        if op == "hla2":
            M = ((Gm * QK) @ (U * KQ)) * Gm
        elif op == "hla2_unmasked":
            M = ((Gm * QK) @ KQ) * Gm
        elif op == "ahla":
            M = (Gm * QK) @ (Gm * QK)
        elif op == "hla3":
            M = ((((Gm * QK) @ (U * KQ)) * Gm) * Gm) @ (Gm * QK)
        elif op == "hla3_unmasked":
            M = ((((Gm * QK) @ KQ) * Gm) @ QK) * Gm
        return M @ Vx
    num = apply(V)
    if not normalize:
        return num
    return num / (apply(torch.ones(T, 1, dtype=torch.float64)) + eps)


def torch_vjp(fn, q, k, v, do):
    Q, K, V = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    (fn(Q, K, V) * torch.tensor(do)).sum().backward()
    # a vector the operator never reads gets no graph edge: its gradient is zero
    return [x.grad.numpy() if x.grad is not None else np.zeros(x.shape) for x in (Q, K, V)]


@st.composite
def problems(draw, positive_qk=False, max_T=7):
    T = draw(st.integers(1, max_T))
    d, dv = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 31 - 1)))
    q, k = rng.standard_normal((T, d)), rng.standard_normal((T, d))
    if positive_qk:
        q, k = np.abs(q) + 0.1, np.abs(k) + 0.1
    v, do = rng.standard_normal((T, dv)), rng.standard_normal((T, dv))
    gamma = draw(st.one_of(st.just(1.0), st.floats(0.2, 1.0)))
    return dict(q=q, k=k, v=v, do=do, gamma=gamma)


FORMS = ["quadratic", "recurrent", "chunked"]
# per operator; the `thorough` profile runs its own (larger) count
EXAMPLES = 8 if settings.default.max_examples <= 25 else settings.default.max_examples


@pytest.mark.parametrize("op", OPS)
@settings(max_examples=EXAMPLES)
@given(p=problems(), form=st.sampled_from(FORMS), chunk=st.integers(1, 5))
def test_vjp_matches_torch_autograd_of_the_matrix_form(op, form, p, chunk):
    note(str(p))
    g = p["gamma"] if hla_core.module(op).HAS_DECAY else 1.0
    got = hla_core.vjp(op, p["q"], p["k"], p["v"], p["do"], gamma=g, form=form, chunk_size=chunk)
    want = torch_vjp(lambda Q, K, V: matrix_form(op, Q, K, V, g, False, 0), p["q"], p["k"], p["v"], p["do"])
    absg = hla_core.vjp(op, *(np.abs(p[n]) for n in ("q", "k", "v", "do")), gamma=g)
    T, d = p["q"].shape
    b = beta("float64", T, d, T, g)
    for name, x, y, a in zip("qkv", got, want, absg):
        assert x.shape == y.shape
        assert np.all(np.abs(x - y) <= 2 * b * a), (name, np.max(np.abs(x - y) - 2 * b * a))


@pytest.mark.parametrize("op", OPS)
@settings(max_examples=EXAMPLES)
@given(p=problems(positive_qk=True), form=st.sampled_from(FORMS), chunk=st.integers(1, 5))
def test_normalized_vjp_matches_torch_autograd(op, form, p, chunk):
    note(str(p))
    g = p["gamma"] if hla_core.module(op).HAS_DECAY else 1.0
    got = hla_core.vjp(op, p["q"], p["k"], p["v"], p["do"], gamma=g, normalize=True, eps=1e-3, form=form,
                       chunk_size=chunk)
    want = torch_vjp(lambda Q, K, V: matrix_form(op, Q, K, V, g, True, 1e-3), p["q"], p["k"], p["v"], p["do"])
    for name, x, y in zip("qkv", got, want):
        rel = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-300)
        assert rel <= 1e-9, (name, rel)


@pytest.mark.parametrize("op, normalize, form", [("hla2", False, "chunked"), ("hla2", True, "recurrent"),
                                                ("ahla", True, "chunked"), ("ahla", False, "quadratic"),
                                                ("hla3", False, "recurrent"), ("hla3", True, "chunked")])
def test_mpmath_vjp_matches_finite_differences(op, normalize, form):
    """⟨(dq, dk, dv), δ⟩ = d/dh Σ do·o(x + hδ) by central differences at 40 digits of the
    Pattern's brute-force sum (error O(h²) = 1e-30, far below the 1e-20 tolerance)."""
    rng = np.random.default_rng(7)
    T, d, dv, g = 4, 2, 2, 0.7
    q, k = np.abs(rng.standard_normal((T, d))) + 0.1, np.abs(rng.standard_normal((T, d))) + 0.1
    v, do = rng.standard_normal((T, dv)), rng.standard_normal((T, dv))
    delta = [rng.standard_normal(x.shape) for x in (q, k, v)]
    grads = hla_core.vjp(op, q, k, v, do, gamma=g, normalize=normalize, backend="mpmath", dps=40, form=form,
                         chunk_size=3)
    with mpmath.workdps(40):
        h = mpmath.mpf(10) ** -15

        def loss(sign):   # the Pattern's own brute-force sum, in mpmath
            xs = [[[mpmath.mpf(a) + sign * h * mpmath.mpf(b) for a, b in zip(r, dr)] for r, dr in zip(x, dx)]
                  for x, dx in zip((q, k, v), delta)]
            return G.brute_loss(hla_core.OPERATORS[op].pattern, *xs, [[mpmath.mpf(a) for a in r] for r in do],
                                mpmath.mpf(g), normalize, mpmath.mpf("1e-6"))
        fd = (loss(1) - loss(-1)) / (2 * h)
        pairing = sum(mpmath.mpf(a) * b for gr, dx in zip(grads, delta) for a, b in zip(dx.ravel(), gr.ravel()))
        assert abs(fd - pairing) <= mpmath.mpf(10) ** -20 * max(1, abs(fd)), (fd, pairing)


def brute_torch(p: Pattern, Q, K, V, gamma):
    """o_t from the Pattern's own sum (Pattern.valuations), in torch."""
    T = Q.shape[0]
    vec = {"q": Q, "k": K, "v": V}
    rows = []
    for t in range(T):
        acc = torch.zeros(V.shape[1], dtype=torch.float64)
        for val, expo in p.valuations(range(T), t):
            x = vec[p.t_vec][t]
            for s in p.slots:
                x = (x @ vec[s.in_vec][val[s.var]]) * vec[s.out_vec][val[s.var]]
            acc = acc + gamma ** float(expo) * x
        rows.append(acc)
    return torch.stack(rows)


@settings(max_examples=EXAMPLES)
@given(p=patterns(), seed=st.integers(0, 999))
def test_unseen_patterns_get_gradients_that_match_brute_force(p, seed):
    """No code per operator: any derivable Pattern's VJP equals torch autograd through its
    own brute-force sum (strict masks, reversed constraints, fractional decays, sandwiches)."""
    try:
        d = derive(p, prove=False)
    except OutOfReach as exc:   # the forward itself is out of reach (crossing components)
        assert "engine does not synthesize" in str(exc)
        return
    rng = np.random.default_rng(seed)
    T, dd, dv = 5, 2, 2
    q, k, v, do = (rng.standard_normal((T, n)) for n in (dd, dd, dv, dv))
    g = 0.7 if p.has_decay else 1.0
    want = torch_vjp(lambda Q, K, V: brute_torch(p, Q, K, V, g), q, k, v, do)
    absg = d.vjp_reference("quadratic")(*(np.abs(x) for x in (q, k, v, do)), gamma=g)
    b = beta("float64", T, dd, T, g)
    for form in FORMS:
        try:
            got = d.vjp_reference(form)(q, k, v, do, gamma=g, chunk_size=2)
        except NotImplementedError as exc:   # a term with crossing components: no streaming form
            assert form != "quadratic" and "no streaming form" in str(exc)
            continue
        for name, x, y, a in zip("qkv", got, want, absg):
            # the suffix side's ⊕ may grow like γ^-C inside a chunk: one more β for chunked
            assert np.all(np.abs(x - y) <= 3 * b * a + 1e-300), (form, name)


@settings(max_examples=EXAMPLES)
@given(p=patterns(max_factors=3 if EXAMPLES <= 12 else 4))   # 4 factors: `thorough` (minutes each)
def test_unseen_patterns_gradient_proofs_hold(p):
    """Every gradient certificate of an operator the engine has never seen holds (a term
    without a streaming form is listed, not silently dropped)."""
    try:
        d = derive(p, prove=False)
    except OutOfReach:
        return                     # the forward is out of reach: test_engine covers that
    from derivations.engine import prove_gradients
    certs = prove_gradients(d, exact_T=3)
    failed = [(c.identity, c.part, c.details.get("failures")) for c in certs if not c.holds]
    assert not failed, failed


def test_order_one_and_order_four_have_gradients():
    for p in (Pattern("dot(q_t,k_i) * v_i", where="i <= t", decay="t-i"),
              Pattern("dot(q_t,k_i)*dot(k_i,q_j)*dot(q_j,k_u)*dot(k_u,q_w)*v_w", where="i<=j<=u<=w<=t")):
        d = derive(p)
        assert d.proved
        assert {c.identity for c in d.certificates} >= {
            "gradient terms = derivative of the loss (every T)",
            "exact VJP check, every T ≤ 3 (plain and normalized)"}


# --- the derivative certificate can fail ---------------------------------------------

HLA2 = hla_core.OPERATORS["hla2"].pattern


def _with_terms(monkeypatch, edit):
    real = G.gradient_terms
    monkeypatch.setattr(G, "gradient_terms", lambda p, wrt: edit(real(p, wrt)))
    return G.prove_derivative(HLA2, "gradient", True)


def test_derivative_proof_rejects_a_dropped_term(monkeypatch):
    assert G.prove_derivative(HLA2, "gradient", True).holds
    assert not _with_terms(monkeypatch, lambda ts: ts[1:] if ts and ts[0].wrt == "k" else ts).holds


def test_derivative_proof_rejects_a_wrong_decay(monkeypatch):
    def edit(ts):
        return [dataclasses.replace(t, decay=tuple((x, 2 * c if x == "j" else c) for x, c in t.decay))
                if t.wrt == "q" else t for t in ts]
    assert not _with_terms(monkeypatch, edit).holds


def test_derivative_proof_rejects_a_wrong_direction(monkeypatch):
    """The chain read the wrong way round (factors reversed but not transposed)."""
    def edit(ts):
        return [dataclasses.replace(t, chain=tuple(reversed(t.chain))) if t.wrt == "v" else t for t in ts]
    assert not _with_terms(monkeypatch, edit).holds


def test_exact_vjp_check_rejects_a_wrong_generated_vjp(monkeypatch):
    from hla_core import runtime
    real = runtime.grad_masked_sum
    monkeypatch.setattr(runtime, "grad_masked_sum", lambda spec, vecs, g, be: 2 * real(spec, vecs, g, be)
                        if spec.lead == "o" else real(spec, vecs, g, be))
    assert not G.prove_exact_vjp(derive(HLA2, prove=False), True).holds


@pytest.mark.parametrize("case, exc, match", [
    ("do_shape", ValueError, "do: expected the output's shape"),
    ("do_nan", ValueError, "do: non-finite"),
    ("form", ValueError, "form: expected one of"),
    ("gamma", ValueError, "gamma"),
    ("q_rank", ValueError, "q: expected a 2-D array"),
])
def test_vjp_bad_inputs(case, exc, match):
    rng = np.random.default_rng(0)
    q, k, v, do = rng.standard_normal((4, 2)), rng.standard_normal((4, 2)), rng.standard_normal((4, 3)), \
        rng.standard_normal((4, 3))
    kw = {}
    if case == "do_shape":
        do = do[:, :2]
    elif case == "do_nan":
        do[1, 1] = np.nan
    elif case == "form":
        kw["form"] = "serial"
    elif case == "gamma":
        kw["gamma"] = 0.0
    elif case == "q_rank":
        q = q[None]
    with pytest.raises(exc, match=match):
        hla_core.vjp("hla2", q, k, v, do, **kw)


def test_streaming_proof_rejects_a_wrong_readout_and_a_wrong_suffix_update(monkeypatch):
    """The two-sided readout's γ^{C_P} and the suffix side's updates are proved, not trusted."""
    import sympy
    from derivations.summaries import GAMMA, Term
    good = G.prove_streaming_gradients(HLA2, "gradient", True)
    assert all(c.holds for c in good)
    real = G.synthesize_term

    def no_shift(term):      # drop the γ^{C_P} that moves the suffix state's end to s + 1
        gs = real(term)
        gs.readout = [Term(sympy.Integer(1), t.seq) for t in gs.readout]
        return gs
    monkeypatch.setattr(G, "synthesize_term", no_shift)
    assert not G.prove_streaming_gradients(HLA2, "gradient", True)[0].holds

    def slow_suffix(term):   # the suffix side decays one power too little per token
        gs = real(term)
        gs.suffix.stream = {n: [Term(t.coef / GAMMA if t.coef.has(GAMMA) else t.coef, t.seq) for t in ts]
                            for n, ts in gs.suffix.stream.items()}
        return gs
    monkeypatch.setattr(G, "synthesize_term", slow_suffix)
    assert not G.prove_streaming_gradients(HLA2, "gradient", True)[0].holds
