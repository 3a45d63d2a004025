"""The proofs behind a derivation, each leaving a certificate.

For every pattern (numerator and denominator, with and without decay):

- translation: the Pattern's own sum equals the top summary the synthesis starts
  from, by order types (weights.py) — every T, d, dv;
- readout + streaming identity: the readout and each one-token update equal
  the defining pattern sums, by order types (weights.py) — every T, d, dv;
- ⊕ correctness: each combine formula equals the summary of the concatenated
  segment, by order types;
- ⊕ associativity: (A⊕B)⊕C = A⊕(B⊕C) as an identity of noncommutative
  polynomials in the summaries of three generic segments (and the empty
  segment is neutral) — holds for matrices of every size;
- scan equivalence: X ⊕ [token] equals the serial update as a noncommutative
  identity; with associativity, induction on T gives: every bracketing of the
  token segments yields the serial state, for every T;
- exact check: noncommutative expansion with one symbol per token factor, every
  bracketing of every T ≤ 4, against the brute-force pattern sum.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass

import sympy

from .algebra import (SympyAlgebra, associativity, base_segment, combine_segments, evaluate, hole_symbols,
                      nc_symbol, token_segment)
from .engine import Certificate, Derivation, Synthesis
from .summaries import END, GAMMA, Summary, Term
from .weights import Context, Fresh, WeightCheck, compare, formula_psums, pattern_psums, summary_psums

# What each certificate establishes: for every T (and d, dv, γ), or only for the sizes tried.
UNIVERSAL, FINITE = "universal", "finite"

P_STREAM = Context(["p0", "p1", "p2"], {"p2"}, {"A": 1, "T": 2})
P_SPLIT = Context(["p0", "p1", "p2"], set(), {"A": 1, "B": 2})
P_PREFIX = Context(["p0", "p1"], set(), {"P": 1})
P_TOKEN = Context(["p0", "p1"], {"p1"}, {"T": 1})


def _ref(syn: Synthesis):
    def ref(seg, name, fillers, alg):
        lo, hi = alg.ctx.bounds(seg)
        return summary_psums(syn.namer.by_name[name], lo, hi, fillers, alg.fresh)
    return ref


def _ext_psums(n: int):
    from .weights import PSum
    from fractions import Fraction
    return tuple([PSum(Fraction(1), (("x", f"Z{k + 1}"),), (), ())] for k in range(n))


def _timed(fn):
    t0 = time.perf_counter()
    cert = fn()
    cert.seconds = time.perf_counter() - t0
    return cert


# ---------------------------------------------------------------------------
# What a proof records for the documents when asked (record=True)

@dataclass
class Bracketings:
    """⊕ associativity for one summary: both bracketings of three generic segments,
    expanded (noncommutative polynomials in the segments' summaries and ρ's)."""
    name: str
    left: sympy.Expr     # (A ⊕ B) ⊕ C
    right: sympy.Expr    # A ⊕ (B ⊕ C)


@dataclass
class ScanStep:
    """The two identities scan equivalence rests on, for one streaming summary."""
    name: str
    joined: sympy.Expr   # X ⊕ [t], X's summaries as symbols
    serial: sympy.Expr   # update(X, t)
    token: sympy.Expr    # [t] (the one-token segment)
    first: sympy.Expr    # update(0, t)


CONTEXTS = {"prefix": P_PREFIX, "stream": P_STREAM, "split": P_SPLIT, "token": P_TOKEN}


def _check(name, context, lhs_psums, lhs, lhs_name, rhs_parts, decay, record):
    """Compare lhs_psums with the concatenated rhs_parts [(label object, psums)]."""
    rhs = [x for _, ps in rhs_parts for x in ps]
    labels = ([0] * len(lhs_psums), [n for n, (_, ps) in enumerate(rhs_parts) for _ in ps])
    r = compare(lhs_psums, rhs, CONTEXTS[context], decay, labels=labels, record=record)
    if record:
        r["check"] = WeightCheck(name, context, lhs, lhs_name, [o for o, _ in rhs_parts], r.pop("rows"))
    return name, r


def _terms_psums(terms, context, ref, fresh, tok_seg=None, holes=()):
    """[(term, its pattern sums)] for each term of a formula (same sums as the whole)."""
    return [(t, formula_psums([t], CONTEXTS[context], ref, tok_seg=tok_seg, holes=holes, fresh=fresh))
            for t in terms]


def _weights_cert(identity, checks, part, decay):
    total = sum(r["order_types"] for _, r in checks)
    bad = [(name, r["mismatch"]) for name, r in checks if not r["holds"]]
    details = {"checked": [name for name, _ in checks], "order_types": total,
               "failures": [f"{n}: {m}" for n, m in bad], "scope": UNIVERSAL}
    if any("check" in r for _, r in checks):
        details["argument"] = [r["check"] for _, r in checks]
    return Certificate(identity, "order types (weights on index tuples)", not bad, details, part, decay)


def prove_translation(syn: Synthesis, part: str, decay: bool, record: bool = False) -> Certificate:
    """The summary every other proof starts from is the user's Pattern: the Pattern's
    sum, read straight from its slots, constraints and decay, equals the top summary
    on the prefix, by order types (every T)."""
    fr = Fresh()
    lhs = pattern_psums(syn.pattern, fr)
    rhs = summary_psums(syn.top, ("p0", 0), ("p1", 0), [], fr)
    return _weights_cert("translation (the Pattern's sum = the top summary)",
                         [_check("pattern → top summary", "prefix", lhs, syn.pattern, None,
                                 [(syn.top, rhs)], decay, record)], part, decay)


def prove_streaming(syn: Synthesis, part: str, decay: bool, record: bool = False) -> Certificate:
    ref = _ref(syn)
    checks = []
    fr = Fresh()
    lhs = summary_psums(syn.top, ("p0", 0), ("p1", 0), [], fr)
    rhs = _terms_psums([Term(sympy.Integer(1), syn.readout)], "prefix", ref, fr)
    checks.append(_check("readout", "prefix", lhs, syn.top, syn.namer.by_summary.get(syn.top), rhs, decay,
                         record))
    for name in syn.stream_state:
        s = syn.namer.by_name[name]
        fr = Fresh()
        holes = _ext_psums(s.holes)
        lhs = summary_psums(s, ("p0", 0), ("p2", 0), list(holes), fr)
        rhs = _terms_psums(syn.stream[name], "stream", ref, fr, tok_seg="T", holes=holes)
        checks.append(_check(f"update {name}", "stream", lhs, s, name, rhs, decay, record))
    return _weights_cert("streaming identity (readout and online updates)", checks, part, decay)


def prove_combine(syn: Synthesis, part: str, decay: bool, record: bool = False) -> Certificate:
    ref = _ref(syn)
    checks = []
    for name in syn.scan_state:
        s = syn.namer.by_name[name]
        holes = _ext_psums(s.holes)
        fr = Fresh()
        lhs = summary_psums(s, ("p0", 0), ("p2", 0), list(holes), fr)
        rhs = _terms_psums(syn.combine[name], "split", ref, fr, holes=holes)
        checks.append(_check(f"⊕ {name}", "split", lhs, s, name, rhs, decay, record))
        fr = Fresh()
        lhs = summary_psums(s, ("p0", 0), ("p1", 0), list(holes), fr)
        rhs = _terms_psums(syn.embeds[name], "token", ref, fr, tok_seg="T", holes=holes)
        checks.append(_check(f"token segment {name}", "token", lhs, s, name, rhs, decay, record))
    return _weights_cert("segment summaries and ⊕ (summary of a concatenation)", checks, part, decay)


def prove_associativity(syn: Synthesis, part: str, decay: bool, record: bool = False) -> Certificate:
    formulas = {n: syn.combine[n] for n in syn.scan_state}
    res = associativity(formulas, syn.holes, decay, check_neutral=not syn.has_end_relations)
    failures = [f"{n}: (A⊕B)⊕C − A⊕(B⊕C) = {d}" for n, d in res["diffs"].items()]
    if res["neutral"] is False:
        failures.append("the empty segment is not neutral")
    details = {"summaries": list(syn.scan_state), "terms": res["terms"],
               "neutral_element": res["neutral"], "failures": failures, "scope": UNIVERSAL}
    if record:
        details["argument"] = _bracketings(formulas, syn.holes, decay)
    return Certificate("⊕ associativity (and neutral empty segment)",
                       "noncommutative polynomial identity (SymPy)", not failures, details, part, decay)


def _bracketings(formulas: dict, holes: dict, decay: bool) -> list[Bracketings]:
    """Both bracketings expanded, as `associativity` forms them (for the documents)."""
    A, B, C = (base_segment(s, holes, decay) for s in "ABC")
    left = combine_segments(formulas, combine_segments(formulas, A, B), C)
    right = combine_segments(formulas, A, combine_segments(formulas, B, C))
    return [Bracketings(n, left.read(n, hole_symbols(holes.get(n, 0))),
                        right.read(n, hole_symbols(holes.get(n, 0)))) for n in formulas]


def _serial_step(syn: Synthesis, prev: dict, token, gamma) -> dict:
    """One streaming update with symbolic previous state `prev` (name -> expr)."""
    holes = syn.holes
    out = {}
    for name in syn.stream_state:
        alg = SympyAlgebra(ref=lambda seg, n, f: prev[n](f),
                           tok=lambda f: nc_symbol(f"{f}_{token}"),
                           coef=lambda c: sympy.sympify(c).subs(GAMMA, gamma))
        out[name] = sympy.expand(evaluate(syn.stream[name], alg, hole_symbols(holes[name])))
    return out


def prove_scan(syn: Synthesis, part: str, decay: bool, record: bool = False) -> Certificate:
    holes = syn.holes
    gamma = GAMMA if decay else sympy.Integer(1)
    A = base_segment("A", holes, decay)
    tok = token_segment(syn.embeds, "t", gamma)
    joined = combine_segments(syn.combine, A, tok)
    failures, steps = [], []
    prev = {n: (lambda f, n=n: A.read(n, f)) for n in syn.scan_state}
    serial = _serial_step(syn, prev, "t", gamma)
    zero_prev = {n: (lambda f: sympy.Integer(0)) for n in syn.scan_state}
    first = _serial_step(syn, zero_prev, "t", gamma)
    for name in syn.stream_state:
        zs = hole_symbols(holes[name])
        step = ScanStep(name, joined.read(name, zs), serial[name], tok.read(name, zs), first[name])
        if sympy.expand(step.joined - step.serial) != 0:
            failures.append(f"{name}: X ⊕ [t] differs from the serial update")
        if sympy.expand(step.token - step.first) != 0:
            failures.append(f"{name}: [t] differs from the update of the zero state")
        steps.append(step)
    details = {"state": list(syn.stream_state), "failures": failures, "scope": UNIVERSAL}
    if record:
        details["argument"] = steps
    return Certificate("scan equivalence (any bracketing = serial recurrence, every T)",
                       "noncommutative identity X ⊕ [t] = update(X, t), induction with associativity",
                       not failures, details, part, decay)


# ---------------------------------------------------------------------------
# Exact noncommutative check for small T

def brute_nc(s: Summary, T: int, gamma, zs=()) -> sympy.Expr:
    """Σ over index tuples in 1..T of the summary's word, tokens as symbols."""
    rel = s.relations()
    vars_ = s.vars
    total = sympy.Integer(0)
    for tup in itertools.product(range(1, T + 1), repeat=len(vars_)):
        val = dict(zip(vars_, tup))
        val[END] = T
        if not all((val[a] < val[b]) if op == "<" else (val[a] <= val[b]) for (a, b), op in rel.items()):
            continue
        w = gamma ** sum((c * (T - val[v]) for v, c in s.decay), 0)
        word, k = sympy.Integer(1), 0
        for sl in s.slots:
            if sl[0] == "h":
                word = word * zs[k]
                k += 1
            else:
                word = word * nc_symbol(f"{sl[1]}_{val[sl[2]]}")
        total += w * word
    return sympy.expand(total)


