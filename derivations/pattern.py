"""`Pattern`: an operator written as one index-pattern sum.

    o_t = Σ_{indices satisfying `where`} γ^{decay} · (product of dot(x_a, y_b)) · v_c

The product of dot scalars is regrouped into a *chain* of token-local factors read
from the output token t to the value: q_tᵀ (k_i k_iᵀ)(q_j v_jᵀ) for HLA2. Each
visit of the chain to an index contributes one factor `(in)(out)ᵀ`; the factor
types ('kk', 'qv', ...) are the letters the rest of the engine works with.
Replacing `v_c` by the scalar 1 gives the normalizing denominator (factor 'q1').
"""
from __future__ import annotations

import ast
import itertools
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction


VECTORS = ("q", "k", "v")
_VEC = re.compile(r"^\s*([qkv])_([A-Za-z][A-Za-z0-9]*)\s*$")
_DOT = re.compile(r"^\s*dot\s*\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)\s*$")
_CMP = re.compile(r"(<=|>=|==|<|>)")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


class PatternError(ValueError):
    """A pattern string that does not describe a causal chain operator."""


@dataclass(frozen=True)
class Constraint:
    """`a op b` with op in '<=', '<', '=='; a, b are index names or 't'."""
    a: str
    op: str
    b: str

    def __str__(self) -> str:
        return f"{self.a} {self.op} {self.b}"


