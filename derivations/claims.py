"""Judging identities stated elsewhere: state systems, combines, algorithms.

A claim is entered as written, in a small SymPy vocabulary:

- `System`: named states, each defined by a prefix sum (`Def(summand)`) or a
  recurrence (`Rec(expr)`), over token factors (`kk` = k_t k_tᵀ, `qv` = q_t v_tᵀ,
  `q1` = q_t as a column, ...) and states at t−1 (`X.prev`) or t (`X.now`);
- `Combine`: a segment concatenation (`X.A`, `X.B`, `rho_A`, `rho_B`, linear maps
  `M.B(Z)`) with its single-token segment.

Semantics come from unrolling: a state X_t = γ^c X_{t−1} + Δ_t is
Σ_{s≤t} γ^{c(t−s)} Δ_s, which turns every state into index-pattern sums; the
weight machinery (weights.py) then decides equalities for every T. Combines
are judged as noncommutative identities (algebra.py). A claim that fails gets
the smallest counterexample a search over exact rational inputs finds.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import sympy
from sympy.core.function import AppliedUndef

from .algebra import (NumericAlgebra, Segment, associativity, base_segment, combine_segments, evaluate)
from .definitions import brute_numeric, rational_inputs
from .pattern import Pattern
from .summaries import GAMMA, Ext, Ref, Term, Tok
from .weights import (Context, Fresh, PSum, PSumAlgebra, bound_le, coef_to_lin, compare, lin_add, pattern_psums,
                      psum_mul)

RHO_A = sympy.Symbol("rho_A", positive=True)
RHO_B = sympy.Symbol("rho_B", positive=True)
FACTORS = ("kk", "qq", "qv", "kv", "kq", "q1", "k1")


def nc(name):
    return sympy.Symbol(name, commutative=False)


class St:
    """A named state: X.prev = X_{t−1}, X.now = X_t, X.A / X.B its values on segments
    A and B, X.map("B", Z) a segment linear map applied to Z."""

    def __init__(self, name):
        self.name = name
        self.prev, self.now = nc(f"{name}[t-1]"), nc(f"{name}[t]")
        self.A, self.B = nc(f"{name}_A"), nc(f"{name}_B")

    def map(self, seg, *args):
        return sympy.Function(f"{self.name}_{seg}", commutative=False)(*args)


def states(names: str):
    return [St(n) for n in names.split()]


def tokens(names: str):
    return [nc(n) for n in names.split()]


@dataclass
class Def:
    """X_t := Σ_{s≤t} γ^{c(t−s)} summand(s)."""
    summand: sympy.Expr
    c: int = 0


@dataclass
class Rec:
    """X_t = expr, with expr = γ^c·X_{t−1} + Δ (Δ free of X)."""
    expr: sympy.Expr


@dataclass
class System:
    defs: dict                      # name -> Def | Rec, in evaluation order
    readout: sympy.Expr = None      # numerator matrix read as x_tᵀ · readout
    readout_den: sympy.Expr = None

    def normal(self) -> dict:
        """name -> (c, Δ terms) with X_t = γ^c X_{t−1} + Δ_t."""
        out = {}
        for name, df in self.defs.items():
            if isinstance(df, Def):
                out[name] = (df.c, to_terms(df.summand))
                continue
            prev = nc(f"{name}[t-1]")
            c, rest = None, []
            for term in sympy.Add.make_args(sympy.expand(df.expr)):
                com, ncp = term.args_cnc()
                if ncp == [prev]:
                    coef = sympy.Mul(*com)
                    if coef == 1:
                        c = 0
                    elif coef == GAMMA:
                        c = 1
                    elif coef.is_Pow and coef.base == GAMMA and coef.exp.is_Integer:
                        c = int(coef.exp)
                    else:
                        raise ValueError(f"{name}: self coefficient {coef} is not a power of γ")
                else:
                    rest.append(term)
            if c is None:
                raise ValueError(f"{name}: recurrence has no {name}[t-1] term")
            delta = sympy.Add(*rest)
            if delta.has(prev) or delta.has(nc(f"{name}[t]")):
                raise ValueError(f"{name}: Δ must not use {name} itself")
            out[name] = (c, to_terms(delta))
        return out


def to_terms(expr) -> list[Term]:
    """SymPy NC expression → formula terms (refs 'prev'/'now'/'A'/'B', tokens, holes)."""
    out = []
    for term in sympy.Add.make_args(sympy.expand(expr)):
        if term == 0:
            continue
        com, ncp = term.args_cnc()
        items = []
        for f in ncp:
            items.append(_item(f))
        out.append(Term(sympy.Mul(*com), tuple(items)))
    return out


def _item(f):
    if isinstance(f, sympy.Symbol):
        n = f.name
        if n in FACTORS:
            return Tok(n)
        if n.startswith("Z") and n[1:].isdigit():
            return Ext(int(n[1:]) - 1)
        if n.endswith("[t-1]"):
            return Ref("prev", n[:-5])
        if n.endswith("[t]"):
            return Ref("now", n[:-3])
        base, seg = n.rsplit("_", 1)
        return Ref(seg, base)
    if isinstance(f, AppliedUndef):
        base, seg = f.func.__name__.rsplit("_", 1)
        return Ref(seg, base, tuple(tuple(to_terms(a)) for a in f.args))
    raise ValueError(f"cannot read {f}")


# ---------------------------------------------------------------------------
# Semantics of a System: unrolled pattern sums

PREFIX = Context(["p0", "p1"], set(), {"P": 1})

class _Unroll:
    def __init__(self, system: System, decay: bool):
        self.norm = system.normal()
        self.fresh = Fresh("s")
        self.decay = decay

    def state(self, name: str, hi: tuple, depth=0) -> list[PSum]:
        if depth > 12:
            raise ValueError(f"state {name}: definitions refer to each other in a cycle")
        c, delta = self.norm[name]
        s = self.fresh()
        cons = (bound_le(("p0", 0), (s, 0), True), bound_le((s, 0), hi))
        lin = {hi[0]: Fraction(c), "1": Fraction(c * hi[1]), s: Fraction(-c)} if c else {}
        base = PSum(Fraction(1), (), cons, tuple(sorted(lin_add(lin).items())))
        alg = _StepAlgebra(self, s, depth)
        return [psum_mul(base, x) for x in evaluate(delta, alg)]


class _StepAlgebra(PSumAlgebra):
    """Pattern sums of one unrolling step: token factors at the step index s, states
    at s−1 ('prev') or s ('now') unrolled further; coefficients are powers of γ."""

    def __init__(self, un: _Unroll, s: str, depth: int):
        super().__init__(PREFIX, ref=None, fresh=un.fresh)
        self.un, self.s, self.depth = un, s, depth

    def scale(self, c, a):
        out = []
        for coef, lin in coef_to_lin(c, self.ctx):
            lin = lin if self.un.decay else {}
            out += [PSum(x.coef * coef, x.word, x.cons,
                         tuple(sorted(lin_add(dict(x.lin), lin).items()))) for x in a]
        return out

    def ref(self, seg, name, fillers):
        off = -1 if seg == "prev" else 0
        return self.un.state(name, (self.s, off), self.depth + 1)

    def tok(self, factor):
        return [PSum(Fraction(1), (("f", factor, self.s),), (), ())]


def system_psums(system: System, expr, decay: bool) -> list[PSum]:
    un = _Unroll(system, decay)
    alg = _StepAlgebra(un, "p1", -1)
    alg.ref = lambda seg, name, fillers: un.state(name, ("p1", 0 if seg == "now" else -1))
    return evaluate(to_terms(expr), alg)


def prove_system_equals_pattern(system: System, pattern: Pattern, decay: bool) -> dict:
    out = {}
    for part, expr, pat in (("numerator", system.readout, pattern),
                            ("denominator", system.readout_den, pattern.denominator())):
        if expr is None:
            continue
        lhs = system_psums(system, expr, decay)
        rhs = pattern_psums(pat if decay else pat.without_decay(), Fresh("r"))
        out[part] = compare(lhs, rhs, PREFIX, decay)
    return out


def prove_exprs_agree(a: System, expr_a, b: System, expr_b, decay: bool) -> dict:
    """expr_a over system a equals expr_b over system b at every t (order types)."""
    return compare(system_psums(a, expr_a, decay), system_psums(b, expr_b, decay), PREFIX, decay)


def prove_systems_agree(a: System, b: System, names: list[str], decay: bool) -> dict:
    return {n: prove_exprs_agree(a, nc(f"{n}[t]"), b, nc(f"{n}[t]"), decay) for n in names}


# ---------------------------------------------------------------------------
# Combines

@dataclass
class Combine:
    formulas: dict            # name -> SymPy expr in X_A, X_B, rho_A, rho_B, maps, Z_k
    token: dict               # name -> SymPy expr in token factors (Z_k for maps)
    holes: dict = field(default_factory=dict)
    decayed: bool = False

    def terms(self):
        return {n: to_terms(e) for n, e in self.formulas.items()}

    def token_terms(self):
        return {n: to_terms(e) for n, e in self.token.items()}


def prove_associative(cb: Combine) -> dict:
    return associativity(cb.terms(), cb.holes, cb.decayed)


def prove_compatible(cb: Combine, serial: System, names: list[str]) -> dict:
    """X ⊕ [t] = serial update of X, as an NC identity (X's parts as symbols)."""
    from .algebra import SympyAlgebra
    f = cb.terms()
    A = base_segment("A", cb.holes, cb.decayed)
    gamma = GAMMA if cb.decayed else sympy.Integer(1)
    tok_terms = cb.token_terms()

    def tok_read(n, fillers):
        alg = SympyAlgebra(ref=None, tok=lambda x: nc(x))
        return sympy.expand(evaluate(tok_terms[n], alg, tuple(fillers)))
    joined = combine_segments(f, A, Segment(tok_read, gamma))
    norm = serial.normal()
    diffs = {}
    for n in names:
        c, delta = norm[n]
        # states at t inside Δ are resolved by substituting their own serial update
        serial_val = gamma ** c * A.read(n, ()) + _eval_delta(delta, norm, A, gamma)
        diff = sympy.expand(joined.read(n, ()) - serial_val)
        if diff != 0:
            diffs[n] = diff
    return {"holds": not diffs, "diffs": diffs}


def _eval_delta(delta, norm, A, gamma):
    from .algebra import SympyAlgebra

    def ref(seg, m, fl):
        if seg == "prev":
            return A.read(m, fl)
        c, d2 = norm[m]
        return gamma ** c * A.read(m, fl) + _eval_delta(d2, norm, A, gamma)
    alg = SympyAlgebra(ref=ref, tok=lambda x: nc(x),
                       coef=lambda c: sympy.sympify(c).subs(GAMMA, gamma))
    return evaluate(delta, alg)


# ---------------------------------------------------------------------------
# Numbers: serial runs, scans in every bracketing, counterexample search

def token_factor(f, q, k, v, t):
    vec = {"q": q, "k": k, "v": v}
    a = vec[f[0]][t]
    b = np.array([Fraction(1)], dtype=object) if f[1] == "1" else vec[f[1]][t]
    return np.multiply.outer(a, b)


def serial_step(norm: dict, prev: dict, q, k, v, t: int, gamma) -> dict:
    """States at token t from the states at t−1 (`norm` = System.normal(); None = zero)."""
    now: dict = {}
    for name, (c, delta) in norm.items():
        alg = NumericAlgebra(
            ref=lambda seg, m, fl: prev.get(m) if seg == "prev" else now.get(m),
            tok=lambda f: token_factor(f, q, k, v, t),
            coef=lambda cc: _num_coef(cc, gamma))
        now[name] = alg.add(alg.scale(GAMMA ** c, prev.get(name)), evaluate(delta, alg))
    return now


def run_serial(system: System, q, k, v, gamma) -> list[dict]:
    """States after each token."""
    norm, prev, out = system.normal(), {}, []
    for t in range(q.shape[0]):
        prev = serial_step(norm, prev, q, k, v, t, gamma)
        out.append(prev)
    return out


def _num_coef(c, gamma, rho=None):
    c = sympy.sympify(c)
    subs = {GAMMA: gamma}
    if rho:
        subs.update(rho)
    val = c.subs(subs)
    return Fraction(str(val)) if val.is_Rational else val


def readout_numeric(expr, state: dict, xt) -> np.ndarray:
    alg = NumericAlgebra(ref=lambda seg, m, fl: state[m], tok=None, coef=lambda c: _num_coef(c, 1))
    val = evaluate(to_terms(expr), alg)
    if val is None or isinstance(val, int):
        return None
    return xt @ val


def scan_numeric(cb: Combine, tree, q, k, v, gamma):
    """Value (dict name -> array or callable, ρ) of a bracketed fold of token segments."""
    if isinstance(tree, int):
        t = tree - 1
        vals = {}
        for n, terms in cb.token_terms().items():
            h = cb.holes.get(n, 0)
            alg = NumericAlgebra(ref=None, tok=lambda f: token_factor(f, q, k, v, t),
                                 coef=lambda c: _num_coef(c, gamma))
            if h:
                vals[n] = (lambda *Z, terms=terms, alg=alg: evaluate(terms, alg, Z))
            else:
                vals[n] = evaluate(terms, alg)
        return vals, (gamma if cb.decayed else 1)
    (a, ra), (b, rb) = scan_numeric(cb, tree[0], q, k, v, gamma), scan_numeric(cb, tree[1], q, k, v, gamma)
    out = {}
    for n, terms in cb.terms().items():
        h = cb.holes.get(n, 0)

        def ref(seg, m, fl, a=a, b=b):
            x = (a if seg == "A" else b)[m]
            return x(*fl) if callable(x) else x
        alg = NumericAlgebra(ref=ref, tok=None,
                             coef=lambda c: _num_coef(c, gamma, {RHO_A: ra, RHO_B: rb}))
        if h:
            out[n] = (lambda *Z, terms=terms, alg=alg: evaluate(terms, alg, Z))
        else:
            out[n] = evaluate(terms, alg)
    return out, ra * rb


def search(check, decayed: bool, T_range=range(1, 5), trials=6, seed=7):
    """Smallest (T, d, dv) with rational inputs where `check` returns a mismatch."""
    rng = random.Random(seed)
    gamma = Fraction(1, 2) if decayed else Fraction(1)
    for T in T_range:
        for d in (1, 2):
            for dv in (1, 2):
                for _ in range(trials):
                    q, k, v = rational_inputs(rng, T, d, dv)
                    bad = check(q, k, v, gamma)
                    if bad:
                        return {"T": T, "d": d, "dv": dv, "gamma": str(gamma),
                                "q": _fmt(q), "k": _fmt(k), "v": _fmt(v), **bad}
    return None


def _fmt(a):
    if a is None:
        return None
    if callable(a):
        return "linear map"
    arr = np.asarray(a, dtype=object)
    return np.vectorize(lambda x: str(Fraction(x)) if not isinstance(x, str) else x, otypes=[object])(
        arr).tolist()


def same(a, b) -> bool:
    a = np.asarray(a if a is not None else 0, dtype=object)
    b = np.asarray(b if b is not None else 0, dtype=object)
    try:
        return bool(np.all(a - b == 0))
    except ValueError:
        return False


def operator_numeric(pattern: Pattern, q, k, v, gamma):
    """Exact operator outputs (numerator, denominator) per token."""
    num = brute_numeric(pattern, q, k, v, gamma)
    den = brute_numeric(pattern.denominator(), q, k, np.ones((q.shape[0], 1), dtype=int).astype(object) *
                        Fraction(1), gamma)
    return num, den


__all__ = ["Combine", "Def", "Rec", "St", "System", "compatibility_sides", "in_claims_vocabulary",
           "prove_associative", "prove_compatible", "prove_system_equals_pattern", "prove_systems_agree",
           "readout_check", "run_serial", "scan_numeric", "search", "states", "tokens"]


# ---------------------------------------------------------------------------
# Arguments for the documents: where a claim and the operator differ, term by term

def readout_check(system: System, expr, pattern: Pattern, decay: bool):
    """The operator's pattern (left) against the claim's readout (right), every order type
    recorded with the contribution of each readout term (weights.WeightCheck)."""
    from .weights import WeightCheck
    terms = to_terms(expr)
    un = _Unroll(system, decay)
    rhs, labels = [], []
    for n, term in enumerate(terms):
        alg = _StepAlgebra(un, "p1", -1)
        alg.ref = lambda seg, name, fillers: un.state(name, ("p1", 0 if seg == "now" else -1))
        part = evaluate([term], alg)
        rhs += part
        labels += [n] * len(part)
    lhs = pattern_psums(pattern if decay else pattern.without_decay(), Fresh("r"))
    r = compare(lhs, rhs, PREFIX, decay, labels=([0] * len(lhs), labels), record=True)
    return WeightCheck("operator → claim", "prefix", pattern, None, terms, r["rows"])


def compatibility_sides(cb: Combine, serial: System, names: list[str]) -> dict:
    """{name: (X ⊕ [t], serial update of X)} with X's summaries as symbols (the two sides
    prove_compatible compares)."""
    f = cb.terms()
    A = base_segment("A", cb.holes, cb.decayed)
    gamma = GAMMA if cb.decayed else sympy.Integer(1)
    tok_terms = cb.token_terms()
    from .algebra import SympyAlgebra

    def tok_read(n, fillers):
        alg = SympyAlgebra(ref=None, tok=lambda x: nc(x))
        return sympy.expand(evaluate(tok_terms[n], alg, tuple(fillers)))
    joined = combine_segments(f, A, Segment(tok_read, gamma))
    norm = serial.normal()
    out = {}
    for n in names:
        c, delta = norm[n]
        out[n] = (joined.read(n, ()),
                  sympy.expand(gamma ** c * A.read(n, ()) + _eval_delta(delta, norm, A, gamma)))
    return out


def in_claims_vocabulary(syns, names: dict, decayed: bool) -> tuple[System, Combine]:
    """A derivation's streaming updates and ⊕ written as a claims System and Combine,
    its summaries renamed by `names` (engine name -> the paper's; others keep theirs)."""
    from .algebra import SympyAlgebra

    def st(n):
        return St(names.get(n, n))

    def expr(terms, seg_map):
        alg = SympyAlgebra(ref=lambda seg, n, f: getattr(st(n), seg_map[seg]), tok=lambda f: nc(f))
        return sympy.expand(evaluate(terms, alg))
    defs, formulas, token = {}, {}, {}
    for syn in syns:
        for n in syn.stream_state:
            defs.setdefault(names.get(n, n), Rec(expr(syn.stream[n], {"A": "prev"})))
        for n in syn.scan_state:
            formulas.setdefault(names.get(n, n), expr(syn.combine[n], {"A": "A", "B": "B"}))
            token.setdefault(names.get(n, n), expr(syn.embeds[n], {}))
    tops = [names.get(syn.namer.by_summary[syn.top], syn.namer.by_summary[syn.top]) for syn in syns]
    system = System(defs, readout=St(tops[0]).now, readout_den=St(tops[1]).now if len(tops) > 1 else None)
    return system, Combine(formulas, token, decayed=decayed)
