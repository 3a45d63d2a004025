"""User API: registered operators, generated references, evaluation.

    import hla_core
    o = hla_core.evaluate("hla2", q, k, v, form="chunked", gamma=0.9, normalize=True)
    o, state = hla_core.evaluate("ahla", q, k, v, return_state=True)
    o2 = hla_core.evaluate("ahla", q2, k2, v2, initial_state=state)   # continue the sequence

Single head: q, k of shape (T, d), v of shape (T, dv); o of shape (T, dv).
`hla_core.vjp(op, q, k, v, do, ...)` returns (dq, dk, dv) of Σ_t do_t · o_t (plus the
gradient w.r.t. `initial_state=` when given; `dstate=` adds ⟨dstate, final state⟩ to the loss).
`state` is the smallest carry the derivation gives, a dict of arrays (see
docs/identities/<op>.md for each entry's meaning).
"""
from __future__ import annotations

import importlib

from . import runtime
from .registry import OPERATORS

__all__ = ["OPERATORS", "evaluate", "module", "reference", "state_shapes", "vjp"]


def module(op: str):
    """The generated reference module of a registered operator."""
    if not isinstance(op, str) or op not in OPERATORS:
        raise ValueError(f"op: expected one of {sorted(OPERATORS)}, got {op!r}")
    try:
        return importlib.import_module(f"hla_core.generated.{op}")
    except ModuleNotFoundError:
        raise RuntimeError(f"op: the generated module for {op!r} is missing; run `make derivations`") from None


def evaluate(op, q, k, v, *, form="recurrent", gamma=1.0, normalize=False, eps=1e-6,
             chunk_size=16, backend="numpy", dps=50, initial_state=None, return_state=False):
    """Evaluate operator `op` on one head with a generated reference (see module doc)."""
    return runtime.evaluate(module(op), q, k, v, form=form, gamma=gamma, normalize=normalize,
                            eps=eps, chunk_size=chunk_size, backend=backend, dps=dps,
                            initial_state=initial_state, return_state=return_state)


def vjp(op, q, k, v, do, *, form="quadratic", gamma=1.0, normalize=False, eps=1e-6,
        chunk_size=16, backend="numpy", dps=50, initial_state=None, dstate=None):
    """(dq, dk, dv) of Σ_t do_t · o_t + Σ_name ⟨dstate[name], final_state[name]⟩ for operator
    `op` on one head, every form (quadratic, recurrent, chunked) in float64 or mpmath. The
    empty-prefix part comes from the gradient terms the engine derived
    (derivations/gradients.py); the part that involves `initial_state` or `dstate`, by reverse
    mode through the generated updates and ⊕ (runtime.handoff_vjp). `initial_state` (a state
    dict as `evaluate(..., return_state=True)` returns, the forward continuing from it) adds a
    fourth element, {name: gradient} of the same shapes; `dstate` is a cotangent dict for the
    final state. Either may be given alone; recurrent and chunked forms only (the quadratic
    form starts from the empty prefix and refuses both with a ValueError)."""
    return runtime.vjp(module(op), q, k, v, do, form=form, gamma=gamma, normalize=normalize,
                       eps=eps, chunk_size=chunk_size, backend=backend, dps=dps,
                       initial_state=initial_state, dstate=dstate)


def reference(op, form="recurrent", backend="numpy"):
    """f(q, k, v, gamma=1.0, normalize=False, eps=1e-6, chunk_size=16, ...) for operator `op`."""
    return module(op).reference(form, backend)


def state_shapes(op, d, dv, normalize=False) -> dict:
    """{name: shape} of the streaming state for head sizes d, dv."""
    mod = module(op)
    out = runtime.state_shapes(mod.NUM, d, dv)
    if normalize:
        out.update(runtime.state_shapes(mod.DEN, d, dv))
    return out
