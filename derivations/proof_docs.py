"""Proof steps as arguments a reader can check, from the certificates' records.

A proof run inside `proofs.recording()` leaves in each certificate's
details['argument'] what it compared: for an order-type proof, every order type
with the weight of each side term by term (weights.WeightCheck); for
associativity, both bracketings expanded (proofs.Bracketings); for scan
equivalence, the two identities it rests on (proofs.ScanStep). This module only
lays them out: a case split per term (which segment holds each index), the
full order-type table folded in <details>, bracketings side by side.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction

import sympy

from .pattern import Pattern
from .summaries import Summary, Term
from .tex import (Roles, gamma_power, lin_tex, monomial_tex, monomials, coef_tex, nc_tex, tex_factor,
                  tex_name, tex_summary, tex_terms)
from .weights import WeightCheck


@dataclass(frozen=True)
class Frame:
    """How one proof context's boundary points and segments read in the documents."""
    ends: dict          # segment k -> (TeX of its end point, one token?)
    where: dict         # segment k -> TeX "lies in" text
    points: dict        # point symbol -> linear form over display symbols (compared forms)
    raw_points: dict    # point symbol -> display atom (forms before the order type)
    order: tuple        # display symbols, in the order they are printed
    lhs_sub: str        # subscript of the left side's summary
    sub: dict           # segment of a formula reference -> its subscript
    intro: str          # one sentence: what the segments are


FRAMES = {
    "prefix": Frame({1: ("t", False)}, {1: "\\le t"}, {"p1": {"t": 1}}, {"p1": "t"}, ("t",), "t",
                    {"P": "t"}, "Indices range over the prefix $1..t$."),
    "stream": Frame({1: ("t-1", False), 2: ("t", True)}, {1: "\\le t-1", 2: "= t"},
                    {"p1": {"t": 1, "1": -1}}, {"p1": "(t-1)", "p2": "t"}, ("t",), "t", {"A": "t-1"},
                    "Indices range over $1..t$, split into the prefix $1..t-1$ and the token $t$."),
    "split": Frame({1: ("e_A", False), 2: ("e_B", False)}, {1: "\\in A", 2: "\\in B"},
                   {"p1": {"e_A": 1}, "p2": {"e_B": 1}}, {"p1": "e_A", "p2": "e_B"}, ("e_B", "e_A"), "AB",
                   {"A": "A", "B": "B"},
                   "Segment $A$ ends at $e_A$, segment $B$ follows it and ends at $e_B$, "
                   "$\\rho_B = \\gamma^{e_B - e_A}$; each summary's decay is measured from its own "
                   "segment's end."),
    "token": Frame({1: ("t", True)}, {1: "= t"}, {}, {"p1": "t"}, ("t",), "[t]", {},
                   "The segment is the one token $t$."),
}


# ---------------------------------------------------------------------------
# The left side's indices and word

def lhs_slots(lhs, roles: Roles) -> tuple[list[str], str]:
    """(display name per slot, TeX of the word) of a check's left side."""
    if isinstance(lhs, Pattern):
        names = [s.var for s in lhs.slots]
        word = " ".join(tex_factor(s.factor, s.var) for s in lhs.slots)
        return names, word
    s: Summary = lhs
    rn = roles.names(s)
    fvars = [sl[2] for sl in s.slots if sl[0] == "f"]
    names = roles.slot_names(fvars, rn)
    word, n, k = [], 0, 0
    for sl in s.slots:
        if sl[0] == "h":
            k += 1
            word.append(f"Z_{{{k}}}")
        else:
            word.append(tex_factor(sl[1], names[n]))
            n += 1
    return names, " ".join(word)


def order_type_tex(ot: tuple, names: list[str], frame: Frame) -> str:
    """The weak order of the indices and the segment ends, e.g. i < t-1 < j = t."""
    parts = []
    for k in sorted(frame.ends):
        end, single = frame.ends[k]
        mine = [(ot[n][1], ot[n][2], names[n]) for n in range(len(ot)) if ot[n][0] == k]
        if not mine:
            parts.append(end)
            continue
        ranks = sorted({r for r, _, _ in mine})
        blocks = [" = ".join(nm for r2, _, nm in mine if r2 == r) for r in ranks]
        at_end = single or any(e for r, e, _ in mine if r == ranks[-1])
        parts.append(" < ".join(blocks) + (" = " if at_end else " < ") + end)
    return " < ".join(parts)


