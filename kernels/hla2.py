"""HLA2 (symmetric second-order, masked) forward kernels: chunked and recurrent.

    o_t = sum_{1 <= i <= j <= t} g^((t-i)+(t-j)) (q_t.k_i)(k_i.q_j) v_j

Carry (see HLA2State): S = KK (d x d), X = KK_QV (d x dv), X1 = KK_Q1 (d).
Online: S_t = g S_{t-1} + k_t k_t^T ; X_t = g^2 X_{t-1} + (S_t q_t) v_t^T ; o_t = q_t^T X_t.

Both forms: with kt_t = S_t q_t the sum regroups as two first-order linear attentions
(kernels/gla.py), g^((t-i)+(t-j)) = g^(2(t-j)) g^(j-i):

    kt = LA(q, k, k; g)       (carry S)
    o  = LA(q, kt, v; g^2)    (carry X; normalized: side value 1, carry X1, divide)

kt goes to HBM once (d per token, in the dot operand format), nothing d x d per chunk.
The recurrent forms run the same chains with the token-by-token LA kernel.
"""
from __future__ import annotations

from ._common import HLA2State, carry_in_out, prepare
from .gla import Chain


def _run(mode, q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
         cu_seqlens, check_finite, block_v, num_warps, num_stages, segment_chunks=None):
    p = prepare(q, k, v, gamma, eps, chunk_size, cu_seqlens, check_finite)
    N, H, d, dv = p["N"], p["H"], p["d"], p["dv"]
    st, fin = carry_in_out(HLA2State, {"KK": (N, H, d, d), "KK_QV": (N, H, d, dv), "KK_Q1": (N, H, d, 1)},
                           initial_state, output_final_state, normalize, q.device, p["sdt"])
    f = fin._asdict() if fin is not None else dict.fromkeys(HLA2State._fields)
    la = Chain(p, mode, block_v, num_warps, num_stages, segment_chunks)
    kt, _ = la(p["q"], p["k"], p["k"], 1, init=(st["KK"], None), final=(f["KK"], None))
    o, _ = la(p["q"], kt, p["v"], 2, last=True, side="ones" if normalize else None, divide=normalize,
              eps=eps, init=(st["KK_QV"], st["KK_Q1"]), final=(f["KK_QV"], f["KK_Q1"]))
    return o, fin


def chunk_hla2(q, k, v, *, gamma=None, normalize=False, eps=1e-6, chunk_size=64, initial_state=None,
               output_final_state=False, cu_seqlens=None, check_finite=True,
               block_v=None, num_warps=None, num_stages=None, segment_chunks=None):
    """Chunked HLA2 forward. Returns (o [B,T,H,dv], HLA2State or None).

    gamma: None (no decay), float in (0, 1], or tensor [H]. check_finite=False skips the
    NaN/Inf scan of the inputs (one pass over q, k, v plus a host sync). block_v,
    num_warps, num_stages are launch knobs of the LA launches (kernels/gla.py);
    segment_chunks cuts the sequences into parallel segments (None: automatic).
    """
    return _run("chunk", q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
                cu_seqlens, check_finite, block_v, num_warps, num_stages, segment_chunks)


def fused_recurrent_hla2(q, k, v, *, gamma=None, normalize=False, eps=1e-6, chunk_size=64,
                         initial_state=None, output_final_state=False, cu_seqlens=None,
                         check_finite=True, block_v=None, num_warps=None, num_stages=None):
    """Token-by-token HLA2 forward (same contract as chunk_hla2; chunk_size is only checked):
    the same chain with the recurrent LA kernel, element-wise fp32 (fp64) arithmetic."""
    return _run("recurrent", q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
                cu_seqlens, check_finite, block_v, num_warps, num_stages)
