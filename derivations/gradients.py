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

import dataclasses
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
    from .weights import index_sum
    out = []
    for cyc, constraints, decay in cycles:
        names = {f.var for f in cyc} | {x for c in constraints for x in (c.a, c.b)} | {OUT}
        ren = {x: fresh() for x in sorted(names)}
        word = tuple(("f", f.in_vec + f.out_vec, ren[f.var]) for f in cyc)
        out.append(index_sum(word, constraints, decay, {x: (v, 0) for x, v in ren.items()},
                             ren.values(), "p1"))
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
                       {"checked": checks, "order_types": n_types, "failures": failures, "scope": "universal"},
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
    if g == 1:
        return g
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
                       {"comparisons": compared, "gamma": str(g), "failures": failures[:10], "scope": "finite"},
                       "gradient", decay,
                       time.perf_counter() - t0)


def _exact_vjp(mod, q, k, v, do, g, normalize, eps):
    from hla_core import runtime as R
    be = R.Backend("exact")
    return R.vjp_quadratic(mod, q, k, v, do, g, normalize, eps, be)


# ---------------------------------------------------------------------------
# Streaming: each gradient term as prefix summaries (up to s, forward in time) and
# suffix summaries (after s, read backward in time), met at s.
#
# A term's indices lie before or at its output index s (the prefix side P) or after it
# (the suffix side F; the old output t is then the largest of them). Every admissible
# assignment of the indices to the two sides factors the chain into components, as
# `summaries.split` does at a segment boundary, with s the end of the prefix. A prefix
# component is an ordinary summary of 1..s (decay γ^{c(s − x)}). The suffix side is one
# component (every index there is ≤ t); with the sequence read backward, from T down to
# s + 1, it is an ordinary summary too, whose end is token s + 1: with τ the reversed
# position, c(t − x) + C_P (t − s) = γ^{C_P} · γ^{(C_P + Σ_F c)(end − τ_t) − Σ_{x≠t} c (end − τ_x)},
# C_P the decay weight of the prefix side. So the forward machinery (split, closure, ⊕,
# the proofs) applies to both sides unchanged; only the readout at s is two-sided.

PREFIX, SUFFIX = "P", "F"


@dataclass
class GradSynthesis:
    term: GradTerm
    readout: list            # Terms over Ref('P', …) (state of 1..s) and Ref('F', …) (of s+1..T)
    prefix: object           # Synthesis of the prefix summaries (forward in time)
    suffix: object           # Synthesis of the suffix summaries (backward in time)


