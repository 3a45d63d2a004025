"""The gradients section of an operator's document (generated from the derivation).

For the numerator and the normalizing denominator: every gradient term (which occurrence
was differentiated, its index pattern), its streaming form (the readout at s from the
prefix state of 1..s and the suffix state of s+1..T, each side's one-token updates),
state entries per token, and the gradient certificates.
"""
from __future__ import annotations

import sympy

from .algebra import SympyAlgebra, evaluate, linear_apply, nc_symbol
from .gradients import all_gradient_terms, synthesize_term
from .summaries import OutOfReach

D, DV = sympy.symbols("d d_v", positive=True)
_DIM = {"q": D, "k": D, "v": DV, "1": sympy.Integer(1), "o": sympy.Symbol("d_o", positive=True)}


def _readout_sym(gs):
    holes = {n: s.holes for syn in (gs.prefix, gs.suffix) for n, s in syn.namer.by_name.items()}

    def ref(seg, name, fillers):
        label = f"{name}[s]" if seg == "P" else f"{name}ᴿ[s+1]"
        return linear_apply(label, fillers) if holes.get(name) else nc_symbol(label)
    alg = SympyAlgebra(ref=ref, tok=lambda f: nc_symbol(f"{f}[s]"))
    return nc_symbol(f"{gs.term.lead}[s]^T") * evaluate(gs.readout, alg)


def _entries(syn) -> sympy.Expr:
    total = sympy.Integer(0)
    for n in syn.stream_state:
        s = syn.namer.by_name[n]
        for run in s.chunks():
            total += _DIM[run[0][0]] * _DIM[run[-1][1]]
    return total


def gradient_section(d) -> str:
    L = ["## Gradients", "",
         "The loss Σ_t do_t · o_t is a closed chain of token factors; each occurrence of q, k or v "
         "in it, cut open there, is one gradient term, whose output index s is the occurrence's "
         "index (`derivations/gradients.py`). `o` is the cotangent: do_t for the numerator, "
         "do_t / (D_t + ε) when normalized, and −(do_t · o_t) / (D_t + ε) for the denominator "
         "(quotient rule). Each term is evaluated at every s from a prefix state of tokens 1..s "
         "(forward in time) and a suffix state of tokens s+1..T (written ᴿ, read backward in time, "
         "from T down): `hla_core.vjp(op, q, k, v, do, form=...)` runs them (quadratic: every index "
         "tuple; recurrent: the two scans; chunked: both scans by chunks with ⊕). A suffix update "
         "X[t] = … X[t+1] … adds token t to the state of the tokens after it.", "",
         "State hand-off (`initial_state=`, `dstate=`; recurrent and chunked forms): every value "
         "splits exactly into the monomials that hold an entry of the initial state and the rest; "
         "the rest is the empty-prefix loss above, and the gradient of the first part plus "
         "⟨dstate, final state⟩, with respect to q, k, v and the initial state, comes from reverse "
         "mode through the generated one-token updates and readout (chunked: checkpoints from ⊕ "
         "over chunk totals, then the reverse pass chunk by chunk; `hla_core.runtime.handoff_vjp`). "
         "Checked against finite differences and autograd, not proved.", ""]
    for part, pat in (("numerator", d.pattern), ("denominator (v → 1)", d.pattern.denominator())):
        L += [f"### Gradient terms of the {part}", ""]
        for wrt, terms in all_gradient_terms(pat).items():
            for n, term in enumerate(terms):
                L.append(f"**d{wrt}, term {n + 1}** — {term.occurrence}:")
                L += ["", f"    {term}", ""]
                try:
                    gs = synthesize_term(term)
                except OutOfReach as exc:
                    L += [f"No streaming form: {exc}.", ""]
                    continue
                L += [f"- readout at s: `{_readout_sym(gs)}`"]
                for side, syn, label in (("P", gs.prefix, "prefix"), ("F", gs.suffix, "suffix (backward)")):
                    if not syn.stream_state:
                        continue
                    ups = "; ".join(f"{k} = {v}" for k, v in syn.updates_sympy().items())
                    if side == "F":   # the suffix side steps from token t+1 down to t
                        ups = ups.replace("[t-1]", "[t+1]")
                    L.append(f"- {label} state ({sympy.expand(_entries(syn))} entries): `{ups}`")
                L.append("")
    return "\n".join(L) + "\n"


__all__ = ["gradient_section"]
