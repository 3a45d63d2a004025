"""`derive`: from a Pattern to its streaming state, segment summaries, ⊕ and proofs.

The synthesis (summaries.py) is generic; this module assembles it for one
operator — numerator and normalizing denominator — exposes the results as
SymPy objects, runs the proofs (proofs.py) and hands out reference code
(codegen.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from .algebra import SympyAlgebra, evaluate, hole_symbols, linear_apply, nc_symbol
from .pattern import Pattern
from .summaries import (END, GAMMA, Namer, OutOfReach, Summary, Term, closure, embed,
                        reduced_relations, refs_in, top_readout)


@dataclass
class Certificate:
    identity: str
    method: str
    holds: bool
    details: dict
    part: str = "numerator"
    decay: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"identity": self.identity, "method": self.method, "holds": self.holds,
                "part": self.part, "decay": self.decay, "details": self.details}


@dataclass
class Synthesis:
    """Everything derived for one pattern (a numerator or a denominator)."""
    pattern: Pattern
    namer: Namer
    top: Summary
    readout: tuple                   # nested product of prefix summaries (segment 'P')
    stream: dict                     # name -> terms over 'A' (state at t-1) and Tok (token t)
    combine: dict                    # name -> terms over 'A', 'B' with ρ_B
    embeds: dict                     # name -> terms of Tok/Ext (one-token segment)
    stream_state: list
    carry_state: list
    scan_state: list

    @property
    def summaries(self) -> dict[str, Summary]:
        return {n: self.namer.by_name[n] for n in self.scan_state}

    @property
    def holes(self) -> dict[str, int]:
        return {n: s.holes for n, s in self.namer.by_name.items()}

    @property
    def has_end_relations(self) -> bool:
        return any(END in pair and op == "<" or pair[0] == END
                   for s in self.summaries.values() for pair, op in s.rel)

    # -- SymPy views -------------------------------------------------------
    def _sym(self, seg_names: dict, token_fmt: str = "{f}[t]"):
        holes = self.holes

        def ref(seg, name, fillers):
            label = seg_names[seg].format(name=name)
            if holes.get(name, 0):
                return linear_apply(label, fillers)
            return nc_symbol(label)
        return SympyAlgebra(ref=ref, tok=lambda f: nc_symbol(token_fmt.format(f=f)))

    def updates_sympy(self) -> dict:
        alg = self._sym({"A": "{name}[t-1]"})
        return {nc_symbol(f"{n}[t]"): evaluate(self.stream[n], alg, hole_symbols(self.holes[n]))
                for n in self.stream_state}

    def combine_sympy(self) -> dict:
        alg = self._sym({"A": "{name}_A", "B": "{name}_B"})
        return {n: evaluate(self.combine[n], alg, hole_symbols(self.holes[n])) for n in self.scan_state}

    def readout_sympy(self):
        alg = self._sym({"P": "{name}[t]"})
        return nc_symbol(f"{self.pattern.t_vec}[t]^T") * evaluate([Term(1, self.readout)], alg)

    def summary_sympy(self, name: str):
        """(summand, condition): γ-weighted word over the summary's indices."""
        s = self.namer.by_name[name]
        end = sympy.Symbol("end", integer=True)
        xs = {v: sympy.Symbol(v, integer=True) for v in s.vars}
        word = sympy.Integer(1)
        k = 0
        for sl in s.slots:
            if sl[0] == "h":
                k += 1
                word = word * nc_symbol(f"Z{k}")
            else:
                word = word * sympy.Function(sl[1], commutative=False)(xs[sl[2]])
        weight = GAMMA ** sum((c * (end - xs[v]) for v, c in s.decay), sympy.Integer(0))
        conds = [sympy.Ge(xs[v], 1) for v in s.vars] + [sympy.Le(xs[v], end) for v in s.vars]
        for a, op, b in reduced_relations(s):
            A = end if a == END else xs[a]
            B = end if b == END else xs[b]
            conds.append({"<=": sympy.Le, "<": sympy.Lt, "==": sympy.Eq}[op](A, B))
        return weight * word, sympy.And(*conds)


