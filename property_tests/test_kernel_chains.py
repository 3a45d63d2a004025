"""The kernels' LA chains are the derivation engine's streaming updates.

Each kernel module declares its operator as a chain of first-order linear attentions
(kernels/gla.py: Stage; carry X_t = g^p X_{t-1} + a_t b_t^T). The engine derives the
operator's streaming state and proves it equal to the definition for every T, d, dv.
Here the chain's update is written in the engine's noncommutative symbols and compared
with the derived update by SymPy expansion, for the numerator and for the v -> 1
denominator (the side carries). So the chunk and recurrent kernels compute the proved
recursion exactly, up to rounding; the numerical property tests are the second line.
"""
from __future__ import annotations

import pytest
import sympy

from derivations.algebra import nc_symbol
from derivations.engine import derive
from derivations.summaries import GAMMA
from hla_core.registry import OPERATORS
from kernels import ahla, hla2, hla3
from kernels.gla import Stage

CHAINS = {"hla2": hla2.CHAIN, "ahla": ahla.CHAIN, "hla3": hla3.CHAIN}


def _now(name):
    return nc_symbol(f"{name}[t]")


def chain_updates(chain, ones=False):
    """{carry[t]: update} of the chain in the engine's symbols; with ones=True the v -> 1
    chain (side carries; a value "v" becomes the token factor 1)."""
    by = {s.state: s for s in chain}
    name = {s.state: (s.side if ones and s.side else s.state) for s in chain}
    out = {}
    for s in chain:
        for ref in (s.key, s.value):
            if ref not in ("k", "v") and ref not in name:
                raise ValueError(f"stage {s.state} reads {ref!r}, which is not a stage of the chain")
        if ones and s.side is None and s.value != "k":
            continue
        left_tok, L = ("k", 1) if s.key == "k" else ("q", _now(name[s.key]))
        if s.value in ("k", "v"):
            right_tok, R = ("1" if ones and s.value == "v" else s.value), 1
        else:
            right_tok, R = "q", _now(name[s.value])
        X = name[s.state]
        out[_now(X)] = GAMMA ** s.power * nc_symbol(f"{X}[t-1]") + L * nc_symbol(f"{left_tok}{right_tok}[t]") * R
        assert s.key == "k" or (by[s.key].key == "k" and by[s.key].value == "k"), \
            f"stage {s.state}: key stage {s.key} must be symmetric (key = value = 'k')"
    return out


def matches(updates: dict, derived: dict) -> bool:
    """Same carries, and every update equal after replacing carry[t] on the right-hand
    sides by its own update (both sides then read carries at t-1 and token factors)."""
    if set(updates) != set(derived):
        return False
    for k, rhs in updates.items():
        if sympy.expand(rhs.xreplace(derived) - derived[k]) != 0:
            return False
    return True


@pytest.mark.parametrize("op", sorted(CHAINS))
def test_chain_is_the_derived_update(op):
    d = derive(OPERATORS[op].pattern, prove=False)
    assert matches(chain_updates(CHAINS[op]), d.num.updates_sympy()), f"{op}: numerator chain"
    assert matches(chain_updates(CHAINS[op], ones=True), d.den.updates_sympy()), f"{op}: v -> 1 chain"


@pytest.mark.parametrize("wrong", [
    (Stage("KK", "k", "k", 1), Stage("KK_QV", "KK", "v", 1, "KK_Q1")),        # decay g instead of g^2
    (Stage("KK", "k", "k", 1), Stage("KK_QV", "k", "v", 2, "KK_Q1")),         # key k instead of KK q
    (Stage("KK", "k", "k", 1), Stage("KK_QV", "KK", "k", 2, "KK_Q1")),        # value k instead of v
    (Stage("KK", "k", "k", 2), Stage("KK_QV", "KK", "v", 2, "KK_Q1")),        # first carry decays g^2
])
def test_a_wrong_chain_is_rejected(wrong):
    d = derive(OPERATORS["hla2"].pattern, prove=False)
    assert not matches(chain_updates(wrong), d.num.updates_sympy())