@dataclass(frozen=True)
class Slot:
    """One chain factor: token `var` contributes the outer product in_vec out_vecᵀ."""
    in_vec: str
    out_vec: str  # 'q', 'k', 'v' or '1' (denominator)
    var: str

    @property
    def factor(self) -> str:
        return self.in_vec + self.out_vec


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise PatternError(f"expr: unbalanced ')' in {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise PatternError(f"expr: unbalanced '(' in {text!r}")
    parts.append("".join(cur))
    return parts


def _vec(token: str, where: str) -> tuple[str, str]:
    m = _VEC.match(token)
    if not m:
        raise PatternError(
            f"expr: expected a vector like q_i, k_j or v_j in {where}, got {token.strip()!r}")
    return m.group(1), m.group(2)


def parse_where(where: str, indices: set[str]) -> list[Constraint]:
    """Conjunction of (chained) comparisons; clauses separated by ',' or 'and'."""
    out: list[Constraint] = []
    if where is None or not where.strip():
        return out
    clauses = [c for part in where.split(",") for c in re.split(r"\band\b", part)]
    for clause in clauses:
        if not clause.strip():
            raise PatternError(f"where: empty clause in {where!r}")
        pieces = [p.strip() for p in _CMP.split(clause)]
        if len(pieces) < 3 or len(pieces) % 2 == 0:
            raise PatternError(f"where: expected comparisons like 'i <= j <= t', got {clause.strip()!r}")
        names, ops = pieces[0::2], pieces[1::2]
        for n in names:
            if not _NAME.match(n):
                raise PatternError(f"where: {n!r} is not an index name (in {clause.strip()!r})")
            if n != "t" and n not in indices:
                raise PatternError(f"where: index {n!r} does not occur in the expression")
        for a, op, b in zip(names, ops, names[1:]):
            if op == ">=":
                a, op, b = b, "<=", a
            elif op == ">":
                a, op, b = b, "<", a
            out.append(Constraint(a, op, b))
    return out


MAX_DOTS = 12              # the chain search below is exponential in the worst case
MAX_DECAY_TERM = 10 ** 6   # generated code raises γ to c·n: keep c a modest rational
_DECAY_HELP = ("a combination of differences (t − x) with rational coefficients, e.g. "
               "'(t-i) + 2*(t-j)' or '(t-i)/2'")


def _linear_form(node, names: set[str], decay: str) -> dict[str, Fraction]:
    """Evaluate a parsed decay expression to {name or '1': coefficient}.

    Walks the syntax tree of `ast.parse` (which only parses, never runs anything) and
    accepts numbers, index names, + − * / and parentheses; anything else is refused."""
    def fail(why):
        raise PatternError(f"decay: {why} in {decay!r}; expected {_DECAY_HELP}")

    if isinstance(node, ast.Expression):
        return _linear_form(node.body, names, decay)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            fail(f"{node.value!r} is not a number")
        if isinstance(node.value, float) and not math.isfinite(node.value):
            fail(f"the number {node.value!r} is not finite")
        return {"1": Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)}
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise PatternError(f"decay: unknown index {[node.id]} in {decay!r}; "
                               f"the indices are {sorted(names - {'t'})} and t")
        return {node.id: Fraction(1)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        inner = _linear_form(node.operand, names, decay)
        return inner if isinstance(node.op, ast.UAdd) else {x: -c for x, c in inner.items()}
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a = _linear_form(node.left, names, decay)
        b = _linear_form(node.right, names, decay)
        if isinstance(node.op, (ast.Add, ast.Sub)):
            s = 1 if isinstance(node.op, ast.Add) else -1
            out = dict(a)
            for x, c in b.items():
                out[x] = out.get(x, Fraction(0)) + s * c
            return out
        const_b = set(b) <= {"1"}
        if isinstance(node.op, ast.Div):
            if not const_b:
                fail("division by an index is not linear")
            if b.get("1", 0) == 0:
                fail("division by zero")
            return {x: c / b["1"] for x, c in a.items()}
        if const_b:
            return {x: c * b.get("1", Fraction(0)) for x, c in a.items()}
        if set(a) <= {"1"}:
            return {x: c * a.get("1", Fraction(0)) for x, c in b.items()}
        fail("a product of two indices is not linear")
    fail(f"{type(node).__name__.lower()} syntax is not allowed (only numbers, index names, "
         "+ − * / and parentheses)")


def parse_decay(decay: str, indices: list[str]) -> dict[str, Fraction]:
    """Exponent of γ, linear in the indices and depending only on differences.

    Returned as coefficients c_x with exponent = Σ c_x (t − x). The string is parsed,
    never evaluated: a decay cannot run code."""
    if decay is None or not str(decay).strip():
        return {x: Fraction(0) for x in indices}
    if len(decay) > 1000:
        raise PatternError(f"decay: {len(decay)} characters is too long for a decay exponent")
    try:
        tree = ast.parse(decay.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise PatternError(f"decay: cannot parse {decay!r} ({type(exc).__name__}); "
                           f"expected {_DECAY_HELP}") from None
    try:
        form = _linear_form(tree, set(indices) | {"t"}, decay)
    except RecursionError:
        raise PatternError(f"decay: {decay!r} is nested too deeply") from None
    coeff = {n: form.get(n, Fraction(0)) for n in indices + ["t"]}
    const = form.get("1", Fraction(0))
    if const != 0 or sum(coeff.values()) != 0:
        raise PatternError(
            f"decay: must be a combination of differences (t − x), e.g. '(t-i)+(t-j)'; got {decay!r}")
    out = {x: -coeff[x] for x in indices}
    for x, c in out.items():
        if abs(c.numerator) > MAX_DECAY_TERM or c.denominator > MAX_DECAY_TERM:
            raise PatternError(f"decay: the coefficient {c} of (t − {x}) in {decay!r} is out of range "
                               f"(numerators and denominators up to {MAX_DECAY_TERM} are supported)")
        if c < 0:
            raise PatternError(f"decay: index {x} has a negative weight in {decay!r}; "
                               "every γ exponent must be ≥ 0")
    return out


@dataclass(frozen=True)
class Pattern:
    """An operator as an index-pattern sum. See the module docstring."""
    expr: str
    where: str = ""
    decay: str = ""
    name: str = ""
    # Derived by __post_init__:
    t_vec: str = field(init=False)
    slots: tuple = field(init=False)
    constraints: tuple = field(init=False)
    decay_coeffs: tuple = field(init=False)

    def __post_init__(self):
        if not isinstance(self.expr, str) or not self.expr.strip():
            raise PatternError("expr: expected a non-empty string such as "
                               "'dot(q_t,k_i) * dot(k_i,q_j) * v_j'")
        for arg in ("where", "decay"):
            if getattr(self, arg) is not None and not isinstance(getattr(self, arg), str):
                raise PatternError(f"{arg}: expected a string, got {type(getattr(self, arg)).__name__}")
        t_vec, slots = _parse_chain(self.expr)
        indices = []
        for s in slots:
            if s.var not in indices:
                indices.append(s.var)
        if "and" in indices:   # `where` clauses are joined by the word `and`
            raise PatternError("expr: 'and' cannot name an index (it joins `where` clauses)")
        cons = parse_where(self.where or "", set(indices))
        # Every operator here is causal: each index is at most t, stated or not.
        cons += [Constraint(x, "<=", "t") for x in indices
                 if Constraint(x, "<=", "t") not in cons]
        coeffs = parse_decay(self.decay or "", indices)
        object.__setattr__(self, "t_vec", t_vec)
        object.__setattr__(self, "slots", tuple(slots))
        object.__setattr__(self, "constraints", tuple(cons))
        object.__setattr__(self, "decay_coeffs", tuple(sorted(coeffs.items())))

    @property
    def indices(self) -> list[str]:
        out = []
        for s in self.slots:
            if s.var not in out:
                out.append(s.var)
        return out

    @property
    def has_decay(self) -> bool:
        return any(c != 0 for _, c in self.decay_coeffs)

    def without_decay(self) -> "Pattern":
        return Pattern(self.expr, self.where, "", self.name)

    def denominator(self) -> "Pattern":
        """The same sum with the value row replaced by the scalar 1."""
        last = self.slots[-1]
        expr = re.sub(rf"\bv_{last.var}\b", f"1_{last.var}", self.expr)
        return Pattern(expr, self.where, self.decay, self.name)

    def valuations(self, tokens, t):
        """Brute force: every assignment of the indices to `tokens` that satisfies the
        constraints for output token t, with its γ exponent Σ c_x (t − x)."""
        holds = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b, "==": lambda a, b: a == b}
        idx, coeffs = self.indices, dict(self.decay_coeffs)
        for tup in itertools.product(tokens, repeat=len(idx)):
            val = dict(zip(idx, tup), t=t)
            if all(holds[c.op](val[c.a], val[c.b]) for c in self.constraints):
                yield val, sum((c * (t - val[x]) for x, c in coeffs.items()), Fraction(0))

    def __str__(self) -> str:
        parts = [f"o_t = Σ [{self.where or 'all indices ≤ t'}]"]
        if self.has_decay:
            parts.append(f"γ^({self.decay})")
        parts.append(self.expr)
        return " ".join(parts)


def _parse_chain(expr: str) -> tuple[str, list[Slot]]:
    dots: list[tuple[tuple[str, str], tuple[str, str]]] = []
    value: tuple[str, str] | None = None
    for raw in _split_top(expr, "*"):
        tok = raw.strip()
        if not tok:
            raise PatternError(f"expr: empty factor in {expr!r}")
        m = _DOT.match(tok)
        if m:
            a, b = _vec(m.group(1), tok), _vec(m.group(2), tok)
            for vec in (a, b):
                if vec[0] == "v":
                    raise PatternError(f"expr: v may only appear as the value row, not inside {tok!r}")
            dots.append((a, b))
            continue
        m1 = re.match(r"^1_([A-Za-z][A-Za-z0-9]*)$", tok)
        if m1:
            vec = ("1", m1.group(1))
        else:
            vec = _vec(tok, "the value row")
            if vec[0] != "v":
                raise PatternError(f"expr: a bare factor must be the value row v_c, got {tok!r}")
        if value is not None:
            raise PatternError(f"expr: exactly one value row v_c is allowed, found a second {tok!r}")
        value = vec
    if value is None:
        raise PatternError(f"expr: no value row v_c in {expr!r}")
    if not dots:
        raise PatternError(f"expr: at least one dot(x_a, y_b) factor is needed in {expr!r}")
    if value[1] == "t":
        raise PatternError("expr: the value row must belong to a summed index, not t")
    t_occ = [(n, side) for n, d in enumerate(dots) for side in (0, 1) if d[side][1] == "t"]
    if len(t_occ) != 1:
        raise PatternError(f"expr: the output index t must occur exactly once (in the first dot of "
                           f"the chain); it occurs {len(t_occ)} times in {expr!r}")
    if len(dots) > MAX_DOTS:
        raise PatternError(f"expr: {len(dots)} dot factors; at most {MAX_DOTS} are supported")
    n, side = t_occ[0]
    t_vec = dots[n][side][0]
    # The scalar is a product: the chain may take the dots in any order. A visit to an
    # index can leave by any unused dot at that index, so search (depth first) for an
    # order that uses every dot once and ends at the value row; all such orders give
    # the same product.
    slots = _walk(dots, value, n, 1 - side, frozenset([n]))
    if slots is None:
        raise PatternError(f"expr: the dots do not form one chain from t to v_{value[1]} in {expr!r} "
                           "(each index must be entered and left by its dots, and the chain must end "
                           f"at the value index {value[1]!r})")
    return t_vec, slots


def _walk(dots, value, cur_dot: int, cur_side: int, used: frozenset):
    in_vec, idx = dots[cur_dot][cur_side]
    if len(used) == len(dots):
        return [Slot(in_vec, value[0], idx)] if value[1] == idx else None
    for m, d in enumerate(dots):
        if m in used:
            continue
        for s in (0, 1):
            if d[s][1] != idx:
                continue
            rest = _walk(dots, value, m, 1 - s, used | {m})
            if rest is not None:
                return [Slot(in_vec, d[s][0], idx)] + rest
    return None
