"""Segment summaries and their synthesis by splitting at a boundary.

A *summary* is a chain of token-local factors summed over the tokens of one
segment, under order relations among its indices (and the segment's end), with
decay γ^{Σ c_x (end − x)}. Where an index group of the chain is interrupted by
factors that live elsewhere, the summary has *holes*: it is then a linear map
applied to what fills them (a "sandwich" Z ↦ Σ a_x Z c_y).

`split` puts a boundary between segment A and a later segment B, assigns each
index to A or B in every admissible way (the down-sets of the order relation),
groups the indices of each side into connected components, and writes the
summary of AB as a sum of nested products of component summaries. Applied
with B a single token it gives the streaming update; with B a general segment
it gives the associative combine ⊕. Iterating until no new summary appears
gives the closed sets. Nothing here knows any particular operator.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from fractions import Fraction

import sympy

from .pattern import Pattern

END = "end"


class OutOfReach(ValueError):
    """A pattern whose summaries cannot be written as nested chain products."""


# ---------------------------------------------------------------------------
# Relations: transitive closure of <=, < over index names and END.

def close_relations(nodes: list[str], pairs: list[tuple[str, str, str]]):
    """Transitive closure; returns dict (a, b) -> '<' | '<=' or None if contradictory."""
    rel: dict[tuple[str, str], str] = {}

    def put(a, b, op):
        old = rel.get((a, b))
        if old is None or (old == "<=" and op == "<"):
            rel[(a, b)] = op
            return True
        return False

    for a, op, b in pairs:
        if op == "==":
            put(a, b, "<=")
            put(b, a, "<=")
        else:
            put(a, b, op)
    for k in nodes:
        for i in nodes:
            if (i, k) not in rel:
                continue
            for j in nodes:
                if (k, j) not in rel:
                    continue
                op = "<" if "<" in (rel[(i, k)], rel[(k, j)]) else "<="
                if i == j:
                    if op == "<":
                        return None
                    continue
                put(i, j, op)
    for (a, b), op in rel.items():
        if op == "<" and (b, a) in rel:
            return None
    return rel


# ---------------------------------------------------------------------------
# Summaries

@dataclass(frozen=True)
class Summary:
    """slots: ('f', factor, var) or ('h',); rel: closed relations; decay: ((var, c), ...)."""
    slots: tuple
    rel: tuple
    decay: tuple

    @property
    def vars(self) -> list[str]:
        out = []
        for s in self.slots:
            if s[0] == "f" and s[2] not in out:
                out.append(s[2])
        return out

    @property
    def holes(self) -> int:
        return sum(1 for s in self.slots if s[0] == "h")

    @property
    def word(self) -> str:
        return "_".join("Z" if s[0] == "h" else s[1].upper() for s in self.slots)

    def relations(self) -> dict:
        return dict(self.rel)

    def chunks(self) -> list[list[str]]:
        """Factor runs between holes (each run is one matrix of the dense map)."""
        out, cur = [], []
        for s in self.slots:
            if s[0] == "h":
                out.append(cur)
                cur = []
            else:
                cur.append(s[1])
        out.append(cur)
        return out

    def c(self, var: str) -> Fraction:
        return dict(self.decay).get(var, Fraction(0))

    def describe(self) -> str:
        """Plain text: Σ_{relations} γ^{...} word."""
        rel = reduced_relations(self)
        cond = ", ".join(f"{a} {op} {b}" for a, op, b in rel) or "all in segment"
        dec = " + ".join(_fmt_c(c) + f"(end−{x})" for x, c in self.decay if c)
        word = " ".join("Z" if s[0] == "h" else f"{s[1]}_{s[2]}" for s in self.slots)
        return f"Σ[{cond}]" + (f" γ^({dec})" if dec else "") + f" {word}"


def _fmt_c(c: Fraction) -> str:
    return "" if c == 1 else f"{c}·"


def reduced_relations(s: Summary) -> list[tuple[str, str, str]]:
    """Transitive reduction of the closed relation, for display."""
    rel = s.relations()
    nodes = s.vars + [END]
    out = []
    done = set()
    for (a, b), op in sorted(rel.items()):
        if b == END and op == "<=":
            continue
        if (b, a) in rel and rel[(b, a)] == "<=" and op == "<=":
            if (b, a) in done:
                continue
            done.add((a, b))
            out.append((a, "==", b))
            continue
        implied = any(
            k not in (a, b) and (a, k) in rel and (k, b) in rel
            and (op == "<=" or "<" in (rel[(a, k)], rel[(k, b)]))
            and not ((k, a) in rel and (b, k) in rel)
            for k in nodes)
        if not implied:
            out.append((a, op, b))
    return out


def make_summary(slots: list, pairs: list[tuple[str, str, str]],
                 decay: dict[str, Fraction]) -> Summary | None:
    """Canonical Summary (vars renamed in order of appearance); None if empty."""
    order = []
    for s in slots:
        if s[0] == "f" and s[2] not in order:
            order.append(s[2])
    ren = {v: f"x{n}" for n, v in enumerate(order)}
    ren[END] = END
    slots2 = tuple(("f", s[1], ren[s[2]]) if s[0] == "f" else ("h",) for s in slots)
    nodes = [ren[v] for v in order] + [END]
    pairs2 = [(ren[a], op, ren[b]) for a, op, b in pairs if a in ren and b in ren]
    pairs2 += [(v, "<=", END) for v in nodes[:-1]]
    rel = close_relations(nodes, pairs2)
    if rel is None:
        return None
    rel_t = tuple(sorted(rel.items()))
    dec = tuple(sorted((ren[v], Fraction(c)) for v, c in decay.items() if v in ren and v != END))
    return Summary(slots2, rel_t, dec)


def pattern_summary(p: Pattern) -> Summary:
    """The whole pattern as a summary of the prefix 1..t (t is the segment end)."""
    # A user's index may be called anything, `end` included: give every index a name
    # that cannot meet the internal ones before t becomes END.
    ren = {x: f"#{x}" for x in p.indices}
    ren["t"] = END
    slots = [("f", s.factor, ren[s.var]) for s in p.slots]
    pairs = [(ren[c.a], c.op, ren[c.b]) for c in p.constraints]
    s = make_summary(slots, pairs, {ren[x]: c for x, c in p.decay_coeffs})
    if s is None:
        raise OutOfReach(f"where: the constraints {p.where!r} can never hold; the operator is zero")
    return s


# ---------------------------------------------------------------------------
# Formula terms: coefficient × nested product of items.

@dataclass(frozen=True)
class Ref:
    """Summary `name` of segment `seg`, holes filled by `fillers` (tuples of Terms)."""
    seg: str
    name: str
    fillers: tuple = ()


@dataclass(frozen=True)
class Ext:
    """The k-th hole of the summary being expressed."""
    k: int


@dataclass(frozen=True)
class Tok:
    """A factor of the single token of a one-token segment."""
    factor: str


@dataclass(frozen=True)
class Term:
    coef: sympy.Expr
    seq: tuple


RHO = {seg: sympy.Symbol(f"rho_{seg}", positive=True) for seg in ("A", "B", "C")}
GAMMA = sympy.Symbol("gamma", positive=True)


# ---------------------------------------------------------------------------
# Splitting

class Namer:
    """Readable, deterministic names: the factor word, disambiguated on clashes."""

    def __init__(self):
        self.by_summary: dict[Summary, str] = {}
        self.by_name: dict[str, Summary] = {}

    def __call__(self, s: Summary) -> str:
        if s in self.by_summary:
            return self.by_summary[s]
        base = s.word
        # say what sets it apart: exclusive of the segment end; on a clash, its decay
        strict_end = any(b == END and op == "<" for (a, b), op in s.rel)
        decay = "".join(str(c) for _, c in s.decay) or "0"
        base += "_excl" if strict_end else ""
        for name in (base, f"{base}_g{decay}"):
            if name not in self.by_name:
                break
        n = 1
        while name in self.by_name:
            n += 1
            name = f"{base}_v{n}"
        self.by_summary[s] = name
        self.by_name[name] = s
        return name


def _decompose(s: Summary, seg_of: dict[str, str], keep_end: set[str], namer: Namer,
               token_seg: str | None, build=None) -> tuple:
    """Nest the chain of `s` into component refs given each var's segment.

    Vars whose segment is `token_seg` become Tok items (all equal the one token).
    `keep_end`: segments whose end is the end of `s` (their END relations survive).
    `build(seg, slots, pairs, vars)` names a component's summary (default: the
    summary with `s`'s decay, named by `namer`); the gradients use it for the
    segments read backward in time.
    """
    rel = s.relations()
    vars_ = s.vars
    # components: connected by surviving relations inside one segment
    comp_of: dict[str, int] = {}
    comps: list[list[str]] = []
    for v in vars_:
        if seg_of[v] == token_seg or v in comp_of:
            continue
        comp, stack = [v], [v]
        comp_of[v] = len(comps)
        while stack:
            a = stack.pop()
            for b in vars_:
                if b not in comp_of and seg_of[b] == seg_of[a] and ((a, b) in rel or (b, a) in rel):
                    comp_of[b] = len(comps)
                    comp.append(b)
                    stack.append(b)
        comps.append(comp)
    positions = [[p for p, sl in enumerate(s.slots) if sl[0] == "f" and comp_of.get(sl[2]) == c]
                 for c in range(len(comps))]
    hole_index = {p: k for k, p in enumerate(p for p, sl in enumerate(s.slots) if sl[0] == "h")}

    def parse(lo: int, hi: int) -> tuple:
        items, p = [], lo
        while p < hi:
            sl = s.slots[p]
            if sl[0] == "h":
                items.append(Ext(hole_index[p]))
                p += 1
                continue
            if seg_of[sl[2]] == token_seg:
                items.append(Tok(sl[1]))
                p += 1
                continue
            c = comp_of[sl[2]]
            pos = positions[c]
            if pos[0] != p or pos[-1] >= hi:
                raise OutOfReach(
                    "two interleaved index groups of the chain "
                    f"{s.word} are coupled on both sides of a split (components at positions "
                    f"{pos} cross another group); their summary would be a tensor that is not a "
                    "nested chain product, which this engine does not synthesize")
            fillers, sub_slots = [], []
            for a, b in zip(pos, pos[1:] + [pos[-1]]):
                sub_slots.append(s.slots[a])
                if b > a + 1:
                    fillers.append((Term(sympy.Integer(1), parse(a + 1, b)),))
                    sub_slots.append(("h",))
            comp_vars = set(comps[c])
            pairs = [(a, op, b) for (a, b), op in rel.items()
                     if a in comp_vars and b in comp_vars]
            if seg_of[comps[c][0]] in keep_end:
                pairs += [(a, op, b) for (a, b), op in rel.items()
                          if (a in comp_vars and b == END) or (b in comp_vars and a == END)]
            seg = seg_of[comps[c][0]]
            if build is None:
                name = namer(make_summary(sub_slots, pairs, {v: s.c(v) for v in comp_vars}))
            else:
                name = build(seg, sub_slots, pairs, comp_vars)
            items.append(Ref(seg, name, tuple(fillers)))
            p = pos[-1] + 1
        return tuple(items)

    return parse(0, len(s.slots))


def _admissible(s: Summary, seg_of: dict[str, str], order: list[str], token_seg: str | None) -> bool:
    """Does the assignment of vars to segments (in time order `order`) satisfy `s`'s relations?"""
    rank = {g: n for n, g in enumerate(order)}
    last = order[-1]
    for (a, b), op in s.rel:
        if a == END or b == END:
            x = b if a == END else a
            g = seg_of[x]
            if a == END:            # end <= x  means x == end: x must sit in the last segment
                if g != last:
                    return False
            elif op == "<":         # x < end: fails only if x is the single last token
                if g == last and g == token_seg:
                    return False
            continue
        ga, gb = seg_of[a], seg_of[b]
        if rank[ga] > rank[gb]:
            return False
        if ga == gb and ga == token_seg and op == "<":
            return False
    return True


