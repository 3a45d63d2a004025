"""Triton kernels for Higher-order Linear Attention (fla layout), forward and backward.

q, k: [B, T, H, d]; v: [B, T, H, dv]; returns (o [B, T, H, dv], state or None). Every
public function is a torch.autograd op (kernels/backward.py).
"""
from ._common import AHLAState, HLA2State, HLA3State
from .ahla import chunk_ahla, fused_recurrent_ahla
from .hla2 import chunk_hla2, fused_recurrent_hla2
from .hla3 import chunk_hla3, fused_recurrent_hla3

__all__ = ["chunk_hla2", "fused_recurrent_hla2", "chunk_ahla", "fused_recurrent_ahla",
           "chunk_hla3", "fused_recurrent_hla3", "HLA2State", "AHLAState", "HLA3State"]