def synthesize(p: Pattern, namer: Namer | None = None) -> Synthesis:
    """Derive readout, streaming state, summaries and ⊕ for one pattern. A shared
    `namer` gives equal summaries of two patterns (numerator, denominator) one name."""
    namer = namer or Namer()
    top, readout = top_readout(p, namer)
    start = list(dict.fromkeys(refs_in([Term(sympy.Integer(1), readout)])))
    stream = closure(start, namer, one_token=True, sides=("A",))
    combine = closure(start, namer, one_token=False, sides=("A", "B"))
    carry = list(closure(start, namer, one_token=False, sides=("A",)))
    embeds = {n: embed(namer.by_name[n]) for n in combine}
    return Synthesis(p, namer, top, readout, stream, combine, embeds,
                     stream_state=list(stream), carry_state=carry, scan_state=list(combine))


@dataclass
class Derivation:
    """The derivation of one operator: numerator and denominator syntheses,
    the proofs' certificates, and reference code on request."""
    pattern: Pattern
    num: Synthesis
    den: Synthesis
    certificates: list = field(default_factory=list)
    definition: object = None

    # Readable SymPy views of the numerator (the denominator is `self.den`).
    @property
    def state(self) -> dict:
        """Streaming state: {X[t]: update in X[t-1] and the token's factors}."""
        return self.num.updates_sympy()

    @property
    def readout(self):
        return self.num.readout_sympy()

    @property
    def summaries(self) -> dict:
        """Segment summaries: name -> (summand, condition)."""
        return {n: self.num.summary_sympy(n) for n in self.num.scan_state}

    @property
    def combine(self) -> dict:
        """The associative combine ⊕: name -> value on A·B from A's and B's summaries."""
        return self.num.combine_sympy()

    @property
    def proved(self) -> bool:
        return bool(self.certificates) and all(c.holds for c in self.certificates)

    def __str__(self) -> str:
        lines = [str(self.pattern), f"  readout: o_t = {self.readout}", "  streaming state:"]
        lines += [f"    {k} = {v}" for k, v in self.state.items()]
        lines.append("  combine ⊕ (segment A then B, ρ_B = γ^|B|):")
        lines += [f"    {k}_AB = {v}" for k, v in self.combine.items()]
        if self.certificates:
            ok = sum(c.holds for c in self.certificates)
            lines.append(f"  proofs: {ok}/{len(self.certificates)} hold")
        return "\n".join(lines)

    @property
    def gradients(self) -> dict:
        """Gradient terms of the numerator: {'q' | 'k' | 'v': [GradTerm, ...]} (print them);
        the denominator's are `all_gradient_terms(self.pattern.denominator())`."""
        from .gradients import all_gradient_terms
        return all_gradient_terms(self.pattern)

    def reference(self, form: str = "recurrent", backend: str = "numpy"):
        from .codegen import reference_function
        return reference_function(self, form, backend)

    def vjp_reference(self, form: str = "quadratic", backend: str = "numpy"):
        """f(q, k, v, do, gamma=, normalize=, eps=, chunk_size=, dps=, initial_state=None,
        dstate=None) -> (dq, dk, dv), plus {name: gradient} of `initial_state` when given."""
        from .codegen import reference_function
        return reference_function(self, form, backend, vjp=True)


def derive(pattern: Pattern, *, prove: bool = True, definition=None, exact_T: int = 4,
           gradients: bool = True) -> Derivation:
    """Derive and (by default) prove everything for `pattern`, numerator and denominator;
    `gradients=False` leaves out the gradient certificates (they cost more than the forward)."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern: expected a derivations.Pattern, got {type(pattern).__name__}")
    num = synthesize(pattern)
    den = synthesize(pattern.denominator(), namer=num.namer)
    d = Derivation(pattern, num, den, definition=definition)
    if prove:
        from .proofs import prove_all
        d.certificates = prove_all(d, exact_T=exact_T)
        if gradients:
            d.certificates += prove_gradients(d, exact_T)
    return d


def prove_gradients(d: Derivation, exact_T: int = 4) -> list:
    """The gradient certificates of a derivation: terms = derivative, exact VJP check, and
    each term's streaming form, numerator and denominator."""
    from .gradients import prove_derivative, prove_exact_vjp, prove_streaming_gradients
    pattern, decay = d.pattern, d.pattern.has_decay
    certs = [prove_derivative(pattern, "gradient, numerator", decay),
             prove_derivative(pattern.denominator(), "gradient, denominator", decay),
             prove_exact_vjp(d, decay, T_max=min(exact_T, 3))]
    certs += prove_streaming_gradients(pattern, "gradient, numerator", decay)
    certs += prove_streaming_gradients(pattern.denominator(), "gradient, denominator", decay)
    return certs


__all__ = ["Certificate", "Derivation", "OutOfReach", "Synthesis", "derive", "synthesize"]
