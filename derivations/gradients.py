"""Gradients of a pattern operator, derived from its Pattern and proved.

The loss of an output cotangent, L = Σ_t do_t · o_t, is a sum over index tuples of a
closed chain (a trace) of token-local factors:

    L = Σ γ^{Σ c_x (t − x)} tr[(do_t x_tᵀ)(a_i b_iᵀ)(c_j v_jᵀ)...]       (t now summed too)

with one factor per chain slot and one for the output token t (`do` against the
pattern's query vector x_t). L is linear in every occurrence of a vector, so its
gradient with respect to q (or k, v) at token s is the sum, over the occurrences of q in
that cycle, of the cycle with the occurrence removed, cut open there and read as a
chain from its neighbour in the same factor: a *gradient term*. Its output index is
the differentiated occurrence's index; its other indices — the old output t among them —
lie before it, after it, or on both sides. Nothing here knows any particular operator.

Normalized operators o = N / (D + ε) (D: the pattern with v → 1) follow the quotient
rule: the numerator's terms take the cotangent do_t / (D_t + ε), the denominator's the
scalar cotangent −(do_t · o_t) / (D_t + ε).

Proofs (certificates like the forward ones):
- gradient = derivative, every T: paired with a direction δ, each term closes back into
  a cycle; the sum over the terms equals the directional derivative of L (the cycle with
  one occurrence replaced by δ, summed over occurrences), compared as weights on index
  tuples by order types (weights.py), so for every T, d, dv;
- exact check: the generated quadratic-form VJP on small rational inputs equals the
  derivative of the brute-force loss (the Pattern's own sum), taken in forward mode
  with exact dual numbers — a line that never uses the gradient terms.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from fractions import Fraction

from .pattern import Pattern

COTANGENT = "o"    # the letter of do_t (or the denominator's scalar cotangent) in a cycle
DIRECTION = "e"    # the letter of the direction δ in the derivative proof
OUT = "t"          # the pattern's output index, summed in the loss


@dataclass(frozen=True)
class Factor:
    """The token-local outer product in_vec out_vecᵀ of token `var`."""
    in_vec: str
    out_vec: str
    var: str

    def transposed(self) -> "Factor":
        return Factor(self.out_vec, self.in_vec, self.var)

    def __str__(self) -> str:
        return f"{self.in_vec}_{self.var} {self.out_vec}_{self.var}ᵀ"


@dataclass(frozen=True)
class GradTerm:
    """g_s += Σ_{tuples with index `at` = s} γ^{decay} lead_sᵀ · chain[0] ⋯ chain[-1]:
    the row the chain ends with (chain[-1].out_vec) is the term's contribution to
    d`wrt` at token s."""
    wrt: str                 # 'q' | 'k' | 'v'
    at: str                  # the differentiated occurrence's index: the output index s
    lead: str                # the other vector of the differentiated factor, at s
    chain: tuple             # Factors, read from `at` around the cycle
    constraints: tuple       # the pattern's constraints, t summed
    decay: tuple             # ((index, c), ...): exponent Σ c (t − index), as the pattern's
    occurrence: str          # which occurrence of `wrt` was differentiated (for display)

    @property
    def indices(self) -> list[str]:
        out = [self.at]
        for f in self.chain:
            if f.var not in out:
                out.append(f.var)
        return out

    def __str__(self) -> str:
        cond = ", ".join(map(str, self.constraints))
        dec = " + ".join(f"{'' if c == 1 else c}(t−{x})" for x, c in self.decay if c)
        chain = " · ".join(f"({f})" for f in self.chain)
        return (f"d{self.wrt}_{self.at} += Σ[{cond}]" + (f" γ^({dec})" if dec else "")
                + f" {self.lead}_{self.at}ᵀ {chain}   ({self.occurrence})")


def loss_cycle(p: Pattern) -> list[Factor]:
    """The factors of L's trace, starting at the output token's (do_t x_tᵀ)."""
    return [Factor(COTANGENT, p.t_vec, OUT)] + [Factor(s.in_vec, s.out_vec, s.var) for s in p.slots]


def gradient_terms(p: Pattern, wrt: str) -> list[GradTerm]:
    """Every occurrence of vector `wrt` in the loss cycle, cut open there.

    The cycle F_0 F_1 ⋯ F_n (F_0 = do_t x_tᵀ) has trace Π (out_i · in_{i+1}). Removing
    in_i leaves the row out_iᵀ F_{i+1} ⋯ F_{i−1} (the cycle read forward from F_i);
    removing out_i leaves in_iᵀ F_{i−1}ᵀ ⋯ F_{i+1}ᵀ (read backward)."""
    cyc = loss_cycle(p)
    n = len(cyc)
    terms = []
    for i, f in enumerate(cyc):
        fwd = tuple(cyc[(i + m) % n] for m in range(1, n))
        bwd = tuple(cyc[(i - m) % n].transposed() for m in range(1, n))
        where = "the output token's query" if i == 0 else f"slot {i} ({f})"
        if f.in_vec == wrt:
            terms.append(GradTerm(wrt, f.var, f.out_vec, fwd, p.constraints, p.decay_coeffs,
                                  f"{wrt}_{f.var} as the left vector of {where}"))
        if f.out_vec == wrt:
            terms.append(GradTerm(wrt, f.var, f.in_vec, bwd, p.constraints, p.decay_coeffs,
                                  f"{wrt}_{f.var} as the right vector of {where}"))
    return terms


def all_gradient_terms(p: Pattern) -> dict[str, list[GradTerm]]:
    return {w: gradient_terms(p, w) for w in ("q", "k", "v")}


# ---------------------------------------------------------------------------
# Proof: the terms are the derivative, for every T (order types).

def closed_cycle(term: GradTerm) -> tuple:
    """⟨δ_s, g_s⟩ as a cycle, oriented so that the cotangent is a left vector, and
    rotated to start at the cotangent's factor: comparable with L's own cycle."""
    cyc = list(term.chain) + [Factor(DIRECTION, term.lead, term.at)]
    if not any(f.in_vec == COTANGENT for f in cyc):
        cyc = [f.transposed() for f in reversed(cyc)]
    start = next(m for m, f in enumerate(cyc) if f.in_vec == COTANGENT)
    return tuple(cyc[start:] + cyc[:start])


def directional_derivative(p: Pattern, wrt: str) -> list[tuple]:
    """L's cycle with one occurrence of `wrt` replaced by the direction δ, per occurrence."""
    cyc = loss_cycle(p)
    out = []
    for i, f in enumerate(cyc):
        if f.in_vec == wrt:
            out.append(tuple(cyc[:i] + [Factor(DIRECTION, f.out_vec, f.var)] + cyc[i + 1:]))
        if f.out_vec == wrt:
            out.append(tuple(cyc[:i] + [Factor(f.in_vec, DIRECTION, f.var)] + cyc[i + 1:]))
    return out


