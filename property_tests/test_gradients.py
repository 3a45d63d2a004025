"""Gradients: the derived gradient terms and the generated VJPs against independent lines.

- float64 autograd (torch) through each registered operator's decayed matrix form, written
  here from ../shared/design/operators.md, never from the derivation;
- mpmath central finite differences of the forward reference along a random direction;
- operators the engine has never seen: torch autograd through the Pattern's own
  brute-force sum;
- the derivative certificate rejects a dropped term, a wrong decay and a wrong direction;
- state hand-off (initial_state=, dstate=): float64 autograd through plain recurrences
  written here (la, hla2, ahla, hla3, normalized, γ < 1, the initial state requiring grad),
  and mpmath (40 digits) central differences of the forward with initial_state over
  dyadic inputs (registered operators and unseen Patterns); named errors.

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
        if op == "la":
            M = Gm * QK
        elif op == "hla2":
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


# --- state hand-off: gradient w.r.t. initial_state, cotangent on the final state -----------

def _rec_torch(op, Q, K, V, g, S, normalize, eps):
    """The recurrences of ../shared/design/operators.md written out here (not from the
    derivation), state entries named as hla_core names them: KK = Σ_i γ^{t−i} k_i k_iᵀ,
    KV = Σ_j γ^{t−j} k_j v_jᵀ, K1 = Σ_j γ^{t−j} k_j, and
      hla2: KK_QV = Σ_{i≤j≤t} γ^{(t−i)+(t−j)} k_i k_iᵀ q_j v_jᵀ    (o_t = q_tᵀ KK_QV)
      ahla: KQ_KV = Σ_{j≤i≤t} γ^{t−j} k_i q_iᵀ k_j v_jᵀ            (o_t = q_tᵀ KQ_KV)
      hla3: KK_QQ_KV = Σ_{i,j≤u≤t} γ^{(t−i)+(t−u)+(t−j)} k_i k_iᵀ q_u q_uᵀ k_j v_jᵀ;
      la:   o_t = q_tᵀ KV;
    the denominators (…_Q1, …_K1) are the same with v → 1. Returns (o, final state)."""
    S = dict(S)
    outs = []
    for t in range(Q.shape[0]):
        q, k, v, one = Q[t], K[t], V[t], torch.ones(1, dtype=torch.float64)
        vals = {"V": v, "1": one}
        if op == "hla2":
            S["KK"] = g * S["KK"] + torch.outer(k, k)
            for x in ("V", "1") if normalize else ("V",):
                S[f"KK_Q{x}"] = g ** 2 * S[f"KK_Q{x}"] + S["KK"] @ torch.outer(q, vals[x])
            N, D = q @ S["KK_QV"], (q @ S["KK_Q1"] if normalize else None)
        elif op == "la":
            for x in ("V", "1") if normalize else ("V",):
                S[f"K{x}"] = g * S[f"K{x}"] + torch.outer(k, vals[x])
            N, D = q @ S["KV"], (q @ S["K1"] if normalize else None)
        elif op == "ahla":
            for x in ("V", "1") if normalize else ("V",):
                S[f"K{x}"] = g * S[f"K{x}"] + torch.outer(k, vals[x])
                S[f"KQ_K{x}"] = g * S[f"KQ_K{x}"] + torch.outer(k, q) @ S[f"K{x}"]
            N, D = q @ S["KQ_KV"], (q @ S["KQ_K1"] if normalize else None)
        else:
            S["KK"] = g * S["KK"] + torch.outer(k, k)
            for x in ("V", "1") if normalize else ("V",):
                S[f"K{x}"] = g * S[f"K{x}"] + torch.outer(k, vals[x])
                S[f"KK_QQ_K{x}"] = g ** 3 * S[f"KK_QQ_K{x}"] + S["KK"] @ torch.outer(q, q) @ S[f"K{x}"]
            N, D = q @ S["KK_QQ_KV"], (q @ S["KK_QQ_K1"] if normalize else None)
        outs.append(N if D is None else N / (D + eps))
    return torch.stack(outs), S


HANDOFF_OPS = ("la", "hla2", "ahla", "hla3")


@pytest.mark.parametrize("op", HANDOFF_OPS)
@settings(max_examples=4 if EXAMPLES <= 12 else EXAMPLES)
@given(p=problems(positive_qk=True, max_T=6), form=st.sampled_from(["recurrent", "chunked"]),
       chunk=st.integers(1, 4), normalize=st.booleans(), which=st.sampled_from(["both", "state", "dstate"]))
def test_handoff_vjp_matches_torch_autograd_of_a_plain_recurrence(op, p, form, chunk, normalize, which):
    """(dq, dk, dv, d initial_state) of Σ do·o + ⟨dstate, final⟩ against float64 autograd
    through the recurrence above, the initial state the test's own recurrence on a prefix."""
    note(str(p))
    g, eps = p["gamma"], 1e-3
    rng = np.random.default_rng(int(abs(p["q"][0, 0]) * 1e6))
    T, d = p["q"].shape
    dv = p["v"].shape[1]
    shapes = hla_core.state_shapes(op, d, dv, normalize)
    zero = {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}
    pre = [torch.tensor(np.abs(rng.standard_normal((3, n))) + 0.1) for n in (d, d)] + \
        [torch.tensor(rng.standard_normal((3, dv)))]
    S0 = {n: x.numpy() for n, x in _rec_torch(op, *pre, g, zero, normalize, eps)[1].items()}
    dS = {n: rng.standard_normal(s) for n, s in shapes.items()}
    kw = dict(initial_state=S0 if which != "dstate" else None, dstate=dS if which != "state" else None)
    got = hla_core.vjp(op, p["q"], p["k"], p["v"], p["do"], form=form, gamma=g, normalize=normalize,
                       eps=eps, chunk_size=chunk, **kw)
    assert len(got) == (4 if kw["initial_state"] is not None else 3)
    Q, K, V = (torch.tensor(p[n], requires_grad=True) for n in "qkv")
    S = {n: torch.tensor(a, requires_grad=True) if kw["initial_state"] is not None else zero[n]
         for n, a in S0.items()}
    o, fin = _rec_torch(op, Q, K, V, g, S, normalize, eps)
    loss = (o * torch.tensor(p["do"])).sum()
    if kw["dstate"] is not None:
        loss = loss + sum((fin[n] * torch.tensor(dS[n])).sum() for n in shapes)
    loss.backward()
    want = [x.grad.numpy() for x in (Q, K, V)]
    if kw["initial_state"] is not None:
        assert set(got[3]) == set(shapes) and all(got[3][n].shape == shapes[n] for n in shapes)
        want += [np.concatenate([S[n].grad.numpy().ravel() for n in sorted(shapes)])]
        got = list(got[:3]) + [np.concatenate([got[3][n].ravel() for n in sorted(shapes)])]
    for name, x, y in zip(["q", "k", "v", "initial_state"], got, want):
        rel = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-300)
        assert rel <= 1e-9, (name, rel)


