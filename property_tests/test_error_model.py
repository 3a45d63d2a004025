"""The error model's constants against what they count (hla_core/error_model.py).

m, the operand roundings on one product path, is counted from each operator's declared
chain (kernels/<op>.py: CHAIN): every LA stage rounds two operands on the path (its
decayed key, and its carry when that is read as the operand of Q X0) and every
intermediate stage output (kt, vt) is stored once in the operand format; the output of
the last stage is not. So m = 2·stages + (stages − 1). The model may add one spare
rounding, no more (a looser m hides real errors) and never less (a bound that does not
cover the counted roundings is not a bound).
"""
import pytest

from hla_core import error_model
from kernels import ahla, hla2, hla3


@pytest.mark.parametrize("module, op", [(hla2, None), (ahla, None), (hla3, "hla3")])
def test_operand_roundings_cover_the_counted_ones(module, op):
    stages = len(module.CHAIN)
    counted = 2 * stages + (stages - 1)
    m = error_model.operand_roundings(op)
    assert counted <= m <= counted + 1, (module.__name__, counted, m)


def test_the_counts_quoted_in_the_model_are_the_chain_counts():
    assert 2 * len(hla2.CHAIN) + len(hla2.CHAIN) - 1 == 5        # "at most 5 for HLA2"
    assert 2 * len(hla3.CHAIN) + len(hla3.CHAIN) - 1 == 8        # "8 counted" for HLA3


# ---------------------------------------------------------------------------
# The backward model's m and nb, counted on the backward chain

def _count_roundings(chain):
    """(forward m, backward m, most writers of one gradient) of a chain, by the rule of
    hla_core/error_model.py: along one product path an LA's roundings are those of the
    operands it reads, plus at most 2 of its own, plus 1 if its result is stored in the
    operand format (an intermediate stage output or an intermediate cotangent)."""
    from kernels.backward import VJP_RULES, _plan
    r = {"q": 0, "k": 0, "v": 0}
    m_fwd = 0
    for i, s in enumerate(chain):
        own = r[s.key] + r[s.value] + r["q"] + 2
        if i == len(chain) - 1:
            m_fwd = own
        else:
            r[s.state] = own + 1
    cot = {chain[-1].state: 0}  # do, the input cotangent
    m_bwd = 0
    for i in range(len(chain) - 1, -1, -1):
        s = chain[i]
        roles = {"q": 0, "a": r[s.key], "b": r[s.value], "dN": cot[s.state]}
        for rule in VJP_RULES:
            got = roles[rule.query] + roles[rule.key] + roles[rule.value] + 2
            tgt = {"q": "q", "a": s.key, "b": s.value}[rule.target]
            if tgt in ("q", "k", "v"):
                m_bwd = max(m_bwd, got)
            else:
                cot[tgt] = max(cot.get(tgt, 0), got + 1)
    need = dict(q=True, k=True, v=True, init=False)
    writers = {}
    for _, _, tgt in _plan(chain, need, {s.state: False for s in chain}):
        writers[tgt] = writers.get(tgt, 0) + 1
    w = max(n for t, n in writers.items() if t in ("q", "k", "v"))
    return m_fwd, m_bwd, w


@pytest.mark.parametrize("module, op", [(hla2, None), (ahla, None), (hla3, "hla3")])
def test_backward_operand_roundings_cover_the_counted_ones(module, op):
    m_fwd, m_bwd, w = _count_roundings(module.CHAIN)
    assert m_fwd == 2 * len(module.CHAIN) + len(module.CHAIN) - 1  # the forward count above
    m = error_model.backward_operand_roundings(op)
    assert m_bwd <= m <= m_bwd + 1, (module.__name__, m_bwd, m)
    # nb adds the fp32 sums of a gradient's writers: W - 1 <= stages - 1
    assert w <= len(module.CHAIN) == error_model.CHAIN_STAGES[op]
    T, d, C, g = 1000, 32, 64, 0.9
    extra = error_model.backward_accumulation_depth(T, d, C, g, op=op) - error_model.accumulation_depth(T, d, C, g, op=op)
    assert w - 1 <= extra <= len(module.CHAIN) - 1


def test_the_backward_counts_quoted_in_the_model():
    assert _count_roundings(hla2.CHAIN)[1] == 5 and _count_roundings(ahla.CHAIN)[1] == 5  # "5"
    assert _count_roundings(hla3.CHAIN)[1] == 8                                           # "8"
