"""Operator definitions in the forms operators.md states them, and the expansion proof.

- `Matrix("((W @ W.T) * L) @ V")`: a matrix expression over W = L ⊙ (Q Kᵀ), the
  causal mask L, products, transposes and Hadamard products, applied to V (γ = 1).
  Expanded entrywise it becomes a Pattern (`Matrix.pattern()`): the front end.
- `Moments("kk", "qv")`: o_t = q_tᵀ M1_t M2_t ... with decayed prefix moments
  M_t = Σ_{x≤t} γ^{t−x} (factor)_x, as the unmasked operators are defined.

`prove_expansion` shows the registered Pattern equals its definition for every
T (order types) and checks it exactly on small rational inputs.
"""
from __future__ import annotations

import ast
import itertools
import random
import time
from fractions import Fraction

import numpy as np

from .pattern import Pattern, PatternError
from .weights import Context, Fresh, PSum, WeightCheck, bound_le, compare, pattern_psums


class Matrix:
    """A γ = 1 matrix definition; see the module docstring."""

    def __init__(self, text: str):
        if not isinstance(text, str) or not text.strip():
            raise PatternError("definition: expected a matrix expression such as '((W @ W.T) * L) @ V'")
        self.text = text
        try:
            self.tree = ast.parse(text, mode="eval").body
        except SyntaxError as exc:
            raise PatternError(f"definition: cannot parse {text!r}: {exc.msg}") from None
        if not (isinstance(self.tree, ast.BinOp) and isinstance(self.tree.op, ast.MatMult)
                and isinstance(self.tree.right, ast.Name) and self.tree.right.id == "V"):
            raise PatternError(f"definition: expected '<T×T matrix expression> @ V', got {text!r}")

    def __str__(self):
        return self.text

    # symbolic expansion --------------------------------------------------
    def _entry(self, node, r, c, fresh):
        """(constraints, dots) of entry [r, c] of a T×T expression."""
        if isinstance(node, ast.Name):
            if node.id == "W":
                return [f"{c} <= {r}"], [f"dot(q_{r},k_{c})"]
            if node.id == "L":
                return [f"{c} <= {r}"], []
            raise PatternError(f"definition: unknown matrix {node.id!r} (use W, L and V)")
        if isinstance(node, ast.Attribute) and node.attr == "T":
            return self._entry(node.value, c, r, fresh)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            u = fresh()
            a, b = self._entry(node.left, r, u, fresh), self._entry(node.right, u, c, fresh)
            return a[0] + b[0], a[1] + b[1]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            a, b = self._entry(node.left, r, c, fresh), self._entry(node.right, r, c, fresh)
            return a[0] + b[0], a[1] + b[1]
        raise PatternError(f"definition: unsupported construct {ast.unparse(node)!r}")

    def pattern(self) -> Pattern:
        names = iter("iuwxyzabcdefghmnprs")
        cons, dots = self._entry(self.tree.left, "t", "j", lambda: next(names))
        expr = " * ".join(dots + ["v_j"])
        return Pattern(expr, where=", ".join(cons), decay="")

    # decay -----------------------------------------------------------------
    def _leaves(self, node, r, c, fresh, out):
        """The W and L leaves in the order `_entry` meets them, each with the row and
        column of its own entry (a transposed W reads W[c, r])."""
        if isinstance(node, ast.Name):
            out.append((node.id, r, c))
        elif isinstance(node, ast.Attribute):
            self._leaves(node.value, c, r, fresh, out)
        elif isinstance(node.op, ast.MatMult):
            u = fresh()
            self._leaves(node.left, r, u, fresh, out)
            self._leaves(node.right, u, c, fresh, out)
        else:
            self._leaves(node.left, r, c, fresh, out)
            self._leaves(node.right, r, c, fresh, out)
        return out

    def decayed(self, pattern: Pattern) -> "DecayedMatrix | None":
        """The decay of `pattern` as entrywise powers of Γ = (γ^{t−x}) on the leaves:
        W → Γ^a ⊙ W, L → Γ^a ⊙ L with integer a ≥ 0, the smallest total power whose
        exponent Σ a (row − column) equals the pattern's Σ c_x (t − x) (its indices matched
        to this expansion's slot by slot); None if no such powers exist."""
        names = iter("iuwxyzabcdefghmnprs")
        leaves = self._leaves(self.tree.left, "t", "j", lambda: next(names), [])
        mine = self.pattern()
        if [s.factor for s in mine.slots] != [s.factor for s in pattern.slots]:
            return None
        ren = {}
        for a, b in zip(pattern.slots, mine.slots):
            if ren.setdefault(a.var, b.var) != b.var:
                return None
        want = {ren[x]: c for x, c in pattern.decay_coeffs if c}
        if any(c.denominator != 1 for c in want.values()):
            return None
        target = {x: -c for x, c in want.items()}
        target["t"] = sum(want.values())
        top = int(sum(want.values()))
        best = None
        for powers in itertools.product(range(top + 1), repeat=len(leaves)):
            if best is not None and sum(powers) >= sum(best):
                continue
            form: dict = {}
            for a, (_, r, c) in zip(powers, leaves):
                if a:
                    form[r] = form.get(r, 0) + a
                    form[c] = form.get(c, 0) - a
            if {k: v for k, v in form.items() if v} == {k: v for k, v in target.items() if v}:
                best = powers
        if best is None:
            return None
        decay = " + ".join(f"{a}*({r}-{c})" for a, (_, r, c) in zip(best, leaves) if a)
        return DecayedMatrix(self, best, Pattern(mine.expr, where=mine.where, decay=decay))


    # numbers --------------------------------------------------------------
    def numeric(self, q, k, v, gamma=1):
        T = q.shape[0]
        env = {"W": np.tril(q @ k.T), "L": np.tril(np.ones((T, T), dtype=int)).astype(object)}

        def ev(node):
            if isinstance(node, ast.Name):
                return env[node.id]
            if isinstance(node, ast.Attribute):
                return ev(node.value).T
            if isinstance(node.op, ast.MatMult):
                return ev(node.left) @ ev(node.right)
            return ev(node.left) * ev(node.right)
        return ev(self.tree.left) @ v

    def psums(self, fresh) -> list[PSum]:
        return pattern_psums(self.pattern(), fresh)

    @property
    def has_decay(self) -> bool:
        return False