def _dyadic(rng, shape, positive=False):
    """Entries m/8 with |m| < 32: x ± 2⁻³⁰·δ stays exact in float64, so a finite difference
    over float64 inputs is as exact as the mpmath arithmetic behind it."""
    m = rng.integers(1 if positive else -31, 32, size=shape)
    return m / 8.0


def _fd_handoff(fwd, grads, q, k, v, do, S0, dS, rng):
    """Central difference (step 2⁻³⁰, 40 digits) of L = Σ do·o + ⟨dS, final⟩ along a dyadic
    direction of (q, k, v, S0) against the pairing with (dq, dk, dv, dS0)."""
    xs = {"q": q, "k": k, "v": v, **{("S", n): a for n, a in S0.items()}}
    delta = {n: _dyadic(rng, x.shape) for n, x in xs.items()}
    h = 2.0 ** -30
    with mpmath.workdps(40):
        def loss(sign):
            at = {n: x + sign * h * delta[n] for n, x in xs.items()}
            o, fin = fwd(at["q"], at["k"], at["v"], {n: at[("S", n)] for n in S0})
            tot = sum(mpmath.mpf(a) * b for a, b in zip(do.ravel(), o.ravel()))
            return tot + sum(mpmath.mpf(a) * b for n in dS for a, b in zip(dS[n].ravel(), fin[n].ravel()))
        fd = (loss(1) - loss(-1)) / (2 * mpmath.mpf(h))
        dq, dk, dv, dS0 = grads
        g = {"q": dq, "k": dk, "v": dv, **{("S", n): a for n, a in dS0.items()}}
        pairing = sum(mpmath.mpf(a) * b for n in xs for a, b in zip(delta[n].ravel(), g[n].ravel()))
        return fd, pairing


@pytest.mark.parametrize("op, normalize, form, gamma", [
    ("hla2", False, "recurrent", 0.75), ("hla2", True, "chunked", 1.0),
    ("ahla", True, "recurrent", 0.5), ("hla3", False, "chunked", 0.75), ("hla3", True, "recurrent", 1.0)])
def test_mpmath_handoff_vjp_matches_finite_differences(op, normalize, form, gamma):
    """mpmath (40 digits) VJP with initial_state and dstate against central differences of
    hla_core.evaluate(..., initial_state=, return_state=True) in every entry of q, k, v and the
    initial state at once (a random direction; the O(h²) error is ~1e-18, the tolerance 1e-14)."""
    rng = np.random.default_rng(11)
    T, d, dv = 4, 2, 2
    q, k = _dyadic(rng, (T, d), normalize), _dyadic(rng, (T, d), normalize)
    v, do = _dyadic(rng, (T, dv)), _dyadic(rng, (T, dv))
    shapes = hla_core.state_shapes(op, d, dv, normalize)
    _, S0 = hla_core.evaluate(op, _dyadic(rng, (2, d), True), _dyadic(rng, (2, d), True),
                              _dyadic(rng, (2, dv)), gamma=gamma, normalize=normalize, return_state=True)
    S0 = {n: np.round(a * 64) / 64 for n, a in S0.items()}      # dyadic too
    dS = {n: _dyadic(rng, s) for n, s in shapes.items()}
    kw = dict(gamma=gamma, normalize=normalize, eps=1e-3, backend="mpmath", dps=40, form=form, chunk_size=3)
    grads = hla_core.vjp(op, q, k, v, do, initial_state=S0, dstate=dS, **kw)
    fd, pairing = _fd_handoff(lambda q_, k_, v_, S_: hla_core.evaluate(op, q_, k_, v_, initial_state=S_,
                                                                       return_state=True, **kw),
                              grads, q, k, v, do, S0, dS, rng)
    assert abs(fd - pairing) <= mpmath.mpf(10) ** -14 * max(1, abs(fd)), (fd, pairing)


