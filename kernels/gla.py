"""First-order linear attention with a per-head decay, chunked and token by token: the
kernels every HLA forward (kernels/hla2.py, ahla.py, hla3.py) is built from.

    LA(q, k, v; g)_t = sum_{j <= t} g^(t-j) (q_t . k_j) v_j        (inclusive, 0 < g <= 1)
    carry X_t = sum_{j <= t} g^(t-j) k_j v_j^T,   LA_t = q_t^T X_t

Why one first-order kernel suffices: the streaming states the derivation engine gives
(docs/identities/) all update as  state_t = g^p state_{t-1} + a_t b_t^T  with a_t, b_t
either a token vector or a read-out q_t^T (another state at t). Each such state is the
carry of one LA whose key / value is that read-out:

    HLA2: kt = LA(q, k, k; g)    (kt_t = KK_t q_t)       o = LA(q, kt, v; g^2)   (carry KK_QV)
    AHLA: vt = LA(q, k, v; g)    (vt_t = KV_t^T q_t)     o = LA(q, k, vt; g)     (carry KQ_KV)
    HLA3: kt, vt as above                                  o = LA(q, kt, vt; g^3)  (carry KK_QQ_KV)

so the HLA forwards are chains of two or three LA launches (class Chain): in chunk mode no
d x d x dv product and nothing d x d per chunk in HBM; in recurrent mode the same chain
token by token.
The normalized operators replace v by 1 throughout: a scalar side channel with per-token
value v1 (1 in the first stage, the previous stage's side output after it) and carry
X1_t = sum_{j <= t} g^(t-j) v1_j k_j; the last stage divides by (side output + eps).

Chunk form (chunk of Lc <= C tokens, local rows r, j = 0..Lc-1, chunk-start carry X0):
    o_r   = g^(r+1) q_r^T X0 + sum_{j <= r} g^(r-j) (q_r . k_j) v_j
    X_end = g^Lc X0 + sum_j g^(Lc-1-j) k_j v_j^T
Every decay factor is g^n with 0 <= n <= C, formed directly (exp2(n log2 g) in fp32, an
exact float64 table for float64 inputs), never as a ratio. One program owns one
(sequence, head, value block) and keeps X in registers while the chunks stream through.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from typing import NamedTuple, Optional

from ._common import _decay, _is_int, buf_dtype, carry_in_out, cdiv, next_pow2, operand_format, prepare


@triton.jit
def _seq_bounds(cu, n, T, VARLEN: tl.constexpr):
    """(first row, length) of sequence n: packed by cu_seqlens, or rows n T .. n T + T - 1."""
    if VARLEN:
        bos = tl.load(cu + n).to(tl.int64)
        L = (tl.load(cu + n + 1) - tl.load(cu + n)).to(tl.int32)
    else:
        bos = n.to(tl.int64) * T
        L = T
    return bos, L


@triton.jit
def _rows(bos, L, tok, REV: tl.constexpr):
    """Memory rows of the sequence's logical tokens `tok`: in order, or reversed (REV)."""
    if REV:
        return bos + (L - 1 - tok)
    else:
        return bos + tok


@triton.jit
def _side_vals(p, rows, H, h, mr, MODE: tl.constexpr, ACC: tl.constexpr):
    """Per-token scalars of a side channel: 1 (MODE 1) or loaded from p [.., T, H] (MODE 2)."""
    if MODE == 1:
        return mr.to(ACC)
    else:
        return tl.load(p + rows * H + h, mask=mr, other=0).to(ACC)


