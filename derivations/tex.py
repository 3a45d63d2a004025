"""TeX (GitHub math) for the generated documents: factors, summaries, formulas,
linear forms, noncommutative polynomials, and one name per index role.

Index roles: every summary is a run of the operator's own chain, so each of its
indices plays the part of one index of the Pattern; `Roles` names it so (the
Pattern's letters), and gives a generic letter only to a summary that serves in
several roles (e.g. k k^T at two places of a fourth-order chain).
"""
from __future__ import annotations

import itertools
from fractions import Fraction

import sympy
from sympy.core.function import AppliedUndef

from .summaries import END, Ext, Ref, Summary, Tok, reduced_relations

GENERIC = "xyzabcwrsmn"


def tex_factor(f: str, idx: str) -> str:
    a, b = f
    if b == "1":
        return f"{a}_{{{idx}}}"
    return f"{a}_{{{idx}}} {b}_{{{idx}}}^\\top"


def tex_name(name: str, sub: str = "") -> str:
    body = "\\mathrm{" + name.replace("_", "\\_") + "}"
    return body + (f"_{{{sub}}}" if sub else "")


class Roles:
    """Names of the indices of every summary of one document: the index of the
    Pattern whose part it plays, when that part is unique."""

    def __init__(self, pattern):
        self.words = []
        for p in (pattern, pattern.denominator()):
            self.words.append(([s.factor for s in p.slots], [s.var for s in p.slots]))
        self.pattern_names = list(dict.fromkeys(s.var for s in pattern.slots))
        self.generic = [c for c in GENERIC if c not in self.pattern_names and c not in "te"]

    def names(self, s: Summary) -> dict:
        """{summary variable: display name} (END -> not included)."""
        sub = [(sl[1], sl[2]) for sl in s.slots if sl[0] == "f"]
        found = set()
        for word, names in self.words:
            for pos in itertools.combinations(range(len(word)), len(sub)):
                if any(word[p] != f for p, (f, _) in zip(pos, sub)):
                    continue
                m = {}
                ok = True
                for p, (_, v) in zip(pos, sub):
                    if m.setdefault(v, names[p]) != names[p]:
                        ok = False
                if ok and len(set(m.values())) == len(m):
                    found.add(tuple(sorted(m.items())))
        if len(found) == 1:
            return dict(next(iter(found)))
        return {v: self.generic[n % len(self.generic)] for n, v in enumerate(s.vars)}

    def slot_names(self, slots_vars: list[str], names: dict) -> list[str]:
        """Display name per slot; a second visit to an index is primed (i, i')."""
        seen: dict = {}
        out = []
        for v in slots_vars:
            k = seen.get(v, 0)
            seen[v] = k + 1
            out.append(names[v] + "'" * k)
        return out


def tex_summary(s: Summary, end: str = "t", names: dict | None = None) -> str:
    """Σ_{relations} γ^{decay} word, with the indices named by `names` (default i, j, ...)."""
    ren = dict(names) if names else {v: "ijuwxyzabc"[n] for n, v in enumerate(s.vars)}
    ren[END] = end
    conds = []
    rel = reduced_relations(s)
    related = {a for a, _, _ in rel} | {b for _, _, b in rel}
    sym = {"<=": "\\le", "<": "<", "==": "="}
    for a, op, b in rel:
        conds.append(f"{ren[a]} {sym[op]} {ren[b]}")
    for v in s.vars:
        if v not in related:
            conds.append(f"{ren[v]} \\le {end}")
    if rel and not any(b == END for _, _, b in rel):
        # the top of the order is bounded by the segment end
        tops = [v for v in s.vars if not any(a == v for a, _, _ in rel)]
        conds += [f"{ren[v]} \\le {end}" for v in tops if v in related]
    dec = " + ".join((f"{c}" if c != 1 else "") + f"({end}-{ren[v]})" for v, c in s.decay if c)
    word, k = [], 0
    for sl in s.slots:
        if sl[0] == "h":
            k += 1
            word.append(f"Z_{k}")
        else:
            word.append(tex_factor(sl[1], ren[sl[2]]))
    g = f"\\gamma^{{{dec}}}\\," if dec else ""
    return f"\\sum_{{{', '.join(conds)}}} {g}" + " ".join(word)


def tex_coef(c) -> str:
    c = sympy.sympify(c)
    if c == 1:
        return ""
    if c == -1:
        return "-"
    s = sympy.latex(c).replace("\\rho_{B}", "\\rho_B")
    return s + "\\,"


def tex_terms(terms, sub: dict, token: str = "t", name_tex=tex_name) -> str:
    parts = []
    for t in terms:
        items = []
        for it in t.seq:
            if isinstance(it, Ref):
                body = name_tex(it.name, sub[it.seg])
                if it.fillers:
                    body += "\\left[" + ", ".join(tex_terms(list(f), sub, token, name_tex)
                                                   for f in it.fillers) + "\\right]"
                items.append(body)
            elif isinstance(it, Tok):
                items.append(tex_factor(it.factor, token))
            elif isinstance(it, Ext):
                items.append(f"Z_{{{it.k + 1}}}")
        parts.append(tex_coef(t.coef) + (" ".join(items) if items else "1"))
    return " + ".join(parts) if parts else "0"


