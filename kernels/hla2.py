"""HLA2 (symmetric second-order, masked) forward kernels: chunked and recurrent.

    o_t = sum_{1 <= i <= j <= t} g^((t-i)+(t-j)) (q_t.k_i)(k_i.q_j) v_j

Carry (see HLA2State): S = KK (d x d), X = KK_QV (d x dv), X1 = KK_Q1 (d).
Online: S_t = g S_{t-1} + k_t k_t^T ; X_t = g^2 X_{t-1} + S_t q_t v_t^T ; o_t = q_t^T X_t.

Chunked form (one chunk of length Lc <= C, local rows r, j, i = 0..Lc-1, chunk-start
carry S0, X0, b_r = g^(r+1)), obtained by unrolling the online update over the chunk:

    o_r   = b_r^2 q_r^T X0 + sum_{j<=r} g^(2r-j+1) (q_r^T S0 q_j) v_j
            + sum_{j<=r} g^(2(r-j)) sum_{i<=j} g^(j-i) (q_r.k_i)(k_i.q_j) v_j
    S_end = g^Lc S0 + sum_i g^(Lc-1-i) k_i k_i^T
    X_end = g^(2Lc) X0 + S0 sum_j g^(2Lc-1-j) q_j v_j^T
            + sum_{i<=j} g^((Lc-1-i)+(Lc-1-j)) k_i (k_i.q_j) v_j^T

Every decay factor is formed directly as g^n with n >= 0 (exp2(n log2 g) in fp32, an
exact float64 table for float64 inputs; never as a ratio g^a / g^b, which over/underflows for small g). One program owns one
(sequence, head, dv block): the running state stays in registers while the chunks
stream through it, so nothing per-chunk goes to HBM.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (_decay, block_sizes_for, decay_table, min_block, HLA2State, check_state, operand_format, prepare, tl_dtype)


NUM_WARPS_BF16 = 8  # bf16 chunk-kernel default (see _run)


@triton.jit
def _hla2_chunk_kernel(q, k, v, o, log2g_ptr, pow_ptr, s0_kk, s0_x, s0_x1, st_kk, st_x, st_x1, cu, eps,
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

    r2 = oc[:, None]
    c2 = oc[None, :]
    low = c2 <= r2
    b = _decay(lg, pw, oc + 1, TABLE)                                          # g^(r+1)
    D1 = tl.where(low, _decay(lg, pw, tl.maximum(2 * r2 - c2 + 1, 0), TABLE), 0)  # g^(2r-j+1), j<=r
    D2 = tl.where(low, _decay(lg, pw, tl.maximum(2 * (r2 - c2), 0), TABLE), 0)    # g^(2(r-j)),  j<=r
    DwT = tl.where(r2 <= c2, _decay(lg, pw, tl.maximum(c2 - r2, 0), TABLE), 0)    # [i,j]: g^(j-i), i<=j
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
        # per-chunk decay vectors g^n, n >= 0 (clamped where masked), zero where masked;
        # the C x C decay matrices do not depend on the chunk and are built before the loop
        gk = tl.where(mr, _decay(lg, pw, tl.maximum(Lc - 1 - oc, 0), TABLE), 0)  # g^(Lc-1-i)
        gC = _decay(lg, pw, Lc, TABLE)                                            # g^Lc
        e = gC * gk                                                              # g^(2Lc-1-j)
        DU = tl.where(r2 <= c2, gk[:, None] * gk[None, :], 0)                    # g^((Lc-1-i)+(Lc-1-j)), i<=j

        W = tl.dot(qd, tl.trans(kd), input_precision=PREC, out_dtype=ACC)       # W[r,i] = q_r.k_i
        KQ = tl.dot(kd, tl.trans(qd), input_precision=PREC, out_dtype=ACC)      # KQ[i,j] = k_i.q_j = W[j,i]
        # (a second dot instead of tl.trans(W): no transpose of a computed tile feeds a dot)
        WdT = (KQ * DwT).to(DOT)                                        # [i<=j] g^(j-i) W[j,i]
        A = tl.dot(W.to(DOT), WdT, input_precision=PREC, out_dtype=ACC) * D2
        QS = tl.dot(qd, S.to(DOT), input_precision=PREC, out_dtype=ACC)         # q_r^T S0 (S0 symmetric)
        A += tl.dot(QS.to(DOT), tl.trans(qd), input_precision=PREC, out_dtype=ACC) * D1
        ob = (b * b)[:, None] * tl.dot(qd, X.to(DOT), input_precision=PREC, out_dtype=ACC)
        ob += tl.dot(A.to(DOT), vd, input_precision=PREC, out_dtype=ACC)
        if NORMALIZE:
            qa = qb.to(ACC)
            den = (b * b) * tl.sum(qa * X1[None, :], 1) + tl.sum(A, 1)
            ob = ob / (den + tl.load(eps))[:, None]
        tl.store(o + (rows[:, None] * H + h) * DV + ov[None, :], ob.to(o.dtype.element_ty),
                 mask=mr[:, None] & mv[None, :])

        # carry to the end of the chunk; X first (it needs S0)
        M = tl.dot(tl.trans((qb.to(ACC) * e[:, None]).to(DOT)), vd, input_precision=PREC, out_dtype=ACC)
        U = KQ * DU                                                              # U[i,j] = k_i.q_j g^..
        UV = tl.dot(U.to(DOT), vd, input_precision=PREC, out_dtype=ACC)
        X = gC * gC * X + tl.dot(S.to(DOT), M.to(DOT), input_precision=PREC, out_dtype=ACC) \
            + tl.dot(tl.trans(kd), UV.to(DOT), input_precision=PREC, out_dtype=ACC)
        if NORMALIZE:
            ka = kb.to(ACC)
            m1 = tl.sum(qb.to(ACC) * e[:, None], 0)
            u1 = tl.sum(U, 1)
            X1 = gC * gC * X1 + tl.sum(S * m1[None, :], 1) + tl.sum(ka * u1[:, None], 0)
        kg = (kb.to(ACC) * gk[:, None]).to(DOT)
        S = gC * S + tl.dot(tl.trans(kg), kd, input_precision=PREC, out_dtype=ACC)

    if STORE_FINAL:
        if iv == 0:
            tl.store(st_kk + sbase * D * D + ok[:, None] * D + ok[None, :], S.to(st_kk.dtype.element_ty),
                     mask=mk[:, None] & mk[None, :])
            if NORMALIZE:
                tl.store(st_x1 + sbase * D + ok, X1.to(st_x1.dtype.element_ty), mask=mk)
        tl.store(st_x + sbase * D * DV + ok[:, None] * DV + ov[None, :], X.to(st_x.dtype.element_ty),
                 mask=mk[:, None] & mv[None, :])


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


# ----------------------------------------------------------------------------- split chunk path
# Three launches instead of one sequential program per (sequence, head, value block):
#
#   pass 1 (sequential over chunks, parallel over (column block of S, sequence, head)):
#       S <- g^Lc S + K^T diag(gk) K                       (S = KK at the chunk start, symmetric)
#       U = Q S                                            (C x d, stored: the size of Q)
#       G = diag(e) U + Ul^T K,  Ul[i,j] = [i<=j] gk_i gk_j (k_i.q_j)       (C x d, stored)
#     S symmetric gives S0 M = S0 Q^T diag(e) V = U^T diag(e) V, so the X carry is
#       X_end = g^(2Lc) X0 + G^T V       (a first-order recursion; no d x d x dv term)
#   pass 2 (sequential over chunks, parallel over (value block, sequence, head)):
#       Y = Q X0 (C x dv, stored), X <- g^(2Lc) X + G^T V ; X1 <- g^(2Lc) X1 + G^T 1
#   pass 3 (parallel over (chunk, head, value block)):
#       o = b^2 Y + (tril(U Q^T o D1) + (W WdT) o D2) V,   W = Q K^T
# gk_i = g^(Lc-1-i), e_j = g^(2Lc-1-j), b_r = g^(r+1), D1[r,j] = [j<=r] g^(2r-j+1),
# D2[r,j] = [j<=r] g^(2(r-j)), WdT[i,j] = [i<=j] g^(j-i) k_i.q_j (as in the fused kernel).
# Nothing d x d is written per chunk: per token U, G (d each) and Y (dv) go to HBM.


@triton.jit
def _hla2_pass1_kernel(q, k, u_buf, g_buf, log2g_ptr, pow_ptr, s0_kk, st_kk, cu,
                       T, H, D,
                       BK: tl.constexpr, BS: tl.constexpr, C: tl.constexpr,
                       HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, VARLEN: tl.constexpr,
                       DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, TABLE: tl.constexpr):
    ic = tl.program_id(0)
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
    os_ = ic * BS + tl.arange(0, BS)
    oc = tl.arange(0, C)
    mk = ok < D
    ms = os_ < D
    lg = tl.load(log2g_ptr + h).to(ACC)
    pw = pow_ptr + h * (2 * C + 1)
    sbase = nh.to(tl.int64)
    S = tl.zeros((BK, BS), dtype=ACC)                        # S[:, column block]
    if HAS_INIT:
        S = tl.load(s0_kk + sbase * D * D + ok[:, None] * D + os_[None, :],
                    mask=mk[:, None] & ms[None, :], other=0).to(ACC)
    r2 = oc[:, None]
    c2 = oc[None, :]
    for cs in range(0, L, C):
        Lc = tl.minimum(L - cs, C)
        mr = oc < Lc
        rows = bos + cs + oc
        qb = tl.load(q + (rows[:, None] * H + h) * D + ok[None, :], mask=mr[:, None] & mk[None, :], other=0)
        kb = tl.load(k + (rows[:, None] * H + h) * D + ok[None, :], mask=mr[:, None] & mk[None, :], other=0)
        kc = tl.load(k + (rows[:, None] * H + h) * D + os_[None, :], mask=mr[:, None] & ms[None, :], other=0)
        qd = qb.to(DOT)
        kd = kb.to(DOT)
        gk = tl.where(mr, _decay(lg, pw, tl.maximum(Lc - 1 - oc, 0), TABLE), 0)  # g^(Lc-1-i)
        gC = _decay(lg, pw, Lc, TABLE)                                            # g^Lc
        e = gC * gk                                                              # g^(2Lc-1-j)
        # UlT[j,i] = Ul[i,j] = [i<=j] gk_i gk_j (k_i.q_j): built from Q K^T (no transposed result)
        QK = tl.dot(qd, tl.trans(kd), input_precision=PREC, out_dtype=ACC)      # [j,i] = q_j.k_i
        UlT = tl.where(c2 <= r2, QK * (gk[:, None] * gk[None, :]), 0).to(DOT)
        U = tl.dot(qd, S.to(DOT), input_precision=PREC, out_dtype=ACC)          # Q S0[:, block]
        G = e[:, None] * U + tl.dot(UlT, kc.to(DOT), input_precision=PREC, out_dtype=ACC)
        off = (rows[:, None] * H + h) * D + os_[None, :]
        msk = mr[:, None] & ms[None, :]
        tl.store(u_buf + off, U.to(u_buf.dtype.element_ty), mask=msk)
        tl.store(g_buf + off, G.to(g_buf.dtype.element_ty), mask=msk)
        kcg = (kc.to(ACC) * gk[:, None]).to(DOT)                                 # diag(gk) K[:, block]
        S = gC * S + tl.dot(tl.trans(kd), kcg, input_precision=PREC, out_dtype=ACC)
    if STORE_FINAL:
        tl.store(st_kk + sbase * D * D + ok[:, None] * D + os_[None, :], S.to(st_kk.dtype.element_ty),
                 mask=mk[:, None] & ms[None, :])


@triton.jit
def _hla2_pass2_kernel(q, v, g_buf, y_buf, y1_buf, log2g_ptr, pow_ptr, s0_x, s0_x1, st_x, st_x1, cu,
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
    pw = pow_ptr + h * (2 * C + 1)
    sbase = nh.to(tl.int64)
    X = tl.zeros((BK, BV), dtype=ACC)
    X1 = tl.zeros((BK,), dtype=ACC)
    if HAS_INIT:
        X = tl.load(s0_x + sbase * D * DV + ok[:, None] * DV + ov[None, :],
                    mask=mk[:, None] & mv[None, :], other=0).to(ACC)
        if NORMALIZE:
            X1 = tl.load(s0_x1 + sbase * D + ok, mask=mk, other=0).to(ACC)
    for cs in range(0, L, C):
        Lc = tl.minimum(L - cs, C)
        mr = oc < Lc
        rows = bos + cs + oc
        qb = tl.load(q + (rows[:, None] * H + h) * D + ok[None, :], mask=mr[:, None] & mk[None, :], other=0)
        gb = tl.load(g_buf + (rows[:, None] * H + h) * D + ok[None, :], mask=mr[:, None] & mk[None, :], other=0)
        vb = tl.load(v + (rows[:, None] * H + h) * DV + ov[None, :], mask=mr[:, None] & mv[None, :], other=0)
        gC2 = _decay(lg, pw, 2 * Lc, TABLE)                                       # g^(2Lc)
        Y = tl.dot(qb.to(DOT), X.to(DOT), input_precision=PREC, out_dtype=ACC)   # Q X0
        tl.store(y_buf + (rows[:, None] * H + h) * DV + ov[None, :], Y.to(y_buf.dtype.element_ty),
                 mask=mr[:, None] & mv[None, :])
        if NORMALIZE:
            if iv == 0:
                y1 = tl.sum(qb.to(ACC) * X1[None, :], 1)
                tl.store(y1_buf + rows * H + h, y1.to(y1_buf.dtype.element_ty), mask=mr)
            X1 = gC2 * X1 + tl.sum(gb.to(ACC), 0)
        X = gC2 * X + tl.dot(tl.trans(gb.to(DOT)), vb.to(DOT), input_precision=PREC, out_dtype=ACC)
    if STORE_FINAL:
        tl.store(st_x + sbase * D * DV + ok[:, None] * DV + ov[None, :], X.to(st_x.dtype.element_ty),
                 mask=mk[:, None] & mv[None, :])
        if NORMALIZE:
            if iv == 0:
                tl.store(st_x1 + sbase * D + ok, X1.to(st_x1.dtype.element_ty), mask=mk)


@triton.jit
def _hla2_pass3_kernel(q, k, v, o, u_buf, y_buf, y1_buf, chunk_tab, log2g_ptr, pow_ptr, cu, eps,
                       T, H, D, DV, NT,
                       BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                       NORMALIZE: tl.constexpr, VARLEN: tl.constexpr, DOT: tl.constexpr,
                       ACC: tl.constexpr, PREC: tl.constexpr, TABLE: tl.constexpr):
    it = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    if VARLEN:
        n = tl.load(chunk_tab + 2 * it)
        cs = tl.load(chunk_tab + 2 * it + 1)
        bos = tl.load(cu + n).to(tl.int64)
        L = (tl.load(cu + n + 1) - tl.load(cu + n)).to(tl.int32)
    else:
        n = it // NT
        cs = (it % NT) * C
        bos = n.to(tl.int64) * T
        L = T
    ok = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    oc = tl.arange(0, C)
    mk = ok < D
    mv = ov < DV
    lg = tl.load(log2g_ptr + h).to(ACC)
    pw = pow_ptr + h * (2 * C + 1)
    r2 = oc[:, None]
    c2 = oc[None, :]
    low = c2 <= r2
    b = _decay(lg, pw, oc + 1, TABLE)                                          # g^(r+1)
    D1 = tl.where(low, _decay(lg, pw, tl.maximum(2 * r2 - c2 + 1, 0), TABLE), 0)  # g^(2r-j+1), j<=r
    D2 = tl.where(low, _decay(lg, pw, tl.maximum(2 * (r2 - c2), 0), TABLE), 0)    # g^(2(r-j)),  j<=r
    DwT = tl.where(r2 <= c2, _decay(lg, pw, tl.maximum(c2 - r2, 0), TABLE), 0)    # [i,j]: g^(j-i), i<=j
    Lc = tl.minimum(L - cs, C)
    mr = oc < Lc
    rows = bos + cs + oc
    qk_off = (rows[:, None] * H + h) * D + ok[None, :]
    qk_msk = mr[:, None] & mk[None, :]
    qd = tl.load(q + qk_off, mask=qk_msk, other=0).to(DOT)
    kd = tl.load(k + qk_off, mask=qk_msk, other=0).to(DOT)
    ud = tl.load(u_buf + qk_off, mask=qk_msk, other=0).to(DOT)
    v_off = (rows[:, None] * H + h) * DV + ov[None, :]
    v_msk = mr[:, None] & mv[None, :]
    vd = tl.load(v + v_off, mask=v_msk, other=0).to(DOT)
    yb = tl.load(y_buf + v_off, mask=v_msk, other=0).to(ACC)
    W = tl.dot(qd, tl.trans(kd), input_precision=PREC, out_dtype=ACC)       # W[r,i] = q_r.k_i
    KQ = tl.dot(kd, tl.trans(qd), input_precision=PREC, out_dtype=ACC)      # KQ[i,j] = k_i.q_j
    WdT = (KQ * DwT).to(DOT)
    A = tl.dot(W.to(DOT), WdT, input_precision=PREC, out_dtype=ACC) * D2
    A += tl.dot(ud, tl.trans(qd), input_precision=PREC, out_dtype=ACC) * D1  # q_r^T S0 q_j
    ob = (b * b)[:, None] * yb + tl.dot(A.to(DOT), vd, input_precision=PREC, out_dtype=ACC)
    if NORMALIZE:
        y1 = tl.load(y1_buf + rows * H + h, mask=mr, other=0).to(ACC)
        den = (b * b) * y1 + tl.sum(A, 1)
        ob = ob / (den + tl.load(eps))[:, None]
    tl.store(o + v_off, ob.to(o.dtype.element_ty), mask=v_msk)


# Variants that do not specialize the head sizes: Triton turns an integer argument equal to 1
# into a compile-time constant, and with dv = 1 (or d = 1) the bf16 kernels compiled that way read
# past their shared-memory dot operands on an H200 / triton 3.6 (see docs/benchmarks.md). Used
# only when d == 1 or dv == 1, so the usual divisibility specialization stays for real sizes.
_NOSPEC = ["D", "DV"]
_hla2_chunk_kernel_ns = triton.jit(do_not_specialize=_NOSPEC)(_hla2_chunk_kernel.fn)
_hla2_pass1_kernel_ns = triton.jit(do_not_specialize=["D"])(_hla2_pass1_kernel.fn)
_hla2_pass2_kernel_ns = triton.jit(do_not_specialize=_NOSPEC)(_hla2_pass2_kernel.fn)
_hla2_pass3_kernel_ns = triton.jit(do_not_specialize=_NOSPEC)(_hla2_pass3_kernel.fn)


# launch defaults of the split path (per pass); chunk_hla2(tune={...}) overrides them
SPLIT_DEFAULTS = dict(bs=32, bv2=64, bv3=128, w1=4, w2=8, w3=4)


def _buf_dtype(dot) -> torch.dtype:
    """Storage format of the per-token U, G buffers: the tl.dot operand format they are
    rounded to anyway (bf16 for bf16 operands on the GPU), else the state format."""
    return {tl.bfloat16: torch.bfloat16, tl.float32: torch.float32, tl.float64: torch.float64}[dot]


def _run_split(p, o, s0, stp, cu, chunk_size, normalize, eps, has_init, store_final,
               block_v, num_warps, num_stages, tune):
    B, T, H, d, dv, N, sdt = p["B"], p["T"], p["H"], p["d"], p["dv"], p["N"], p["sdt"]
    dtype = p["q"].dtype
    dev = o.device
    cfg = dict(SPLIT_DEFAULTS)
    if tune:
        unknown = set(tune) - set(cfg)
        if unknown:
            raise ValueError(f"unknown tune keys {sorted(unknown)}; known: {sorted(cfg)}")
        cfg.update(tune)
    if block_v is not None:
        cfg["bv2"] = block_v
    if num_warps is not None:
        cfg["w1"] = cfg["w2"] = cfg["w3"] = num_warps
    C = chunk_size
    mb = min_block(dtype)  # 32 for bf16 dot operands: a 16-wide bf16 block miscompiles (see min_block)
    BK = max(mb, triton.next_power_of_2(d))
    BS = max(mb, min(cfg["bs"], BK))
    BV2 = max(mb, min(cfg["bv2"], triton.next_power_of_2(dv)))
    BV3 = max(mb, min(cfg["bv3"], triton.next_power_of_2(dv)))
    stages = {} if num_stages is None else dict(num_stages=num_stages)
    if num_stages is None and dtype == torch.float64:
        stages = dict(num_stages=1)  # fp64 tiles overflow shared memory with deeper pipelining
    (DOT, PREC), ACC, TABLE = operand_format(dtype, d, dv), tl_dtype(sdt), sdt == torch.float64
    bdt = _buf_dtype(DOT)
    u_buf = torch.empty((B, T, H, d), dtype=bdt, device=dev)
    g_buf = torch.empty((B, T, H, d), dtype=bdt, device=dev)
    y_buf = torch.empty((B, T, H, dv), dtype=sdt, device=dev)
    y1_buf = torch.empty((B, T, H), dtype=sdt, device=dev) if normalize else y_buf
    table = decay_table(p["gam"], C) if TABLE else p["log2g"]  # the table is read only when TABLE
    varlen = p["cu"] is not None
    ns = d == 1 or dv == 1
    (_hla2_pass1_kernel_ns if ns else _hla2_pass1_kernel)[(triton.cdiv(d, BS), N * H)](
        p["q"], p["k"], u_buf, g_buf, p["log2g"], table, s0[0], stp[0], cu, T, H, d,
        BK=BK, BS=BS, C=C, HAS_INIT=has_init, STORE_FINAL=store_final, VARLEN=varlen,
        DOT=DOT, ACC=ACC, PREC=PREC, TABLE=TABLE, num_warps=cfg["w1"], **stages)
    (_hla2_pass2_kernel_ns if ns else _hla2_pass2_kernel)[(triton.cdiv(dv, BV2), N * H)](
        p["q"], p["v"], g_buf, y_buf, y1_buf, p["log2g"], table, s0[1], s0[2], stp[1], stp[2], cu,
        T, H, d, dv, BK=BK, BV=BV2, C=C, NORMALIZE=bool(normalize), HAS_INIT=has_init,
        STORE_FINAL=store_final, VARLEN=varlen, DOT=DOT, ACC=ACC, PREC=PREC, TABLE=TABLE,
        num_warps=cfg["w2"], **stages)
    if varlen:
        tab = [(n, cs) for n, ln in enumerate(p["lens"]) for cs in range(0, ln, C)]
        chunk_tab = torch.tensor(tab, dtype=torch.int32).to(dev)
        NT, ntot = 0, len(tab)
    else:
        chunk_tab = cu
        NT = triton.cdiv(T, C)
        ntot = NT * N
    (_hla2_pass3_kernel_ns if ns else _hla2_pass3_kernel)[(ntot, H, triton.cdiv(dv, BV3))](
        p["q"], p["k"], p["v"], o, u_buf, y_buf, y1_buf, chunk_tab, p["log2g"], table, cu,
        torch.full((1,), float(eps), dtype=sdt, device=dev), T, H, d, dv, NT,
        BK=BK, BV=BV3, C=C, NORMALIZE=bool(normalize), VARLEN=varlen, DOT=DOT, ACC=ACC,
        PREC=PREC, TABLE=TABLE, num_warps=cfg["w3"], **stages)


def _run(mode, q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
         cu_seqlens, check_finite, block_v, num_warps, num_stages, impl="split", tune=None):
    p = prepare(q, k, v, gamma, eps, chunk_size, cu_seqlens, check_finite)
    B, T, H, d, dv, N, sdt = p["B"], p["T"], p["H"], p["d"], p["dv"], p["N"], p["sdt"]
    dev = q.device
    BK, BV = block_sizes_for(d, dv, block_v, q.dtype)
    if initial_state is not None:
        st = check_state(initial_state, HLA2State,
                         {"KK": (N, H, d, d), "KK_QV": (N, H, d, dv), "KK_Q1": (N, H, d, 1)},
                         normalize, dev, sdt)
        s0 = (st["KK"], st["KK_QV"], st["KK_Q1"] if normalize else st["KK"])
    else:
        s0 = (p["q"], p["q"], p["q"])  # dummies, never read (HAS_INIT=False)
    o = torch.empty((B, T, H, dv), dtype=q.dtype, device=dev)
    if output_final_state:
        fin = HLA2State(torch.empty((N, H, d, d), dtype=sdt, device=dev),
                        torch.empty((N, H, d, dv), dtype=sdt, device=dev),
                        torch.empty((N, H, d, 1), dtype=sdt, device=dev) if normalize else None)
        stp = (fin.KK, fin.KK_QV, fin.KK_Q1 if normalize else fin.KK)
    else:
        fin = None
        stp = (o, o, o)
    cu = p["cu"] if p["cu"] is not None else o  # dummy pointer when not varlen
    grid = (triton.cdiv(dv, BV), N * H)
    acc = tl_dtype(sdt)
    common = dict(T=T, H=H, D=d, DV=dv, BK=BK, BV=BV, NORMALIZE=bool(normalize),
                  HAS_INIT=initial_state is not None, STORE_FINAL=bool(output_final_state),
                  VARLEN=p["cu"] is not None, ACC=acc)
    if impl not in ("split", "fused"):
        raise ValueError(f"impl must be 'split' or 'fused', got {impl!r}")
    launch = {}
    if num_warps is None and mode == "chunk" and impl == "fused" and q.dtype == torch.bfloat16:
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
    if mode == "chunk" and impl == "split":
        _run_split(p, o, s0, stp, cu, chunk_size, normalize, eps, initial_state is not None,
                   bool(output_final_state), block_v, num_warps, num_stages, tune)
    elif mode == "chunk":
        (_hla2_chunk_kernel_ns if (d == 1 or dv == 1) else _hla2_chunk_kernel)[grid](p["q"], p["k"], p["v"], o, p["log2g"], decay_table(p["gam"], chunk_size), *s0, *stp, cu, torch.full((1,), float(eps), dtype=sdt, device=dev),
                                 C=chunk_size, DOT=operand_format(q.dtype, d, dv)[0], PREC=operand_format(q.dtype, d, dv)[1], TABLE=sdt == torch.float64, **common, **launch)
    else:
        _hla2_recurrent_kernel[grid](p["q"], p["k"], p["v"], o, p["gam"], *s0, *stp, cu, torch.full((1,), float(eps), dtype=sdt, device=dev),
                                     **common, **launch)
    return o, fin


def chunk_hla2(q, k, v, *, gamma=None, normalize=False, eps=1e-6, chunk_size=64, initial_state=None,
               output_final_state=False, cu_seqlens=None, check_finite=True,
               block_v=None, num_warps=None, num_stages=None, impl="split", tune=None):
    """Chunked HLA2 forward. Returns (o [B,T,H,dv], HLA2State or None).

    gamma: None (no decay), float in (0, 1], or tensor [H]. check_finite=False skips the
    NaN/Inf scan of the inputs (one pass over q, k, v plus a host sync). block_v,
    num_warps, num_stages are launch knobs (value-column block, Triton launch options).
    impl: "split" (default: three launches, see the split-path comment above) or "fused"
    (one sequential program per (sequence, head, value block); the earlier kernel).
    tune: overrides of SPLIT_DEFAULTS (per-pass blocks and warps) for the split path.
    """
    return _run("chunk", q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
                cu_seqlens, check_finite, block_v, num_warps, num_stages, impl, tune)


def fused_recurrent_hla2(q, k, v, *, gamma=None, normalize=False, eps=1e-6, chunk_size=64,
                         initial_state=None, output_final_state=False, cu_seqlens=None,
                         check_finite=True, block_v=None, num_warps=None, num_stages=None):
    """Token-by-token HLA2 forward (same contract as chunk_hla2; chunk_size is only checked)."""
    return _run("recurrent", q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
                cu_seqlens, check_finite, block_v, num_warps, num_stages)
