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
