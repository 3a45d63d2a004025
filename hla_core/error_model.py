"""Forward error model for the HLA kernels (owned by the kernels work; see docs/numerics.md).

Every HLA output is a sum of products of input entries with positive decay weights:
o_t = sum over index tuples of  w * (q_t.k_i)(k_i.q_j) v_j  (and the like). The kernels
form it through intermediate quantities (running states, C x C chunk weights), each of
which is itself a positively weighted sum of partial products. So when an intermediate
is rounded (relative error <= u) or an addition is rounded, the absolute error it adds
is at most u times the same intermediate evaluated on |q|, |k|, |v| -- and that
propagates to at most u times the *operator evaluated on absolute values*:

    |op|_t = op(|q|, |k|, |v|; |initial state|)_t          (all terms >= 0).

Standard bounds (Higham, Accuracy and Stability, ch. 3) then give, element-wise,

    |o_hat - o| <= beta * |op| + u_out * |o_hat| + eta_out / 2,
    1 + beta    = (1 + gamma_m(u_op)) * (1 + gamma_n(u_acc)) * (1 + gamma_n(u_ref)),
    gamma_m(u)  = m u / (1 - m u),

with
    u_op  : unit roundoff of the tl.dot operand format (bf16 2^-8; fp16 inputs use
            TF32 operands, 2^-10 allowing truncation; fp32 2^-24 -- the kernels use
            IEEE fp32 dots, not TF32 -- fp64 2^-53);
    m     : roundings of an intermediate to the operand format along one product
            path. The chunk kernels are chains of first-order linear attentions
            (kernels/gla.py); counted there: at most 5 for HLA2 (k*g for S, S as the
            operand of Q S0, kt = S q stored in the operand format, kt*g^2 for X, X as the
            operand of Q X0) and for AHLA (k*g, P, vt, k*g, E); the model uses M_OPERAND = 6;
    u_acc : unit roundoff of the accumulator (fp32, or fp64 for fp64 inputs);
    n     : accumulation depth, the largest number of rounded additions and
            multiplications any term passes through. Recursive summation over the
            tokens (recurrent) or over the chunks and segment folds of each chained stage
            (chunked: at most 2T/C steps per stage, each a multiply, an add and an exp2)
            gives at most 3T; dot products over d and C add 3d + 4C; each of the <= 4
            per-token decay factors exp2(n log2 g^p) (two per stage, n <= C, p = 1 then
            2 for HLA2) adds 4 + np|log2 g| (rounding of log2 g magnified by the exponent,
            plus exp2 itself): 16 + 6C|log2 g|; and the carry decays g^(p Lc) per chunk and
            g^(p SEG) per segment fold add at most pT|log2 g| per stage: 3T|log2 g|:
            n = 3T + 3d + 4C + 16 + 6C|log2 g| + 3T|log2 g|;
    u_ref : 2^-53, the float64 reference's own rounding (same depth n);
    u_out : unit roundoff of the output format (the input dtype);
    eta_out: smallest subnormal spacing of the output format (gradual underflow of
            the stored output; matters only for fp16, 2^-24).

Normalized outputs o = N / (D + eps) with N, D the unnormalized sums (D with v -> 1):
|dN| <= beta |N|abs, |dD| <= beta |D|abs, so

    |o_hat - o| <= (beta |N|abs + |o| beta |D|abs) / (|D + eps| - beta |D|abs)
                   + (u_acc + u_out) (|o| + that),

and no claim (infinite bound) where |D + eps| <= beta |D|abs: there the
denominator's sign is not determined by the arithmetic.

Norm-wise bound for nonnegative inputs (normwise_coefficient, normwise_bound). The
element-wise bound is relative to |op|, not to o: with inputs of both signs the operators
cancel (|op|/|o| is in the hundreds to tens of thousands at d = 64, docs/numerics.md),
so beta |op| can exceed |o| itself and a wrong output (10% too large, or a dropped carry)
stays inside it. Where q, k, v and the initial state are all >= 0, every term of the
sums is >= 0, so |op| = o = |o| and, for the normalized form, |D|abs = D >= 0,
|N|abs = N = o (D + eps).
Then, element by element, with beta_o = beta + u_out (1 + beta):

    unnormalized:  |o_hat - o| <= beta o + u_out (o + beta o) + eta_out/2
                               =  beta_o o + eta_out/2;
    normalized:    the margin |D + eps| - beta |D|abs = (1 - beta) D + eps > 0 (beta < 1),
                   so every element is bounded (no "no claim" case), and
                   e = (beta N + o beta D) / ((1 - beta) D + eps)
                     = beta o (2D + eps) / ((1 - beta) D + eps) <= beta' o,
                   beta' = 2 beta / (1 - beta)   [(2D + eps)(1 - beta) <= 2((1 - beta) D + eps)];
                   |o_hat - o| <= e + (u_acc + u_out)(o + e) + eta_out/2
                               <= (beta' + (u_acc + u_out)(1 + beta')) o + eta_out/2.

Writing rho for the coefficient of o (beta_o, or beta' + (u_acc + u_out)(1 + beta')), the
2-norm is monotone in the absolute values of the entries, so over one head's output
(M entries)

    ||o_hat - o||_2 <= rho ||o||_2 + sqrt(M) eta_out / 2.

rho is about beta for unnormalized outputs and 2 beta for normalized ones (docs/numerics.md
lists it at the CI shapes; for bf16 at most 0.08 there), so an output 10% off in norm
exceeds it at every dtype. For general inputs the same argument gives rho times the
condition number ||op||_2 / ||o||_2 of the sum, which is why the tests hold random-sign
inputs to the element-wise bound only and draw nonnegative inputs for the norm-wise check.

Final states. The carries a kernel returns are intermediates of the same sums (each
chained stage's carry is a positively weighted sum of partial products whose product
paths are prefixes of the output's, with no division), so the same beta bounds them;
they are stored in the state format (fp32, or fp64 for fp64 inputs). For nonnegative
inputs and initial states: ||S_hat - S||_2 <= (beta + u_s (1 + beta)) ||S||_2 + sqrt(M) eta_s/2
with u_s, eta_s those of the state format (normwise_bound(..., out_dtype=state dtype)).

The model assumes no overflow or underflow in the operand and output formats (the
fp16 output range is +-65504: callers must scale inputs so that |o| stays inside it).
These constants are counted, not fitted: a test that exceeds this bound has found
an error larger than the arithmetic can explain.

Third order (op="hla3"; the default op=None keeps the second-order constants above).
The chunk kernel is the chain kt = LA(q, k, k; g), vt = LA(q, k, v; g), o = LA(q, kt, vt; g^3):
    m = 8 operand roundings on the longest product path, the carry term q^T X0 with
        X0 from (kt g^3)^T vt: X, kt*g^3, kt (stored), S, k*g (for S), vt (stored), P,
        k*g (for P). Model: M_OPERAND_HLA3 = 9 (8 counted + 1 spare, as for second order).
    n: a term passes three chained recursions (KK over u-i tokens, KV over u-j, KK_QQ_KV
        over t-u with the factor g^3); per step the representation error of g (three
        times for g^3), one multiply and one add: at most 3(u-i) + 3(u-j) + 5(t-u) <= 6T.
        Dots along one term's tree: three over d and three over C (+ C spare as for
        second order): 3d + 4C. Per-token decay factors: two per stage, exponents <= C
        of g, g and g^3: 6 * 4 + 10C|log2 g|. Carry decays per chunk / segment fold:
        (1 + 1 + 3) T|log2 g|.
        n = 6T + 3d + 4C + 24 + 10C|log2 g| + 5T|log2 g|.
"""
from __future__ import annotations

