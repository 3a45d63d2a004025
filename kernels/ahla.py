"""AHLA (asymmetric second-order, masked) forward kernels: chunked and recurrent.

    o_t = sum_{1 <= j <= i <= t} g^(t-j) (q_t.k_i)(q_i.k_j) v_j

Carry (see AHLAState): P = KV (d x dv), E = KQ_KV (d x dv), p1 = K1, e1 = KQ_K1 (d).
Online: P_t = g P_{t-1} + k_t v_t^T ; E_t = g E_{t-1} + k_t (q_t^T P_t) ; o_t = q_t^T E_t.

Chunked form (chunk of length Lc <= C, local rows r, i, j = 0..Lc-1, b_r = g^(r+1),
W = Q K^T, Wl = tril(W), Wd[r,i] = [i<=r] g^(r-i) W[r,i], gk_j = g^(Lc-1-j)):

    o     = b * (Q E0) + b * (Wl (Q P0)) + Wd (Wd V)
    P_end = g^Lc P0 + (K * gk)^T V
    E_end = g^Lc (E0 + K^T (Q P0)) + (K * gk)^T (Wd V)

(the K^T Q P0 term carries no decay: g^(Lc-1-i) b_i = g^Lc for every i). The carry
holds no d x d matrix, so AHLA costs about a first-order kernel plus one C x C x dv product.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (_decay, block_sizes_for, decay_table, AHLAState, check_state, operand_format, prepare, tl_dtype)


NUM_WARPS_BF16 = None  # bf16 chunk-kernel default (see _run)


@triton.jit
def _ahla_chunk_kernel(q, k, v, o, log2g_ptr, pow_ptr, s0_p, s0_e, s0_p1, s0_e1, st_p, st_e, st_p1, st_e1, cu, eps,
                       T, H, D, DV,
                       BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                       NORMALIZE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
                       VARLEN: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                       TABLE: tl.constexpr):
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
    oc = tl.arange(0, C)
    mk = ok < D
    mv = ov < DV
    lg = tl.load(log2g_ptr + h).to(ACC)
    pw = pow_ptr + h * (2 * C + 1)  # g^n, n = 0..2C, exact float64 table (used when TABLE)
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
    r2 = oc[:, None]
    c2 = oc[None, :]
    b = _decay(lg, pw, oc + 1, TABLE)                                          # g^(r+1)
    Dw = tl.where(c2 <= r2, _decay(lg, pw, tl.maximum(r2 - c2, 0), TABLE), 0)   # g^(r-i), i<=r
    for cs in range(0, L, C):
        Lc = tl.minimum(L - cs, C)
        mr = oc < Lc
        rows = bos + cs + oc
        qb = tl.load(q + (rows[:, None] * H + h) * D + ok[None, :], mask=mr[:, None] & mk[None, :], other=0)
        kb = tl.load(k + (rows[:, None] * H + h) * D + ok[None, :], mask=mr[:, None] & mk[None, :], other=0)
        vb = tl.load(v + (rows[:, None] * H + h) * DV + ov[None, :], mask=mr[:, None] & mv[None, :], other=0)
        qd = qb.to(DOT)
        kd = kb.to(DOT)
        vd = vb.to(DOT)
        gk = tl.where(mr, _decay(lg, pw, tl.maximum(Lc - 1 - oc, 0), TABLE), 0)  # g^(Lc-1-j)
        gC = _decay(lg, pw, Lc, TABLE)                                            # g^Lc

        W = tl.dot(qd, tl.trans(kd), input_precision=PREC, out_dtype=ACC)
        Wl = tl.where(c2 <= r2, W, 0)
        Wd = W * Dw
        QP = tl.dot(qd, P.to(DOT), input_precision=PREC, out_dtype=ACC)         # q_i^T P0
        WdV = tl.dot(Wd.to(DOT), vd, input_precision=PREC, out_dtype=ACC)
        ob = b[:, None] * (tl.dot(qd, E.to(DOT), input_precision=PREC, out_dtype=ACC)
                           + tl.dot(Wl.to(DOT), QP.to(DOT), input_precision=PREC, out_dtype=ACC))
        ob += tl.dot(Wd.to(DOT), WdV.to(DOT), input_precision=PREC, out_dtype=ACC)
        if NORMALIZE:
            qa = qb.to(ACC)
            qp1 = tl.sum(qa * p1[None, :], 1)
            wd1 = tl.sum(Wd, 1)
            den = b * (tl.sum(qa * e1[None, :], 1) + tl.sum(Wl * qp1[None, :], 1)) \
                + tl.sum(Wd * wd1[None, :], 1)
            ob = ob / (den + tl.load(eps))[:, None]
        tl.store(o + (rows[:, None] * H + h) * DV + ov[None, :], ob.to(o.dtype.element_ty),
                 mask=mr[:, None] & mv[None, :])

        kg = (kb.to(ACC) * gk[:, None])
        E = gC * (E + tl.dot(tl.trans(kd), QP.to(DOT), input_precision=PREC, out_dtype=ACC)) \
            + tl.dot(tl.trans(kg.to(DOT)), WdV.to(DOT), input_precision=PREC, out_dtype=ACC)
        P = gC * P + tl.dot(tl.trans(kg.to(DOT)), vd, input_precision=PREC, out_dtype=ACC)
        if NORMALIZE:
            ka = kb.to(ACC)
            e1 = gC * (e1 + tl.sum(ka * qp1[:, None], 0)) + tl.sum(kg * wd1[:, None], 0)
            p1 = gC * p1 + tl.sum(kg, 0)

    if STORE_FINAL:
        tl.store(st_p + sbase * D * DV + ok[:, None] * DV + ov[None, :], P.to(st_p.dtype.element_ty),
                 mask=mk[:, None] & mv[None, :])
        tl.store(st_e + sbase * D * DV + ok[:, None] * DV + ov[None, :], E.to(st_e.dtype.element_ty),
                 mask=mk[:, None] & mv[None, :])
        if NORMALIZE:
            if iv == 0:
                tl.store(st_p1 + sbase * D + ok, p1.to(st_p1.dtype.element_ty), mask=mk)
                tl.store(st_e1 + sbase * D + ok, e1.to(st_e1.dtype.element_ty), mask=mk)


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


# see hla2.py: with d == 1 or dv == 1 use a variant that does not make them compile-time 1
_ahla_chunk_kernel_ns = triton.jit(do_not_specialize=["D", "DV"])(_ahla_chunk_kernel.fn)


def _run(mode, q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
         cu_seqlens, check_finite, block_v, num_warps, num_stages):
    p = prepare(q, k, v, gamma, eps, chunk_size, cu_seqlens, check_finite)
    B, T, H, d, dv, N, sdt = p["B"], p["T"], p["H"], p["d"], p["dv"], p["N"], p["sdt"]
    dev = q.device
    BK, BV = block_sizes_for(d, dv, block_v, q.dtype)
    if initial_state is not None:
        st = check_state(initial_state, AHLAState,
                         {"KV": (N, H, d, dv), "KQ_KV": (N, H, d, dv), "K1": (N, H, d, 1),
                          "KQ_K1": (N, H, d, 1)}, normalize, dev, sdt)
        s0 = (st["KV"], st["KQ_KV"], st["K1"] if normalize else st["KV"],
              st["KQ_K1"] if normalize else st["KV"])
    else:
        s0 = (p["q"],) * 4  # dummies, never read
    o = torch.empty((B, T, H, dv), dtype=q.dtype, device=dev)
    if output_final_state:
        mk = lambda *s: torch.empty(s, dtype=sdt, device=dev)  # noqa: E731
        fin = AHLAState(mk(N, H, d, dv), mk(N, H, d, dv),
                        mk(N, H, d, 1) if normalize else None, mk(N, H, d, 1) if normalize else None)
        stp = (fin.KV, fin.KQ_KV, fin.K1 if normalize else fin.KV, fin.KQ_K1 if normalize else fin.KV)
    else:
        fin = None
        stp = (o,) * 4
    cu = p["cu"] if p["cu"] is not None else o
    grid = (triton.cdiv(dv, BV), N * H)
    common = dict(T=T, H=H, D=d, DV=dv, BK=BK, BV=BV, NORMALIZE=bool(normalize),
                  HAS_INIT=initial_state is not None, STORE_FINAL=bool(output_final_state),
                  VARLEN=p["cu"] is not None, ACC=tl_dtype(sdt))
    launch = {}
    if num_warps is None and mode == "chunk" and q.dtype == torch.bfloat16:
        # measured on an H200 (triton 3.6): with 4 warps some bf16 HLA2 chunk shapes
        # (e.g. d=33, dv=1, C=64; d=128, block_v=32) gave wrong results or an illegal
        # memory access; 8 warps ran correctly on every shape tested (docs/benchmarks.md)
        num_warps = NUM_WARPS_BF16
    if num_stages is None and q.dtype == torch.float64:
        num_stages = 1  # fp64 tiles at C=64, d=64 overflow shared memory with deeper pipelining
    if num_warps is not None:
        launch["num_warps"] = num_warps
    if num_stages is not None:
        launch["num_stages"] = num_stages
    if mode == "chunk":
        (_ahla_chunk_kernel_ns if (d == 1 or dv == 1) else _ahla_chunk_kernel)[grid](p["q"], p["k"], p["v"], o, p["log2g"], decay_table(p["gam"], chunk_size), *s0, *stp, cu, torch.full((1,), float(eps), dtype=sdt, device=dev),
                                 C=chunk_size, DOT=operand_format(q.dtype, d, dv)[0], PREC=operand_format(q.dtype, d, dv)[1], TABLE=sdt == torch.float64, **common, **launch)
    else:
        _ahla_recurrent_kernel[grid](p["q"], p["k"], p["v"], o, p["gam"], *s0, *stp, cu, torch.full((1,), float(eps), dtype=sdt, device=dev),
                                     **common, **launch)
    return o, fin


def chunk_ahla(q, k, v, *, gamma=None, normalize=False, eps=1e-6, chunk_size=64, initial_state=None,
               output_final_state=False, cu_seqlens=None, check_finite=True,
               block_v=None, num_warps=None, num_stages=None):
    """Chunked AHLA forward. Returns (o [B,T,H,dv], AHLAState or None). See chunk_hla2."""
    return _run("chunk", q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
                cu_seqlens, check_finite, block_v, num_warps, num_stages)


def fused_recurrent_ahla(q, k, v, *, gamma=None, normalize=False, eps=1e-6, chunk_size=64,
                         initial_state=None, output_final_state=False, cu_seqlens=None,
                         check_finite=True, block_v=None, num_warps=None, num_stages=None):
    """Token-by-token AHLA forward (same contract as chunk_ahla)."""
    return _run("recurrent", q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
                cu_seqlens, check_finite, block_v, num_warps, num_stages)
