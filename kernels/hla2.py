"""HLA2 (symmetric second-order, masked) forward kernels: chunked and recurrent.

    o_t = sum_{1 <= i <= j <= t} g^((t-i)+(t-j)) (q_t.k_i)(k_i.q_j) v_j

Carry (see HLA2State): S = KK (d x d), X = KK_QV (d x dv), X1 = KK_Q1 (d).
Online: S_t = g S_{t-1} + k_t k_t^T ; X_t = g^2 X_{t-1} + (S_t q_t) v_t^T ; o_t = q_t^T X_t.

Chunked: with kt_t = S_t q_t the sum regroups as two first-order linear attentions
(kernels/gla.py), g^((t-i)+(t-j)) = g^(2(t-j)) g^(j-i):

    kt = LA(q, k, k; g)       (carry S)
    o  = LA(q, kt, v; g^2)    (carry X; normalized: side value 1, carry X1, divide)

kt goes to HBM once (d per token, in the dot operand format), nothing d x d per chunk.
The recurrent kernel applies the online update token by token.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import HLA2State, block_sizes, buf_dtype, check_state, operand_format, prepare, tl_dtype
from .gla import la_chunk


@triton.jit
def _hla2_recurrent_kernel(q, k, v, o, gam_ptr, s0_kk, s0_x, s0_x1, st_kk, st_x, st_x1, cu, eps,
                           T, H, D, DV,
                           BK: tl.constexpr, BV: tl.constexpr,
                           NORMALIZE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
                           VARLEN: tl.constexpr, ACC: tl.constexpr):
    # token-by-token online update, element-wise arithmetic in ACC (no tl.dot at all)
    iv = tl.program_id(0)
    nh = tl.program_id(1)
    n = nh // H
    h = nh % H
    if VARLEN:
        bos = tl.load(cu + n).to(tl.int64)
        L = (tl.load(cu + n + 1) - tl.load(cu + n)).to(tl.int32)
    else:
        bos = n.to(tl.int64) * T
        L = T
    ok = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    mk = ok < D
    mv = ov < DV
    g = tl.load(gam_ptr + h).to(ACC)
    S = tl.zeros((BK, BK), dtype=ACC)
    X = tl.zeros((BK, BV), dtype=ACC)
    X1 = tl.zeros((BK,), dtype=ACC)
    sbase = nh.to(tl.int64)
    if HAS_INIT:
        S = tl.load(s0_kk + sbase * D * D + ok[:, None] * D + ok[None, :],
                    mask=mk[:, None] & mk[None, :], other=0).to(ACC)
        X = tl.load(s0_x + sbase * D * DV + ok[:, None] * DV + ov[None, :],
                    mask=mk[:, None] & mv[None, :], other=0).to(ACC)
        if NORMALIZE:
            X1 = tl.load(s0_x1 + sbase * D + ok, mask=mk, other=0).to(ACC)
    for t in range(0, L):
        row = bos + t
        qt = tl.load(q + (row * H + h) * D + ok, mask=mk, other=0).to(ACC)
        kt = tl.load(k + (row * H + h) * D + ok, mask=mk, other=0).to(ACC)
        vt = tl.load(v + (row * H + h) * DV + ov, mask=mv, other=0).to(ACC)
        S = g * S + kt[:, None] * kt[None, :]
        sq = tl.sum(S * qt[None, :], 1)                     # S_t q_t
        X = g * g * X + sq[:, None] * vt[None, :]
        ot = tl.sum(qt[:, None] * X, 0)
        if NORMALIZE:
            X1 = g * g * X1 + sq
            ot = ot / (tl.sum(qt * X1, 0) + tl.load(eps))
        tl.store(o + (row * H + h) * DV + ov, ot.to(o.dtype.element_ty), mask=mv)
    if STORE_FINAL:
        if iv == 0:
            tl.store(st_kk + sbase * D * D + ok[:, None] * D + ok[None, :], S.to(st_kk.dtype.element_ty),
                     mask=mk[:, None] & mk[None, :])
            if NORMALIZE:
                tl.store(st_x1 + sbase * D + ok, X1.to(st_x1.dtype.element_ty), mask=mk)
        tl.store(st_x + sbase * D * DV + ok[:, None] * DV + ov[None, :], X.to(st_x.dtype.element_ty),
                 mask=mk[:, None] & mv[None, :])


def _run(mode, q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
         cu_seqlens, check_finite, block_v, num_warps, num_stages, segment_chunks=None):
    p = prepare(q, k, v, gamma, eps, chunk_size, cu_seqlens, check_finite)
    B, T, H, d, dv, N, sdt = p["B"], p["T"], p["H"], p["d"], p["dv"], p["N"], p["sdt"]
    dev = q.device
    st = {"KK": None, "KK_QV": None, "KK_Q1": None}
    if initial_state is not None:
        st = check_state(initial_state, HLA2State,
                         {"KK": (N, H, d, d), "KK_QV": (N, H, d, dv), "KK_Q1": (N, H, d, 1)},
                         normalize, dev, sdt)
    fin = None
    if output_final_state:
        fin = HLA2State(torch.empty((N, H, d, d), dtype=sdt, device=dev),
                        torch.empty((N, H, d, dv), dtype=sdt, device=dev),
                        torch.empty((N, H, d, 1), dtype=sdt, device=dev) if normalize else None)
    if mode == "chunk":
        fmt = operand_format(q.dtype, d, dv)
        kw = dict(fmt=fmt, block_v=block_v, num_warps=num_warps, num_stages=num_stages,
                  segment_chunks=segment_chunks)
        kt, _ = la_chunk(p, p["q"], p["k"], p["k"], 1, out_dtype=buf_dtype(fmt[0]),
                         init=(st["KK"], None), final=(fin.KK if fin else None, None), **kw)
        o, _ = la_chunk(p, p["q"], kt, p["v"], 2, out_dtype=q.dtype, side="ones" if normalize else None,
                        divide=normalize, eps=eps, init=(st["KK_QV"], st["KK_Q1"]),
                        final=(fin.KK_QV, fin.KK_Q1) if fin else (None, None), **kw)
        return o, fin
    o = torch.empty((B, T, H, dv), dtype=q.dtype, device=dev)
    dummy = o
    s0 = tuple(x if x is not None else dummy for x in (st["KK"], st["KK_QV"], st["KK_Q1"]))
    stp = tuple(x if x is not None else dummy for x in (fin if fin else (None,) * 3))
    BK, BV = block_sizes(d, dv, block_v)
    launch = {}
    if num_warps is not None:
        launch["num_warps"] = num_warps
    if num_stages is not None:
        launch["num_stages"] = num_stages
    _hla2_recurrent_kernel[(triton.cdiv(dv, BV), N * H)](
        p["q"], p["k"], p["v"], o, p["gam"], *s0, *stp, p["cu"] if p["cu"] is not None else dummy,
        torch.full((1,), float(eps), dtype=sdt, device=dev), T=T, H=H, D=d, DV=dv, BK=BK, BV=BV,
        NORMALIZE=bool(normalize), HAS_INIT=initial_state is not None, STORE_FINAL=bool(output_final_state),
        VARLEN=p["cu"] is not None, ACC=tl_dtype(sdt), **launch)
    return o, fin


def chunk_hla2(q, k, v, *, gamma=None, normalize=False, eps=1e-6, chunk_size=64, initial_state=None,
               output_final_state=False, cu_seqlens=None, check_finite=True,
               block_v=None, num_warps=None, num_stages=None, segment_chunks=None):
    """Chunked HLA2 forward. Returns (o [B,T,H,dv], HLA2State or None).

    gamma: None (no decay), float in (0, 1], or tensor [H]. check_finite=False skips the
    NaN/Inf scan of the inputs (one pass over q, k, v plus a host sync). block_v,
    num_warps, num_stages are launch knobs of the first-order launches (kernels/gla.py).
    """
    return _run("chunk", q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
                cu_seqlens, check_finite, block_v, num_warps, num_stages, segment_chunks)


def fused_recurrent_hla2(q, k, v, *, gamma=None, normalize=False, eps=1e-6, chunk_size=64,
                         initial_state=None, output_final_state=False, cu_seqlens=None,
                         check_finite=True, block_v=None, num_warps=None, num_stages=None):
    """Token-by-token HLA2 forward (same contract as chunk_hla2; chunk_size is only checked)."""
    return _run("recurrent", q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
                cu_seqlens, check_finite, block_v, num_warps, num_stages)
