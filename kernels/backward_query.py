"""One forward launch for the query rules of two stages (kernels/backward.py, VJP_RULES).

Every stage i of a chain gives dq a forward-in-time term, its query rule

    dq += LA(dN_i, b_i, a_i; g_i)      (query dN_i, key b_i, value a_i, decay g_i = gamma^power_i)

Run one launch per stage, dq's partial sums go through an fp32 buffer: the first launch
writes it, the next reads it back (4 + 4 bytes per entry, about a third of a launch's
traffic at d = 128). This kernel runs two such terms in one program per value block of
dq, keeping both carries X_i = sum g_i^(t-j) b_j a_j^T (their own widths x the value
block) and adding the two chunk outputs in registers before dq is written once:

    per chunk (rows r, j; bc = g^(r+1), Dm = g^(r-j) for j <= r), for each term:
    out += bc (dN X) + ((dN b^T) o Dm) a        X <- g^Lc X + (b o g^(Lc-1-j))^T a

the chunk kernel's form (kernels/gla.py), twice. Sequence segments reuse the LA summary
kernel once per term. Numerically the same sum as the two launches (fp32 / fp64 adds
before one rounding to dq's format).

Initial carries (the stages' initial states, transposed as the query rule's carry) and,
with context parallelism, each term's carry from the earlier ranks (kernels/cp.py; both
terms' carries in one exchange, where separate launches make one each) enter as the LA's. Scope: chunk mode, no side
channels; kernels/backward.py runs separate launches otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _decay, next_pow2
from .gla import _la_summary_kernel, _rows, _seq_bounds


@triton.jit
def _term_decays(lg_ptr, pw_ptr, h, oc, C: tl.constexpr, ACC: tl.constexpr, TABLE: tl.constexpr):
    lg = tl.load(lg_ptr + h).to(ACC)
    pw = pw_ptr + h * (C + 1)
    r2 = oc[:, None]
    c2 = oc[None, :]
    bc = _decay(lg, pw, oc + 1, TABLE)                                                   # g^(r+1)
    Dm = tl.where(c2 <= r2, _decay(lg, pw, tl.maximum(r2 - c2, 0), TABLE), 0)            # g^(r-j), j<=r
    return lg, pw, bc, Dm


@triton.jit
def _term_fold(X, dx, lg, sbase, s, SEG, NSUM, D, DV, ok, ov, x_msk):
    """The carry at segment s's start: Horner over the earlier segments' summaries."""
    gS = tl.exp2(lg * SEG)
    for sp in range(0, tl.minimum(s, NSUM)):
        X = gS * X + tl.load(dx + (sbase * NSUM + sp) * D * DV + ok[:, None] * DV + ov[None, :],
                             mask=x_msk, other=0)
    return X


@triton.jit
def _term_chunk(q, k, v, X, rows, mr, Lc, H, h, D, DV, ok, ov, mv, oc, lg, pw, bc, Dm,
                DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, TABLE: tl.constexpr):
    """(one chunk's output of LA(q, k, v), the carry after the chunk)."""
    mk = ok < D
    qk_off = (rows[:, None] * H + h) * D + ok[None, :]
    qk_msk = mr[:, None] & mk[None, :]
    qd = tl.load(q + qk_off, mask=qk_msk, other=0).to(DOT)
    kb = tl.load(k + qk_off, mask=qk_msk, other=0)
    vd = tl.load(v + (rows[:, None] * H + h) * DV + ov[None, :], mask=mr[:, None] & mv[None, :],
                 other=0).to(DOT)
    gk = tl.where(mr, _decay(lg, pw, tl.maximum(Lc - 1 - oc, 0), TABLE), 0)              # g^(Lc-1-j)
    gC = _decay(lg, pw, Lc, TABLE)                                                       # g^Lc
    A = tl.dot(qd, tl.trans(kb.to(DOT)), input_precision=PREC, out_dtype=ACC) * Dm       # [r, j]
    ob = bc[:, None] * tl.dot(qd, X.to(DOT), input_precision=PREC, out_dtype=ACC)
    ob += tl.dot(A.to(DOT), vd, input_precision=PREC, out_dtype=ACC)
    kg = (kb.to(ACC) * gk[:, None]).to(DOT)
    X = gC * X + tl.dot(tl.trans(kg), vd, input_precision=PREC, out_dtype=ACC)
    return ob, X


@triton.jit
def _la_sum2_kernel(q1, k1, v1, q2, k2, v2, o, acc, lg1, pw1, lg2, pw2, dx1, dx2, x01, x02, cu,
                    T, H, D1, D2, DV, SEG, NSUM,
                    BK1: tl.constexpr, BK2: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                    VARLEN: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                    TABLE: tl.constexpr, ACCUM: tl.constexpr, HAS_INIT: tl.constexpr):
    # program (iv, nh, s): value block iv of sequence-head nh, segment s; o = LA(q1, k1, v1; g1)
    # + LA(q2, k2, v2; g2) (+ acc): q_i, k_i [.., D_i], v_i and o [.., DV]; HAS_INIT: the
    # carries start from x0_i [N, H, D_i, DV] (an initial state, or across ranks the carry in)
    iv = tl.program_id(0)
    nh = tl.program_id(1)
    s = tl.program_id(2)
    h = nh % H
    bos, L = _seq_bounds(cu, nh // H, T, VARLEN)
    ok1 = tl.arange(0, BK1)
    ok2 = tl.arange(0, BK2)
    ov = iv * BV + tl.arange(0, BV)
    oc = tl.arange(0, C)
    mv = ov < DV
    sbase = nh.to(tl.int64)
    la1, p1, b1, Dm1 = _term_decays(lg1, pw1, h, oc, C, ACC, TABLE)
    la2, p2, b2, Dm2 = _term_decays(lg2, pw2, h, oc, C, ACC, TABLE)
    m1 = (ok1 < D1)[:, None] & mv[None, :]
    m2 = (ok2 < D2)[:, None] & mv[None, :]
    X1 = tl.zeros((BK1, BV), dtype=ACC)
    X2 = tl.zeros((BK2, BV), dtype=ACC)
    if HAS_INIT:
        X1 = tl.load(x01 + sbase * D1 * DV + ok1[:, None] * DV + ov[None, :], mask=m1, other=0).to(ACC)
        X2 = tl.load(x02 + sbase * D2 * DV + ok2[:, None] * DV + ov[None, :], mask=m2, other=0).to(ACC)
    X1 = _term_fold(X1, dx1, la1, sbase, s, SEG, NSUM, D1, DV, ok1, ov, m1)
    X2 = _term_fold(X2, dx2, la2, sbase, s, SEG, NSUM, D2, DV, ok2, ov, m2)
    start = s * SEG
    stop = tl.minimum(start + SEG, L)
    for cs in range(start, stop, C):
        Lc = tl.minimum(stop - cs, C)
        mr = oc < Lc
        rows = _rows(bos, L, cs + oc, False)
        ob, X1 = _term_chunk(q1, k1, v1, X1, rows, mr, Lc, H, h, D1, DV, ok1, ov, mv, oc, la1, p1, b1, Dm1,
                             DOT, ACC, PREC, TABLE)
        ob2, X2 = _term_chunk(q2, k2, v2, X2, rows, mr, Lc, H, h, D2, DV, ok2, ov, mv, oc, la2, p2, b2, Dm2,
                              DOT, ACC, PREC, TABLE)
        ob += ob2
        o_off = (rows[:, None] * H + h) * DV + ov[None, :]
        o_msk = mr[:, None] & mv[None, :]
        if ACCUM:
            ob += tl.load(acc + o_off, mask=o_msk, other=0).to(ACC)
        tl.store(o + o_off, ob.to(o.dtype.element_ty), mask=o_msk)


# (num_warps, num_stages) for 2-byte operand tiles (BK1, BK2, BV), from the sweep of
# `python -m kernels.bench --train --pair-sweep` on an H100 (docs/benchmarks.md: 8 warps,
# 3 stages at both head sizes, 1.394 ms against 1.745 for the two launches at (16K, 128),
# 0.529 against 0.703 at (16K, 64)); the bench overwrites an entry with its sweep's best.
LAUNCH_2BYTE = {(64, 64, 64): (8, 3), (128, 128, 64): (8, 3)}


def sum2_launch_config(dot, d1: int, d2: int, dv: int, block_v=None, num_warps=None, num_stages=None):
    """(BK1, BK2, BV, launch kwargs). Value blocks: 64 wide for 2-byte operands as the LA
    launch's (kernels/gla.py); for 4- and 8-byte ones 32 wide (16 for 8-byte at head size 128
    and above), narrower than the LA launch's fp32 64 below 128 as the program holds two
    carries; one pipeline stage there."""
    mb = 64 if dot in (tl.bfloat16, tl.float16) else 16
    BK1, BK2 = max(mb, next_pow2(d1)), max(mb, next_pow2(d2))
    if block_v is None:
        block_v = 64 if mb == 64 else (16 if dot == tl.float64 else 32) if max(BK1, BK2) >= 128 else 32
    BV = max(mb, min(block_v, next_pow2(dv)))
    big = max(BK1, BK2) * BV >= 128 * 64
    nw, ns = LAUNCH_2BYTE.get((BK1, BK2, BV), (8 if big else 4, 2)) if mb == 64 else (8 if big else 4, 1)
    return BK1, BK2, BV, dict(num_stages=num_stages or ns, num_warps=num_warps or nw)


def query_pair(la, terms, *, out=None, acc=None, out_dtype=None, num_warps=None, num_stages=None):
    """dq = LA(q1, k1, v1; g^p1) + LA(q2, k2, v2; g^p2) (+ acc) in one launch.

    la: the forward's Chain (kernels/gla.py: chunk mode, decays, segments, launch knobs,
    and with context parallelism la.cp: both terms' carries are exchanged across the
    ranks together); terms: two (query [B, T, H, d_i], key [.., d_i], value [.., dv],
    power, initial carry [N, H, d_i, dv] or None); out / acc / out_dtype as Chain's;
    num_warps / num_stages override the chain's launch knobs."""
    if la.mode != "chunk":
        raise ValueError("query_pair runs chunk mode")
    (q1, k1, v1, p1, x01), (q2, k2, v2, p2, x02) = terms
    p = la.p
    B, T, H, N, sdt = p["B"], p["T"], p["H"], p["N"], p["sdt"]
    d1, d2, dv = q1.shape[-1], q2.shape[-1], v1.shape[-1]
    if v2.shape[-1] != dv:
        raise ValueError(f"query_pair: the two terms' values differ in width ({dv}, {v2.shape[-1]})")
    dev = q1.device
    o = out if out is not None else torch.empty((B, T, H, dv), dtype=out_dtype or la.mid_dtype, device=dev)
    C = p["C"]
    DOT, PREC = la.fmt
    BK1, BK2, BV, launch = sum2_launch_config(DOT, d1, d2, dv, la.knobs["block_v"],
                                              num_warps or la.knobs["num_warps"],
                                              num_stages or la.knobs["num_stages"])
    nvb = triton.cdiv(dv, BV)
    SEG, nseg, nsum = la.segments(N * H * nvb)
    TABLE = sdt == torch.float64
    ACC = tl.float64 if sdt == torch.float64 else tl.float32
    VARLEN = p["cu"] is not None
    cu = p["cu"] if VARLEN else o
    decays, dxs = [], []
    for k, v, power, d, BK in ((k1, v1, p1, d1, BK1), (k2, v2, p2, d2, BK2)):
        log2g, table = la.decay(power)
        dx = o
        if nsum > 0:  # the term's segment carries: the LA summary kernel
            dx = torch.empty((N, H, nsum, d, dv), dtype=sdt, device=dev)
            _la_summary_kernel[(nvb, N * H, nsum)](
                k, v, o, dx, o, log2g, table, cu, o, o, T, H, d, dv, SEG, nsum, SIDE=0, VARLEN=VARLEN,
                ACC=ACC, BK=BK, BV=BV, C=C, DOT=DOT, PREC=PREC, TABLE=TABLE, **launch)
        decays += [log2g, table]
        dxs.append(dx)
    inits = [x01, x02]
    if la.cp is not None:  # each term's carry at this rank's slice start, folded over the ranks
        inits = la.cp.carry_in((p1, p2), SEG, dxs, inits, shift=False, reverse=False)  # one exchange
    has_init = any(x is not None for x in inits)
    inits = [(x.contiguous() if x is not None else torch.zeros((N, H, d, dv), dtype=sdt, device=dev))
             if has_init else o for x, d in zip(inits, (d1, d2))]
    _la_sum2_kernel[(nvb, N * H, nseg)](
        q1, k1, v1, q2, k2, v2, o, acc if acc is not None else o, *decays, *dxs, *inits, cu,
        T, H, d1, d2, dv, SEG, nsum, BK1=BK1, BK2=BK2, BV=BV, C=C, VARLEN=VARLEN, DOT=DOT, ACC=ACC,
        PREC=PREC, TABLE=TABLE, ACCUM=acc is not None, HAS_INIT=has_init, **launch)
    return o
