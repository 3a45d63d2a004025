"""HLA3 (symmetric third-order, masked) kernels: chunked and recurrent, forward and backward.

    o_t = sum_{i <= u, j <= u, u <= t} g^((t-i)+(t-u)+(t-j)) (q_t.k_i)(k_i.q_u)(q_u.k_j) v_j

Carry (see HLA3State, keys of hla_core "hla3"): S = KK (d x d), P = KV (d x dv),
X = KK_QQ_KV (d x dv); with normalize also P1 = K1 (d), X1 = KK_QQ_K1 (d) (v -> 1).
Online (inclusive): S_t = g S_{t-1} + k_t k_t^T ; P_t = g P_{t-1} + k_t v_t^T ;
X_t = g^3 X_{t-1} + (S_t q_t)(q_t^T P_t) ; o_t = q_t^T X_t.

Both forms: with kt_u = S_u q_u and vt_u = P_u^T q_u the sum regroups as three first-order
linear attentions (kernels/gla.py), g^((t-i)+(t-u)+(t-j)) = g^(3(t-u)) g^(u-i) g^(u-j):

    kt = LA(q, k, k; g)         (carry S)
    vt = LA(q, k, v; g)         (carry P; normalized: side value 1, side output vt1, carry P1)
    o  = LA(q, kt, vt; g^3)     (carry X; normalized: side value vt1, carry X1, divide)

The recurrent forms run the same chains with the token-by-token LA kernel. The backward
(kernels/backward.py) runs each stage's VJP, three LAs, in reverse order.
"""
from __future__ import annotations

from ._common import HLA3State
from .backward import chain_apply
from .gla import Stage

# the derived streaming update as LA stages (kernels/gla.py: Stage); checked against the
# derivation engine by property_tests/test_kernel_chains.py
CHAIN = (Stage("KK", key="k", value="k", power=1),
         Stage("KV", key="k", value="v", power=1, side="K1"),
         Stage("KK_QQ_KV", key="KK", value="KV", power=3, side="KK_QQ_K1"))


def chunk_hla3(q, k, v, *, gamma=None, scale=1.0, normalize=False, eps=1e-6, chunk_size=64, initial_state=None,
               output_final_state=False, cu_seqlens=None, check_finite=True,
               block_v=None, num_warps=None, num_stages=None, segment_chunks=None, cp_group=None):
    """Chunked HLA3. Returns (o [B,T,H,dv], HLA3State or None).

    Same contract as kernels.chunk_hla2 (scale, autograd, autocast): gamma None / float in (0, 1] / tensor [H];
    initial_state an HLA3State (also one from fused_recurrent_hla3 or built from
    hla_core.evaluate("hla3", ..., return_state=True)); cu_seqlens packs sequences (B = 1).
    """
    return chain_apply(CHAIN, HLA3State, "chunk", q, k, v, gamma=gamma, scale=scale, normalize=normalize,
                       eps=eps, chunk_size=chunk_size, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                       check_finite=check_finite, block_v=block_v, num_warps=num_warps,
                       num_stages=num_stages, segment_chunks=segment_chunks, cp_group=cp_group)


def fused_recurrent_hla3(q, k, v, *, gamma=None, scale=1.0, normalize=False, eps=1e-6, chunk_size=64,
                         initial_state=None, output_final_state=False, cu_seqlens=None,
                         check_finite=True, block_v=None, num_warps=None, num_stages=None):
    """Token-by-token HLA3 (same contract as chunk_hla3; chunk_size is only checked):
    the same chain with the recurrent LA kernel, element-wise fp32 (fp64) arithmetic."""
    return chain_apply(CHAIN, HLA3State, "recurrent", q, k, v, gamma=gamma, scale=scale, normalize=normalize,
                       eps=eps, chunk_size=chunk_size, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                       check_finite=check_finite, block_v=block_v, num_warps=num_warps,
                       num_stages=num_stages)