def brute_pattern_nc(p, T: int, gamma) -> sympy.Expr:
    """o_T (without the leading x_Tᵀ) straight from the Pattern's own constraints."""
    total = sympy.Integer(0)
    for val, expo in p.valuations(range(1, T + 1), T):
        word = sympy.Integer(1)
        for sl in p.slots:
            word = word * nc_symbol(f"{sl.factor}_{val[sl.var]}")
        total += gamma ** sympy.Rational(expo.numerator, expo.denominator) * word
    return sympy.expand(total)


def bracketings(lo: int, hi: int):
    """All binary bracketings of tokens lo..hi as nested tuples."""
    if lo == hi:
        yield lo
        return
    for mid in range(lo, hi):
        for left in bracketings(lo, mid):
            for right in bracketings(mid + 1, hi):
                yield (left, right)


def prove_exact(syn: Synthesis, part: str, decay: bool, T_max: int) -> Certificate:
    holes = syn.holes
    gamma = GAMMA if decay else sympy.Integer(1)
    failures, n_brackets, n_compared = [], 0, 0

    def build(tree):
        if isinstance(tree, int):
            return token_segment(syn.embeds, tree, gamma)
        return combine_segments(syn.combine, build(tree[0]), build(tree[1]))

    def readout_of(read):
        alg = SympyAlgebra(ref=lambda seg, n, f: read(n, f), tok=None)
        return sympy.expand(evaluate([Term(sympy.Integer(1), syn.readout)], alg))

    for T in range(1, T_max + 1):
        want = {n: brute_nc(syn.namer.by_name[n], T, gamma, hole_symbols(holes[n])) for n in syn.scan_state}
        want_out = brute_pattern_nc(syn.pattern, T, gamma)
        for tree in bracketings(1, T):
            n_brackets += 1
            seg = build(tree)
            for n in syn.scan_state:
                n_compared += 1
                if sympy.expand(seg.read(n, hole_symbols(holes[n])) - want[n]) != 0:
                    failures.append(f"T={T} bracketing {tree}: {n}")
            n_compared += 1
            if readout_of(seg.read) != want_out:
                failures.append(f"T={T} bracketing {tree}: readout")
    state = {n: (lambda f: sympy.Integer(0)) for n in syn.scan_state}
    for t in range(1, T_max + 1):
        vals = _serial_step(syn, state, t, gamma)
        state = {n: (lambda f, e=vals[n], n=n: e.subs(dict(zip(hole_symbols(holes[n]), f))))
                 for n in syn.stream_state}
        for n in syn.stream_state:
            n_compared += 1
            if sympy.expand(vals[n] - brute_nc(syn.namer.by_name[n], t, gamma, hole_symbols(holes[n]))) != 0:
                failures.append(f"serial t={t}: {n}")
        n_compared += 1
        if readout_of(lambda n, f: state[n](f)) != brute_pattern_nc(syn.pattern, t, gamma):
            failures.append(f"serial t={t}: readout")
    return Certificate(f"exact check, every bracketing of every T ≤ {T_max}",
                       "noncommutative expansion with one symbol per token factor",
                       not failures, {"bracketings": n_brackets, "comparisons": n_compared,
                                      "failures": failures, "scope": FINITE, "T_max": T_max},
                       part, decay)


