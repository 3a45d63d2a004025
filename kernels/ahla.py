"""AHLA (asymmetric second-order, masked) kernels: chunked and recurrent, forward and backward.

    o_t = sum_{1 <= j <= i <= t} g^(t-j) (q_t.k_i)(q_i.k_j) v_j

Carry (see AHLAState): P = KV (d x dv), E = KQ_KV (d x dv), p1 = K1, e1 = KQ_K1 (d).
Online: P_t = g P_{t-1} + k_t v_t^T ; E_t = g E_{t-1} + k_t (q_t^T P_t) ; o_t = q_t^T E_t.

Both forms: with vt_i = P_i^T q_i (the first-order output) the sum regroups as two
first-order linear attentions (kernels/gla.py), g^(t-j) = g^(t-i) g^(i-j):

    vt = LA(q, k, v; g)       (carry P; normalized: side value 1, side output vt1, carry p1)
    o  = LA(q, k, vt; g)      (carry E; normalized: side value vt1, carry e1, divide)

The recurrent forms run the same chains with the token-by-token LA kernel. The backward
(kernels/backward.py) runs each stage's VJP, three LAs, in reverse order.
"""
from __future__ import annotations

from ._common import AHLAState
from .backward import chain_apply
from .gla import Stage

# the derived streaming update as LA stages (kernels/gla.py: Stage); checked against the
# derivation engine by property_tests/test_kernel_chains.py
CHAIN = (Stage("KV", key="k", value="v", power=1, side="K1"),
         Stage("KQ_KV", key="k", value="KV", power=1, side="KQ_K1"))


def chunk_ahla(q, k, v, *, gamma=None, scale=1.0, normalize=False, eps=1e-6, chunk_size=64, initial_state=None,
               output_final_state=False, cu_seqlens=None, check_finite=True,
               block_v=None, num_warps=None, num_stages=None, segment_chunks=None, cp_group=None):
    """Chunked AHLA. Returns (o [B,T,H,dv], AHLAState or None). See chunk_hla2 (gamma,
    scale, autograd, autocast)."""
    return chain_apply(CHAIN, AHLAState, "chunk", q, k, v, gamma=gamma, scale=scale, normalize=normalize,
                       eps=eps, chunk_size=chunk_size, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                       check_finite=check_finite, block_v=block_v, num_warps=num_warps,
                       num_stages=num_stages, segment_chunks=segment_chunks, cp_group=cp_group)


def fused_recurrent_ahla(q, k, v, *, gamma=None, scale=1.0, normalize=False, eps=1e-6, chunk_size=64,
                         initial_state=None, output_final_state=False, cu_seqlens=None,
                         check_finite=True, block_v=None, num_warps=None, num_stages=None):
    """Token-by-token AHLA (same contract as chunk_ahla; chunk_size is only checked):
    the same chain with the recurrent LA kernel, element-wise fp32 (fp64) arithmetic."""
    return chain_apply(CHAIN, AHLAState, "recurrent", q, k, v, gamma=gamma, scale=scale, normalize=normalize,
                       eps=eps, chunk_size=chunk_size, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                       check_finite=check_finite, block_v=block_v, num_warps=num_warps,
                       num_stages=num_stages)
