"""Proofs on weights: two sums of index patterns are equal for every T, d, dv.

Every quantity here is a sum of *pattern sums*: a word of token-local factors
(noncommuting, from independent tokens), an index per factor, order relations
among the indices and the segment boundaries, a rational coefficient and a decay
γ^{linear form}. Two such expressions are equal for all inputs when, for every
word and every tuple of token indices, the total weights agree (the words of
distinct tuples are distinct monomials of the free algebra, so this is also
necessary for generic matrices).

The tuples are split by *order type*: which segment each index lies in, the weak
order of the indices inside it, and whether the top ones sit at the segment's
end. Inside one order type every relation has one truth value and every decay
is γ to one linear form in the free values, so equality is a finite comparison
of coefficients per linear form (distinct linear forms are independent
functions on an order type, because segment lengths and gaps are unbounded).
The result holds for every T: T never enters.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction

import sympy

from .algebra import evaluate
from .summaries import END, GAMMA, Summary

Lin = tuple  # sorted ((symbol, Fraction), ...), symbol '1' for the constant


def lin_add(*forms: dict) -> dict:
    out: dict = defaultdict(Fraction)
    for f in forms:
        for k, v in f.items():
            out[k] += v
    return {k: v for k, v in out.items() if v != 0}


@dataclass(frozen=True)
class PSum:
    coef: Fraction
    word: tuple          # ('f', factor, var) | ('x', external-name)
    cons: tuple          # (a, op, b): names of vars or points; op '<=', '<', '=='
    lin: tuple           # decay exponent as sorted ((symbol, coeff), ...)


def bound_le(a: tuple, b: tuple, strict: bool = False) -> tuple:
    """a + da (<= or <) b + db as a relation without offsets (integers)."""
    (an, da), (bn, db) = a, b
    k = db - da - (1 if strict else 0)
    if k == 0:
        return (an, "<=", bn)
    if k == -1:
        return (an, "<", bn)
    raise ValueError(f"relation {an}{da:+d} {'<' if strict else '<='} {bn}{db:+d} is not an order relation")


class Fresh:
    def __init__(self, prefix="y"):
        self.n, self.prefix = 0, prefix

    def __call__(self):
        self.n += 1
        return f"{self.prefix}{self.n}"


def summary_psums(s: Summary, lo: tuple, hi: tuple, fillers: list, fresh: Fresh) -> list[PSum]:
    """Meaning of summary `s` over the interval (lo, hi] (bounds: (name, offset))."""
    ren = {v: fresh() for v in s.vars}
    cons = []
    for (a, b), op in s.rel:
        if b == END and op == "<=":
            continue
        aa = (ren[a], 0) if a != END else hi
        bb = (ren[b], 0) if b != END else hi
        cons.append(bound_le(aa, bb, op == "<"))
    for v in ren.values():
        cons.append(bound_le(lo, (v, 0), strict=True))
        cons.append(bound_le((v, 0), hi))
    lin = {}
    for v, c in s.decay:
        lin = lin_add(lin, {hi[0]: c, "1": c * hi[1], ren[v]: -c})
    base = PSum(Fraction(1), (), tuple(cons), tuple(sorted(lin.items())))
    return with_slots(base, s.slots, ren, fillers)


def with_slots(base: PSum, slots, ren: dict, fillers: list) -> list[PSum]:
    """`base` (the index constraints and decay) times a summary's word: its factors under
    the names `ren`, each hole replaced by its filler (a list of PSums)."""
    parts = [[base]]
    k = 0
    for sl in slots:
        if sl[0] == "h":
            parts.append(fillers[k])
            k += 1
        else:
            parts.append([PSum(Fraction(1), (("f", sl[1], ren[sl[2]]),), (), ())])
    out = [PSum(Fraction(1), (), (), ())]
    for p in parts:
        out = [psum_mul(x, y) for x in out for y in p]
    return out


def index_sum(word: tuple, constraints, decay, pos: dict, free, hi: str) -> PSum:
    """One pattern sum written over index names: `pos` maps each name (the output 't'
    among them) to its bound (symbol, offset), a fresh var or a point; the vars `free`
    range over (p0, hi]; the γ exponent is Σ c (t − x) over `decay`."""
    cons = [bound_le(pos[c.a], pos[c.b], c.op == "<") for c in constraints if c.op != "=="]
    cons += [(pos[c.a][0], "==", pos[c.b][0]) for c in constraints if c.op == "=="]
    for v in free:
        cons += [bound_le(("p0", 0), (v, 0), True), bound_le((v, 0), (hi, 0))]
    lin: dict = {}
    for x, c in decay:
        for k, y in ((pos["t"][0], c), (pos[x][0], -c)):
            lin[k] = lin.get(k, Fraction(0)) + y
    return PSum(Fraction(1), word, tuple(cons), tuple(sorted((k, y) for k, y in lin.items() if y)))


def pattern_psums(p, fresh) -> list[PSum]:
    """The Pattern's own sum over the prefix (p0, p1], t = p1, read straight from its
    slots, constraints and decay (no summary in between)."""
    ren = {x: fresh() for x in p.indices}
    pos = {x: (v, 0) for x, v in ren.items()}
    pos["t"] = ("p1", 0)
    word = tuple(("f", s.factor, ren[s.var]) for s in p.slots)
    return [index_sum(word, p.constraints, p.decay_coeffs, pos, ren.values(), "p1")]


def psum_mul(x: PSum, y: PSum) -> PSum:
    return PSum(x.coef * y.coef, x.word + y.word, x.cons + y.cons,
                tuple(sorted(lin_add(dict(x.lin), dict(y.lin)).items())))


@dataclass
class Context:
    """Boundary points p0 = 0 < p1 < ... ; segment k is (p_{k-1}, p_k]."""
    points: list
    single: set = field(default_factory=set)   # points p_k whose segment is one token
    seg_name: dict = field(default_factory=dict)  # segment label -> k

    def bounds(self, seg: str) -> tuple[tuple, tuple]:
        k = self.seg_name[seg]
        return (self.points[k - 1], 0), (self.points[k], 0)

    def point_value(self) -> dict:
        """Points as linear forms in free point symbols (single-token chains resolved)."""
        val = {self.points[0]: {}}
        for k in range(1, len(self.points)):
            p = self.points[k]
            if p in self.single:
                val[p] = lin_add(val[self.points[k - 1]], {"1": Fraction(1)})
            else:
                val[p] = {p: Fraction(1)}
        return val


class PSumAlgebra:
    """Evaluate formula terms into lists of PSum; coefficients in γ and ρ_seg."""

    def __init__(self, ctx: Context, ref, tok_seg: str | None = None, fresh: Fresh | None = None):
        self.ctx, self._ref, self.tok_seg = ctx, ref, tok_seg
        self.fresh = fresh or Fresh()

    def zero(self):
        return []

    def one(self):
        return [PSum(Fraction(1), (), (), ())]

    def add(self, a, b):
        return a + b

    def mul(self, a, b):
        return [psum_mul(x, y) for x in a for y in b]

    def scale(self, c, a):
        out = []
        for coef, lin in coef_to_lin(c, self.ctx):
            out += [PSum(x.coef * coef, x.word, x.cons,
                         tuple(sorted(lin_add(dict(x.lin), lin).items()))) for x in a]
        return out

    def ref(self, seg, name, fillers):
        return self._ref(seg, name, fillers, self)

    def tok(self, factor):
        lo, hi = self.ctx.bounds(self.tok_seg)
        v = self.fresh()
        return [PSum(Fraction(1), (("f", factor, v),),
                     (bound_le(lo, (v, 0), True), bound_le((v, 0), hi)), ())]


def coef_to_lin(c, ctx: Context) -> list[tuple[Fraction, dict]]:
    """Commutative coefficient (polynomial in γ, ρ_seg) → [(rational, exponent form)]."""
    out = []
    for term in sympy.Add.make_args(sympy.expand(sympy.sympify(c))):
        if term == 0:
            continue
        coef, lin = Fraction(1), {}
        for fac in sympy.Mul.make_args(term):
            base, exp = fac.as_base_exp()
            if base.is_Number:
                coef *= Fraction(str(fac))
                continue
            e = Fraction(str(exp))
            if base == GAMMA:
                lin = lin_add(lin, {"1": e})
            elif str(base).startswith("rho_"):
                (lo, _), (hi, _) = ctx.bounds(str(base)[4:])
                lin = lin_add(lin, {hi: e, lo: -e})
            else:
                raise ValueError(f"coefficient {c} has an unknown factor {fac}")
        out.append((coef, lin))
    return out


def formula_psums(terms, ctx: Context, ref, tok_seg=None, holes=(), fresh=None) -> list[PSum]:
    return evaluate(terms, PSumAlgebra(ctx, ref, tok_seg, fresh), holes)


# ---------------------------------------------------------------------------
# Order types

def _ordered_partitions(items: list):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _ordered_partitions(rest):
        # first joins an existing block, or becomes a new block at any position
        for n in range(len(part)):
            yield part[:n] + [[first] + part[n]] + part[n + 1:]
        for n in range(len(part) + 1):
            yield part[:n] + [[first]] + part[n:]


def order_types(n: int, ctx: Context):
    """Yield for each slot (segment k, rank, at_end) over all order types."""
    m = len(ctx.points) - 1
    for segs in itertools.product(range(1, m + 1), repeat=n):
        per = defaultdict(list)
        for j, k in enumerate(segs):
            per[k].append(j)
        choices = []
        for k, slots in sorted(per.items()):
            if ctx.points[k] in ctx.single:
                choices.append([(k, [slots], True)])
            else:
                choices.append([(k, part, end) for part in _ordered_partitions(slots)
                                for end in (False, True)])
        for combo in itertools.product(*choices):
            ot = [None] * n
            for k, part, end in combo:
                for r, block in enumerate(part):
                    for j in block:
                        ot[j] = (k, r, end and r == len(part) - 1)
            yield tuple(ot)


def _cmp(x, y) -> int:
    return (x > y) - (x < y)


def _compare_vals(a, b) -> int:
    # values: ('v', k, r, end) or ('p', j)
    if a[0] == "p" and b[0] == "p":
        return _cmp(a[1], b[1])
    if a[0] == "p":
        return -_compare_vals(b, a)
    if b[0] == "p":
        k, j = a[1], b[1]
        if k != j:
            return -1 if k < j else 1
        return 0 if a[3] else -1
    return _cmp((a[1], a[2]), (b[1], b[2])) if (a[1], a[2]) != (b[1], b[2]) else 0


def _holds(op, c):
    return c <= 0 if op == "<=" else (c < 0 if op == "<" else c == 0)


@dataclass(frozen=True)
class Contribution:
    """What one pattern sum of one side contributes on one order type.

    label: which term of its side it came from (the caller's labels, else its position);
    coef: its rational coefficient; form: the γ exponent as the comparison sees it, a
    linear form (sorted ((symbol, coeff), ...)) in the free values of the order type
    ('b{k}.{r}': the common value of the indices of block r of segment k) and the free
    points; raw: the γ exponent before the order type is applied, with each index
    replaced by its slot (('slot', n), coeff) and the points kept by name."""
    label: object
    coef: Fraction
    form: tuple
    raw: tuple


@dataclass(frozen=True)
class OrderTypeRow:
    """One order type of one word: the weight of each side, term by term.

    word: the factor of each slot (('x', name) for an external hole); order_type: per
    slot (segment k, rank inside the segment, at the segment's end)."""
    word: tuple
    order_type: tuple
    lhs: tuple
    rhs: tuple

    def weight(self, side: str) -> dict:
        """{form: total coefficient} of one side ('lhs' or 'rhs'), zeros dropped."""
        acc: dict = defaultdict(Fraction)
        for c in getattr(self, side):
            acc[c.form] += c.coef
        return {f: c for f, c in acc.items() if c != 0}

    @property
    def holds(self) -> bool:
        return self.weight("lhs") == self.weight("rhs")


@dataclass
class WeightCheck:
    """One comparison of an order-type certificate, as recorded for the documents:
    `lhs` (a Summary, or a Pattern) against the sum of `rhs` (formula Terms, a Summary or
    a definition), with the weight of each side on every order type (`rows`; a row's
    contribution labels are positions in `rhs`, 0 on the left). `context` names the
    boundary points: 'prefix' (1..t), 'stream' (1..t−1, then token t), 'split' (segment
    A, then segment B), 'token' (one token)."""
    name: str
    context: str
    lhs: object
    lhs_name: str | None
    rhs: list
    rows: list


def compare(lhs: list[PSum], rhs: list[PSum], ctx: Context, decay: bool = True,
            labels: tuple | None = None, record: bool = False) -> dict:
    """Decide lhs == rhs for all T. Returns {'holds', 'order_types', 'terms', 'mismatch'},
    and with `record` also 'rows': an OrderTypeRow per order type of every word, each
    pattern sum labelled by `labels` = (lhs labels, rhs labels), parallel to the lists."""
    point_index = {p: j for j, p in enumerate(ctx.points)}
    pval = ctx.point_value()
    groups = defaultdict(list)
    lab = labels or (range(len(lhs)), range(len(rhs)))
    for sign, side, names in ((1, lhs, lab[0]), (-1, rhs, lab[1])):
        for t, name in zip(side, names):
            if t.coef == 0:
                continue
            key = tuple(w[1] if w[0] == "f" else ("x", w[1]) for w in t.word)
            groups[key].append((sign, t, name))
    n_types = 0
    mismatch = None
    rows = []
    for key, terms in groups.items():
        slots = [j for j, w in enumerate(key) if not isinstance(w, tuple)]
        for ot in order_types(len(slots), ctx):
            n_types += 1
            acc = defaultdict(Fraction)
            seen = ([], []) if record else None
            for sign, t, name in terms:
                val = {}
                ok = True
                for idx, w in enumerate(w for w in t.word if w[0] == "f"):
                    v = ("v",) + ot[idx]
                    if w[2] in val and val[w[2]] != v:
                        ok = False
                        break
                    val[w[2]] = v
                if not ok:
                    continue
                for a, op, b in t.cons:
                    va = val[a] if a in val else ("p", point_index[a])
                    vb = val[b] if b in val else ("p", point_index[b])
                    if not _holds(op, _compare_vals(va, vb)):
                        ok = False
                        break
                if not ok:
                    continue
                if decay:
                    form = {}
                    for sym, c in t.lin:
                        if sym == "1":
                            form = lin_add(form, {"1": c})
                        elif sym in val:
                            _, k, r, end = val[sym]
                            if end:
                                form = lin_add(form, {s: c * x for s, x in pval[ctx.points[k]].items()})
                            else:
                                form = lin_add(form, {f"b{k}.{r}": c})
                        else:
                            form = lin_add(form, {s: c * x for s, x in pval[sym].items()})
                    fkey = tuple(sorted(form.items()))
                else:
                    fkey = ()
                acc[fkey] += sign * t.coef
                if record:
                    seen[sign < 0].append(Contribution(name, t.coef, fkey, _raw_form(t) if decay else ()))
            bad = {f: c for f, c in acc.items() if c != 0}
            if bad and mismatch is None:
                mismatch = {"word": key, "order_type": ot, "residual": bad}
            if record:
                rows.append(OrderTypeRow(key, ot, tuple(seen[0]), tuple(seen[1])))
    out = {"holds": mismatch is None, "order_types": n_types,
           "terms": len(lhs) + len(rhs), "mismatch": mismatch}
    if record:
        out["rows"] = rows
    return out


def _raw_form(t: PSum) -> tuple:
    """t's γ exponent with each index variable replaced by its (first) slot."""
    slot = {}
    for n, w in enumerate(w for w in t.word if w[0] == "f"):
        slot.setdefault(w[2], ("slot", n))
    return tuple((slot.get(sym, sym), c) for sym, c in t.lin)
