"""AHLA (asymmetric second-order, masked) forward kernels: chunked and recurrent.

    o_t = sum_{1 <= j <= i <= t} g^(t-j) (q_t.k_i)(q_i.k_j) v_j

Carry (see AHLAState): P = KV (d x dv), E = KQ_KV (d x dv), p1 = K1, e1 = KQ_K1 (d).
Online: P_t = g P_{t-1} + k_t v_t^T ; E_t = g E_{t-1} + k_t (q_t^T P_t) ; o_t = q_t^T E_t.

Chunked: with vt_i = P_i^T q_i (the first-order output) the sum regroups as two
first-order linear attentions (kernels/gla.py), g^(t-j) = g^(t-i) g^(i-j):

    vt = LA(q, k, v; g)       (carry P; normalized: side value 1, side output vt1, carry p1)
    o  = LA(q, k, vt; g)      (carry E; normalized: side value vt1, carry e1, divide)

The recurrent kernel applies the online update token by token.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import AHLAState, block_sizes, buf_dtype, check_state, operand_format, prepare, tl_dtype
from .gla import la_chunk


@triton.jit
def _ahla_recurrent_kernel(q, k, v, o, gam_ptr, s0_p, s0_e, s0_p1, s0_e1, st_p, st_e, st_p1, st_e1, cu, eps,
                           T, H, D, DV,
                           BK: tl.constexpr, BV: tl.constexpr,
                           NORMALIZE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
                           VARLEN: tl.constexpr, ACC: tl.constexpr):
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
    P = tl.zeros((BK, BV), dtype=ACC)
    E = tl.zeros((BK, BV), dtype=ACC)
    p1 = tl.zeros((BK,), dtype=ACC)
    e1 = tl.zeros((BK,), dtype=ACC)
    sbase = nh.to(tl.int64)
    if HAS_INIT:
        P = tl.load(s0_p + sbase * D * DV + ok[:, None] * DV + ov[None, :],
                    mask=mk[:, None] & mv[None, :], other=0).to(ACC)
        E = tl.load(s0_e + sbase * D * DV + ok[:, None] * DV + ov[None, :],
                    mask=mk[:, None] & mv[None, :], other=0).to(ACC)
        if NORMALIZE:
            p1 = tl.load(s0_p1 + sbase * D + ok, mask=mk, other=0).to(ACC)
            e1 = tl.load(s0_e1 + sbase * D + ok, mask=mk, other=0).to(ACC)
    for t in range(0, L):
        row = bos + t
        qt = tl.load(q + (row * H + h) * D + ok, mask=mk, other=0).to(ACC)
        kt = tl.load(k + (row * H + h) * D + ok, mask=mk, other=0).to(ACC)
        vt = tl.load(v + (row * H + h) * DV + ov, mask=mv, other=0).to(ACC)
        P = g * P + kt[:, None] * vt[None, :]
        qp = tl.sum(qt[:, None] * P, 0)                     # q_t^T P_t
        E = g * E + kt[:, None] * qp[None, :]
        ot = tl.sum(qt[:, None] * E, 0)
        if NORMALIZE:
            p1 = g * p1 + kt
            e1 = g * e1 + kt * tl.sum(qt * p1, 0)
            ot = ot / (tl.sum(qt * e1, 0) + tl.load(eps))
        tl.store(o + (row * H + h) * DV + ov, ot.to(o.dtype.element_ty), mask=mv)
    if STORE_FINAL:
        tl.store(st_p + sbase * D * DV + ok[:, None] * DV + ov[None, :], P.to(st_p.dtype.element_ty),
                 mask=mk[:, None] & mv[None, :])
        tl.store(st_e + sbase * D * DV + ok[:, None] * DV + ov[None, :], E.to(st_e.dtype.element_ty),
                 mask=mk[:, None] & mv[None, :])
        if NORMALIZE:
            if iv == 0:
                tl.store(st_p1 + sbase * D + ok, p1.to(st_p1.dtype.element_ty), mask=mk)
                tl.store(st_e1 + sbase * D + ok, e1.to(st_e1.dtype.element_ty), mask=mk)


def _run(mode, q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
         cu_seqlens, check_finite, block_v, num_warps, num_stages, segment_chunks=None):
    p = prepare(q, k, v, gamma, eps, chunk_size, cu_seqlens, check_finite)
    B, T, H, d, dv, N, sdt = p["B"], p["T"], p["H"], p["d"], p["dv"], p["N"], p["sdt"]
    dev = q.device
    st = dict.fromkeys(AHLAState._fields)
    if initial_state is not None:
        st = check_state(initial_state, AHLAState,
                         {"KV": (N, H, d, dv), "KQ_KV": (N, H, d, dv), "K1": (N, H, d, 1),
                          "KQ_K1": (N, H, d, 1)}, normalize, dev, sdt)
    fin = None
    if output_final_state:
        mk = lambda *s: torch.empty(s, dtype=sdt, device=dev)  # noqa: E731
        fin = AHLAState(mk(N, H, d, dv), mk(N, H, d, dv),
                        mk(N, H, d, 1) if normalize else None, mk(N, H, d, 1) if normalize else None)
    if mode == "chunk":
        fmt = operand_format(q.dtype, d, dv)
        kw = dict(fmt=fmt, block_v=block_v, num_warps=num_warps, num_stages=num_stages,
                  segment_chunks=segment_chunks)
        vt, vt1 = la_chunk(p, p["q"], p["k"], p["v"], 1, out_dtype=buf_dtype(fmt[0]),
                           side="ones" if normalize else None, side_out=normalize,
                           init=(st["KV"], st["K1"]), final=(fin.KV, fin.K1) if fin else (None, None), **kw)
        o, _ = la_chunk(p, p["q"], p["k"], vt, 1, out_dtype=q.dtype, side=vt1, divide=normalize, eps=eps,
                        init=(st["KQ_KV"], st["KQ_K1"]), final=(fin.KQ_KV, fin.KQ_K1) if fin else (None, None),
                        **kw)
        return o, fin
    o = torch.empty((B, T, H, dv), dtype=q.dtype, device=dev)
    dummy = o
    s0 = tuple(st[f] if st[f] is not None else dummy for f in AHLAState._fields)
    stp = tuple(x if x is not None else dummy for x in (fin if fin else (None,) * 4))
    BK, BV = block_sizes(d, dv, block_v)
    launch = {}
    if num_warps is not None:
        launch["num_warps"] = num_warps
    if num_stages is not None:
        launch["num_stages"] = num_stages
    _ahla_recurrent_kernel[(triton.cdiv(dv, BV), N * H)](
        p["q"], p["k"], p["v"], o, p["gam"], *s0, *stp, p["cu"] if p["cu"] is not None else dummy,
        torch.full((1,), float(eps), dtype=sdt, device=dev), T=T, H=H, D=d, DV=dv, BK=BK, BV=BV,
        NORMALIZE=bool(normalize), HAS_INIT=initial_state is not None, STORE_FINAL=bool(output_final_state),
        VARLEN=p["cu"] is not None, ACC=tl_dtype(sdt), **launch)
    return o, fin


def chunk_ahla(q, k, v, *, gamma=None, normalize=False, eps=1e-6, chunk_size=64, initial_state=None,
               output_final_state=False, cu_seqlens=None, check_finite=True,
               block_v=None, num_warps=None, num_stages=None, segment_chunks=None):
    """Chunked AHLA forward. Returns (o [B,T,H,dv], AHLAState or None). See chunk_hla2."""
    return _run("chunk", q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
                cu_seqlens, check_finite, block_v, num_warps, num_stages, segment_chunks)


def fused_recurrent_ahla(q, k, v, *, gamma=None, normalize=False, eps=1e-6, chunk_size=64,
                         initial_state=None, output_final_state=False, cu_seqlens=None,
                         check_finite=True, block_v=None, num_warps=None, num_stages=None):
    """Token-by-token AHLA forward (same contract as chunk_ahla)."""
    return _run("recurrent", q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
                cu_seqlens, check_finite, block_v, num_warps, num_stages)