def split(s: Summary, namer: Namer, one_token: bool) -> list[Term]:
    """Summary of A·B in terms of summaries of A and of B (B = one token if `one_token`)."""
    b_seg = "T" if one_token else "B"
    vars_ = s.vars
    terms = []
    for assign in itertools.product(("A", b_seg), repeat=len(vars_)):
        seg_of = dict(zip(vars_, assign))
        if not _admissible(s, seg_of, ["A", b_seg], "T" if one_token else None):
            continue
        seq = _decompose(s, seg_of, {b_seg}, namer, "T" if one_token else None)
        power = sum((s.c(v) for v in vars_ if seg_of[v] == "A"), Fraction(0))
        rho = GAMMA if one_token else RHO["B"]
        terms.append(Term(rho ** sympy.Rational(power.numerator, power.denominator), seq))
    return terms


def embed(s: Summary) -> list[Term]:
    """Value of `s` on a segment of one token: the chain with every index at that token."""
    seg_of = {v: "T" for v in s.vars}
    if not _admissible(s, seg_of, ["T"], "T"):
        return []
    items, k = [], 0
    for sl in s.slots:
        if sl[0] == "h":
            items.append(Ext(k))
            k += 1
        else:
            items.append(Tok(sl[1]))
    return [Term(sympy.Integer(1), tuple(items))]


def refs_in(terms: list[Term], seg: str | None = None):
    for t in terms:
        for item in t.seq:
            yield from _refs_item(item, seg)


def _refs_item(item, seg):
    if isinstance(item, Ref):
        if seg is None or item.seg == seg:
            yield item.name
        for f in item.fillers:
            yield from refs_in(list(f), seg)


def top_readout(p: Pattern, namer: Namer) -> tuple[Summary, tuple]:
    """o_t = x_tᵀ · (nested product over components of the whole pattern on the prefix)."""
    top = pattern_summary(p)
    seq = _decompose(top, {v: "P" for v in top.vars}, {"P"}, namer, None)
    return top, seq


def closure(start: list[str], namer: Namer, one_token: bool, sides: tuple[str, ...]):
    """Split every summary reachable from `start` through refs of the given sides."""
    formulas: dict[str, list[Term]] = {}
    work = list(start)
    while work:
        name = work.pop(0)
        if name in formulas:
            continue
        formulas[name] = split(namer.by_name[name], namer, one_token)
        for side in sides:
            for r in refs_in(formulas[name], side):
                if r not in formulas and r not in work:
                    work.append(r)
    return formulas
