"""Shared plumbing for the HLA Triton kernels: input checks, state types, launch choices.

Everything here runs on the host, except the decay helper `_decay`. The kernels
(first-order linear attention, chunked and recurrent) and the chain runner live in
`gla.py`; each operator's chain in `hla2.py`, `ahla.py`, `hla3.py`. The conventions follow
flash-linear-attention: q, k [B, T, H, d], v [B, T, H, dv], o [B, T, H, dv]; with `cu_seqlens`
(varlen) B must be 1 and the packed sequences are cu_seqlens[n]:cu_seqlens[n+1].
"""
from __future__ import annotations

import math
import numbers
import os
from typing import NamedTuple, Optional

import numpy as np
import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256  # the d x d (or d x dv) running state lives in registers


class HLA2State(NamedTuple):
    """Carry of HLA2 after a prefix 1..t (per sequence n and head h), gamma = decay.

    KK    [N, H, d, d]  = sum_{i<=t} g^(t-i) k_i k_i^T
    KK_QV [N, H, d, dv] = sum_{i<=j<=t} g^((t-i)+(t-j)) k_i k_i^T q_j v_j^T
    KK_Q1 [N, H, d, 1]  = KK_QV with v_j replaced by 1 (only with normalize, else None)
    Output o_t = q_t^T KK_QV_t (normalized: / (q_t^T KK_Q1_t + eps)).
    float32, or float64 for float64 inputs.
    """
    KK: torch.Tensor
    KK_QV: torch.Tensor
    KK_Q1: Optional[torch.Tensor] = None


class AHLAState(NamedTuple):
    """Carry of AHLA after a prefix 1..t (per sequence n and head h).

    KV    [N, H, d, dv] = sum_{j<=t} g^(t-j) k_j v_j^T
    KQ_KV [N, H, d, dv] = sum_{j<=i<=t} g^(t-j) k_i q_i^T k_j v_j^T
    K1    [N, H, d, 1], KQ_K1 [N, H, d, 1]: the same with v_j replaced by 1
    (only with normalize, else None). Output o_t = q_t^T KQ_KV_t.
    """
    KV: torch.Tensor
    KQ_KV: torch.Tensor
    K1: Optional[torch.Tensor] = None
    KQ_K1: Optional[torch.Tensor] = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_dtype(dtype: torch.dtype):
    """Operand format of every tl.dot for inputs of `dtype`.

    bf16 inputs: operands in bf16 (tensor cores), fp32 accumulate;
    intermediates (states, C x C weights) are rounded to that format before a dot,
    which the error model counts. Under TRITON_INTERPRET the interpreter's bf16 dot
    is wrong (it multiplies raw bit patterns), so there bf16 is upcast to fp32 and
    the CPU run never relies on a bf16 dot. fp32 inputs: fp32 operands with IEEE
    precision (not TF32), fp16 inputs: fp32 operands as TF32 (see dot_precision;
    fp16 operands would overflow for long sequences), fp64 inputs: fp64 throughout.
    """
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return {torch.float16: tl.float32, torch.bfloat16: tl.bfloat16,
            torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


def operand_format(dtype: torch.dtype, d: int, dv: int):
    """(tl.dot operand dtype, input_precision) for inputs of `dtype` and head sizes d, dv.

    As dot_dtype / dot_precision, except bf16 inputs on the GPU with a head size below
    16 (the smallest tl.dot tile): there the bf16-operand dots of the HLA2/AHLA chunk
    kernels read past their shared-memory tile on an H200 / triton 3.6 (compute-sanitizer,
    d=33, dv=1; docs/benchmarks.md), so they take the fp16 inputs' path instead: fp32
    operands rounded to TF32 (unit roundoff 2^-11, inside the model's bf16 2^-8).
    """
    if dtype == torch.bfloat16 and min(d, dv) < 16 and not interpreting():
        return tl.float32, "tf32"
    return dot_dtype(dtype), dot_precision(dtype)


def _finite(name: str, x: torch.Tensor):
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or Inf)")


def _check_bool(name: str, x):
    """Flags must be bool: a truthy string such as normalize="no" would silently mean True."""
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {x!r} ({type(x).__name__})")