def synthesize_term(term: GradTerm) -> GradSynthesis:
    import itertools

    import sympy

    from .engine import Synthesis
    from .summaries import (END, GAMMA, Namer, Summary, Term, close_relations, closure, embed,
                            make_summary, refs_in, _decompose)
    at = term.at
    idx = [x for x in term.indices if x != at]
    ren = {x: f"#{x}" for x in idx}
    ren[at] = "#@"                                  # slots at s itself: a var tied to the end
    slots = [("f", f.in_vec + f.out_vec, ren[f.var]) for f in term.chain]
    vars_ = list(dict.fromkeys(s[2] for s in slots))
    pairs = [(END if c.a == at else ren[c.a], c.op, END if c.b == at else ren[c.b]) for c in term.constraints]
    if "#@" in vars_:
        pairs += [("#@", "<=", END), (END, "<=", "#@")]
    coeff = {ren[x]: c for x, c in term.decay}
    t_var = ren.get(OUT)
    namer_p, namer_f = Namer(), Namer()
    readout = []
    free = [v for v in vars_ if v != "#@"]
    for assign in itertools.product((PREFIX, SUFFIX), repeat=len(free)):
        side = dict(zip(free, assign), **({"#@": PREFIX} if "#@" in vars_ else {}))
        P = [v for v in vars_ if side[v] == PREFIX]
        F = [v for v in vars_ if side[v] == SUFFIX]
        extra = [(v, "<=", END) for v in P] + [(END, "<", v) for v in F]
        rel = close_relations(vars_ + [END], pairs + extra)
        if rel is None:                             # the constraints forbid this assignment
            continue
        # decay weight of the prefix side, s itself included (whether or not a factor sits at s)
        c_p = sum((coeff.get(v, Fraction(0)) for v in P if v != "#@"), Fraction(0)) + coeff.get("#@", Fraction(0))
        full = Summary(tuple(slots), tuple(sorted(rel.items())),
                       tuple(sorted((v, coeff.get(v, Fraction(0))) for v in P)))

        def build(seg, sub_slots, sub_pairs, comp_vars, c_p=c_p, F=F):
            if seg == PREFIX:
                return namer_p(make_summary(sub_slots, sub_pairs, {v: coeff.get(v, Fraction(0))
                                                                   for v in comp_vars}))
            flipped = [(b, op, a) for a, op, b in sub_pairs]
            dec = {v: -coeff.get(v, Fraction(0)) for v in comp_vars}
            dec[t_var] = c_p + sum((coeff.get(v, Fraction(0)) for v in F if v != t_var), Fraction(0))
            return namer_f(make_summary(sub_slots, flipped, dec))
        seq = _decompose(full, side, {PREFIX}, namer_p, None, build=build)
        coef = GAMMA ** sympy.Rational(c_p.numerator, c_p.denominator) if F else sympy.Integer(1)
        readout.append(Term(coef, seq))

    def side_synthesis(seg, namer):
        start = list(dict.fromkeys(refs_in(readout, seg)))
        stream = closure(start, namer, one_token=True, sides=("A",))
        combine = closure(start, namer, one_token=False, sides=("A", "B"))
        carry = list(closure(start, namer, one_token=False, sides=("A",)))
        embeds = {n: embed(namer.by_name[n]) for n in combine}
        return Synthesis(None, namer, None, (), stream, combine, embeds, stream_state=list(stream),
                         carry_state=carry, scan_state=list(combine))
    return GradSynthesis(term, readout, side_synthesis(PREFIX, namer_p), side_synthesis(SUFFIX, namer_f))


def _suffix_psums(s, lo: tuple, hi: tuple, fillers: list, fresh):
    """Meaning, in forward time, of a suffix-side summary over (lo, hi]: its relations
    read backward, its decay measured from the segment's first token lo + 1."""
    from .summaries import END
    from .weights import PSum, bound_le, with_slots
    ren = {v: fresh() for v in s.vars}
    cons = []
    for (a, b), op in s.rel:
        if b == END:       # x ≤ end holds for all; x < end only follows from x < y ≤ end
            continue
        if a == END:
            raise ValueError(f"suffix summary {s.describe()} is tied to its end; not a readout summary")
        cons.append(bound_le((ren[b], 0), (ren[a], 0), op == "<"))
    for v in ren.values():
        cons += [bound_le(lo, (v, 0), strict=True), bound_le((v, 0), hi)]
    lin: dict = {}
    for v, c in s.decay:
        for k, x in ((ren[v], c), (lo[0], -c), ("1", -c * (1 + lo[1]))):
            lin[k] = lin.get(k, Fraction(0)) + x
    base = PSum(Fraction(1), (), tuple(cons), tuple(sorted((k, x) for k, x in lin.items() if x)))
    return with_slots(base, s.slots, ren, fillers)


def _term_psums(term: GradTerm, fresh):
    """The term's own sum at output s = p1, every index in (p0, p2], read from its data."""
    from .weights import bound_le, index_sum
    ren = {x: fresh() for x in term.indices if x != term.at}
    pos = {x: (v, 0) for x, v in ren.items()}
    pos[term.at] = ("p1", 0)
    var_at = None
    if any(f.var == term.at for f in term.chain):   # factors at s itself: a var pinned to p1
        var_at = fresh()
    word = tuple(("f", f.in_vec + f.out_vec, var_at if f.var == term.at else ren[f.var]) for f in term.chain)
    s = index_sum(word, term.constraints, term.decay, pos, ren.values(), "p2")
    if var_at is not None:
        s = dataclasses.replace(s, cons=s.cons + (bound_le((var_at, 0), ("p1", 0)), bound_le(("p1", 0), (var_at, 0))))
    return [s]