@triton.jit
def _la_chunk_kernel(q, k, v, o, v1, o1, log2g_ptr, pow_ptr, x0, x1_0, xf, x1f, dx, dx1, cu, eps,
                     q1, k1, xr0, dxr, oa,
                     T, H, D, DV, SEG, NSUM,
                     BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                     SIDE: tl.constexpr, DIVIDE: tl.constexpr, STORE_O1: tl.constexpr,
                     HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, VARLEN: tl.constexpr,
                     DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, TABLE: tl.constexpr,
                     REV: tl.constexpr = False, QS: tl.constexpr = 0, KS: tl.constexpr = 1,
                     SHIFT: tl.constexpr = False, ACCUM: tl.constexpr = False,
                     ACCUM1: tl.constexpr = False):
    # SIDE: 0 no side channel, 1 side value v1 = 1, 2 side value loaded from v1 [.., T, H].
    # Program (iv, nh, s) owns value block iv of sequence-head nh, tokens [s SEG, (s+1) SEG);
    # it starts from the carry folded from the earlier segments' summaries dx (_la_summary_kernel).
    # Backward options (kernels/backward.py), all off in the forward:
    # REV: the sequence is read from its last token to its first (tokens are logical indices).
    # QS > 0: a scalar query/key side channel, query q_t -> [q_t, q1_t], key k_j -> [k_j, k1_j]
    #   (QS / KS: 1 the scalar is 1, 2 loaded from q1 / k1 [.., T, H]); its carry row
    #   XR = sum g^(t-j) k1_j v_j^T starts from xr0 [N, H, DV]; segment summaries in dxr.
    # SHIFT: the initial carry is the state *after* a virtual first update: it enters token
    #   tau with g^tau, not g^(tau+1) (a final-state cotangent read backward in time).
    # ACCUM: add what oa holds (oa may be o itself); ACCUM1: add to what o1 holds.
    iv = tl.program_id(0)
    nh = tl.program_id(1)
    s = tl.program_id(2)
    h = nh % H
    bos, L = _seq_bounds(cu, nh // H, T, VARLEN)
    ok = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    oc = tl.arange(0, C)
    mk = ok < D
    mv = ov < DV
    lg = tl.load(log2g_ptr + h).to(ACC)
    pw = pow_ptr + h * (C + 1)  # g^n, n = 0..C, exact float64 table (read only when TABLE)
    sbase = nh.to(tl.int64)
    x_off = sbase * D * DV + ok[:, None] * DV + ov[None, :]
    x_msk = mk[:, None] & mv[None, :]
    X = tl.zeros((BK, BV), dtype=ACC)
    X1 = tl.zeros((BK,), dtype=ACC)
    XR = tl.zeros((BV,), dtype=ACC)
    if HAS_INIT:
        X = tl.load(x0 + x_off, mask=x_msk, other=0).to(ACC)
        if SIDE > 0:
            X1 = tl.load(x1_0 + sbase * D + ok, mask=mk, other=0).to(ACC)
        if QS > 0:
            XR = tl.load(xr0 + sbase * DV + ov, mask=mv, other=0).to(ACC)
    start = s * SEG
    stop = tl.minimum(start + SEG, L)
    gS = tl.exp2(lg * SEG)                                                               # g^SEG
    for sp in range(0, tl.minimum(s, NSUM)):  # Horner over the full earlier segments
        fS = gS
        if SHIFT:
            fS = tl.where(sp == 0, tl.exp2(lg * (SEG - 1)), gS)  # the initial carry: g^(SEG-1)
        X = fS * X + tl.load(dx + (sbase * NSUM + sp) * D * DV + ok[:, None] * DV + ov[None, :],
                             mask=x_msk, other=0)
        if SIDE > 0:
            X1 = fS * X1 + tl.load(dx1 + (sbase * NSUM + sp) * D + ok, mask=mk, other=0)
        if QS > 0:
            XR = fS * XR + tl.load(dxr + (sbase * NSUM + sp) * DV + ov, mask=mv, other=0)
    r2 = oc[:, None]
    c2 = oc[None, :]
    b = _decay(lg, pw, oc + 1, TABLE)                                                    # g^(r+1)
    Dm = tl.where(c2 <= r2, _decay(lg, pw, tl.maximum(r2 - c2, 0), TABLE), 0)            # g^(r-j), j<=r
    for cs in range(start, stop, C):
        Lc = tl.minimum(stop - cs, C)
        mr = oc < Lc
        rows = _rows(bos, L, cs + oc, REV)
        qk_off = (rows[:, None] * H + h) * D + ok[None, :]
        qk_msk = mr[:, None] & mk[None, :]
        v_off = (rows[:, None] * H + h) * DV + ov[None, :]
        v_msk = mr[:, None] & mv[None, :]
        qb = tl.load(q + qk_off, mask=qk_msk, other=0)
        kb = tl.load(k + qk_off, mask=qk_msk, other=0)
        vd = tl.load(v + v_off, mask=v_msk, other=0).to(DOT)
        qd = qb.to(DOT)
        gk = tl.where(mr, _decay(lg, pw, tl.maximum(Lc - 1 - oc, 0), TABLE), 0)          # g^(Lc-1-j)
        gC = _decay(lg, pw, Lc, TABLE)                                                   # g^Lc
        bc = b
        gX = gC  # decay of the chunk-start carry over the chunk
        if SHIFT:
            f0 = tl.where(cs == 0, 1, 0)  # the first chunk: the initial carry is one decay ahead
            bc = _decay(lg, pw, oc + 1 - f0, TABLE)
            gX = _decay(lg, pw, Lc - f0, TABLE)
        A = tl.dot(qd, tl.trans(kb.to(DOT)), input_precision=PREC, out_dtype=ACC)       # [r,j]
        ob = bc[:, None] * tl.dot(qd, X.to(DOT), input_precision=PREC, out_dtype=ACC)
        if QS > 0:
            qs = _side_vals(q1, rows, H, h, mr, QS, ACC)
            ks = _side_vals(k1, rows, H, h, mr, KS, ACC)
            A += qs[:, None] * ks[None, :]
            ob += (bc * qs)[:, None] * XR[None, :]
        A = A * Dm
        ob += tl.dot(A.to(DOT), vd, input_precision=PREC, out_dtype=ACC)
        if SIDE > 0:
            w1 = _side_vals(v1, rows, H, h, mr, SIDE, ACC)
            ob1 = bc * tl.sum(qb.to(ACC) * X1[None, :], 1) + tl.sum(A * w1[None, :], 1)
            if DIVIDE:
                ob = ob / (ob1 + tl.load(eps))[:, None]
            if STORE_O1:
                if iv == 0:
                    if ACCUM1:
                        ob1 += tl.load(o1 + rows * H + h, mask=mr, other=0).to(ACC)
                    tl.store(o1 + rows * H + h, ob1.to(o1.dtype.element_ty), mask=mr)
            X1 = gX * X1 + tl.sum(kb.to(ACC) * (gk * w1)[:, None], 0)
        if ACCUM:
            ob += tl.load(oa + v_off, mask=v_msk, other=0).to(ACC)
        tl.store(o + v_off, ob.to(o.dtype.element_ty), mask=v_msk)
        if QS > 0:
            XR = gX * XR + tl.sum((ks * gk)[:, None] * vd.to(ACC), 0)
        kg = (kb.to(ACC) * gk[:, None]).to(DOT)
        X = gX * X + tl.dot(tl.trans(kg), vd, input_precision=PREC, out_dtype=ACC)
    if STORE_FINAL:
        if (start < L) & (stop == L):  # the sequence's last segment
            tl.store(xf + x_off, X.to(xf.dtype.element_ty), mask=x_msk)
            if SIDE > 0:
                if iv == 0:
                    tl.store(x1f + sbase * D + ok, X1.to(x1f.dtype.element_ty), mask=mk)


@triton.jit
def _la_summary_kernel(k, v, v1, dx, dx1, log2g_ptr, pow_ptr, cu, k1, dxr, T, H, D, DV, SEG, NSUM,
                       BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, SIDE: tl.constexpr,
                       VARLEN: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                       TABLE: tl.constexpr, REV: tl.constexpr = False, QS: tl.constexpr = 0,
                       KS: tl.constexpr = 1):
    # dx[nh, s] = sum_{j in segment s} g^(end_s - 1 - j) k_j v_j^T: the carry a segment adds
    # (its chunk updates X <- g^Lc X + (K g^(Lc-1-j))^T V from X = 0); dx1 the same with v1,
    # dxr (QS > 0) the query/key side channel's carry row with k1; REV as the chunk kernel.
    iv = tl.program_id(0)
    nh = tl.program_id(1)
    s = tl.program_id(2)
    h = nh % H
    bos, L = _seq_bounds(cu, nh // H, T, VARLEN)
    ok = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    oc = tl.arange(0, C)
    mk = ok < D
    mv = ov < DV
    lg = tl.load(log2g_ptr + h).to(ACC)
    pw = pow_ptr + h * (C + 1)
    sbase = nh.to(tl.int64)
    X = tl.zeros((BK, BV), dtype=ACC)
    X1 = tl.zeros((BK,), dtype=ACC)
    XR = tl.zeros((BV,), dtype=ACC)
    start = s * SEG
    stop = tl.minimum(start + SEG, L)
    for cs in range(start, stop, C):
        Lc = tl.minimum(stop - cs, C)
        mr = oc < Lc
        rows = _rows(bos, L, cs + oc, REV)
        kb = tl.load(k + (rows[:, None] * H + h) * D + ok[None, :], mask=mr[:, None] & mk[None, :], other=0)
        vd = tl.load(v + (rows[:, None] * H + h) * DV + ov[None, :], mask=mr[:, None] & mv[None, :],
                     other=0).to(DOT)
        gk = tl.where(mr, _decay(lg, pw, tl.maximum(Lc - 1 - oc, 0), TABLE), 0)          # g^(Lc-1-j)
        gC = _decay(lg, pw, Lc, TABLE)                                                   # g^Lc
        kg = (kb.to(ACC) * gk[:, None]).to(DOT)
        X = gC * X + tl.dot(tl.trans(kg), vd, input_precision=PREC, out_dtype=ACC)
        if SIDE > 0:
            w1 = _side_vals(v1, rows, H, h, mr, SIDE, ACC)
            X1 = gC * X1 + tl.sum(kb.to(ACC) * (gk * w1)[:, None], 0)
        if QS > 0:
            ks = _side_vals(k1, rows, H, h, mr, KS, ACC)
            XR = gC * XR + tl.sum((ks * gk)[:, None] * vd.to(ACC), 0)
    tl.store(dx + (sbase * NSUM + s) * D * DV + ok[:, None] * DV + ov[None, :], X.to(dx.dtype.element_ty),
             mask=mk[:, None] & mv[None, :])
    if SIDE > 0:
        if iv == 0:
            tl.store(dx1 + (sbase * NSUM + s) * D + ok, X1.to(dx1.dtype.element_ty), mask=mk)
    if QS > 0:
        tl.store(dxr + (sbase * NSUM + s) * DV + ov, XR.to(dxr.dtype.element_ty), mask=mv)


@triton.jit
def _la_recurrent_kernel(q, k, v, o, v1, o1, g_ptr, x0, x1_0, xf, x1f, cu, eps, q1, k1, xr0, oa, T, H, D, DV,
                         BK: tl.constexpr, BV: tl.constexpr, SIDE: tl.constexpr, DIVIDE: tl.constexpr,
                         STORE_O1: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
                         VARLEN: tl.constexpr, ACC: tl.constexpr, REV: tl.constexpr = False,
                         QS: tl.constexpr = 0, KS: tl.constexpr = 1, SHIFT: tl.constexpr = False,
                         ACCUM: tl.constexpr = False, ACCUM1: tl.constexpr = False):
    # the online update token by token, X_t = g X_{t-1} + k_t v_t^T, o_t = q_t^T X_t, in ACC
    # element-wise arithmetic (no tl.dot); same arguments, side channels and backward
    # options (REV, QS / KS, SHIFT, ACCUM / ACCUM1) as the chunk kernel
    iv = tl.program_id(0)
    nh = tl.program_id(1)
    h = nh % H
    bos, L = _seq_bounds(cu, nh // H, T, VARLEN)
    ok = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    mk = ok < D
    mv = ov < DV
    g = tl.load(g_ptr + h).to(ACC)
    sbase = nh.to(tl.int64)
    x_off = sbase * D * DV + ok[:, None] * DV + ov[None, :]
    x_msk = mk[:, None] & mv[None, :]
    X = tl.zeros((BK, BV), dtype=ACC)
    X1 = tl.zeros((BK,), dtype=ACC)
    XR = tl.zeros((BV,), dtype=ACC)
    if HAS_INIT:
        X = tl.load(x0 + x_off, mask=x_msk, other=0).to(ACC)
        if SIDE > 0:
            X1 = tl.load(x1_0 + sbase * D + ok, mask=mk, other=0).to(ACC)
        if QS > 0:
            XR = tl.load(xr0 + sbase * DV + ov, mask=mv, other=0).to(ACC)
    for t in range(0, L):
        row = _rows(bos, L, t, REV)
        gt = g
        if SHIFT:
            gt = tl.where(t == 0, 1.0, g).to(ACC)  # the initial carry is one decay ahead
        qt = tl.load(q + (row * H + h) * D + ok, mask=mk, other=0).to(ACC)
        kt = tl.load(k + (row * H + h) * D + ok, mask=mk, other=0).to(ACC)
        vt = tl.load(v + (row * H + h) * DV + ov, mask=mv, other=0).to(ACC)
        X = gt * X + kt[:, None] * vt[None, :]
        ot = tl.sum(qt[:, None] * X, 0)
        if QS > 0:
            if QS == 1:
                qs = 1.0
            else:
                qs = tl.load(q1 + row * H + h).to(ACC)
            if KS == 1:
                ks = 1.0
            else:
                ks = tl.load(k1 + row * H + h).to(ACC)
            XR = gt * XR + ks * vt
            ot += qs * XR
        if SIDE > 0:
            if SIDE == 1:
                w1 = 1.0
            else:
                w1 = tl.load(v1 + row * H + h).to(ACC)
            X1 = gt * X1 + kt * w1
            ot1 = tl.sum(qt * X1, 0)
            if DIVIDE:
                ot = ot / (ot1 + tl.load(eps))
            if STORE_O1:
                if iv == 0:
                    if ACCUM1:
                        ot1 += tl.load(o1 + row * H + h).to(ACC)
                    tl.store(o1 + row * H + h, ot1.to(o1.dtype.element_ty))
        if ACCUM:
            ot += tl.load(oa + (row * H + h) * DV + ov, mask=mv, other=0).to(ACC)
        tl.store(o + (row * H + h) * DV + ov, ot.to(o.dtype.element_ty), mask=mv)
    if STORE_FINAL:
        tl.store(xf + x_off, X.to(xf.dtype.element_ty), mask=x_msk)
        if SIDE > 0:
            if iv == 0:
                tl.store(x1f + sbase * D + ok, X1.to(x1f.dtype.element_ty), mask=mk)


# Triton compiles an integer argument equal to 1 as a constant; with dv = 1 (or d = 1) the
# bf16 chunk kernels compiled that way read past their shared-memory dot operands on an
# H200 / triton 3.6 (docs/benchmarks.md). This variant keeps D, DV as runtime values and is
# used only when one of them is 1, so real sizes keep the usual specialization.
_la_chunk_kernel_ns = triton.jit(do_not_specialize=["D", "DV"])(_la_chunk_kernel.fn)
_la_summary_kernel_ns = triton.jit(do_not_specialize=["D", "DV"])(_la_summary_kernel.fn)


def launch_config(dot, d: int, dv: int, block_v=None, num_warps=None, num_stages=None):
    """(BK, BV, launch kwargs) for one LA launch with operand format `dot`.

    Defaults from a sweep on an H200 (docs/benchmarks.md): 64-wide value blocks, 4 warps,
    3 pipeline stages where the tiles fit (the loop waits on its loads: 0.57 ms for one
    LA at B=4, H=16, T=16K, d=dv=128 with 3 stages, 0.75 with 2, 0.80 with 1), else 1.
    2-byte operands pad blocks to 64: on an H200 / triton 3.6 narrower bf16 tiles made the
    Hopper dot read past its shared-memory operand (compute-sanitizer: "Invalid __shared__
    read"), giving wrong, run-to-run varying values (d = 46, dv = 20: 4% of |op| off) or an
    illegal memory access (d = 128 with 32-wide value blocks); docs/benchmarks.md. 4- and
    8-byte operands keep tl.dot's minimum of 16 and take narrower value blocks at head
    size 128 and above, so the tiles fit in shared memory.
    """
    mb = 64 if dot in (tl.bfloat16, tl.float16) else 16
    BK = max(mb, next_pow2(d))
    if block_v is None:
        block_v = 64
        if dot == tl.float32 and BK >= 128:
            block_v = 32
        if dot == tl.float64:
            block_v = 16 if BK >= 128 else 32
    BV = max(mb, min(block_v, next_pow2(dv)))
    if num_stages is None:
        row_bytes = BK * (2 if mb == 64 else 8 if dot == tl.float64 else 4)
        num_stages = 3 if row_bytes <= 256 else 1
    launch = dict(num_stages=num_stages)
    if num_warps is not None:
        launch["num_warps"] = num_warps
    return BK, BV, launch


def segment_chunks_auto(n_chunks: int, programs: int, device) -> int:
    """Chunks per segment when the caller does not choose. Each program is a sequential
    loop over its chunks, so with fewer programs than SMs most of the GPU idles: then the
    sequences are cut into about SMs / programs segments. With one program per SM or more
    a split only adds the summary launch (measured slower on an H200): no split. The CPU
    interpreter runs sequentially anyway: no split there."""
    if device.type != "cuda":
        return n_chunks
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    parts = max(1, min(n_chunks, sms // programs))
    return cdiv(n_chunks, parts)


def check_knob(name: str, x, pow2=False, most=None):
    """A launch knob (block_v, num_warps, num_stages, segment_chunks): None, or a positive
    integer (Python or numpy; a power of two for block_v and num_warps, at most `most`),
    returned as a Python int. Anything else raises a ValueError naming the argument (Triton
    would otherwise fail at compile time, or silently misbehave, far from the call)."""
    if x is None:
        return None
    what = "a positive power-of-two integer" if pow2 else "a positive integer"
    if most is not None:
        what += f" <= {most}"
    if not _is_int(x):
        raise ValueError(f"{name} must be None or {what} (Python or numpy), got {x!r} ({type(x).__name__})")
    n = int(x)
    if n < 1 or (pow2 and n & (n - 1)) or (most is not None and n > most):
        raise ValueError(f"{name} must be None or {what}, got {n}")
    return n


class Chain:
    """The LA launches of one operator call, in one mode with shared launch knobs.

    mode "chunk" (kernel _la_chunk_kernel) or "recurrent" (_la_recurrent_kernel). Stage
    outputs that feed a later stage are stored in the format that stage reads them in:
    the tl.dot operand format for chunk mode (no extra rounding, kernels._common.buf_dtype),
    the state format for recurrent mode (no dots). The last stage writes the input dtype.
    """

    def __init__(self, p, mode, block_v=None, num_warps=None, num_stages=None, segment_chunks=None):
        if mode not in ("chunk", "recurrent"):
            raise ValueError(f"mode must be 'chunk' or 'recurrent', got {mode!r}")
        self.p, self.mode = p, mode
        self.fmt = operand_format(p["q"].dtype, p["d"], p["dv"])
        self.mid_dtype = buf_dtype(self.fmt[0]) if mode == "chunk" else p["sdt"]
        self.knobs = dict(block_v=check_knob("block_v", block_v, pow2=True),
                          num_warps=check_knob("num_warps", num_warps, pow2=True, most=32),
                          num_stages=check_knob("num_stages", num_stages, most=8))
        self.segment_chunks = check_knob("segment_chunks", segment_chunks)
        self.cp = None  # kernels/cp.py: ContextParallel when the sequence is split across ranks
        self._decays = {}

    def segments(self, programs: int):
        """(SEG tokens per segment, nseg segments, nsum segment summaries) of a chunked
        launch with `programs` programs per segment. The summaries are of the segments
        before the last; across ranks the last one's too (the slice's summary is what the
        ranks exchange, kernels/cp.py)."""
        p = self.p
        n_chunks = cdiv(max(p["lens"]), p["C"])
        seg = self.segment_chunks
        if seg is None:
            seg = segment_chunks_auto(n_chunks, programs, p["q"].device)
        SEG = p["C"] * min(seg, n_chunks)
        nseg = cdiv(max(p["lens"]), SEG)
        return SEG, nseg, nseg if self.cp is not None else nseg - 1

    def decay(self, power: int):
        """Per-head decay arguments for g = gamma^power, formed once per power: recurrent
        mode g itself; chunk mode (log2 g, table of g^n for n = 0..C, read only by float64
        kernels). All computed in float64 from the checked gamma, then rounded."""
        if power not in self._decays:
            p, dev, sdt = self.p, self.p["q"].device, self.p["sdt"]
            g = p["g_dev"]  # device ops from here: nothing waits on the GPU
            if self.mode == "recurrent":
                self._decays[power] = (g ** power).to(sdt)
            else:
                log2g = (torch.log2(g) * power).to(sdt)
                table = log2g
                if sdt == torch.float64:
                    n = torch.arange(p["C"] + 1, dtype=torch.float64, device=dev)
                    table = (g[:, None] ** (power * n)[None, :]).contiguous()
                self._decays[power] = (log2g, table)
        return self._decays[power]

    def __call__(self, q, k, v, power: int, *, last=False, side=None, divide=False, side_out=False,
                 eps=1e-6, init=(None, None), final=(None, None), reverse=False, shift=False,
                 qside=None, xr_init=None, out=None, out1=None, out_dtype=None, acc=None):
        """LA(q, k, v; gamma^power) over the sequences of p. Returns (o [B, T, H, dv], side
        output [B, T, H] or None).

        side: None, "ones" (v1 = 1) or a tensor [B, T, H] of per-token side values.
        divide: o / (side output + eps) (the normalized operators' last stage).
        init / final: (X [N, H, d, dv], X1 [N, H, d, 1] or None) carry in / out, or Nones.
        Backward options (kernels/backward.py): reverse reads every sequence from its end;
        shift: the initial carry enters token tau with g^tau (a final-state cotangent);
        qside: (q1, k1), each "ones" or a tensor [B, T, H]: query q_t -> [q_t, q1_t] and key
        k_j -> [k_j, k1_j], with the initial carry row xr_init [N, H, dv] (or None);
        out: the tensor to write the output to (else a fresh one, of out_dtype or by default
        the input dtype for `last`, the stage-output format otherwise); acc: a tensor whose
        values are added to the output (may be `out` itself); out1: a side-output tensor to
        add the side output to.
        """
        p = self.p
        B, T, H, N, sdt = p["B"], p["T"], p["H"], p["N"], p["sdt"]
        d, dv = q.shape[-1], v.shape[-1]
        dev = q.device
        if out is None:
            dt = out_dtype or (p["q"].dtype if last else self.mid_dtype)
            o = torch.empty((B, T, H, dv), dtype=dt, device=dev)
        else:
            o = out
        o1 = (out1 if out1 is not None else torch.empty((B, T, H), dtype=sdt, device=dev)) if side_out else o
        SIDE = 0 if side is None else 1 if isinstance(side, str) and side == "ones" else 2
        QS = KS = 0
        q1 = k1 = dummy = o
        if qside is not None:
            QS, KS = (1 if isinstance(x, str) else 2 for x in qside)
            q1 = qside[0].contiguous() if QS == 2 else dummy
            k1 = qside[1].contiguous() if KS == 2 else dummy
        args = dict(v1=side.contiguous() if SIDE == 2 else dummy, o1=o1,
                    x0=init[0] if init[0] is not None else dummy, x1_0=init[1] if init[1] is not None else dummy,
                    xf=final[0] if final[0] is not None else dummy, x1f=final[1] if final[1] is not None else dummy,
                    cu=p["cu"] if p["cu"] is not None else dummy,
                    eps=torch.full((1,), float(eps), dtype=sdt, device=dev) if divide else dummy,
                    q1=q1, k1=k1, xr0=xr_init if xr_init is not None else dummy,
                    oa=acc if acc is not None else dummy)
        has_init = init[0] is not None or xr_init is not None
        if has_init and (init[0] is None or (SIDE and init[1] is None) or (QS and xr_init is None)):
            raise ValueError("an initial carry needs all of its parts (X, and X1 / the side row when used)")
        flags = dict(SIDE=SIDE, DIVIDE=bool(divide), STORE_O1=bool(side_out), HAS_INIT=has_init,
                     STORE_FINAL=final[0] is not None, VARLEN=p["cu"] is not None,
                     ACC=tl.float64 if sdt == torch.float64 else tl.float32,
                     REV=bool(reverse), QS=QS, KS=max(KS, 1), SHIFT=bool(shift) and has_init,
                     ACCUM=acc is not None, ACCUM1=side_out and out1 is not None)
        if self.mode == "recurrent":
            BK = max(16, next_pow2(d))
            BV = max(16, min(self.knobs["block_v"] or 64, next_pow2(dv)))
            launch = {key: val for key, val in (("num_warps", self.knobs["num_warps"]),
                                                ("num_stages", self.knobs["num_stages"])) if val is not None}
            _la_recurrent_kernel[(cdiv(dv, BV), N * H)](
                q, k, v, o, g_ptr=self.decay(power), T=T, H=H, D=d, DV=dv, BK=BK, BV=BV, **args, **flags, **launch)
            return o, (o1 if side_out else None)
        C = p["C"]
        DOT, PREC = self.fmt
        BK, BV, launch = launch_config(DOT, d, dv, **self.knobs)
        nvb = cdiv(dv, BV)
        SEG, nseg, nsum = self.segments(N * H * nvb)
        log2g, table = self.decay(power)
        TABLE = sdt == torch.float64
        ns = d == 1 or dv == 1
        dx = dx1 = dxr = dummy
        consts = dict(BK=BK, BV=BV, C=C, DOT=DOT, PREC=PREC, TABLE=TABLE)
        if nsum > 0:
            dx = torch.empty((N, H, nsum, d, dv), dtype=sdt, device=dev)
            dx1 = torch.empty((N, H, nsum, d), dtype=sdt, device=dev) if SIDE else dummy
            dxr = torch.empty((N, H, nsum, dv), dtype=sdt, device=dev) if QS else dummy
            (_la_summary_kernel_ns if ns else _la_summary_kernel)[(nvb, N * H, nsum)](
                k, v, args["v1"], dx, dx1, log2g, table, args["cu"], k1, dxr, T, H, d, dv, SEG, nsum,
                SIDE=SIDE, VARLEN=flags["VARLEN"], ACC=flags["ACC"], REV=flags["REV"], QS=QS, KS=flags["KS"],
                **consts, **launch)
        if self.cp is not None:
            # this rank's own carry (init: the caller's, on rank 0 / a final-state cotangent)
            # becomes the carry at its slice's start, folded over the other ranks
            parts = [("x0", dx, init[0])]
            if SIDE:
                parts.append(("x1_0", dx1, init[1]))
            if QS:
                parts.append(("xr0", dxr, xr_init))
            got = self.cp.carry_in(power, SEG, [x for _, x, _ in parts], [b for _, _, b in parts],
                                   shift=bool(shift), reverse=bool(reverse))
            args.update({name: x for (name, _, _), x in zip(parts, got)})
            flags.update(HAS_INIT=True, SHIFT=bool(shift))
        (_la_chunk_kernel_ns if ns else _la_chunk_kernel)[(nvb, N * H, nseg)](
            q, k, v, o, log2g_ptr=log2g, pow_ptr=table, dx=dx, dx1=dx1, dxr=dxr, T=T, H=H, D=d, DV=dv,
            SEG=SEG, NSUM=nsum, **args, **flags, **consts, **launch)
        return o, (o1 if side_out else None)


class Stage(NamedTuple):
    """One LA of an operator's chain: carry X_t = g^power X_{t-1} + a_t b_t^T.

    state: the carry's field in the operator's state type.
    key:   a_t = "k" (the token's key) or the name of an earlier stage S: S_t^T q_t, its
           output (S must be symmetric, i.e. key = value = "k", so this is also S_t q_t;
           an initial state's S need not be: see transposed_fields).
    value: b_t = "k", "v", or the name of an earlier stage S: S_t^T q_t.
    side:  the carry of the same stage with v -> 1 (normalize), when the value involves v.
    The operator's derived streaming update must equal this chain; property_tests/
    test_kernel_chains.py checks it symbolically against the derivation engine.
    """
    state: str
    key: str
    value: str
    power: int
    side: Optional[str] = None


def setup_chain(chain, state_cls, mode, q, k, v, gamma, normalize, eps, chunk_size, initial_state,
                output_final_state, cu_seqlens, check_finite, block_v=None, num_warps=None,
                num_stages=None, segment_chunks=None):
    """Validate the inputs of `chain` (a tuple of Stage) in `mode`. Returns (p, initial
    carries {field: tensor or None}, fresh final state_cls or None, Chain)."""
    p = prepare(q, k, v, gamma, eps, chunk_size, cu_seqlens, check_finite)
    N, H, d, dv = p["N"], p["H"], p["d"], p["dv"]
    width = {"k": d, "v": dv}
    shapes = {}
    for s in chain:
        width[s.state] = width[s.value]
        shapes[s.state] = (N, H, d, width[s.value])
        if s.side is not None:
            shapes[s.side] = (N, H, d, 1)
    st, fin = carry_in_out(state_cls, shapes, initial_state, output_final_state, normalize, q.device, p["sdt"])
    st = as_carries(chain, st)
    return p, st, fin, Chain(p, mode, block_v, num_warps, num_stages, segment_chunks)


def transposed_fields(chain) -> frozenset:
    """The state fields whose LA carry is the field transposed: those of key stages (key =
    value = "k"). A stage's carry is X = sum a b^T and its output X^T q; the reference
    (hla_core) reads a key stage's field S as S q (its update has S @ F["qv"]), the other
    fields as q^T S. The two agree on the S = sum k k^T the tokens build, which is
    symmetric, but not on a learned initial state: that enters as X0 = S^T, and the final
    carry, the initial state's gradient and a final-state cotangent are turned likewise."""
    return frozenset(s.state for s in chain if s.key == s.value)


def as_carries(chain, fields: dict) -> dict:
    """{field: tensor or None} in the state's orientation -> the LA carries' (and back:
    the map is its own inverse). Tensors [..., d, w]; other entries pass through."""
    tr = transposed_fields(chain)
    return {n: (x.transpose(-1, -2).contiguous() if n in tr and x is not None else x) for n, x in fields.items()}


def forward_chain(chain, la, p, st, fin, normalize, eps, keep_side=False):
    """Run the stages of `chain` on p's q, k, v; the last stage is the operator's output.
    Returns (o [B, T, H, dv], {stage input: (tensor, its v -> 1 side value)}); with
    keep_side the dividing last stage also stores its denominator (for the backward)."""
    f = fin._asdict() if fin is not None else {}
    out = {"k": (p["k"], None), "v": (p["v"], "ones")}  # stage input -> (tensor, its v -> 1 side value)
    for i, s in enumerate(chain):
        last = i == len(chain) - 1
        val, side = out[s.value]
        use_side = bool(normalize) and s.side is not None
        o, o1 = la(p["q"], out[s.key][0], val, s.power, last=last, side=side if use_side else None,
                   side_out=use_side and (not last or keep_side), divide=use_side and last, eps=eps,
                   init=(st[s.state], st[s.side] if use_side else None),
                   final=(f.get(s.state), f.get(s.side) if use_side else None))
        out[s.state] = (o, o1)
    for n in transposed_fields(chain):  # the final carry back in the state's orientation
        x = f.get(n)
        if x is not None:
            x.copy_(x.transpose(-1, -2).clone())
    return o, out


def run_chain(chain, state_cls, mode, q, k, v, gamma, normalize, eps, chunk_size, initial_state,
              output_final_state, cu_seqlens, check_finite, block_v=None, num_warps=None,
              num_stages=None, segment_chunks=None):
    """Validate the inputs and run `chain` (a tuple of Stage) in `mode`, forward only (the
    public functions add the backward: kernels/backward.py). Returns (o [B, T, H, dv],
    state_cls or None)."""
    p, st, fin, la = setup_chain(chain, state_cls, mode, q, k, v, gamma, normalize, eps, chunk_size,
                                 initial_state, output_final_state, cu_seqlens, check_finite, block_v,
                                 num_warps, num_stages, segment_chunks)
    return forward_chain(chain, la, p, st, fin, normalize, eps)[0], fin