def _cycle_psums(cycles, fresh):
    """(cycle, constraints, decay) triples as pattern sums over the tokens (p0, p1]."""
    from .weights import PSum, bound_le
    out = []
    for cyc, constraints, decay in cycles:
        names = {f.var for f in cyc} | {x for c in constraints for x in (c.a, c.b)} | {OUT}
        ren = {x: fresh() for x in sorted(names)}
        cons = [bound_le((ren[c.a], 0), (ren[c.b], 0), c.op == "<") for c in constraints if c.op != "=="]
        cons += [(ren[c.a], "==", ren[c.b]) for c in constraints if c.op == "=="]
        for x in ren.values():
            cons += [bound_le(("p0", 0), (x, 0), True), bound_le((x, 0), ("p1", 0))]
        lin = {}
        for x, c in decay:
            if c:
                lin[ren[x]] = lin.get(ren[x], 0) - c
                lin[ren[OUT]] = lin.get(ren[OUT], 0) + c
        word = tuple(("f", f.in_vec + f.out_vec, ren[f.var]) for f in cyc)
        out.append(PSum(Fraction(1), word, tuple(cons),
                        tuple(sorted((k, Fraction(v)) for k, v in lin.items() if v))))
    return out


def prove_derivative(p: Pattern, part: str, decay: bool):
    """Certificate: Σ terms paired with δ = the directional derivative of L, every T."""
    from .engine import Certificate
    from .weights import Context, Fresh, compare
    t0 = time.perf_counter()
    ctx = Context(["p0", "p1"], set(), {"P": 1})
    checks, failures, n_types = [], [], 0
    for wrt in ("q", "k", "v"):
        terms = gradient_terms(p, wrt)
        lhs = _cycle_psums([(closed_cycle(t), t.constraints, t.decay) for t in terms], Fresh("a"))
        rhs = _cycle_psums([(c, p.constraints, p.decay_coeffs) for c in directional_derivative(p, wrt)],
                           Fresh("b"))
        if not lhs and not rhs:
            continue
        r = compare(lhs, rhs, ctx, decay)
        n_types += r["order_types"]
        checks.append(f"d{wrt} ({len(terms)} terms)")
        if not r["holds"]:
            failures.append(f"d{wrt}: {r['mismatch']}")
    return Certificate("gradient terms = derivative of the loss (every T)",
                       "order types (weights on index tuples)", not failures,
                       {"checked": checks, "order_types": n_types, "failures": failures},
                       part, decay, time.perf_counter() - t0)


