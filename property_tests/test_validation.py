"""Bad input to the reference API gets a clear error naming the argument."""
import numpy as np
import pytest

import hla_core

rng = np.random.default_rng(0)
Q, K, V = rng.standard_normal((5, 3)), rng.standard_normal((5, 3)), rng.standard_normal((5, 2))


def call(**over):
    kw = dict(op="hla2", q=Q, k=K, v=V)
    kw.update(over)
    op, q, k, v = kw.pop("op"), kw.pop("q"), kw.pop("k"), kw.pop("v")
    return hla_core.evaluate(op, q, k, v, **kw)


@pytest.mark.parametrize("over, exc, text", [
    (dict(op="hla9"), ValueError, "op: expected one of"),
    (dict(q=Q[None]), ValueError, "q: expected a 2-D array"),
    (dict(v=V[:, 0]), ValueError, "v: expected a 2-D array"),
    (dict(k=K[:4]), ValueError, "k: length T = 4 does not match q's T = 5"),
    (dict(v=V[:3]), ValueError, "v: length T = 3"),
    (dict(k=K[:, :2]), ValueError, "k: head size d = 2 does not match q's d = 3"),
    (dict(q=Q[:0], k=K[:0], v=V[:0]), ValueError, "q: sequence length T must be ≥ 1"),
    (dict(q=np.where(np.eye(5, 3) > 0, np.nan, Q)), ValueError, "q: non-finite value"),
    (dict(v=np.full((5, 2), np.inf)), ValueError, "v: non-finite value"),
    (dict(q="abc"), TypeError, "q: expected a 2-D array"),
    (dict(q=np.array([["a", "b"]] * 5)), TypeError, "q: expected real"),
    (dict(gamma=0.0), ValueError, "gamma: expected a value in (0, 1]"),
    (dict(gamma=1.5), ValueError, "gamma: expected a value in (0, 1]"),
    (dict(gamma=-0.5), ValueError, "gamma"),
    (dict(gamma=float("nan")), ValueError, "gamma"),
    (dict(gamma="0.5"), TypeError, "gamma: expected a real number"),
    (dict(normalize="yes"), TypeError, "normalize"),
    (dict(eps=0.0), ValueError, "eps: expected a finite number > 0"),
    (dict(chunk_size=0), ValueError, "chunk_size: expected an integer ≥ 1"),
    (dict(chunk_size=2.5), ValueError, "chunk_size"),
    (dict(form="fast"), ValueError, "form: expected one of"),
    (dict(backend="cuda"), ValueError, "backend: expected one of"),
    (dict(backend="mpmath", dps=5), ValueError, "dps: expected an integer ≥ 15"),
    (dict(return_state="yes"), TypeError, "return_state"),
    (dict(initial_state=[1, 2]), TypeError, "initial_state: expected a dict"),
    (dict(initial_state={"KK": np.zeros((3, 3))}), ValueError, "initial_state: expected keys"),
    (dict(initial_state={"KK": np.zeros((2, 3)), "KK_QV": np.zeros((3, 2))}), ValueError,
     "initial_state['KK']: expected shape (3, 3)"),
    (dict(initial_state={"KK": np.full((3, 3), np.nan), "KK_QV": np.zeros((3, 2))}), ValueError,
     "initial_state['KK']: contains non-finite"),
    (dict(form="quadratic", initial_state={"KK": np.zeros((3, 3)), "KK_QV": np.zeros((3, 2))}), ValueError,
     "initial_state: the quadratic form starts from the empty prefix"),
])
def test_bad_input(over, exc, text):
    with pytest.raises(exc) as info:
        call(**over)
    assert text in str(info.value)


def test_normalized_state_needs_denominator_entries():
    _, st = hla_core.evaluate("ahla", Q, K, V, return_state=True)
    with pytest.raises(ValueError, match="missing"):
        hla_core.evaluate("ahla", Q, K, V, normalize=True, initial_state=st)


def test_no_decay_pattern_rejects_gamma():
    from derivations import Pattern, derive
    d = derive(Pattern("dot(q_t,k_i) * v_i", where="i <= t"), prove=False)
    with pytest.raises(ValueError, match="gamma: this operator has no decay"):
        d.reference("recurrent")(Q, K, V, gamma=0.5)


def test_reference_accessor_rejects_unknown_operator():
    with pytest.raises(ValueError, match="op: expected one of"):
        hla_core.reference("nope")