import math

import numpy as np

M_OPERAND = 6
M_OPERAND_HLA3 = 9  # third order: 8 counted roundings + 1 spare (module docstring)

UNIT_ROUNDOFF = {
    "float64": 2.0 ** -53,
    "float32": 2.0 ** -24,
    "float16": 2.0 ** -11,
    "bfloat16": 2.0 ** -8,
}

# Unit roundoff of the tl.dot operand format chosen for each input dtype
# (kernels._common.dot_dtype / dot_precision): fp16 inputs use fp32 operands rounded to
# TF32 (10 explicit mantissa bits); 2^-10 also covers a truncating conversion.
OPERAND_ROUNDOFF = {
    "float64": 2.0 ** -53,
    "float32": 2.0 ** -24,
    "float16": 2.0 ** -10,
    "bfloat16": 2.0 ** -8,
}


# Half the smallest subnormal spacing of the output format: rounding x to the output
# format errs by at most u|x| + ETA/2 (Higham, Accuracy and Stability, Thm 2.2 with
# gradual underflow). Only fp16 outputs ever come near it.
ETA = {
    "float64": 2.0 ** -1074,
    "float32": 2.0 ** -149,
    "float16": 2.0 ** -24,
    "bfloat16": 2.0 ** -133,
}


def unit_roundoff(dtype) -> float:
    name = str(dtype).replace("torch.", "")
    return UNIT_ROUNDOFF[name]