def _is_int(x) -> bool:
    """Python or numpy integer scalar (np.int64(64) is what indexing a numpy array gives), not bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    """Python or numpy real scalar (int, float, np.float32, ...), not bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _no_grad_needed(name: str, x: torch.Tensor):
    """The forward-only runner (kernels.gla.run_chain, used directly by bench / numerics)
    builds no graph: an input that requires grad would get an output with no gradient,
    silently. Refuse it there. The public functions are autograd ops (kernels/backward.py):
    their forward runs with grad mode off, so this never fires through them."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise NotImplementedError(
            f"{name} requires grad, but kernels.gla.run_chain is forward only: the output would carry "
            f"no gradient. Use the public functions (kernels.chunk_hla2, ...), which are differentiable, "
            f"call it under torch.no_grad() or pass {name}.detach()")


def check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        _no_grad_needed(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must have rank 4 [B, T, H, dim], got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if interpreting():
        if q.device.type != "cpu":
            raise ValueError(f"q is on {q.device}; under TRITON_INTERPRET=1 inputs must be on the CPU")
    elif q.device.type != "cuda":
        raise ValueError(f"q is on {q.device}; the Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 with CPU tensors)")
    if k.shape != q.shape:
        raise ValueError(f"k shape {tuple(k.shape)} must equal q shape {tuple(q.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v shape {tuple(v.shape)} must match q shape {tuple(q.shape)} in [B, T, H]")
    B, T, H, d = q.shape
    dv = v.shape[3]
    if T == 0:
        raise ValueError("q has T = 0 tokens; at least one token is required")
    if B == 0 or H == 0 or d == 0 or dv == 0:
        raise ValueError(f"empty dimension in q {tuple(q.shape)} / v {tuple(v.shape)}")
    if d > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        raise ValueError(f"head dims d={d}, dv={dv} exceed the supported maximum {MAX_HEAD_DIM}")
    return B, T, H, d, dv


def check_gamma(gamma, H: int) -> torch.Tensor:
    """Return gamma as a float64 tensor [H] after checking 0 < gamma <= 1."""
    if gamma is None:
        g = torch.ones(H, dtype=torch.float64)
    elif isinstance(gamma, torch.Tensor):
        _no_grad_needed("gamma", gamma)
        if gamma.dim() == 0:
            g = gamma.detach().to("cpu", torch.float64).reshape(1).expand(H).clone()
        elif gamma.dim() == 1 and gamma.shape[0] == H:
            g = gamma.detach().to("cpu", torch.float64)
        else:
            raise ValueError(f"gamma tensor must have shape [H] = [{H}], got {tuple(gamma.shape)}")
    elif _is_real(gamma):
        g = torch.full((H,), float(gamma), dtype=torch.float64)
    else:
        raise TypeError(f"gamma must be None, a real number in (0, 1] (Python or numpy scalar) or a "
                        f"tensor [H], got {type(gamma).__name__}")
    if not bool(torch.isfinite(g).all()) or bool((g <= 0).any()) or bool((g > 1).any()):
        raise ValueError(f"gamma must lie in (0, 1], got {g.tolist()}")
    return g


def check_cu_seqlens(cu_seqlens, B: int, T: int, device):
    """Return (N, cu int32 tensor on device or None, host list of lengths)."""
    if cu_seqlens is None:
        return B, None, [T] * B
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [N + 1]")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1, got B = {B}")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if cu.numel() < 2:
        raise ValueError("cu_seqlens must hold at least two offsets [0, ..., T]")
    if int(cu[0]) != 0 or int(cu[-1]) != T:
        raise ValueError(f"cu_seqlens must start at 0 and end at T = {T}, got {cu.tolist()}")
    lens = (cu[1:] - cu[:-1]).tolist()
    if min(lens) < 1:
        raise ValueError(f"cu_seqlens must be strictly increasing (every sequence needs >= 1 token), got {cu.tolist()}")
    return len(lens), cu.to(device=device, dtype=torch.int32), lens


def check_chunk_size(chunk_size) -> int:
    """Return chunk_size as a Python int (it becomes a compile-time constant of the kernels)."""
    if not _is_int(chunk_size):
        raise TypeError(f"chunk_size must be an integer (Python or numpy), a power of two in [16, 128], "
                        f"got {chunk_size!r} ({type(chunk_size).__name__})")
    c = int(chunk_size)
    if c < 16 or c > 128 or c & (c - 1):
        raise ValueError(f"chunk_size must be a power of two in [16, 128], got {c}")
    return c


def check_eps(eps) -> float:
    """Return eps as a Python float after checking it is a finite real number > 0."""
    if not _is_real(eps):
        raise TypeError(f"eps must be a real number (Python or numpy scalar) > 0, got {eps!r} "
                        f"({type(eps).__name__})")
    e = float(eps)
    if not math.isfinite(e) or e <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {e!r}")
    return e


def check_state(state, cls, fields_shapes: dict, normalize: bool, device, sdtype):
    """Validate an initial state and return {field: tensor contiguous in the state dtype}.

    fields_shapes maps field name -> expected shape. The fields that `cls` defaults to None
    (the v -> 1 carries) are needed only with normalize; without it they come back None.
    """
    if not isinstance(state, tuple) or not hasattr(state, "_fields"):
        raise TypeError(f"initial_state must be a {cls.__name__} named tuple, got {type(state).__name__}")
    optional = set(cls._field_defaults)
    out = {}
    for name, shape in fields_shapes.items():
        x = getattr(state, name, None)
        if name in optional and not normalize:
            out[name] = None
            continue
        if x is None:
            raise ValueError(f"initial_state.{name} is missing" + (" (needed with normalize)" if name in optional else ""))
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"initial_state.{name} must be a torch.Tensor, got {type(x).__name__}")
        _no_grad_needed(f"initial_state.{name}", x)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"initial_state.{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
        if x.device != device:
            raise ValueError(f"initial_state.{name} is on {x.device}, inputs on {device}")
        if not x.is_floating_point():
            raise TypeError(f"initial_state.{name} must be floating point, got {x.dtype}")
        _finite(f"initial_state.{name}", x)
        out[name] = x.to(sdtype).contiguous()
    return out


def carry_in_out(cls, shapes: dict, initial_state, output_final_state, normalize, device, sdtype):
    """(validated initial carry {field: tensor or None}, fresh final state of `cls` or None);
    also checks the flags normalize and output_final_state are bool."""
    _check_bool("normalize", normalize)
    _check_bool("output_final_state", output_final_state)
    st = dict.fromkeys(cls._fields)
    if initial_state is not None:
        st = check_state(initial_state, cls, shapes, normalize, device, sdtype)
    fin = None
    if output_final_state:
        optional = set(cls._field_defaults)
        fin = cls(**{f: torch.empty(shapes[f], dtype=sdtype, device=device)
                     if normalize or f not in optional else None for f in cls._fields})
    return st, fin


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host. triton.cdiv and triton.next_power_of_2 are constexpr
    functions in recent Triton, about 10 us a call outside a kernel: a training step made
    ~30 such calls, a quarter of its host time (measured with the launches stubbed)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1), on the host (see cdiv)."""
    return 1 << max(0, n - 1).bit_length()


