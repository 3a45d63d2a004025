"""HLA3 (symmetric third-order, masked) forward kernels: chunked and recurrent.

    o_t = sum_{i <= u, j <= u, u <= t} g^((t-i)+(t-u)+(t-j)) (q_t.k_i)(k_i.q_u)(q_u.k_j) v_j

Carry (see HLA3State, keys of hla_core "hla3"): S = KK (d x d), P = KV (d x dv),
X = KK_QQ_KV (d x dv); with normalize also P1 = K1 (d), X1 = KK_QQ_K1 (d) (v -> 1).
Online (inclusive): S_t = g S_{t-1} + k_t k_t^T ; P_t = g P_{t-1} + k_t v_t^T ;
X_t = g^3 X_{t-1} + (S_t q_t)(q_t^T P_t) ; o_t = q_t^T X_t.

Chunked: with kt_u = S_u q_u and vt_u = P_u^T q_u the sum regroups as three first-order
linear attentions (kernels/gla.py), g^((t-i)+(t-u)+(t-j)) = g^(3(t-u)) g^(u-i) g^(u-j):

    kt = LA(q, k, k; g)         (carry S)
    vt = LA(q, k, v; g)         (carry P; normalized: side value 1, side output vt1, carry P1)
    o  = LA(q, kt, vt; g^3)     (carry X; normalized: side value vt1, carry X1, divide)

The recurrent kernel applies the online update token by token.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import HLA3State, block_sizes, buf_dtype, check_state, operand_format, prepare, tl_dtype
from .gla import la_chunk


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


def _run(mode, q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
         cu_seqlens, check_finite, block_v, num_warps, num_stages, segment_chunks=None):
    p = prepare(q, k, v, gamma, eps, chunk_size, cu_seqlens, check_finite)
    B, T, H, d, dv, N, sdt = p["B"], p["T"], p["H"], p["d"], p["dv"], p["N"], p["sdt"]
    dev = q.device
    shapes = {"KK": (N, H, d, d), "KV": (N, H, d, dv), "KK_QQ_KV": (N, H, d, dv),
              "K1": (N, H, d, 1), "KK_QQ_K1": (N, H, d, 1)}
    st = dict.fromkeys(_FIELDS)
    if initial_state is not None:
        if isinstance(initial_state, tuple) and hasattr(initial_state, "_fields"):
            for name in ("KK", "KV", "KK_QQ_KV"):  # always needed (also when dv = 1)
                if getattr(initial_state, name, None) is None:
                    raise ValueError(f"initial_state.{name} is missing")
        st = check_state(initial_state, HLA3State, shapes, normalize, dev, sdt)
    fin = None
    if output_final_state:
        mk = lambda f: torch.empty(shapes[f], dtype=sdt, device=dev)  # noqa: E731
        fin = HLA3State(mk("KK"), mk("KV"), mk("KK_QQ_KV"), mk("K1") if normalize else None,
                        mk("KK_QQ_K1") if normalize else None)
    if mode == "chunk":
        fmt = operand_format(q.dtype, d, dv)
        kw = dict(fmt=fmt, block_v=block_v, num_warps=num_warps, num_stages=num_stages,
                  segment_chunks=segment_chunks)
        bdt = buf_dtype(fmt[0])
        kt, _ = la_chunk(p, p["q"], p["k"], p["k"], 1, out_dtype=bdt,
                         init=(st["KK"], None), final=(fin.KK if fin else None, None), **kw)
        vt, vt1 = la_chunk(p, p["q"], p["k"], p["v"], 1, out_dtype=bdt,
                           side="ones" if normalize else None, side_out=normalize,
                           init=(st["KV"], st["K1"]), final=(fin.KV, fin.K1) if fin else (None, None), **kw)
        o, _ = la_chunk(p, p["q"], kt, vt, 3, out_dtype=q.dtype, side=vt1, divide=normalize, eps=eps,
                        init=(st["KK_QQ_KV"], st["KK_QQ_K1"]),
                        final=(fin.KK_QQ_KV, fin.KK_QQ_K1) if fin else (None, None), **kw)
        return o, fin
    o = torch.empty((B, T, H, dv), dtype=q.dtype, device=dev)
    dummy = o
    s0 = tuple(st[f] if st[f] is not None else dummy for f in _FIELDS)
    stp = tuple(x if x is not None else dummy for x in (fin if fin else (None,) * 5))
    BK, BV = block_sizes(d, dv, block_v)
    launch = {}
    if num_warps is not None:
        launch["num_warps"] = num_warps
    if num_stages is not None:
        launch["num_stages"] = num_stages
    _hla3_recurrent_kernel[(triton.cdiv(dv, BV), N * H)](
        p["q"], p["k"], p["v"], o, p["gam"], *s0, *stp, p["cu"] if p["cu"] is not None else dummy,
        torch.full((1,), float(eps), dtype=sdt, device=dev), T=T, H=H, D=d, DV=dv, BK=BK, BV=BV,
        NORMALIZE=bool(normalize), HAS_INIT=initial_state is not None, STORE_FINAL=bool(output_final_state),
        VARLEN=p["cu"] is not None, ACC=tl_dtype(sdt), **launch)
    return o, fin


def chunk_hla3(q, k, v, *, gamma=None, normalize=False, eps=1e-6, chunk_size=64, initial_state=None,
               output_final_state=False, cu_seqlens=None, check_finite=True,
               block_v=None, num_warps=None, num_stages=None, segment_chunks=None):
    """Chunked HLA3 forward. Returns (o [B,T,H,dv], HLA3State or None).

    Same contract as kernels.chunk_hla2: gamma None / float in (0, 1] / tensor [H];
    initial_state an HLA3State (also one from fused_recurrent_hla3 or built from
    hla_core.evaluate("hla3", ..., return_state=True)); cu_seqlens packs sequences (B = 1).
    """
    return _run("chunk", q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
                cu_seqlens, check_finite, block_v, num_warps, num_stages, segment_chunks)


def fused_recurrent_hla3(q, k, v, *, gamma=None, normalize=False, eps=1e-6, chunk_size=64,
                         initial_state=None, output_final_state=False, cu_seqlens=None,
                         check_finite=True, block_v=None, num_warps=None, num_stages=None):
    """Token-by-token HLA3 forward (same contract as chunk_hla3; chunk_size is only checked)."""
    return _run("recurrent", q, k, v, gamma, normalize, eps, chunk_size, initial_state, output_final_state,
                cu_seqlens, check_finite, block_v, num_warps, num_stages)
