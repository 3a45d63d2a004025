"""One evaluator for formula terms, many interpretations.

A formula (list of `Term`) is a sum of coefficient × nested product of items.
`evaluate` folds it with an *algebra*: noncommutative SymPy (proofs, display),
exact or floating numbers (checks, counterexamples), index-pattern sums
(the weight proofs of `weights.py`). Each algebra supplies zero, one, +, the
ordered product, scaling by a commutative coefficient, and the meaning of a
summary reference and of a token factor.
"""
from __future__ import annotations

from typing import Callable

import sympy

from .summaries import Ext, Ref, Tok


def evaluate(terms, alg, holes: tuple = ()):
    total = alg.zero()
    for t in terms:
        v = alg.one()
        for item in t.seq:
            if isinstance(item, Ref):
                x = alg.ref(item.seg, item.name, [evaluate(list(f), alg, holes) for f in item.fillers])
            elif isinstance(item, Ext):
                x = holes[item.k]
            elif isinstance(item, Tok):
                x = alg.tok(item.factor)
            else:  # pragma: no cover - construction guarantees the three kinds
                raise TypeError(item)
            v = alg.mul(v, x)
        total = alg.add(total, alg.scale(t.coef, v))
    return total


# ---------------------------------------------------------------------------
# Noncommutative SymPy

def nc_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, commutative=False)


def hole_symbols(n: int) -> tuple:
    """Z1..Zn: noncommutative placeholders for the holes of a summary."""
    return tuple(nc_symbol(f"Z{k + 1}") for k in range(n))


def linear_apply(fname: str, args: list) -> sympy.Expr:
    """f(args) for an undefined multilinear noncommutative map f, expanded:
    sums in the arguments distribute and commutative coefficients move out."""
    f = sympy.Function(fname, commutative=False)
    expanded = []
    for a in args:
        parts = []
        for term in sympy.Add.make_args(sympy.expand(a)):
            if term == 0:
                continue
            c, nc = term.args_cnc()
            parts.append((sympy.Mul(*c), sympy.Mul(*nc)))
        expanded.append(parts)
    out = sympy.Integer(0)
    for combo in _product(expanded):
        coef = sympy.Mul(*[c for c, _ in combo])
        out += coef * f(*[m for _, m in combo])
    return out


def _product(lists):
    if not lists:
        yield ()
        return
    for head in lists[0]:
        for rest in _product(lists[1:]):
            yield (head,) + rest


class SympyAlgebra:
    """Values are SymPy expressions; refs and tokens come from callables."""

    def __init__(self, ref: Callable, tok: Callable, coef: Callable | None = None):
        self._ref, self._tok = ref, tok
        self._coef = coef or (lambda c: c)

    def zero(self):
        return sympy.Integer(0)

    def one(self):
        return sympy.Integer(1)

    def add(self, a, b):
        return a + b

    def mul(self, a, b):
        return a * b

    def scale(self, c, a):
        return self._coef(c) * a

    def ref(self, seg, name, fillers):
        return self._ref(seg, name, fillers)

    def tok(self, factor):
        return self._tok(factor)


def symbolic_segment(seg: str, holes: dict[str, int]):
    """Ref resolver for an opaque segment: summary `N` of segment `A` is the
    noncommutative symbol N_A, or the multilinear map N_A(·) if it has holes."""
    def ref(s, name, fillers):
        if holes.get(name, 0):
            return linear_apply(f"{name}_{seg}", fillers)
        return nc_symbol(f"{name}_{seg}")
    return ref


class Segment:
    """A segment value for the NC algebra: how to read each summary, and ρ."""

    def __init__(self, read: Callable, rho):
        self.read = read  # (name, fillers) -> expr
        self.rho = rho


def base_segment(seg: str, holes: dict[str, int], decayed: bool = True) -> Segment:
    ref = symbolic_segment(seg, holes)
    rho = sympy.Symbol(f"rho_{seg}", positive=True) if decayed else sympy.Integer(1)
    return Segment(lambda name, fillers: ref(seg, name, fillers), rho)