def _unseen_handoff_check(p, seed, forms=("recurrent", "chunked")):
    """derive(p).vjp_reference with initial_state and dstate against central differences of
    the same Pattern's generated forward with initial_state (mpmath, 40 digits)."""
    d = derive(p, prove=False)
    rng = np.random.default_rng(seed)
    T, dd, dv = 4, 2, 2
    g = 0.5 if p.has_decay else 1.0
    q, k, v, do = (_dyadic(rng, (T, n)) for n in (dd, dd, dv, dv))
    fwd = d.reference("recurrent", "mpmath")
    _, S0 = fwd(*(_dyadic(rng, (2, n)) for n in (dd, dd, dv)), gamma=g, return_state=True)
    S0 = {n: np.round(np.array([float(x) for x in a.ravel()]).reshape(a.shape) * 64) / 64 for n, a in S0.items()}
    dS = {n: _dyadic(rng, a.shape) for n, a in S0.items()}
    for form in forms:
        try:
            grads = d.vjp_reference(form, "mpmath")(q, k, v, do, gamma=g, chunk_size=3, dps=40,
                                                    initial_state=S0, dstate=dS)
        except NotImplementedError as exc:   # a gradient term with no streaming form
            assert "no streaming form" in str(exc)
            continue
        fd, pairing = _fd_handoff(lambda q_, k_, v_, S_: fwd(q_, k_, v_, gamma=g, dps=40, initial_state=S_,
                                                             return_state=True),
                                  grads, q, k, v, do, S0, dS, rng)
        assert abs(fd - pairing) <= mpmath.mpf(10) ** -14 * max(1, abs(fd)), (form, fd, pairing)


@pytest.mark.parametrize("p", [
    Pattern("dot(q_t,k_i) * dot(k_i,q_j) * dot(q_j,k_i) * v_i", where="i <= j <= t"),      # sandwich map
    Pattern("dot(k_t,q_i) * dot(k_i,q_j) * v_j", where="i < t, j <= i", decay="(t-i)/2 + 2*(t-j)")])
def test_unseen_pattern_handoff_vjp_matches_finite_differences(p):
    """No code per operator: a sandwich map (holed summaries) and a strict mask with
    fractional decays and a key-side output vector."""
    _unseen_handoff_check(p, 3)


@settings(max_examples=2 if EXAMPLES <= 12 else EXAMPLES // 4)
@given(p=patterns(max_factors=3 if EXAMPLES <= 12 else 4), seed=st.integers(0, 999))
def test_random_unseen_patterns_handoff_vjp_matches_finite_differences(p, seed):
    try:
        derive(p, prove=False)
    except OutOfReach:
        return
    _unseen_handoff_check(p, seed, forms=("chunked",) if EXAMPLES <= 12 else ("recurrent", "chunked"))


@pytest.mark.parametrize("arg", ["initial_state", "dstate"])
@pytest.mark.parametrize("case, match", [
    ("shape", r"\['KK'\]: expected shape"), ("missing", "missing \\['KK'\\]"),
    ("extra", "unexpected \\['XX'\\]"), ("nan", r"\['KK_QV'\]: contains non-finite"),
    ("mp_nan", r"\['KK_QV'\]: contains non-finite"), ("quadratic", "the quadratic")])
def test_handoff_bad_inputs(arg, case, match):
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((4, n)) for n in (2, 2, 3, 3))
    st_ = {"KK": np.eye(2), "KK_QV": np.ones((2, 3))}
    form = "recurrent"
    if case == "shape":
        st_["KK"] = np.eye(3)
    elif case == "missing":
        del st_["KK"]
    elif case == "extra":
        st_["XX"] = np.ones(1)
    elif case == "nan":
        st_["KK_QV"][0, 1] = np.inf
    elif case == "mp_nan":    # an mpmath state, as the mpmath backend returns it
        st_ = {n: np.array([mpmath.mpf(x) for x in a.ravel()], dtype=object).reshape(a.shape)
               for n, a in st_.items()}
        st_["KK_QV"][1, 0] = mpmath.mpf("nan")
    else:
        form = "quadratic"
    with pytest.raises(ValueError, match=f"^{arg}" + ("" if case == "quadratic" else ".*" + match)):
        hla_core.vjp("hla2", q, k, v, do, form=form, **{arg: st_})