def _form_display(form: tuple, ot: tuple, names: list[str], frame: Frame) -> dict:
    """A compared form (block values, points) as a linear form over display symbols."""
    rep = {}
    for n, (k, r, _) in enumerate(ot):
        rep.setdefault(f"b{k}.{r}", names[n])
    out: dict = defaultdict(Fraction)
    for sym, c in form:
        if sym == "1":
            out["1"] += c
        elif sym in rep:
            out[rep[sym]] += c
        elif sym in frame.points:
            for s2, c2 in frame.points[sym].items():
                out[s2] += c * c2
        else:
            out[str(sym)] += c
    return {s: c for s, c in out.items() if c != 0}


def _raw_display(raw: tuple, names: list[str], frame: Frame, ot: tuple = ()) -> dict:
    """A form before the order type, over display symbols; an index in a one-token
    segment is that token (its segment's end)."""
    out: dict = defaultdict(Fraction)
    for sym, c in raw:
        if isinstance(sym, tuple):
            k = ot[sym[1]][0] if ot else None
            if k is not None and frame.ends[k][1]:
                out[frame.ends[k][0]] += c
            else:
                out[names[sym[1]]] += c
        elif sym in frame.raw_points:
            out[frame.raw_points[sym]] += c
        else:
            out[str(sym)] += c
    return {s: c for s, c in out.items() if c != 0}


def _side_weight(contribs, ot, names, frame, decay, order) -> str:
    acc: dict = defaultdict(Fraction)
    for c in contribs:
        acc[c.form] += c.coef
    parts = [gamma_power(_form_display(f, ot, names, frame) if decay else {}, order, c)
             for f, c in acc.items() if c != 0]
    return " + ".join(parts).replace("+ -", "- ") if parts else "0"


def _raw_weight(contribs, names, frame, decay, order, ot=()) -> str:
    acc: dict = defaultdict(Fraction)
    for c in contribs:
        acc[c.raw] += c.coef
    parts = [gamma_power(_raw_display(r, names, frame, ot) if decay else {}, order, c)
             for r, c in acc.items() if c != 0]
    return " + ".join(parts).replace("+ -", "- ") if parts else "0"


# ---------------------------------------------------------------------------
# Labels of the two sides

def label_tex(obj, frame: Frame, roles: Roles) -> str:
    if isinstance(obj, Term):
        return "$" + tex_terms([obj], frame.sub) + "$"
    if isinstance(obj, Summary):
        return "$" + tex_summary(obj, "t", roles.names(obj)) + "$"
    if isinstance(obj, Pattern):
        return "the Pattern's sum"
    if hasattr(obj, "tex"):
        return f"${obj.tex()}$ expanded entrywise"
    return f"`{obj}` expanded entrywise"


def lhs_tex(wc: WeightCheck, frame: Frame) -> str:
    if wc.lhs_name:
        return "$" + tex_name(wc.lhs_name, frame.lhs_sub) + "$"
    if isinstance(wc.lhs, Pattern):
        return "the Pattern's sum"
    return "the top summary"


# ---------------------------------------------------------------------------
# One order-type comparison

def _segments_tex(ot, names, frame) -> str:
    by: dict = defaultdict(list)
    for n, (k, _, _) in enumerate(ot):
        by[k].append(names[n])
    return ",\\ ".join(", ".join(by[k]) + " " + frame.where[k] for k in sorted(by)) or "(no index)"