def host_to(x: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor on `device` without waiting: a plain host-to-device copy
    synchronizes the stream, and the host would stop running ahead of the GPU mid-call."""
    if torch.device(device).type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def prepare(q, k, v, gamma, eps, chunk_size, cu_seqlens, check_finite):
    B, T, H, d, dv = check_qkv(q, k, v)
    g = check_gamma(gamma, H)
    check_eps(eps)
    chunk_size = check_chunk_size(chunk_size)
    N, cu, lens = check_cu_seqlens(cu_seqlens, B, T, q.device)
    _check_bool("check_finite", check_finite)
    if check_finite:
        for name, x in (("q", q), ("k", k), ("v", v)):
            _finite(name, x)
    g_dev = host_to(g, q.device)
    return dict(B=B, T=T, H=H, d=d, dv=dv, N=N, cu=cu, lens=lens, sdt=state_dtype(q.dtype),
                g64=g, g_dev=g_dev, C=chunk_size, q=q.contiguous(), k=k.contiguous(), v=v.contiguous())


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision of every tl.dot: fp32 inputs use IEEE fp32 products; fp16 inputs
    use fp32 operands rounded to TF32 (unit roundoff 2^-11 like fp16, but fp32's range,
    so large states cannot overflow the operand format); others ignore it."""
    return "tf32" if dtype == torch.float16 else "ieee"


@triton.jit
def _decay(lg, pw, n, TABLE: tl.constexpr):
    """g^n for integer n >= 0: a float64 table lookup (TABLE) or exp2(n log2 g)."""
    if TABLE:
        return tl.load(pw + n)
    else:
        return tl.exp2(lg * n.to(lg.dtype))


class HLA3State(NamedTuple):
    """Carry of HLA3 after a prefix 1..t (per sequence n and head h), gamma = decay.

    KK       [N, H, d, d]  = sum_{i<=t} g^(t-i) k_i k_i^T
    KV       [N, H, d, dv] = sum_{j<=t} g^(t-j) k_j v_j^T
    KK_QQ_KV [N, H, d, dv] = sum_{i<=u, j<=u, u<=t} g^((t-i)+(t-u)+(t-j)) k_i k_i^T q_u q_u^T k_j v_j^T
    K1       [N, H, d, 1], KK_QQ_K1 [N, H, d, 1]: KV and KK_QQ_KV with v_j replaced by 1
    (only with normalize, else None). Output o_t = q_t^T KK_QQ_KV_t
    (normalized: / (q_t^T KK_QQ_K1_t + eps)). float32, or float64 for float64 inputs.
    Keys and meaning are those of hla_core.state_shapes("hla3", d, dv, normalize).
    """
    KK: torch.Tensor
    KV: torch.Tensor
    KK_QQ_KV: torch.Tensor
    K1: Optional[torch.Tensor] = None
    KK_QQ_K1: Optional[torch.Tensor] = None


def buf_dtype(dot) -> torch.dtype:
    """Storage format of an intermediate that only ever feeds tl.dot (the kt, vt of the HLA
    chains): the operand format it is rounded to anyway, so storing it costs no extra
    rounding (bf16 for bf16 operands, fp32 for fp32 / TF32 operands, fp64)."""
    return {tl.bfloat16: torch.bfloat16, tl.float32: torch.float32, tl.float64: torch.float64}[dot]