def _gam(n: float, u: float) -> float:
    nu = n * u
    if nu >= 1:
        return math.inf
    return nu / (1 - nu)


def accumulation_depth(T: int, d: int, chunk_size: int, gamma: float, op=None) -> float:
    """n of the model: 3T + 3d + 4C + 16 + 6C|log2 gamma| + 3T|log2 gamma|; for op="hla3"
    6T + 3d + 4C + 24 + 10C|log2 gamma| + 5T|log2 gamma| (see the module docstring).

    The T|log2 gamma| terms are the carry decays: each chained stage multiplies its carry
    by gamma^(p Lc) per chunk and gamma^(p SEG) per segment fold, formed as exp2 with
    relative error about (exponent)|log2 gamma| u; along one term the exponents add up to
    at most pT per stage (p = 1, 2 for HLA2; 1, 1 for AHLA; 1, 1, 3 for HLA3).
    """
    lg = abs(math.log2(gamma))
    if op == "hla3":
        return 6 * T + 3 * d + 4 * chunk_size + 24 + 10 * chunk_size * lg + 5 * T * lg
    return 3 * T + 3 * d + 4 * chunk_size + 16 + 6 * chunk_size * lg + 3 * T * lg


def operand_roundings(op=None) -> int:
    """m of the model: M_OPERAND (second order), M_OPERAND_HLA3 for op="hla3"."""
    return M_OPERAND_HLA3 if op == "hla3" else M_OPERAND


def beta(dtype, T: int, d: int, chunk_size: int, gamma: float, op=None) -> float:
    """Relative (to |op|) error coefficient of an unnormalized kernel output."""
    name = str(dtype).replace("torch.", "")
    u_op = OPERAND_ROUNDOFF[name]
    u_acc = UNIT_ROUNDOFF["float64"] if name == "float64" else UNIT_ROUNDOFF["float32"]
    n = accumulation_depth(T, d, chunk_size, gamma, op=op)
    b = (1 + _gam(operand_roundings(op), u_op)) * (1 + _gam(n, u_acc)) * (1 + _gam(n, UNIT_ROUNDOFF["float64"])) - 1
    return b


def output_bound(dtype, *, o_ref, num_abs, T, d, chunk_size, gamma,
                 normalize=False, den_ref=None, den_abs=None, eps=1e-6, op=None):
    """Element-wise bound on |o_kernel - o_ref| for one head.

    o_ref: the exact (float64 reference) output [T, dv]; num_abs: the unnormalized
    operator on absolute values [T, dv]; for normalize, den_ref [T] the exact
    denominator sum (v -> 1, before + eps) and den_abs [T] its absolute-value version.
    """
    name = str(dtype).replace("torch.", "")
    u_out = unit_roundoff(name)
    u_acc = UNIT_ROUNDOFF["float64"] if name == "float64" else UNIT_ROUNDOFF["float32"]
    b = beta(name, T, d, chunk_size, gamma, op=op)
    o_ref = np.asarray(o_ref, dtype=np.float64)
    num_abs = np.asarray(num_abs, dtype=np.float64)
    if not normalize:
        e = b * num_abs
        return e + u_out * (np.abs(o_ref) + e) + ETA[name] / 2
    den_ref = np.asarray(den_ref, dtype=np.float64)[:, None]
    den_abs = np.asarray(den_abs, dtype=np.float64)[:, None]
    margin = np.abs(den_ref + eps) - b * den_abs
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.where(margin > 0, (b * num_abs + np.abs(o_ref) * b * den_abs) / np.where(margin > 0, margin, 1),
                     np.inf)
    return e + (u_acc + u_out) * (np.abs(o_ref) + e) + ETA[name] / 2