class DecayedMatrix:
    """A Matrix whose leaves carry entrywise powers of Γ (see Matrix.decayed)."""

    def __init__(self, matrix: Matrix, powers: tuple, pattern: Pattern):
        self.matrix, self.powers, self.expanded = matrix, powers, pattern

    def tex(self) -> str:
        """The matrix form in TeX, Γ^a ⊙ X for a leaf X with power a."""
        powers = iter(self.powers)

        def walk(node):
            if isinstance(node, ast.Name):
                a = next(powers)
                if not a:
                    return node.id
                return f"(\\Gamma{'^{' + str(a) + '}' if a > 1 else ''} \\odot {node.id})"
            if isinstance(node, ast.Attribute):
                return walk(node.value) + "^\\top"
            op = " " if isinstance(node.op, ast.MatMult) else " \\odot "
            left, right = walk(node.left), walk(node.right)
            return f"({left}{op}{right})"
        return walk(self.matrix.tree.left) + " V"

    def __str__(self):
        return self.tex()

    def psums(self, fresh) -> list[PSum]:
        return pattern_psums(self.expanded, fresh)


class Moments:
    """o_t = x_tᵀ Π_k (Σ_{x≤t} γ^{t−x} factor_k(x)); factors like 'kk', 'qv'."""

    def __init__(self, *factors: str, t_vec: str = "q"):
        for f in factors:
            if len(f) != 2 or f[0] not in "qk" or f[1] not in "qkv1":
                raise PatternError(f"definition: moment factor {f!r} is not like 'kk' or 'qv'")
        self.factors, self.t_vec = factors, t_vec

    def __str__(self):
        return f"{self.t_vec}_tᵀ " + " ".join(f"(Σ_{{x≤t}} γ^(t−x) {f}_x)" for f in self.factors)

    @property
    def has_decay(self) -> bool:
        return True

    def psums(self, fresh) -> list[PSum]:
        word, cons, lin = [], [], {}
        for f in self.factors:
            x = fresh()
            word.append(("f", f, x))
            cons += [bound_le(("p0", 0), (x, 0), True), bound_le((x, 0), ("p1", 0))]
            lin[x] = lin.get(x, 0) - 1
            lin["p1"] = lin.get("p1", 0) + 1
        return [PSum(Fraction(1), tuple(word), tuple(cons),
                     tuple(sorted((k, Fraction(v)) for k, v in lin.items() if v)))]

    def numeric(self, q, k, v, gamma=1):
        vec = {"q": q, "k": k, "v": v, "1": np.ones((q.shape[0], 1), dtype=int).astype(object)}
        T = q.shape[0]
        out = []
        mom = [0] * len(self.factors)
        for t in range(T):
            for n, f in enumerate(self.factors):
                mom[n] = gamma * mom[n] + np.outer(vec[f[0]][t], vec[f[1]][t])
            x = vec[self.t_vec][t]
            for m in mom:
                x = x @ m
            out.append(x)
        return np.array(out)