def prove_synthesis(syn: Synthesis, part: str, decay: bool, exact_T: int,
                    record: bool = False) -> list[Certificate]:
    return [
        _timed(lambda: prove_translation(syn, part, decay, record)),
        _timed(lambda: prove_streaming(syn, part, decay, record)),
        _timed(lambda: prove_combine(syn, part, decay, record)),
        _timed(lambda: prove_associativity(syn, part, decay, record)),
        _timed(lambda: prove_scan(syn, part, decay, record)),
        _timed(lambda: prove_exact(syn, part, decay, exact_T)),
    ]


_RECORD = [False]


@contextlib.contextmanager
def recording():
    """Inside `with recording():`, every proof (through `derive`, say) records its
    argument: each certificate's details['argument'] holds what the documents print
    (order-type rows term by term, both bracketings, the scan identities)."""
    _RECORD.append(True)
    try:
        yield
    finally:
        _RECORD.pop()


def prove_all(d: Derivation, exact_T: int = 4, record: bool | None = None) -> list[Certificate]:
    """Every certificate of a derivation; `record` (default: inside `recording()`) keeps
    each proof's argument in its certificate's details['argument']."""
    record = _RECORD[-1] if record is None else record
    decay = d.pattern.has_decay
    certs = []
    if d.definition is not None:
        from .definitions import prove_expansion
        certs += prove_expansion(d, record)
    certs += prove_synthesis(d.num, "numerator", decay, exact_T, record)
    certs += prove_synthesis(d.den, "denominator", decay, exact_T, record)
    return certs
