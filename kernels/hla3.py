"""HLA3 (symmetric third-order, masked) forward kernels: chunked and recurrent.

    o_t = sum_{i <= u, j <= u, u <= t} g^((t-i)+(t-u)+(t-j)) (q_t.k_i)(k_i.q_u)(q_u.k_j) v_j

Carry (see HLA3State, keys of hla_core "hla3"): S = KK (d x d), P = KV (d x dv),
X = KK_QQ_KV (d x dv); with normalize also P1 = K1 (d), X1 = KK_QQ_K1 (d) (v -> 1).
Online (inclusive): S_t = g S_{t-1} + k_t k_t^T ; P_t = g P_{t-1} + k_t v_t^T ;
X_t = g^3 X_{t-1} + S_t q_t q_t^T P_t ; o_t = q_t^T X_t.

Chunked form. A chunk of length Lc <= C, local rows r, u, i, j = 0..Lc-1, chunk-start
carry S0, P0, X0, b_r = g^(r+1); W[r,i] = q_r.k_i, G[r,u] = q_r^T S0 q_u,
Wd[u,j] = [j<=u] g^(u-j) W[u,j], A2[r,u] = [u<=r] sum_{i<=u} g^((r-i)+(r-u)) W[r,i] W[u,i]
(the HLA2 intra-chunk weight), QP = Q P0, WdV = Wd V. The segment combine
X_AB = rho^3 X_A + rho^2 S_A Q_B P_A + rho S_A Y_B + rho Z_B P_A + X_B, applied to the
chunk prefix ending at r (rho = b_r), reads as C x C masked products:

    o_r = b_r^3 q_r^T X0
          + sum_u (G[r,u] g^(3r+2-u) + A2[r,u] b_r)        QP[u]      (S0 Q_B P0, Z_B P0)
          + sum_u (G[r,u] g^(3r+1-2u) + A2[r,u] g^(r-u))   WdV[u]     (S0 Y_B,    X_B)

and at the chunk end (e = Lc-1, rho = g^Lc, gk_i = g^(e-i), U[i,u] = [i<=u] gk_i gk_u k_i.q_u):

    S_end = rho S0 + sum_i gk_i k_i k_i^T ;  P_end = rho P0 + sum_j gk_j k_j v_j^T
    X_end = rho^3 X0 + (S0 Q^T) T1 + K^T (U T2),
    T1[u] = rho^2 gk_u QP[u] + rho gk_u^2 WdV[u],  T2[u] = rho QP[u] + gk_u WdV[u].

No d^3 maps. Every decay factor is g^n with n >= 0 (exp2(n log2 g) in fp32, an exact
float64 table of g^0..g^3C for float64 inputs). One program owns one (sequence, head,
dv block); the running state stays in registers while the chunks stream through it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (_decay, decay_table_n, HLA3State, block_sizes, check_state, dot_dtype, dot_precision,
                      interpreting, prepare, tl_dtype)

NUM_WARPS_BF16 = 8  # bf16 chunk-kernel default, as for HLA2 (4-warp bf16 miscompiles seen on H200)


@triton.jit
def _hla3_chunk_kernel(q, k, v, o, log2g_ptr, pow_ptr,
                       s0_kk, s0_kv, s0_x, s0_k1, s0_x1, st_kk, st_kv, st_x, st_k1, st_x1, cu, eps,
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
    pw = pow_ptr + h * (3 * C + 1)  # g^n, n = 0..3C, exact float64 table (used when TABLE)

    S = tl.zeros((BK, BK), dtype=ACC)
    P = tl.zeros((BK, BV), dtype=ACC)
    X = tl.zeros((BK, BV), dtype=ACC)
    P1 = tl.zeros((BK,), dtype=ACC)
    X1 = tl.zeros((BK,), dtype=ACC)
    sbase = nh.to(tl.int64)
    if HAS_INIT:
        S = tl.load(s0_kk + sbase * D * D + ok[:, None] * D + ok[None, :],
                    mask=mk[:, None] & mk[None, :], other=0).to(ACC)
        P = tl.load(s0_kv + sbase * D * DV + ok[:, None] * DV + ov[None, :],
                    mask=mk[:, None] & mv[None, :], other=0).to(ACC)
        X = tl.load(s0_x + sbase * D * DV + ok[:, None] * DV + ov[None, :],
                    mask=mk[:, None] & mv[None, :], other=0).to(ACC)
        if NORMALIZE:
            P1 = tl.load(s0_k1 + sbase * D + ok, mask=mk, other=0).to(ACC)
            X1 = tl.load(s0_x1 + sbase * D + ok, mask=mk, other=0).to(ACC)

    r2 = oc[:, None]
    c2 = oc[None, :]
    low = c2 <= r2
    b = _decay(lg, pw, oc + 1, TABLE)                                              # g^(r+1)
    b3 = _decay(lg, pw, 3 * (oc + 1), TABLE)                                       # g^(3(r+1))
    Da = tl.where(low, _decay(lg, pw, tl.maximum(3 * r2 - c2 + 2, 0), TABLE), 0)   # g^(3r+2-u)
    D3 = tl.where(low, _decay(lg, pw, tl.maximum(3 * r2 - 2 * c2 + 1, 0), TABLE), 0)  # g^(3r+1-2u)
    D2 = tl.where(low, _decay(lg, pw, tl.maximum(2 * (r2 - c2), 0), TABLE), 0)     # g^(2(r-u))
    Dw = tl.where(low, _decay(lg, pw, tl.maximum(r2 - c2, 0), TABLE), 0)           # g^(r-u)
    DwT = tl.where(r2 <= c2, _decay(lg, pw, tl.maximum(c2 - r2, 0), TABLE), 0)     # [i,u]: g^(u-i)
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
        ee = tl.maximum(Lc - 1 - oc, 0)
        gk = tl.where(mr, _decay(lg, pw, ee, TABLE), 0)                     # g^(e-i)
        gC = _decay(lg, pw, Lc, TABLE)                                       # rho = g^Lc
        gC3 = _decay(lg, pw, 3 * Lc, TABLE)                                  # rho^3
        t1a = tl.where(mr, _decay(lg, pw, 2 * Lc + ee, TABLE), 0)           # rho^2 gk_u
        t1b = tl.where(mr, _decay(lg, pw, Lc + 2 * ee, TABLE), 0)           # rho gk_u^2
        DU = tl.where(r2 <= c2, gk[:, None] * gk[None, :], 0)               # [i<=u] gk_i gk_u

        W = tl.dot(qd, tl.trans(kd), input_precision=PREC, out_dtype=ACC)   # W[r,i] = q_r.k_i
        KQ = tl.dot(kd, tl.trans(qd), input_precision=PREC, out_dtype=ACC)  # KQ[i,u] = k_i.q_u
        WdT = (KQ * DwT).to(DOT)
        A2 = tl.dot(W.to(DOT), WdT, input_precision=PREC, out_dtype=ACC) * D2
        Wd = W * Dw
        WdV = tl.dot(Wd.to(DOT), vd, input_precision=PREC, out_dtype=ACC)   # sum_{j<=u} g^(u-j) W[u,j] v_j
        SQ = tl.dot(S.to(DOT), tl.trans(qd), input_precision=PREC, out_dtype=ACC)  # S0 Q^T  [d, C]
        G = tl.dot(qd, SQ.to(DOT), input_precision=PREC, out_dtype=ACC)     # q_r^T S0 q_u
        QP = tl.dot(qd, P.to(DOT), input_precision=PREC, out_dtype=ACC)     # q_u^T P0
        M1 = G * Da + A2 * b[:, None]
        M2 = G * D3 + A2 * Dw
        ob = b3[:, None] * tl.dot(qd, X.to(DOT), input_precision=PREC, out_dtype=ACC)
        ob += tl.dot(M1.to(DOT), QP.to(DOT), input_precision=PREC, out_dtype=ACC)
        ob += tl.dot(M2.to(DOT), WdV.to(DOT), input_precision=PREC, out_dtype=ACC)
        if NORMALIZE:
            qa = qb.to(ACC)
            qp1 = tl.sum(qa * P1[None, :], 1)                                # q_u^T K1_0
            wd1 = tl.sum(Wd, 1)                                              # WdV with v -> 1
            den = b3 * tl.sum(qa * X1[None, :], 1) + tl.sum(M1 * qp1[None, :], 1) \
                + tl.sum(M2 * wd1[None, :], 1)
            ob = ob / (den + tl.load(eps))[:, None]
        tl.store(o + (rows[:, None] * H + h) * DV + ov[None, :], ob.to(o.dtype.element_ty),
                 mask=mr[:, None] & mv[None, :])

        # carry to the end of the chunk (X first: it needs S0 and P0)
        U = KQ * DU
        T1 = t1a[:, None] * QP + t1b[:, None] * WdV
        T2 = gC * QP + gk[:, None] * WdV
        UT = tl.dot(U.to(DOT), T2.to(DOT), input_precision=PREC, out_dtype=ACC)
        X = gC3 * X + tl.dot(SQ.to(DOT), T1.to(DOT), input_precision=PREC, out_dtype=ACC) \
            + tl.dot(tl.trans(kd), UT.to(DOT), input_precision=PREC, out_dtype=ACC)
        ka = kb.to(ACC)
        if NORMALIZE:
            t1 = t1a * qp1 + t1b * wd1
            t2 = gC * qp1 + gk * wd1
            ut1 = tl.sum(U * t2[None, :], 1)
            X1 = gC3 * X1 + tl.sum(SQ * t1[None, :], 1) + tl.sum(ka * ut1[:, None], 0)
            P1 = gC * P1 + tl.sum(ka * gk[:, None], 0)
        kg = (ka * gk[:, None]).to(DOT)
        P = gC * P + tl.dot(tl.trans(kg), vd, input_precision=PREC, out_dtype=ACC)
        S = gC * S + tl.dot(tl.trans(kg), kd, input_precision=PREC, out_dtype=ACC)

    if STORE_FINAL:
        if iv == 0:
            tl.store(st_kk + sbase * D * D + ok[:, None] * D + ok[None, :], S.to(st_kk.dtype.element_ty),
                     mask=mk[:, None] & mk[None, :])
            if NORMALIZE:
                tl.store(st_k1 + sbase * D + ok, P1.to(st_k1.dtype.element_ty), mask=mk)
                tl.store(st_x1 + sbase * D + ok, X1.to(st_x1.dtype.element_ty), mask=mk)
        tl.store(st_kv + sbase * D * DV + ok[:, None] * DV + ov[None, :], P.to(st_kv.dtype.element_ty),
                 mask=mk[:, None] & mv[None, :])
        tl.store(st_x + sbase * D * DV + ok[:, None] * DV + ov[None, :], X.to(st_x.dtype.element_ty),
                 mask=mk[:, None] & mv[None, :])


@triton.jit
def _hla3_recurrent_kernel(q, k, v, o, gam_ptr,
                           s0_kk, s0_kv, s0_x, s0_k1, s0_x1, st_kk, st_kv, st_x, st_k1, st_x1, cu, eps,
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
    g3 = g * g * g
    S = tl.zeros((BK, BK), dtype=ACC)
    P = tl.zeros((BK, BV), dtype=ACC)
    X = tl.zeros((BK, BV), dtype=ACC)
    P1 = tl.zeros((BK,), dtype=ACC)
    X1 = tl.zeros((BK,), dtype=ACC)
    sbase = nh.to(tl.int64)
    if HAS_INIT:
        S = tl.load(s0_kk + sbase * D * D + ok[:, None] * D + ok[None, :],
                    mask=mk[:, None] & mk[None, :], other=0).to(ACC)
        P = tl.load(s0_kv + sbase * D * DV + ok[:, None] * DV + ov[None, :],
                    mask=mk[:, None] & mv[None, :], other=0).to(ACC)
        X = tl.load(s0_x + sbase * D * DV + ok[:, None] * DV + ov[None, :],
                    mask=mk[:, None] & mv[None, :], other=0).to(ACC)
        if NORMALIZE:
            P1 = tl.load(s0_k1 + sbase * D + ok, mask=mk, other=0).to(ACC)
            X1 = tl.load(s0_x1 + sbase * D + ok, mask=mk, other=0).to(ACC)
    for t in range(0, L):
        row = bos + t
        qt = tl.load(q + (row * H + h) * D + ok, mask=mk, other=0).to(ACC)
        kt = tl.load(k + (row * H + h) * D + ok, mask=mk, other=0).to(ACC)
        vt = tl.load(v + (row * H + h) * DV + ov, mask=mv, other=0).to(ACC)
        S = g * S + kt[:, None] * kt[None, :]
        P = g * P + kt[:, None] * vt[None, :]
        sq = tl.sum(S * qt[None, :], 1)                     # S_t q_t
        qp = tl.sum(qt[:, None] * P, 0)                     # q_t^T P_t
        X = g3 * X + sq[:, None] * qp[None, :]
        ot = tl.sum(qt[:, None] * X, 0)
        if NORMALIZE:
            P1 = g * P1 + kt
            X1 = g3 * X1 + sq * tl.sum(qt * P1, 0)
            ot = ot / (tl.sum(qt * X1, 0) + tl.load(eps))
        tl.store(o + (row * H + h) * DV + ov, ot.to(o.dtype.element_ty), mask=mv)
    if STORE_FINAL:
        if iv == 0:
            tl.store(st_kk + sbase * D * D + ok[:, None] * D + ok[None, :], S.to(st_kk.dtype.element_ty),
                     mask=mk[:, None] & mk[None, :])
            if NORMALIZE:
                tl.store(st_k1 + sbase * D + ok, P1.to(st_k1.dtype.element_ty), mask=mk)
                tl.store(st_x1 + sbase * D + ok, X1.to(st_x1.dtype.element_ty), mask=mk)
        tl.store(st_kv + sbase * D * DV + ok[:, None] * DV + ov[None, :], P.to(st_kv.dtype.element_ty),
                 mask=mk[:, None] & mv[None, :])
        tl.store(st_x + sbase * D * DV + ok[:, None] * DV + ov[None, :], X.to(st_x.dtype.element_ty),
                 mask=mk[:, None] & mv[None, :])


_FIELDS = ("KK", "KV", "KK_QQ_KV", "K1", "KK_QQ_K1")


def dot_format(dtype: torch.dtype, bf16_dots: bool = False):
    """(operand dtype, input_precision) of the chunk kernel's tl.dot for inputs of `dtype`.

    As kernels._common.dot_dtype / dot_precision, except bf16 inputs on the GPU: by
    default they go through fp32 operands rounded to TF32 (unit roundoff 2^-11, inside the
    error model's bf16 operand roundoff 2^-8), because the bf16-operand variant hit an
    illegal memory access on an H200 / triton 3.6 (d=60, dv=25, C=64, normalize, varlen;
    docs/benchmarks.md), like the HLA2 bf16 problem. bf16_dots=True selects bf16 operands.
    """
    if dtype == torch.bfloat16 and not interpreting() and not bf16_dots:
        return tl.float32, "tf32"
    return dot_dtype(dtype), dot_precision(dtype)


def _run(mode, q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
         cu_seqlens, check_finite, block_v, num_warps, num_stages, bf16_dots=False):
    p = prepare(q, k, v, gamma, eps, chunk_size, cu_seqlens, check_finite)
    B, T, H, d, dv, N, sdt = p["B"], p["T"], p["H"], p["d"], p["dv"], p["N"], p["sdt"]
    dev = q.device
    dfmt = dot_format(q.dtype, bf16_dots)
    wide = dfmt[0] in (tl.float32, tl.float64)
    if block_v is None and wide and mode == "chunk" and d >= 128:
        block_v = 32  # fp32/fp64 operands at d = 128: a 64-wide value block overflows shared memory
    BK, BV = block_sizes(d, dv, block_v)
    shapes = {"KK": (N, H, d, d), "KV": (N, H, d, dv), "KK_QQ_KV": (N, H, d, dv),
              "K1": (N, H, d, 1), "KK_QQ_K1": (N, H, d, 1)}
    if initial_state is not None:
        if isinstance(initial_state, tuple) and hasattr(initial_state, "_fields"):
            for name in ("KK", "KV", "KK_QQ_KV"):  # always needed (also when dv = 1)
                if getattr(initial_state, name, None) is None:
                    raise ValueError(f"initial_state.{name} is missing")
        st = check_state(initial_state, HLA3State, shapes, normalize, dev, sdt)
        s0 = tuple(st[f] if st[f] is not None else st["KK"] for f in _FIELDS)
    else:
        s0 = (p["q"],) * 5  # dummies, never read (HAS_INIT=False)
    o = torch.empty((B, T, H, dv), dtype=q.dtype, device=dev)
    if output_final_state:
        mk = lambda f: torch.empty(shapes[f], dtype=sdt, device=dev)  # noqa: E731
        fin = HLA3State(mk("KK"), mk("KV"), mk("KK_QQ_KV"), mk("K1") if normalize else None,
                        mk("KK_QQ_K1") if normalize else None)
        stp = tuple(x if x is not None else fin.KK for x in fin)
    else:
        fin = None
        stp = (o,) * 5
    cu = p["cu"] if p["cu"] is not None else o  # dummy pointer when not varlen
    grid = (triton.cdiv(dv, BV), N * H)
    acc = tl_dtype(sdt)
    common = dict(T=T, H=H, D=d, DV=dv, BK=BK, BV=BV, NORMALIZE=bool(normalize),
                  HAS_INIT=initial_state is not None, STORE_FINAL=bool(output_final_state),
                  VARLEN=p["cu"] is not None, ACC=acc)
    launch = {}
    if num_warps is None and mode == "chunk" and q.dtype == torch.bfloat16:
        num_warps = NUM_WARPS_BF16
    if num_stages is None and wide:
        num_stages = 1  # fp32/fp64 tiles overflow shared memory with deeper pipelining (as for HLA2)
    if num_warps is not None:
        launch["num_warps"] = num_warps
    if num_stages is not None:
        launch["num_stages"] = num_stages
    epst = torch.full((1,), float(eps), dtype=sdt, device=dev)
    if mode == "chunk":
        _hla3_chunk_kernel[grid](p["q"], p["k"], p["v"], o, p["log2g"], decay_table_n(p["gam"], 3 * chunk_size),
                                 *s0, *stp, cu, epst, C=chunk_size, DOT=dfmt[0],
                                 PREC=dfmt[1], TABLE=sdt == torch.float64, **common, **launch)
    else:
        _hla3_recurrent_kernel[grid](p["q"], p["k"], p["v"], o, p["gam"], *s0, *stp, cu, epst,
                                     **common, **launch)
    return o, fin


def chunk_hla3(q, k, v, *, gamma=None, normalize=False, eps=1e-6, chunk_size=64, initial_state=None,
               output_final_state=False, cu_seqlens=None, check_finite=True,
               block_v=None, num_warps=None, num_stages=None, bf16_dots=False):
    """Chunked HLA3 forward. Returns (o [B,T,H,dv], HLA3State or None).

    Same contract as kernels.chunk_hla2: gamma None / float in (0, 1] / tensor [H];
    initial_state an HLA3State (also one from fused_recurrent_hla3 or built from
    hla_core.evaluate("hla3", ..., return_state=True)); cu_seqlens packs sequences (B = 1).
    bf16_dots: bf16 inputs through bf16 tl.dot operands instead of TF32 (see dot_format).
    """
    return _run("chunk", q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
                cu_seqlens, check_finite, block_v, num_warps, num_stages, bf16_dots)


def fused_recurrent_hla3(q, k, v, *, gamma=None, normalize=False, eps=1e-6, chunk_size=64,
                         initial_state=None, output_final_state=False, cu_seqlens=None,
                         check_finite=True, block_v=None, num_warps=None, num_stages=None):
    """Token-by-token HLA3 forward (same contract as chunk_hla3; chunk_size is only checked)."""
    return _run("recurrent", q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
                cu_seqlens, check_finite, block_v, num_warps, num_stages)
