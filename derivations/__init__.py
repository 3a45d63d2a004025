"""Derivation engine for higher-order linear attention.

    from derivations import Pattern, derive
    p = Pattern("dot(q_t,k_i) * dot(k_i,q_j) * v_j", where="i <= j <= t", decay="(t-i) + (t-j)")
    d = derive(p)
    d.state, d.summaries, d.combine, d.certificates, d.reference("chunked", "numpy")
"""
from .definitions import Matrix, Moments
from .engine import Certificate, Derivation, derive
from .pattern import Pattern, PatternError
from .summaries import OutOfReach

__all__ = ["Certificate", "Derivation", "Matrix", "Moments", "OutOfReach", "Pattern",
           "PatternError", "derive"]