def combine_segments(formulas: dict, left: Segment, right: Segment) -> Segment:
    """The segment left·right, reading each summary through the combine formulas
    (segments 'A' = left, 'B' = right; ρ_B = right.rho)."""
    rho_a = sympy.Symbol("rho_A", positive=True)
    rho_b = sympy.Symbol("rho_B", positive=True)

    cache = {}

    def read(name, fillers):
        key = (name, tuple(fillers))
        if key in cache:
            return cache[key]
        alg = SympyAlgebra(
            ref=lambda seg, n, f: (left if seg == "A" else right).read(n, f),
            tok=lambda f: (_ for _ in ()).throw(ValueError("token in a segment combine")),
            coef=lambda c: sympy.sympify(c).subs({rho_a: left.rho, rho_b: right.rho}),
        )
        cache[key] = sympy.expand(evaluate(formulas[name], alg, tuple(fillers)))
        return cache[key]

    return Segment(read, sympy.expand(left.rho * right.rho))


def associativity(formulas: dict, holes: dict, decayed: bool, check_neutral: bool = True) -> dict:
    """(A⊕B)⊕C − A⊕(B⊕C) for every summary, with three opaque segments; and whether
    the empty segment (all summaries zero, ρ = 1) is neutral on both sides."""
    A, B, C = (base_segment(s, holes, decayed) for s in "ABC")
    left = combine_segments(formulas, combine_segments(formulas, A, B), C)
    right = combine_segments(formulas, A, combine_segments(formulas, B, C))
    diffs, terms = {}, 0
    for name in formulas:
        zs = hole_symbols(holes.get(name, 0))
        lhs = left.read(name, zs)
        terms += len(sympy.Add.make_args(lhs))
        diff = sympy.expand(lhs - right.read(name, zs))
        if diff != 0:
            diffs[name] = diff
    if sympy.expand(left.rho - right.rho) != 0:
        diffs["ρ"] = sympy.expand(left.rho - right.rho)
    neutral = None
    if check_neutral:
        E = zero_segment()
        neutral = all(sympy.expand(combine_segments(formulas, *pair).read(n, hole_symbols(holes.get(n, 0)))
                                   - A.read(n, hole_symbols(holes.get(n, 0)))) == 0
                      for n in formulas for pair in ((E, A), (A, E)))
    return {"holds": not diffs, "diffs": diffs, "neutral": neutral, "terms": terms}


def token_segment(embeds: dict, token: int, gamma) -> Segment:
    """A one-token segment whose factors are the symbols f_<token>."""
    def read(name, fillers):
        alg = SympyAlgebra(ref=lambda *a: (_ for _ in ()).throw(ValueError("ref in an embedding")),
                           tok=lambda f: nc_symbol(f"{f}_{token}"))
        return sympy.expand(evaluate(embeds[name], alg, tuple(fillers)))
    return Segment(read, gamma)


def zero_segment() -> Segment:
    return Segment(lambda name, fillers: sympy.Integer(0), sympy.Integer(1))


# ---------------------------------------------------------------------------
# Numbers (float64, Fraction or mpmath object arrays)

class NumericAlgebra:
    """Values are 2-D arrays (None = zero, ONE = identity); refs from callables."""
    ONE = object()

    def __init__(self, ref: Callable, tok: Callable, coef: Callable):
        self._ref, self._tok, self._coef = ref, tok, coef

    def zero(self):
        return None

    def one(self):
        return self.ONE

    def add(self, a, b):
        if a is None:
            return b
        if b is None:
            return a
        return a + b

    def mul(self, a, b):
        if a is None or b is None:
            return None
        if a is self.ONE:
            return b
        if b is self.ONE:
            return a
        return a @ b

    def scale(self, c, a):
        if a is None:
            return None
        if a is self.ONE:
            raise ValueError("a bare coefficient has no shape")
        return self._coef(c) * a

    def ref(self, seg, name, fillers):
        return self._ref(seg, name, fillers)

    def tok(self, factor):
        return self._tok(factor)
