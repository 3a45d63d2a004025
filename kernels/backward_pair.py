"""One reversed launch for a stage's key and value rules (kernels/backward.py, VJP_RULES).

A stage N = LA(q, a, b; g) has, for a cotangent dN, the two reversed rules

    da_j = sum_{t >= j} g^(t-j) (b_j . dN_t) q_t     = LA~(b, dN, q)_j     carry  sum dN q^T
    db_j = sum_{t >= j} g^(t-j) (a_j . q_t) dN_t     = LA~(a, q, dN)_j     carry  sum q dN^T

whose carries are transposes of each other. Two launches read q, dN, a, b twice (each
once per value block); this kernel keeps one carry Y = sum g^(t-j) q_t dN_t^T (d x w,
full width, one program per sequence and head) and writes both outputs:

    per chunk (logical reversed rows r, j; bc = g^(r+1), Dm = g^(r-j) for j <= r):
    db = bc (a Y) + ((a q^T) o Dm) dN          da = bc (b Y^T) + ((b dN^T) o Dm) q
    Y <- g^Lc Y + (q o g^(Lc-1-j))^T dN

With SAME (a and b are one tensor with one target, the key stage of HLA2 / HLA3: a = b =
k) the two are summed into one output. Sequence segments reuse the LA summary kernel
(kernels/gla.py; its carry with key q and value dN is Y's segment part).

Scope: chunk mode, no side channels (normalize), no carry out (initial-state gradient);
a carry in (final-state cotangent, and across ranks, kernels/cp.py) enters like the
chunk kernel's SHIFT. kernels/backward.py falls back to the two launches otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _decay, next_pow2
from .gla import _la_summary_kernel, _rows, _seq_bounds


@triton.jit
def _la_rev_pair_kernel(q, a, b, dn, oa, ob, acc_a, acc_b, log2g_ptr, pow_ptr, dx, cu, y0,
                        T, H, D, W, SEG, NSUM,
                        BK: tl.constexpr, BW: tl.constexpr, C: tl.constexpr, VARLEN: tl.constexpr,
                        DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, TABLE: tl.constexpr,
                        SAME: tl.constexpr, ACCUM_A: tl.constexpr, ACCUM_B: tl.constexpr,
                        HAS_INIT: tl.constexpr = False):
    # program (nh, s): sequence-head nh, segment s (tokens in logical reversed order)
    # HAS_INIT: Y starts from y0 [N, H, D, W], a final-state cotangent: shifted as the chunk
    # kernel's SHIFT (it enters token tau with g^tau)
    nh = tl.program_id(0)
    s = tl.program_id(1)
    h = nh % H
    bos, L = _seq_bounds(cu, nh // H, T, VARLEN)
    ok = tl.arange(0, BK)
    ow = tl.arange(0, BW)
    oc = tl.arange(0, C)
    mk = ok < D
    mw = ow < W
    lg = tl.load(log2g_ptr + h).to(ACC)
    pw = pow_ptr + h * (C + 1)
    sbase = nh.to(tl.int64)
    y_msk = mk[:, None] & mw[None, :]
    Y = tl.zeros((BK, BW), dtype=ACC)
    if HAS_INIT:
        Y = tl.load(y0 + sbase * D * W + ok[:, None] * W + ow[None, :], mask=y_msk, other=0).to(ACC)
    start = s * SEG
    stop = tl.minimum(start + SEG, L)
    gS = tl.exp2(lg * SEG)
    for sp in range(0, tl.minimum(s, NSUM)):  # Horner over the earlier segments' summaries
        fS = gS
        if HAS_INIT:
            fS = tl.where(sp == 0, tl.exp2(lg * (SEG - 1)), gS)  # the initial carry: g^(SEG-1)
        Y = fS * Y + tl.load(dx + (sbase * NSUM + sp) * D * W + ok[:, None] * W + ow[None, :],
                             mask=y_msk, other=0)
    r2 = oc[:, None]
    c2 = oc[None, :]
    bc = _decay(lg, pw, oc + 1, TABLE)                                                   # g^(r+1)
    Dm = tl.where(c2 <= r2, _decay(lg, pw, tl.maximum(r2 - c2, 0), TABLE), 0)            # g^(r-j), j<=r
    for cs in range(start, stop, C):
        Lc = tl.minimum(stop - cs, C)
        mr = oc < Lc
        rows = _rows(bos, L, cs + oc, True)
        k_off = (rows[:, None] * H + h) * D + ok[None, :]
        k_msk = mr[:, None] & mk[None, :]
        w_off = (rows[:, None] * H + h) * W + ow[None, :]
        w_msk = mr[:, None] & mw[None, :]
        qb = tl.load(q + k_off, mask=k_msk, other=0)
        ad = tl.load(a + k_off, mask=k_msk, other=0).to(DOT)
        bd = tl.load(b + w_off, mask=w_msk, other=0).to(DOT)
        nd = tl.load(dn + w_off, mask=w_msk, other=0).to(DOT)
        qd = qb.to(DOT)
        gk = tl.where(mr, _decay(lg, pw, tl.maximum(Lc - 1 - oc, 0), TABLE), 0)          # g^(Lc-1-j)
        gC = _decay(lg, pw, Lc, TABLE)                                                   # g^Lc
        bc_ = bc
        if HAS_INIT:
            f0 = tl.where(cs == 0, 1, 0)  # the first chunk: the initial carry is one decay ahead
            bc_ = _decay(lg, pw, oc + 1 - f0, TABLE)
            gC = _decay(lg, pw, Lc - f0, TABLE)
        Yd = Y.to(DOT)
        Ab = tl.dot(ad, tl.trans(qd), input_precision=PREC, out_dtype=ACC) * Dm         # (a_r . q_j)
        outb = bc_[:, None] * tl.dot(ad, Yd, input_precision=PREC, out_dtype=ACC)
        outb += tl.dot(Ab.to(DOT), nd, input_precision=PREC, out_dtype=ACC)             # [C, W]
        Aa = tl.dot(bd, tl.trans(nd), input_precision=PREC, out_dtype=ACC) * Dm         # (b_r . dN_j)
        outa = bc_[:, None] * tl.dot(bd, tl.trans(Yd), input_precision=PREC, out_dtype=ACC)
        outa += tl.dot(Aa.to(DOT), qd, input_precision=PREC, out_dtype=ACC)             # [C, D]
        if SAME:  # D == W: one output, da + db
            outa += outb
        if ACCUM_A:
            outa += tl.load(acc_a + k_off, mask=k_msk, other=0).to(ACC)
        tl.store(oa + k_off, outa.to(oa.dtype.element_ty), mask=k_msk)
        if not SAME:
            if ACCUM_B:
                outb += tl.load(acc_b + w_off, mask=w_msk, other=0).to(ACC)
            tl.store(ob + w_off, outb.to(ob.dtype.element_ty), mask=w_msk)
        qg = (qb.to(ACC) * gk[:, None]).to(DOT)
        Y = gC * Y + tl.dot(tl.trans(qg), nd, input_precision=PREC, out_dtype=ACC)


# (num_warps, num_stages) for 2-byte operand tiles (BK, BW), from the sweep of
# `python -m kernels.bench --train` on an H100 (docs/benchmarks.md); the bench overwrites
# an entry with its own sweep's best before it times the training rows.
LAUNCH_2BYTE = {(64, 64): (4, 3), (128, 128): (8, 2)}


def pair_launch_config(dot, d: int, w: int, num_warps=None, num_stages=None):
    """(BK, BW, launch kwargs): full-width tiles (one program holds the d x w carry)."""
    mb = 64 if dot in (tl.bfloat16, tl.float16) else 16
    BK = max(mb, next_pow2(d))
    BW = max(mb, next_pow2(w))
    nw, ns = LAUNCH_2BYTE.get((BK, BW), (8 if BK * BW >= 128 * 64 else 4, 2)) if mb == 64 else \
        (8 if BK * BW >= 128 * 64 else 4, 1)
    return BK, BW, dict(num_stages=num_stages or ns, num_warps=num_warps or nw)


def reversed_pair(la, q, a, b, dN, power, *, same=False, out_a=None, acc_a=None, dtype_a=None,
                  out_b=None, acc_b=None, dtype_b=None, num_warps=None, num_stages=None, init=None):
    """(da, db) of one stage (db None with same: da + db in one output).

    la: the forward's Chain (kernels/gla.py: chunk mode, decays, segments); q [B, T, H, d]
    the token query, a [.., d], b and dN [.., w]. out_* / acc_* / dtype_*: as Chain's out /
    acc / out_dtype for each output (acc may be out itself). init: the cotangent of the
    stage's final carry [N, H, d, w] or None; with context parallelism (la.cp) this rank's
    own, and the carry from the later ranks is folded in (kernels/cp.py)."""
    p = la.p
    B, T, H, N, sdt = p["B"], p["T"], p["H"], p["N"], p["sdt"]
    d, w = a.shape[-1], b.shape[-1]
    if same and d != w:
        raise ValueError("same=True needs a and b of one width")
    dev = q.device
    oa = out_a if out_a is not None else torch.empty((B, T, H, d), dtype=dtype_a or la.mid_dtype, device=dev)
    ob = oa
    if not same:
        ob = out_b if out_b is not None else torch.empty((B, T, H, w), dtype=dtype_b or la.mid_dtype, device=dev)
    C = p["C"]
    DOT, PREC = la.fmt
    BK, BW, launch = pair_launch_config(DOT, d, w, num_warps, num_stages)
    SEG, nseg, nsum = la.segments(N * H)  # across ranks nsum counts the slice's last segment too
    log2g, table = la.decay(power)
    TABLE = sdt == torch.float64
    ACC = tl.float64 if sdt == torch.float64 else tl.float32
    cu = p["cu"] if p["cu"] is not None else oa
    dx = oa
    if nsum > 0:  # Y's segment parts: the LA summary with key q, value dN, reversed
        dx = torch.empty((N, H, nsum, d, w), dtype=sdt, device=dev)
        _la_summary_kernel[(1, N * H, nsum)](
            q, dN, oa, dx, oa, log2g, table, cu, oa, oa, T, H, d, w, SEG, nsum,
            SIDE=0, VARLEN=p["cu"] is not None, ACC=ACC, REV=True, QS=0, KS=1,
            BK=BK, BV=BW, C=C, DOT=DOT, PREC=PREC, TABLE=TABLE, **launch)
    if la.cp is not None:
        (init,) = la.cp.carry_in(power, SEG, [dx], [init], shift=True, reverse=True)
    elif init is not None:
        init = init.contiguous()
    _la_rev_pair_kernel[(N * H, nseg)](
        q, a, b, dN, oa, ob, acc_a if acc_a is not None else oa, acc_b if acc_b is not None else oa,
        log2g, table, dx, cu, init if init is not None else oa, T, H, d, w, SEG, nsum,
        BK=BK, BW=BW, C=C, VARLEN=p["cu"] is not None, DOT=DOT, ACC=ACC, PREC=PREC, TABLE=TABLE,
        SAME=bool(same), ACCUM_A=acc_a is not None, ACCUM_B=acc_b is not None and not same,
        HAS_INIT=init is not None, **launch)
    return oa, (None if same else ob)