class Dual:
    """a + b·ε with ε² = 0 over exact rationals: forward-mode derivatives of the
    brute-force loss, independent of the gradient terms."""
    __slots__ = ("a", "b")

    def __init__(self, a, b=0):
        self.a, self.b = a, b

    @staticmethod
    def _lift(x):
        return x if isinstance(x, Dual) else Dual(x)

    def __add__(self, o):
        o = Dual._lift(o)
        return Dual(self.a + o.a, self.b + o.b)
    __radd__ = __add__

    def __neg__(self):
        return Dual(-self.a, -self.b)

    def __sub__(self, o):
        return self + (-Dual._lift(o))

    def __rsub__(self, o):
        return Dual._lift(o) - self

    def __mul__(self, o):
        o = Dual._lift(o)
        return Dual(self.a * o.a, self.a * o.b + self.b * o.a)
    __rmul__ = __mul__

    def __truediv__(self, o):
        o = Dual._lift(o)
        return Dual(self.a / o.a, (self.b * o.a - self.a * o.b) / (o.a * o.a))

    def __rtruediv__(self, o):
        return Dual._lift(o) / self


def _power(g, expo: Fraction):
    """g ** expo in g's own arithmetic (Fraction, mpmath, float) where it is exact."""
    if expo.denominator == 1:
        return g ** int(expo)
    return g ** (type(g)(expo.numerator) / expo.denominator) if not isinstance(g, Fraction) \
        else float(g) ** float(expo)


def brute_loss(p: Pattern, q, k, v, do, g, normalize: bool, eps):
    """Σ_t do_t · o_t from the Pattern's own sum (lists of numbers, Fractions or Duals)."""
    T = len(q)
    vec = {"q": q, "k": k, "v": v, "1": [[1] for _ in range(T)]}

    def run(pat):
        out = []
        for t in range(T):
            acc = [0] * len(vec[pat.slots[-1].out_vec][0])
            for val, expo in pat.valuations(range(T), t):
                x = vec[pat.t_vec][t]
                for s in pat.slots:
                    a, b = vec[s.in_vec][val[s.var]], vec[s.out_vec][val[s.var]]
                    dot = sum((xi * ai for xi, ai in zip(x, a)), 0)
                    x = [dot * bi for bi in b]
                w = _power(g, expo)
                acc = [ac + w * xi for ac, xi in zip(acc, x)]
            out.append(acc)
        return out
    o = run(p)
    if normalize:
        den = run(p.denominator())
        o = [[n / (den[t][0] + eps) for n in o[t]] for t in range(T)]
    return sum((do[t][c] * o[t][c] for t in range(T) for c in range(len(do[t]))), 0)


def prove_exact_vjp(d, decay: bool, T_max: int = 3):
    """Certificate: the generated quadratic VJP equals the exact derivative of the
    brute-force loss (forward mode with dual numbers, rational inputs), every T ≤ T_max,
    plain and normalized."""
    import numpy as np

    from .codegen import load_module, module_source
    from .engine import Certificate
    t0 = time.perf_counter()
    p = d.pattern
    mod = load_module(module_source(d, "exact_vjp_check"), "exact_vjp_check")
    rng = random.Random(4321)
    failures, compared = [], 0
    # a fractional decay power of a rational γ is irrational: check those at γ = 1 only
    integral = all(c.denominator == 1 for _, c in p.decay_coeffs)
    g = Fraction(1, 2) if decay and integral else Fraction(1)
    eps = Fraction(1, 10)
    pick = lambda: Fraction(rng.choice([-2, -1, 1, 2, 3]), rng.choice([1, 2]))  # noqa: E731
    for T in range(1, T_max + 1):
        dims = {"q": 2, "k": 2, "v": 2}
        x = {n: [[pick() for _ in range(m)] for _ in range(T)] for n, m in dims.items()}
        do = [[pick() for _ in range(dims["v"])] for _ in range(T)]
        for normalize in (False, True):
            got = _exact_vjp(mod, *(np.array(x[n], dtype=object) for n in "qkv"),
                             np.array(do, dtype=object), g, normalize, eps)
            for n, G in zip("qkv", got):
                for a in range(T):
                    for b in range(dims[n]):
                        arg = {m: [list(r) for r in x[m]] for m in "qkv"}
                        arg[n][a][b] = Dual(x[n][a][b], 1)
                        want = brute_loss(p, arg["q"], arg["k"], arg["v"], do, g, normalize, eps)
                        compared += 1
                        if Dual._lift(want).b != G[a, b]:
                            failures.append(f"T={T} normalize={normalize} d{n}[{a},{b}]")
    return Certificate(f"exact VJP check, every T ≤ {T_max} (plain and normalized)",
                       "forward-mode derivative (dual numbers) of the brute-force loss vs the generated "
                       "quadratic VJP, exact rationals", not failures,
                       {"comparisons": compared, "gamma": str(g), "failures": failures[:10]},
                       "gradient", decay,
                       time.perf_counter() - t0)


def _exact_vjp(mod, q, k, v, do, g, normalize, eps):
    from hla_core import runtime as R
    be = R.Backend("exact")
    return R.vjp_quadratic(mod, q, k, v, do, g, normalize, eps, be)
