"""The registered operators of operators.md, each by its Pattern and its definition."""
from __future__ import annotations

from dataclasses import dataclass

from derivations.definitions import Matrix, Moments
from derivations.pattern import Pattern


@dataclass(frozen=True)
class Operator:
    name: str
    pattern: Pattern
    definition: object   # Matrix (γ = 1 form) or Moments (decayed prefix moments)
    summary: str


def _op(name, expr, where, decay, definition, summary):
    return Operator(name, Pattern(expr, where=where, decay=decay, name=name), definition, summary)


OPERATORS = {op.name: op for op in [
    _op("la", "dot(q_t,k_j) * v_j", "j <= t", "t-j", Matrix("W @ V"),
        "first order: linear attention with a scalar decay, the building block every kernel chain "
        "is made of (kernels/gla.py) and whose ⊕ joins context-parallel ranks (kernels/cp.py)"),
    _op("hla2", "dot(q_t,k_i) * dot(k_i,q_j) * v_j", "i <= j <= t", "(t-i) + (t-j)",
        Matrix("((W @ W.T) * L) @ V"), "second order, symmetric, masked (paper §3.1, Thm 3.1)"),
    _op("hla2_unmasked", "dot(q_t,k_i) * dot(k_i,q_j) * v_j", "i <= t, j <= t", "(t-i) + (t-j)",
        Moments("kk", "qv"), "second order, symmetric, unmasked: q_tᵀ S_t C_t (paper Eq. 3.1)"),
    _op("ahla", "dot(q_t,k_i) * dot(q_i,k_j) * v_j", "j <= i <= t", "t-j",
        Matrix("((W @ W) * L) @ V"), "second order, asymmetric, masked (paper §6, Thm 6.1)"),
    _op("hla3", "dot(q_t,k_i) * dot(k_i,q_u) * dot(q_u,k_j) * v_j", "i <= u, j <= u, u <= t",
        "(t-i) + (t-u) + (t-j)", Matrix("(((W @ W.T) * L) @ W) @ V"),
        "third order, symmetric, masked (paper §7)"),
    _op("hla3_unmasked", "dot(q_t,k_i) * dot(k_i,q_u) * dot(q_u,k_j) * v_j",
        "i <= t, u <= t, j <= t", "(t-i) + (t-u) + (t-j)", Moments("kk", "qq", "kv"),
        "third order, symmetric, unmasked: q_tᵀ S^K_t S^Q_t P^KV_t (paper §7.1)"),
]}