def tex_fraction(c: Fraction) -> str:
    c = Fraction(c)
    return str(c.numerator) if c.denominator == 1 else f"\\tfrac{{{c.numerator}}}{{{c.denominator}}}"


def lin_tex(form: dict, order: list) -> str:
    """A linear form {symbol: coefficient} (symbol '1' the constant) as TeX, its symbols
    in `order` (display strings, each already TeX), the constant last."""
    parts = []
    for sym in [s for s in order if s in form] + [s for s in form if s not in order and s != "1"] + ["1"]:
        c = Fraction(form.get(sym, 0))
        if c == 0:
            continue
        mag = abs(c)
        if sym == "1":
            body = tex_fraction(mag)
        else:
            body = (tex_fraction(mag) if mag != 1 else "") + str(sym)
        parts.append(("-" if c < 0 else "+") + " " + body)
    if not parts:
        return "0"
    s = " ".join(parts)
    return s[2:] if s.startswith("+ ") else "-" + s[2:]


def gamma_power(form: dict, order: list, coef: Fraction = Fraction(1)) -> str:
    """coef · γ^{form} as TeX."""
    expo = lin_tex(form, order)
    c = Fraction(coef)
    if expo == "0":
        return tex_fraction(c) if c >= 0 else "-" + tex_fraction(-c)
    power = "\\gamma" if expo == "1" else f"\\gamma^{{{expo}}}"
    head = "" if c == 1 else ("-" if c == -1 else tex_fraction(c) + "\\," if c > 0 else "-" + tex_fraction(-c) + "\\,")
    return head + power


# ---------------------------------------------------------------------------
# Noncommutative polynomials (associativity, scan identities, claim residuals)

def monomials(expr) -> dict:
    """{noncommutative monomial: commutative coefficient} of an expanded expression."""
    out: dict = {}
    for term in sympy.Add.make_args(sympy.expand(expr)):
        if term == 0:
            continue
        c, nc = term.args_cnc()
        key = sympy.Mul(*nc)
        out[key] = sympy.expand(out.get(key, 0) + sympy.Mul(*c))
    return {k: v for k, v in out.items() if v != 0}


def _nc_atom(x, seg_sub: dict, token: str, name_tex) -> str:
    if isinstance(x, sympy.Pow):
        return "{" + _nc_atom(x.base, seg_sub, token, name_tex) + f"}}^{{{x.exp}}}"
    if isinstance(x, sympy.Symbol):
        n = x.name
        if n.startswith("Z") and n[1:].isdigit():
            return f"Z_{{{n[1:]}}}"
        if len(n) == 2 and n[0] in "qkv" and n[1] in "qkv1":       # a token factor kk
            return tex_factor(n, token)
        base, _, seg = n.rpartition("_")
        if base and base.islower() and len(base) == 2:          # a token factor kk_t
            return tex_factor(base, seg_sub.get(seg, seg))
        if not base:
            return name_tex(n, "")
        if seg in seg_sub or seg in ("A", "B", "C"):
            return name_tex(base, seg_sub.get(seg, seg))
        return name_tex(n, "")
    if isinstance(x, AppliedUndef):
        name = x.func.__name__
        base, _, seg = name.rpartition("_")
        args = ", ".join(nc_tex(a, seg_sub, token, name_tex) for a in x.args)
        return name_tex(base, seg_sub.get(seg, seg)) + "\\left[" + args + "\\right]"
    return sympy.latex(x)


def monomial_tex(m, seg_sub: dict | None = None, token: str = "t", name_tex=tex_name) -> str:
    seg_sub = seg_sub or {}
    if m == 1:
        return "1"
    factors = m.args if isinstance(m, sympy.Mul) else (m,)
    return " ".join(_nc_atom(f, seg_sub, token, name_tex) for f in factors)


def coef_tex(c) -> str:
    s = sympy.latex(sympy.factor(c))
    for seg in "ABC":
        s = s.replace(f"\\rho_{{{seg}}}", f"\\rho_{seg}")
    return s


def nc_tex(expr, seg_sub: dict | None = None, token: str = "t", name_tex=tex_name) -> str:
    """An expanded noncommutative polynomial as TeX, monomial by monomial."""
    parts = []
    for m, c in monomials(expr).items():
        body = monomial_tex(m, seg_sub, token, name_tex)
        if c == 1:
            parts.append(body)
        elif c == -1:
            parts.append("-" + body)
        else:
            cs = coef_tex(c)
            if isinstance(sympy.factor(c), sympy.Add):
                cs = f"\\left({cs}\\right)"
            parts.append(cs + "\\," + body)
    s = " + ".join(parts) if parts else "0"
    return s.replace("+ -", "- ")