def normwise_coefficient(dtype, *, T, d, chunk_size, gamma, normalize=False, op=None, out_dtype=None) -> float:
    """rho of the norm-wise bound ||o_hat - o||_2 <= rho ||o||_2 + sqrt(M) eta_out / 2, valid
    when q, k, v and the initial state are all >= 0 (module docstring, "Norm-wise bound").

    dtype: the input dtype (operand and accumulator formats); out_dtype: the format the
    result is stored in (default dtype: the output; a final state's is fp32 or fp64).
    normalize: the normalized output (a final state is never divided: pass False).
    """
    name = str(dtype).replace("torch.", "")
    out = name if out_dtype is None else str(out_dtype).replace("torch.", "")
    u_out = unit_roundoff(out)
    u_acc = UNIT_ROUNDOFF["float64"] if name == "float64" else UNIT_ROUNDOFF["float32"]
    b = beta(name, T, d, chunk_size, gamma, op=op)
    if not normalize:
        return b + u_out * (1 + b)
    if b >= 1:
        return math.inf
    bp = 2 * b / (1 - b)
    return bp + (u_acc + u_out) * (1 + bp)


def normwise_bound(dtype, *, o_ref, T, d, chunk_size, gamma, normalize=False, op=None, out_dtype=None) -> float:
    """Bound on ||o_kernel - o_ref||_2 over one head's result o_ref (the exact float64 output
    [T, dv], or a final state), for inputs and initial state all >= 0: rho ||o_ref||_2 +
    sqrt(M) eta_out / 2 with rho = normwise_coefficient(...)."""
    o_ref = np.asarray(o_ref, dtype=np.float64)
    out = str(dtype if out_dtype is None else out_dtype).replace("torch.", "")
    rho = normwise_coefficient(dtype, T=T, d=d, chunk_size=chunk_size, gamma=gamma, normalize=normalize,
                               op=op, out_dtype=out_dtype)
    return rho * float(np.linalg.norm(o_ref)) + math.sqrt(o_ref.size) * ETA[out] / 2


# ---------------------------------------------------------------------------
# Backward (kernels/backward.py): gradients of L = sum_t do_t . o_t
#
# A gradient entry dL/dx_(s,c) is a positively weighted sum of products of entries of q, k,
# v and do: each is a term of L (a closed chain of token factors) with one factor x_(s,c)
# cut out (README, "Gradients"). The kernels form it through the backward chain: a stage's
# VJP is three LAs (VJP_RULES: dq = LA(dN, b, a), da = LA~(b, dN, q), db = LA~(a, q, dN)),
# reading the forward's stored intermediates (kt, vt) and writing the intermediate
# cotangents (dkt, dvt) once in the operand format. So the forward argument applies
# unchanged, with |op| replaced by the gradient evaluated on absolute values,
#
#     |g|abs = VJP(|q|, |k|, |v|, |do|)      (every term >= 0),
#
#     |g_hat - g| <= beta_b |g|abs + u_out (|g| + beta_b |g|abs) + eta_out / 2,
#     1 + beta_b = (1 + gamma_m(u_op)) (1 + gamma_nb(u_acc)) (1 + gamma_nb(2^-53)).
#
# m, counted on the chain (property_tests/test_error_model.py counts it from CHAIN and
# VJP_RULES): roundings along one product path add up over the operands an LA reads, plus
# at most 2 of its own (the C x C weights, or the decayed key and the carry as the operand
# of Q X0), plus 1 where the result is stored in the operand format (kt, vt, dkt, dvt; the
# gradients are stored in the input dtype: u_out). Forward: kt 0+0+2+1 = 3, HLA2's output
# 3+2 = 5. Backward of HLA2: dq from the output stage LA(do, v, kt) 0+0+3+2 = 5, dv =
# LA~(kt, q, do) 5, dkt = LA~(v, do, q) 2+1 = 3, then the key stage's three rules 3+2 = 5;
# AHLA likewise 5; HLA3: dq = LA(do, vt, kt) 0+3+3+2 = 8, dkt, dvt 6, the first two
# stages' rules 6+2 = 8. The backward's m is the forward's (a gradient term passes every
# stage once: as the forward LA that makes the intermediate it reads, or as one of that
# stage's rules), so backward_operand_roundings = operand_roundings: 6, HLA3 9.
#
# nb: along one term the backward passes the same index differences as the forward term
# it is cut from (e.g. HLA2's dk_j via dkt_u = sum_{t >= u} ...: (t - u) + (u - j) steps),
# with the same stage powers, the same two per-token decay factors and two dots per LA
# (over d or dv, and over C): the forward's n at head size max(d, dv). A gradient written
# by several rules (dq: one per stage; dk of a key stage: both of its rules and any stage
# keyed by k) is summed in an fp32 buffer, W - 1 more additions with W <= stages writers:
#     nb = n(T, max(d, dv), C, g) + stages - 1.
#
# Scope: unnormalized operators, no initial state and no cotangent on the final state
# (those add only more nonnegative terms of the same products, through the carry path the
# model already counts, but are not tested against it). Normalized operators: the quotient
# rule dD = -(do . o) / (D + eps) has terms of both signs, no claim.
# Norm-wise, for nonnegative q, k, v, do: |g|abs = g, so ||g_hat - g|| <= (beta_b +
# u_out (1 + beta_b)) ||g|| + sqrt(M) eta_out / 2 per head.