METHOD = ("Both sides of every order-type step are sums, over index tuples, of a weight times one "
          "word of token factors; on each order type (the weak order of the indices together with the "
          "segment ends) every constraint has one truth value and every weight is one power of "
          "$\\gamma$, so the two sides agree for every $T$ exactly when they agree on every order type "
          "([proofs.md](proofs.md)). Each step gives the terms of the right side, then the case split: "
          "for each term, which segment holds each index, how many order types it covers, and the "
          "weight each side assigns, written as the side defines it (an index in a one-token segment "
          "is that token, the others are left free); then, folded, every order type with the weight the comparison computed on it.")


def weight_check_md(wc: WeightCheck, roles: Roles, decay: bool, names: list[str] | None = None,
                    word: str | None = None, left: str | None = None,
                    right_labels: list | None = None) -> list[str]:
    """A weight comparison as an argument: the terms, the case split by term (which segment
    holds each index), and every order type (folded when long)."""
    frame = FRAMES[wc.context]
    if names is None:
        names, word = lhs_slots(wc.lhs, roles)
    order = list(dict.fromkeys(list(frame.raw_points.values()) + list(frame.order) + names))
    left = left or lhs_tex(wc, frame)
    right = right_labels or [label_tex(o, frame, roles) for o in wc.rhs]
    L = [frame.intro + f" Word ${word}$, index tuples $({', '.join(names)})$."]
    if not right:
        L[-1] += " Right side: 0 (no term)."
    elif len(right) > 1 or not isinstance(wc.rhs[0], (Summary, Pattern)):
        L[-1] += " Right side, term by term: " + ", ".join(f"({n + 1}) {r}" for n, r in enumerate(right)) + "."
    L.append("")
    if len(wc.rows) <= 4:
        return L + full_table(wc, names, frame, decay, order) + [""]
    groups: dict = {}
    for row in wc.rows:
        key = (tuple(k for k, _, _ in row.order_type), tuple(sorted({c.label for c in row.lhs})),
               tuple(sorted({c.label for c in row.rhs})))
        groups.setdefault(key, []).append(row)
    order_keys = sorted(groups, key=lambda g: (not (g[1] or g[2]), g[2] or (99,), g[0]))
    L += [f"| indices | order types | left: {left} | right | weights |", "|---|---|---|---|---|"]
    for key in order_keys:
        rows = groups[key]
        segs = "$" + _segments_tex(rows[0].order_type, names, frame) + "$"
        ot0 = rows[0].order_type
        lw = _raw_weight([c for c in rows[0].lhs], names, frame, decay, order, ot0) if key[1] else "0"
        if key[2]:
            rterms = "; ".join(f"({lab + 1}) " + "$" + _raw_weight([c for c in rows[0].rhs if c.label == lab],
                                                                    names, frame, decay, order, ot0) + "$"
                               for lab in key[2])
        else:
            rterms = "0"
        ok = all(r.holds for r in rows)
        verdict = "equal" if ok else "**differ**"
        shared = sum(g[0] == key[0] for g in groups) > 1
        if not key[1] and not key[2]:
            verdict = "both 0 (constraints)"
        if shared and len(rows) <= 6:
            segs += ": " + ", ".join("$" + order_type_tex(r.order_type, names, frame) + "$" for r in rows)
        elif shared and not key[1] and not key[2]:
            segs += ", the other order types"
        L.append(f"| {segs} | {len(rows)} | ${lw}$ | {rterms} | {verdict} |")
    L.append("")
    L += details(f"all {len(wc.rows)} order types of {left}, one by one", full_table(wc, names, frame, decay, order))
    return L


def signature(wc: WeightCheck, decay: bool) -> tuple:
    """What a comparison established, row by row, without the factor names: equal
    signatures mean the same order types, the same terms and the same weights."""
    def side(cs):
        return tuple(sorted((c.label, c.coef, c.form if decay else ()) for c in cs))
    return tuple((r.order_type, side(r.lhs), side(r.rhs)) for r in wc.rows)