def brute_numeric(p: Pattern, q, k, v, gamma) -> np.ndarray:
    """o_t straight from the pattern's definition (exact for Fraction inputs)."""
    T = q.shape[0]
    vec = {"q": q, "k": k, "v": v, "1": np.ones((T, 1), dtype=int).astype(object)}
    out = []
    for t in range(T):
        acc = None
        for val, expo in p.valuations(range(T), t):
            x = vec[p.t_vec][t]
            for s in p.slots:
                x = x @ np.outer(vec[s.in_vec][val[s.var]], vec[s.out_vec][val[s.var]])
            w = gamma ** (int(expo) if expo.denominator == 1 else float(expo))
            acc = w * x if acc is None else acc + w * x
        out.append(acc if acc is not None else np.zeros(vec[p.slots[-1].out_vec].shape[1], dtype=int) * Fraction(0))
    return np.array(out)


def rational_inputs(rng: random.Random, T: int, d: int, dv: int):
    pick = lambda: Fraction(rng.choice([-2, -1, 1, 2, 3]), rng.choice([1, 1, 2]))
    mat = lambda n, m: np.array([[pick() for _ in range(m)] for _ in range(n)], dtype=object)
    return mat(T, d), mat(T, d), mat(T, dv)


def prove_expansion(d, record: bool = False) -> list:
    """Pattern = definition: order types for every T, and an exact rational check.
    `record` keeps the order-type rows in details['argument'] (for the documents)."""
    from .engine import Certificate
    out = []
    defn = d.definition
    decays = [False] + ([True] if defn.has_decay and d.pattern.has_decay else [])
    for part, pat in (("numerator", d.pattern), ("denominator", d.pattern.denominator())):
        for decay in decays:
            t0 = time.perf_counter()
            fresh = Fresh()
            ctx = Context(["p0", "p1"], set(), {"P": 1})
            lhs = pattern_psums(pat, fresh)
            if part == "denominator":
                rhs = [PSum(s.coef, s.word[:-1] + ((s.word[-1][0], s.word[-1][1][0] + "1", s.word[-1][2]),),
                            s.cons, s.lin) for s in defn.psums(fresh)]
            else:
                rhs = defn.psums(fresh)
            r = compare(lhs, rhs, ctx, decay=decay, record=record)
            rng = random.Random(1234)
            exact_bad = []
            for T in range(1, 5):
                q, k, v = rational_inputs(rng, T, 2, 2)
                if part == "denominator":
                    v = np.ones((T, 1), dtype=int).astype(object)   # the definition with v -> 1
                g = Fraction(1, 2) if decay else 1
                a = brute_numeric(pat, q, k, v, g)
                b = defn.numeric(q, k, v, g)
                if not np.array_equal(np.asarray(a, dtype=object).reshape(T, -1),
                                      np.asarray(b, dtype=object).reshape(T, -1)):
                    exact_bad.append(f"T={T}")
            details = {"order_types": r["order_types"], "mismatch": str(r["mismatch"]) if r["mismatch"] else None,
                       "exact_failures": exact_bad, "scope": "universal"}
            if record:
                details["argument"] = [WeightCheck("pattern → definition", "prefix", pat, None, [defn], r["rows"])]
            out.append(Certificate(
                f"expansion: pattern = definition {defn}", "order types + exact rationals (T ≤ 4)",
                r["holds"] and not exact_bad, details, part, decay, time.perf_counter() - t0))
    if isinstance(defn, Matrix) and d.pattern.has_decay:
        out += prove_decayed_form(d, record)
    return out


def prove_decayed_form(d, record: bool = False) -> list:
    """The decayed matrix form (Matrix.decayed) equals the Pattern, decay included, by
    order types (every T); one certificate per part, or a failed one if no form exists."""
    from .engine import Certificate
    form = d.definition.decayed(d.pattern)
    out = []
    for part, pat in (("numerator", d.pattern), ("denominator", d.pattern.denominator())):
        t0 = time.perf_counter()
        if form is None:
            out.append(Certificate("decayed matrix form", "none found", False,
                                   {"failures": ["no per-leaf powers of Γ give the decay"]}, part, True))
            continue
        other = form.expanded if part == "numerator" else form.expanded.denominator()
        fresh = Fresh()
        r = compare(pattern_psums(pat, fresh), pattern_psums(other, fresh), Context(["p0", "p1"], set(), {"P": 1}),
                    decay=True, record=record)
        details = {"order_types": r["order_types"], "mismatch": str(r["mismatch"]) if r["mismatch"] else None,
                   "scope": "universal", "form": form.tex()}
        if record:
            details["argument"] = [WeightCheck("pattern → decayed definition", "prefix", pat, None, [form], r["rows"])]
        out.append(Certificate(f"expansion, decayed: pattern = {form.tex()}", "order types (weights on index tuples)",
                               r["holds"], details, part, True, time.perf_counter() - t0))
    return out