CHAIN_STAGES = {None: 2, "hla2": 2, "ahla": 2, "hla3": 3}


def backward_operand_roundings(op=None) -> int:
    """m of the backward model: the forward's (counted on the backward chain, module notes)."""
    return operand_roundings(op)


def backward_accumulation_depth(T: int, d: int, chunk_size: int, gamma: float, op=None, dv=None) -> float:
    """nb = n(T, max(d, dv), C, gamma) + stages - 1 (the fp32 sums of a gradient's writers)."""
    w = max(d, dv or d)
    return accumulation_depth(T, w, chunk_size, gamma, op=op) + CHAIN_STAGES[op] - 1


def backward_beta(dtype, T: int, d: int, chunk_size: int, gamma: float, op=None, dv=None) -> float:
    """beta_b: relative (to |g|abs) error coefficient of a kernel gradient (unnormalized)."""
    name = str(dtype).replace("torch.", "")
    u_op = OPERAND_ROUNDOFF[name]
    u_acc = UNIT_ROUNDOFF["float64"] if name == "float64" else UNIT_ROUNDOFF["float32"]
    n = backward_accumulation_depth(T, d, chunk_size, gamma, op=op, dv=dv)
    m = backward_operand_roundings(op)
    return (1 + _gam(m, u_op)) * (1 + _gam(n, u_acc)) * (1 + _gam(n, UNIT_ROUNDOFF["float64"])) - 1


def gradient_bound(dtype, *, g_ref, g_abs, T, d, chunk_size, gamma, op=None, dv=None):
    """Element-wise bound on |g_kernel - g_ref| (one gradient, any shape): g_ref the exact
    (float64) gradient, g_abs the gradient evaluated on |q|, |k|, |v|, |do|."""
    name = str(dtype).replace("torch.", "")
    u_out = unit_roundoff(name)
    b = backward_beta(name, T, d, chunk_size, gamma, op=op, dv=dv)
    e = b * np.asarray(g_abs, dtype=np.float64)
    return e + u_out * (np.abs(np.asarray(g_ref, dtype=np.float64)) + e) + ETA[name] / 2


def backward_normwise_coefficient(dtype, *, T, d, chunk_size, gamma, op=None, dv=None) -> float:
    """rho_b: ||g_hat - g||_2 <= rho_b ||g||_2 + sqrt(M) eta_out / 2 per head, for q, k, v, do >= 0."""
    name = str(dtype).replace("torch.", "")
    b = backward_beta(name, T, d, chunk_size, gamma, op=op, dv=dv)
    return b + unit_roundoff(name) * (1 + b)