def full_table(wc: WeightCheck, names, frame, decay, order) -> list[str]:
    L = ["| # | order type | left | right (term: weight) | |", "|---|---|---|---|---|"]
    for n, row in enumerate(wc.rows):
        ot = row.order_type
        words = "" if all(not isinstance(w, tuple) for w in row.word) else " (word with holes)"
        lw = _side_weight(row.lhs, ot, names, frame, decay, order)
        labs = sorted({c.label for c in row.rhs})
        rw = "; ".join(f"({lab + 1}) $" + _side_weight([c for c in row.rhs if c.label == lab], ot, names,
                                                          frame, decay, order) + "$" for lab in labs) or "0"
        L.append(f"| {n + 1} | ${order_type_tex(ot, names, frame)}${words} | ${lw}$ | {rw} | "
                 f"{'✓' if row.holds else '✗'} |")
    return L


def details(summary: str, body: list[str]) -> list[str]:
    return ["<details><summary>" + summary + "</summary>", "", *body, "", "</details>", ""]


# ---------------------------------------------------------------------------
# Associativity and scan equivalence

def bracketings_md(brs, seg_names: dict | None = None, name_tex=tex_name, only_differing: bool = False) -> list[str]:
    """Both bracketings of each summary side by side, monomial by monomial (difference =
    (A⊕B)⊕C − A⊕(B⊕C))."""
    L = []
    for b in brs:
        left, right = monomials(b.left), monomials(b.right)
        keys = list(left) + [k for k in right if k not in left]
        if only_differing and all(sympy.expand(left.get(k, 0) - right.get(k, 0)) == 0 for k in keys):
            continue
        L += [f"**${name_tex(b.name, '')}$**: {len(keys)} monomials.", "",
              "| monomial | $(A \\oplus B) \\oplus C$ | $A \\oplus (B \\oplus C)$ | difference |",
              "|---|---|---|---|"]
        for k in keys:
            a, c = left.get(k, 0), right.get(k, 0)
            diff = sympy.expand(a - c)
            L.append(f"| ${monomial_tex(k, seg_names, name_tex=name_tex)}$ | ${coef_tex(a)}$ | ${coef_tex(c)}$ | "
                     f"{'0' if diff == 0 else '$' + coef_tex(diff) + '$ ✗'} |")
        L.append("")
    return L


def scan_md(steps, stream_names: list[str]) -> list[str]:
    L = ["Identity (i), $X \\oplus [t] = \\mathrm{update}(X, t)$, with the summaries of $X$ (the "
         "prefix $1..t-1$) kept as noncommuting symbols; identity (ii), $[t] = \\mathrm{update}(0, t)$:", ""]
    for s in steps:
        sub = {"A": "t-1"}
        L += [f"- ${tex_name(s.name)}$ (i): $X \\oplus [t] = {nc_tex(s.joined, sub)}$; "
              f"$\\mathrm{{update}} = {nc_tex(s.serial, sub)}$",
              f"  (ii): $[t] = {nc_tex(s.token, sub)}$; $\\mathrm{{update}}(0, t) = {nc_tex(s.first, sub)}$"]
    state = ", ".join(tex_name(n).join("$$") for n in stream_names)
    L += ["", f"Induction on $T$. Let $s_T$ be the serial state ({state}) after $T$ tokens and $S(\\tau)$ "
          "the value of a bracketing $\\tau$ of the one-token segments $[1], \\dots, [T]$ under ⊕. "
          "$T = 1$: $S([1]) = [1] = \\mathrm{update}(0, 1) = s_1$ by (ii). $T > 1$: ⊕ is associative "
          "(previous certificate), so every bracketing has the value of the left-nested one, "
          "$S(\\tau) = S(\\tau') \\oplus [T]$ with $\\tau'$ a bracketing of $[1..T-1]$; by the "
          "induction hypothesis $S(\\tau') = s_{T-1}$, and by (i) $s_{T-1} \\oplus [T] = "
          "\\mathrm{update}(s_{T-1}, T) = s_T$. Identities (i) and (ii) hold as noncommutative "
          "polynomial identities, hence for matrices of every size: the conclusion holds for every "
          "$T$, $d$, $d_v$. (The ⊕ certificate gives the same by a second route: each combine is the "
          "summary of the concatenation, so any bracketing is the summary of $1..T$.)", ""]
    return L
