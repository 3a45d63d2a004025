"""HLA2 (symmetric second-order, masked) kernels: chunked and recurrent, forward and backward.

    o_t = sum_{1 <= i <= j <= t} g^((t-i)+(t-j)) (q_t.k_i)(k_i.q_j) v_j

Carry (see HLA2State): S = KK (d x d), X = KK_QV (d x dv), X1 = KK_Q1 (d).
Online: S_t = g S_{t-1} + k_t k_t^T ; X_t = g^2 X_{t-1} + (S_t q_t) v_t^T ; o_t = q_t^T X_t.

Both forms: with kt_t = S_t q_t the sum regroups as two first-order linear attentions
(kernels/gla.py), g^((t-i)+(t-j)) = g^(2(t-j)) g^(j-i):

    kt = LA(q, k, k; g)       (carry S)
    o  = LA(q, kt, v; g^2)    (carry X; normalized: side value 1, carry X1, divide)

kt goes to HBM once (d per token, in the dot operand format), nothing d x d per chunk.
The recurrent forms run the same chains with the token-by-token LA kernel. The backward
(kernels/backward.py) runs each stage's VJP, three LAs, in reverse order.
"""
from __future__ import annotations

from ._common import HLA2State
from .backward import chain_apply
from .gla import Stage

# the derived streaming update as LA stages (kernels/gla.py: Stage); checked against the
# derivation engine by property_tests/test_kernel_chains.py
CHAIN = (Stage("KK", key="k", value="k", power=1),
         Stage("KK_QV", key="KK", value="v", power=2, side="KK_Q1"))


def chunk_hla2(q, k, v, *, gamma=None, scale=1.0, normalize=False, eps=1e-6, chunk_size=64, initial_state=None,
               output_final_state=False, cu_seqlens=None, check_finite=True,
               block_v=None, num_warps=None, num_stages=None, segment_chunks=None, cp_group=None):
    """Chunked HLA2. Returns (o [B,T,H,dv], HLA2State or None).

    gamma: None (no decay), float in (0, 1], or tensor [H]; a constant (a gamma tensor that
    requires grad raises). check_finite=False skips the NaN/Inf scan of the inputs (one
    pass over q, k, v plus a host sync). block_v, num_warps, num_stages are launch knobs of
    the LA launches (kernels/gla.py); segment_chunks cuts the sequences into parallel
    segments (None: automatic).

    Differentiable (kernels/backward.py): gradients for q, k, v and the initial state's
    tensors; a cotangent on the returned final state flows back.
    scale: q is multiplied by it first. Default 1.0, the operator as defined (paper,
    hla_core's references, the states). fla defaults to d^-1/2; here every (q . k) factor
    of the chain holds exactly one q, so scale=d**-0.5 scales every dot product by d^-1/2
    as fla's does (the output by d^-1 for HLA2 / AHLA, d^-3/2 for HLA3); the normalized
    outputs do not depend on it (up to eps).
    Under torch.autocast the kernels compute in the autocast dtype: float32 / float16 /
    bfloat16 inputs are cast to it (float64 is left alone), o comes back in it, states in
    fp32, and the gradients in the inputs' dtypes.
    cp_group: a torch.distributed process group splitting the sequence across its ranks
    (kernels/cp.py): each rank passes its own contiguous slice (rank order = sequence
    order, any lengths >= 1, the same B, H, d, dv, dtype, gamma, normalize, eps, scale on
    every rank), gets the output of its slice as if the whole sequence ran on one device,
    and a final state at the end of its slice; initial_state is taken on rank 0 only. Not
    with cu_seqlens. The backward exchanges carries too: every rank must run it.
    """
    return chain_apply(CHAIN, HLA2State, "chunk", q, k, v, gamma=gamma, scale=scale, normalize=normalize,
                       eps=eps, chunk_size=chunk_size, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                       check_finite=check_finite, block_v=block_v, num_warps=num_warps,
                       num_stages=num_stages, segment_chunks=segment_chunks, cp_group=cp_group)


def fused_recurrent_hla2(q, k, v, *, gamma=None, scale=1.0, normalize=False, eps=1e-6, chunk_size=64,
                         initial_state=None, output_final_state=False, cu_seqlens=None,
                         check_finite=True, block_v=None, num_warps=None, num_stages=None):
    """Token-by-token HLA2 (same contract as chunk_hla2; chunk_size is only checked):
    the same chain with the recurrent LA kernel, element-wise fp32 (fp64) arithmetic."""
    return chain_apply(CHAIN, HLA2State, "recurrent", q, k, v, gamma=gamma, scale=scale, normalize=normalize,
                       eps=eps, chunk_size=chunk_size, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                       check_finite=check_finite, block_v=block_v, num_warps=num_warps,
                       num_stages=num_stages)