def _update_checks(syn) -> list:
    """Each one-token update of a side equals its summary (order types), as prove_streaming."""
    from .proofs import _ext_psums
    from .weights import Context, Fresh, compare, formula_psums, summary_psums
    ctx = Context(["p0", "p1", "p2"], {"p2"}, {"A": 1, "T": 2})
    out = []
    for name in syn.stream_state:
        s = syn.namer.by_name[name]
        fr = Fresh()
        holes = _ext_psums(s.holes)

        def ref(seg, n, fillers, alg):
            lo, hi = alg.ctx.bounds(seg)
            return summary_psums(syn.namer.by_name[n], lo, hi, fillers, alg.fresh)
        lhs = summary_psums(s, ("p0", 0), ("p2", 0), list(holes), fr)
        rhs = formula_psums(syn.stream[name], ctx, ref, tok_seg="T", holes=holes, fresh=fr)
        out.append((f"update {name}", compare(lhs, rhs, ctx)))
    return out


def prove_streaming_gradients(p: Pattern, part: str, decay: bool) -> list:
    """Certificates for every gradient term of `p`: the two-sided readout at s equals the
    term (order types, every T); each side's one-token updates, ⊕, associativity and scan
    equivalence, by the forward proofs (the suffix side in reversed time)."""
    from .engine import Certificate
    from .proofs import prove_associativity, prove_combine, prove_scan
    from .summaries import OutOfReach
    from .weights import Context, Fresh, compare, formula_psums, summary_psums
    t0 = time.perf_counter()
    ctx = Context(["p0", "p1", "p2"], set(), {PREFIX: 1, SUFFIX: 2})
    readout_checks, update_checks, failures = [], [], []
    side_certs: dict = {"combine": [], "associativity": [], "scan": []}
    out_of_reach = []
    for wrt, terms in all_gradient_terms(p).items():
        for n, term in enumerate(terms):
            label = f"d{wrt} term {n + 1}"
            try:
                gs = synthesize_term(term)
            except OutOfReach as exc:
                out_of_reach.append(f"{label}: {exc}")
                continue

            def ref(seg, name, fillers, alg, gs=gs):
                lo, hi = alg.ctx.bounds(seg)
                if seg == PREFIX:
                    return summary_psums(gs.prefix.namer.by_name[name], lo, hi, fillers, alg.fresh)
                return _suffix_psums(gs.suffix.namer.by_name[name], lo, hi, fillers, alg.fresh)
            fr = Fresh()
            r = compare(_term_psums(term, fr), formula_psums(gs.readout, ctx, ref, fresh=fr), ctx, decay)
            readout_checks.append((label, r))
            # each side is an ordinary summary set in its own direction of time
            for side, syn in ((PREFIX, gs.prefix), (SUFFIX, gs.suffix)):
                update_checks += [(f"{label} {side} {name}", res) for name, res in _update_checks(syn)]
                side_certs["combine"].append((f"{label} {side}", prove_combine(syn, part, decay)))
                side_certs["associativity"].append((f"{label} {side}", prove_associativity(syn, part, decay)))
                side_certs["scan"].append((f"{label} {side}", prove_scan(syn, part, decay)))
    for label, r in readout_checks + update_checks:
        if not r["holds"]:
            failures.append(f"{label}: {r['mismatch']}")
    certs = [Certificate("gradient streaming: readout at s = the term; one-token updates (every T)",
                         "order types (weights on index tuples)", not failures,
                         {"checked": len(readout_checks) + len(update_checks),
                          "out_of_reach": out_of_reach,
                          "order_types": sum(r["order_types"] for _, r in readout_checks + update_checks),
                          "failures": failures[:10], "scope": "universal"}, part, decay, time.perf_counter() - t0)]
    for kind, sel in side_certs.items():
        bad = [f"{lbl}: {c.details.get('failures')}" for lbl, c in sel if not c.holds]
        certs.append(Certificate(f"gradient {sel[0][1].identity}" if sel else f"gradient {kind}",
                                 sel[0][1].method if sel else "", not bad,
                                 {"summaries": len(sel), "failures": bad[:10], "scope": "universal"}, part, decay))
    return certs
