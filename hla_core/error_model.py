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
            path. Counted in kernels/hla2.py and kernels/ahla.py: at most 5 (e.g. HLA2
            k*g -> S -> M -> X -> output dot); the model uses M_OPERAND = 6;
    u_acc : unit roundoff of the accumulator (fp32, or fp64 for fp64 inputs);
    n     : accumulation depth, the largest number of rounded additions and
            multiplications any term passes through. Recursive summation over the
            tokens (recurrent) or the chunks (chunked) gives at most 3T, dot products
            over d and C add 3d + 4C, and each of the <= 3 decay factors
            exp2(n log2 g) (n <= 2C) adds 4 + 2C |log2 g| (rounding of log2 g
            magnified by n, plus exp2 itself), and the chunk decay g^(2C) that
            multiplies the carry once per chunk adds 2T|log2 g| over T/C chunks:
            n = 3T + 3d + 4C + 12 + 6C|log2 g| + 2T|log2 g|;
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

The model assumes no overflow or underflow in the operand and output formats (the
fp16 output range is +-65504: callers must scale inputs so that |o| stays inside it).
These constants are counted, not fitted: a test that exceeds this bound has found
an error larger than the arithmetic can explain.

Third order (op="hla3", kernels/hla3.py; the default op=None keeps the second-order
constants above unchanged). Counted in kernels/hla3.py:
    m = 7 operand roundings on the longest product path, e.g. the output term
        M1 . QP with M1 = G Da, G = Q (S0 Q^T), S0 = (k g)^T K, QP = Q P0, P0 = (k g)^T V:
        roundings of M1, SQ, S0, kg (for S0), QP, P0, kg (for P0); or the carry path
        X -> (S0 Q^T) T1 with T1 from QP: X, SQ, S0, kg, T1, P0, kg. Model: M_OPERAND_HLA3 = 8.
    n: a term passes three chained recursions (KK over u-i tokens, KV over u-j, KK_QQ_KV
        over t-u with the factor g^3); per step the representation error of g (three
        times for g^3), one multiply and one add: at most 3(u-i) + 3(u-j) + 5(t-u) <= 6T.
        Dots along one term's tree: three over d and three over C (+ C spare as for
        second order): 3d + 4C. Decay factors exp2(n log2 g) with n <= 3C, at most five
        per term (e.g. Da, two g^(e-i) in S0 and P0, g^(2Lc+e-u), g^(3Lc)): 5 (4 + 3C|log2 g|).
        n = 6T + 3d + 4C + 20 + 15C|log2 g|.
"""
from __future__ import annotations

import math

import numpy as np

M_OPERAND = 6
M_OPERAND_HLA3 = 8  # third order: 7 counted roundings + 1 spare (module docstring)

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
    """n of the model: 3T + 3d + 4C + 12 + 6C|log2 gamma| + 2T|log2 gamma|; for op="hla3"
    6T + 3d + 4C + 20 + 15C|log2 gamma| + 3T|log2 gamma| (see the module docstring).

    The last term is the chunk-level decay: the carried state is multiplied once per chunk
    by rho^k = gamma^(kC) (k = 2 for second order, 3 for HLA3), formed as exp2(kC log2 gamma)
    with relative error about kC|log2 gamma| u; over T/C chunks that is kT|log2 gamma| u.
    """
    lg = abs(math.log2(gamma))
    if op == "hla3":
        return 6 * T + 3 * d + 4 * chunk_size + 20 + 15 * chunk_size * lg + 3 * T * lg
    return 3 * T + 3 * d + 4 * chunk_size + 12 + 6 * chunk_size * lg + 2 * T * lg


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
