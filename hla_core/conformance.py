"""Conformance harness: does someone's HLA implementation compute the operator?

    python -m hla_core.conformance TARGET --op OP [options]
    python -m hla_core.conformance kernels:chunk_hla2 --op hla2
    python -m hla_core.conformance path/to/my_hla.py:hla2_forward --op hla2 --gamma 1

TARGET is `package.module:function` or `path/to/file.py:function`. The function takes
q, k [B, T, H, d] and v [B, T, H, dv] torch tensors (`--layout bhtd`: [B, H, T, d]) and
any of the keyword arguments gamma, normalize, eps, initial_state, output_final_state,
cu_seqlens, chunk_size (and scale, which is then passed as 1.0: the operator as defined
has no scale) that it declares; it returns o or (o, state). The harness reads the
signature and tests each property the function can express; the others are reported
"n/a" with the reason, never as passed.

Properties (docs/conformance.md), each a Hypothesis property with shrinking:
  output      gamma = 1, unnormalized, random shapes (T = 1, odd T, d, dv among them)
  decay       gamma < 1 (the requested values), unnormalized
  normalize   normalize=True (every requested gamma)
  handoff     split the sequence at any token, feed the function's own returned state
              back in (initial_state), compare with the whole sequence (and, in float64,
              the final states of both runs)
  varlen      packed sequences with cu_seqlens, each against its own reference
  gradients   dq, dk, dv of sum(do * o) against the engine's VJP (hla_core.vjp)
  determinism two calls on the same inputs give bitwise equal outputs (and states)

Reference: hla_core.evaluate(op, ..., form="recurrent", backend="numpy") per (batch,
head), in float64 on the inputs as the target sees them. Judgement, per (batch, head):
float64: ||o - ref||_2 <= 1e-10 ||ref||_2 (Frobenius norm over the head's [T, dv]
output, the same for each gradient); other dtypes: nonnegative inputs and the norm-wise
bound of hla_core/error_model.py (normwise_bound; the gradients: the backward model of
property_tests/test_kernels_backward.py). Reported: the worst error / bound ratio.

Exit status: 0 every applicable property holds, 1 one fails, 2 usage error (bad target,
unknown operator, a function that cannot be called as described), with one line on
stderr. For pytest: `check(fn, op, ...)` returns a Report; `assert_conforms(fn, op, ...)`
raises AssertionError with the report; `make_test(fn, op, ...)` returns a test function
parametrized over the properties.

torch and hypothesis are imported here only (hla_core itself needs neither).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np

from . import error_model
from .registry import OPERATORS

PROPERTIES = ("output", "decay", "normalize", "handoff", "varlen", "gradients", "determinism")
KWARGS = ("gamma", "normalize", "eps", "initial_state", "output_final_state", "cu_seqlens", "chunk_size", "scale")
FLOAT64_TOL = 1e-10
M_BWD = 12  # operand roundings along one backward product path (test_kernels_backward.py)
PASSED, FAILED, NA = "passed", "FAILED", "n/a"


class UsageError(Exception):
    """A problem with the target or the options (exit status 2)."""


class _Fail(Exception):
    """A property does not hold on one example (raised inside the Hypothesis test)."""

    def __init__(self, message, case, ratio=math.inf):
        super().__init__(message)
        self.message, self.case, self.ratio = message, case, ratio


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a project dependency
        raise UsageError("hla_core.conformance needs torch (pip install torch)") from None
    return torch


# ----------------------------------------------------------------------------- target

def load_target(spec: str):
    """`package.module:function` or `path/to/file.py:function` -> the function."""
    if not isinstance(spec, str) or ":" not in spec:
        raise UsageError(f"target {spec!r}: expected package.module:function or path/to/file.py:function")
    mod_name, _, fn_name = spec.rpartition(":")
    if not mod_name or not fn_name:
        raise UsageError(f"target {spec!r}: expected package.module:function or path/to/file.py:function")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name or "/" in mod_name:
            path = os.path.abspath(mod_name)
            if not os.path.isfile(path):
                raise UsageError(f"target {spec!r}: no such file {mod_name}")
            name = "_conformance_target_" + os.path.splitext(os.path.basename(path))[0]
            sys.path.insert(0, os.path.dirname(path))
            mspec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[name] = module
            mspec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure is the target's problem
        raise UsageError(f"target {spec!r}: cannot import {mod_name}: {type(e).__name__}: {e}") from None
    fn = module
    for part in fn_name.split("."):
        if not hasattr(fn, part):
            raise UsageError(f"target {spec!r}: module {mod_name} has no function {fn_name!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise UsageError(f"target {spec!r}: {fn_name} is not callable ({type(fn).__name__})")
    return fn


def declared(fn) -> frozenset:
    """The keyword arguments of KWARGS that `fn` declares by name (**kwargs declares none)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return frozenset()
    positional = [p for p in params.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    if len(positional) < 3 and not any(p.kind == p.VAR_POSITIONAL for p in positional):
        raise UsageError(f"{_name(fn)} cannot be called as f(q, k, v, ...): its signature is "
                         f"{inspect.signature(fn)}")
    return frozenset(n for n, p in params.items() if n in KWARGS and p.kind != p.POSITIONAL_ONLY)


def _name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


# ----------------------------------------------------------------------------- reference

def _heads(x, layout):
    """[B, T, H, *] view of a tensor in `layout`."""
    return x.transpose(1, 2) if layout == "bhtd" else x


def reference(op, q, k, v, *, gamma=1.0, normalize=False, eps=1e-6, layout="bthd", cu_seqlens=None):
    """The operator's float64 output for torch inputs in `layout` (same layout, on the CPU):
    hla_core.evaluate(op, form="recurrent", backend="numpy") per (batch, head) and, with
    cu_seqlens, per packed sequence."""
    torch = _torch()
    Q, K, Vv = (_heads(x, layout).detach().to("cpu", torch.float64).numpy() for x in (q, k, v))
    B, T, H, _ = Q.shape
    out = np.zeros((B, T, H, Vv.shape[3]))
    bounds = _segments(cu_seqlens, T)
    for b in range(B):
        for h in range(H):
            for lo, hi in bounds:
                out[b, lo:hi, h] = _evaluate(op, Q[b, lo:hi, h], K[b, lo:hi, h], Vv[b, lo:hi, h],
                                             gamma, normalize, eps)
    o = torch.from_numpy(out)
    return o.transpose(1, 2) if layout == "bhtd" else o


def reference_vjp(op, q, k, v, do, *, gamma=1.0, normalize=False, eps=1e-6, layout="bthd"):
    """(dq, dk, dv) of sum(do * o) in float64 (hla_core.vjp per (batch, head)), same layout."""
    torch = _torch()
    Q, K, Vv, DO = (_heads(x, layout).detach().to("cpu", torch.float64).numpy() for x in (q, k, v, do))
    B, T, H, _ = Q.shape
    grads = [np.zeros_like(Q), np.zeros_like(K), np.zeros_like(Vv)]
    from . import vjp
    for b in range(B):
        for h in range(H):
            gs = vjp(op, Q[b, :, h], K[b, :, h], Vv[b, :, h], DO[b, :, h], form="recurrent",
                     gamma=float(gamma), normalize=normalize, eps=eps)
            for g, x in zip(grads, gs):
                g[b, :, h] = x
    out = [torch.from_numpy(g) for g in grads]
    return tuple(g.transpose(1, 2) if layout == "bhtd" else g for g in out)


def _quotient_terms(op, q, k, v, do, gamma, eps):
    """Norms of the two quotient-rule terms of a normalized gradient, per (b, h, input):
    dx = vjp_N(do / (D + eps)) - vjp_D((do . o) / (D + eps)). Their sum can cancel far below
    either term (float64 keeps only ~1e-16 of the terms), so a normalized gradient is judged
    relative to ||first|| + ||second||. Arrays [B, T, H, *] float64 (layout bthd)."""
    from . import vjp
    B, T, H, _ = q.shape
    scale = np.zeros((B, H, 3))
    for b in range(B):
        for h in range(H):
            Q, K, Vv, DO = q[b, :, h], k[b, :, h], v[b, :, h], do[b, :, h]
            ones = np.ones((T, 1))
            den = _evaluate(op, Q, K, ones, gamma, False, eps)[:, 0] + eps
            o = _evaluate(op, Q, K, Vv, gamma, False, eps) / den[:, None]
            t1 = vjp(op, Q, K, Vv, DO / den[:, None], form="recurrent", gamma=float(gamma))
            c = ((DO * o).sum(1) / den)[:, None]
            t2 = vjp(op, Q, K, ones, c, form="recurrent", gamma=float(gamma))
            for i in range(3):
                scale[b, h, i] = np.linalg.norm(t1[i]) + (np.linalg.norm(t2[i]) if i < 2 else 0.0)
    return scale


def _evaluate(op, q, k, v, gamma, normalize, eps):
    from . import evaluate
    return evaluate(op, q, k, v, form="recurrent", gamma=float(gamma), normalize=normalize, eps=eps)


def _segments(cu_seqlens, T):
    if cu_seqlens is None:
        return [(0, T)]
    cu = [int(c) for c in cu_seqlens.tolist()]
    return list(zip(cu[:-1], cu[1:]))


def max_relative_error(o, ref, layout="bthd") -> float:
    """max over (batch, head) of ||o - ref||_2 / ||ref||_2 (Frobenius over [T, dv])."""
    torch = _torch()
    o = _heads(o.detach().to("cpu", torch.float64), layout)
    ref = _heads(ref.detach().to("cpu", torch.float64), layout)
    worst = 0.0
    for b in range(o.shape[0]):
        for h in range(o.shape[2]):
            e = float(torch.linalg.vector_norm(o[b, :, h] - ref[b, :, h]))
            r = float(torch.linalg.vector_norm(ref[b, :, h]))
            worst = max(worst, e / r if r > 0 else (0.0 if e == 0 else math.inf))
    return worst


# ----------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    """One example: shapes, options and the seed of the input values (see _inputs)."""
    B: int
    T: int
    H: int
    d: int
    dv: int
    gamma: float = 1.0
    normalize: bool = False
    seed: int = 0
    chunk_size: int | None = None
    split: int | None = None
    lens: tuple | None = None


@dataclass
class Config:
    op: str
    gammas: tuple = (1.0, 0.95, 0.5)
    normalize: str = "both"
    device: str = "cpu"
    dtype: str = "float64"
    layout: str = "bthd"
    max_examples: int = 20
    seed: int = 0
    eps: float = 1e-6
    max_T: int | None = None
    max_dim: int | None = None
    max_batch: int = 2
    max_heads: int = 2
    chunk_sizes: tuple = (16, 32, 64)

    def __post_init__(self):
        gpu = str(self.device).startswith("cuda")
        if self.max_T is None:
            self.max_T = 160 if gpu else 24
        if self.max_dim is None:
            self.max_dim = 64 if gpu else 8


_Q = 16.0  # inputs are multiples of 1/16 in [-2, 2]: exact in every dtype (bf16 included)


def _values(rng, shape, scale, positive):
    x = np.clip(np.round(rng.standard_normal(shape) * scale * _Q) / _Q, -2, 2)
    return np.abs(x) if positive else x


def _inputs(case: Case, cfg: Config, positive_qk: bool, positive_v: bool, with_do=False):
    """q, k, v (and do) in [B, T, H, *] float64, deterministic in case.seed."""
    rng = np.random.default_rng(case.seed)
    s = 1 / math.sqrt(case.d)
    q = _values(rng, (case.B, case.T, case.H, case.d), s, positive_qk)
    k = _values(rng, (case.B, case.T, case.H, case.d), s, positive_qk)
    v = _values(rng, (case.B, case.T, case.H, case.dv), 1.0, positive_v)
    if cfg.dtype == "float16":  # keep o inside fp16's range (+-65504): v / 2^ceil(log2 T), still exact
        v = v * 2.0 ** -math.ceil(math.log2(case.T)) if case.T > 1 else v
    out = [q, k, v]
    if with_do:
        out.append(_values(rng, (case.B, case.T, case.H, case.dv), 1.0, positive_v))
    return out


# ----------------------------------------------------------------------------- the checker

@dataclass
class Row:
    name: str
    status: str
    reason: str = ""
    examples: int = 0
    worst: float = 0.0          # worst error / bound ratio seen
    bound: str = ""
    failure: str = ""           # message of the minimal failing example
    case: Case | None = None    # the minimal failing example
    snippet: str = ""           # paste-able reproduction
    seconds: float = 0.0


@dataclass
class Report:
    target: str
    cfg: Config
    rows: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.status != FAILED for r in self.rows)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def row(self, name) -> Row:
        return next(r for r in self.rows if r.name == name)

    def format(self) -> str:
        c = self.cfg
        g = ", ".join(f"{x:g}" for x in c.gammas)
        lines = [f"conformance of {self.target} to {c.op} ({c.dtype}, {c.device}, layout {c.layout}; "
                 f"gamma in {{{g}}}; normalize {c.normalize}; up to {c.max_examples} examples per property, "
                 f"seed {c.seed}; T <= {c.max_T}, d, dv <= {c.max_dim})", ""]
        head = f"{'property':<12} {'result':<7} {'examples':>8}  {'worst err/bound':>15}  bound or reason"
        lines += [head, "-" * len(head)]
        for r in self.rows:
            worst = "" if r.status == NA else (f"{r.worst:.2e}" if math.isfinite(r.worst) else "inf")
            lines.append(f"{r.name:<12} {r.status:<7} {r.examples if r.status != NA else '':>8}  {worst:>15}  "
                         f"{r.reason if r.status == NA else r.bound}")
        failed = [r for r in self.rows if r.status == FAILED]
        lines.append("")
        lines.append(f"{sum(r.status == PASSED for r in self.rows)} passed, {len(failed)} failed, "
                     f"{sum(r.status == NA for r in self.rows)} not applicable")
        for r in failed:
            c = r.case
            size = (f"B={c.B}, T={c.T}, H={c.H}, d={c.d}, dv={c.dv}, gamma={c.gamma:g}, normalize={c.normalize}"
                    + (f", split at {c.split}" if c.split is not None else "")
                    + (f", lens={list(c.lens)}" if c.lens else "")
                    + (f", chunk_size={c.chunk_size}" if c.chunk_size else "")) if c else "?"
            lines += ["", f"FAILED {r.name}: {r.failure}", f"  smallest failing input: {size}",
                      "  reproduce (paste into a test):", ""]
            lines += ["    " + x if x else "" for x in r.snippet.splitlines()]
        return "\n".join(lines)


class Checker:
    def __init__(self, fn, cfg: Config, target: str | None = None):
        torch = _torch()
        self.torch, self.fn, self.cfg = torch, fn, cfg
        self.target = target or _name(fn)
        if cfg.op not in OPERATORS:
            raise UsageError(f"unknown operator {cfg.op!r}; registered: {', '.join(sorted(OPERATORS))}")
        if cfg.layout not in ("bthd", "bhtd"):
            raise UsageError(f"layout {cfg.layout!r}: expected bthd or bhtd")
        if cfg.normalize not in ("off", "on", "both"):
            raise UsageError(f"normalize {cfg.normalize!r}: expected off, on or both")
        if cfg.dtype not in error_model.UNIT_ROUNDOFF:
            raise UsageError(f"dtype {cfg.dtype!r}: expected one of {', '.join(error_model.UNIT_ROUNDOFF)}")
        if not cfg.gammas or any(not (0 < g <= 1) for g in cfg.gammas):
            raise UsageError(f"gamma {list(cfg.gammas)}: every value must lie in (0, 1]")
        if cfg.max_examples < 1 or cfg.max_T < 2 or cfg.max_dim < 1 or cfg.max_batch < 1 or cfg.max_heads < 1:
            raise UsageError("max-examples, max-dim, max-batch, max-heads must be >= 1 and max-T >= 2")
        try:
            self.device = torch.device(cfg.device)
            torch.zeros(1, device=self.device)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"device {cfg.device!r}: {type(e).__name__}: {e}") from None
        self.tdtype = getattr(torch, cfg.dtype)
        self.low = cfg.dtype != "float64"
        self.kw = declared(fn)
        self._smoke()

    # -- calling the target
    def _tensor(self, x, requires_grad=False):
        t = self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device, self.tdtype)
        if self.cfg.layout == "bhtd":
            t = t.transpose(1, 2).contiguous()
        return t.requires_grad_(requires_grad)

    def _case_kwargs(self, case: Case) -> dict:
        """The keyword arguments of `case` that the target declares (scale: 1.0, the
        operator as defined)."""
        kw = {}
        if "gamma" in self.kw:
            kw["gamma"] = float(case.gamma)
        if "normalize" in self.kw:
            kw["normalize"] = bool(case.normalize)
        if "eps" in self.kw:
            kw["eps"] = self.cfg.eps
        if "chunk_size" in self.kw and case.chunk_size is not None:
            kw["chunk_size"] = case.chunk_size
        if "scale" in self.kw:
            kw["scale"] = 1.0
        return kw

    def call(self, q, k, v, *, case: Case, **extra):
        kw = self._case_kwargs(case)
        kw.update({n: x for n, x in extra.items() if n in self.kw})
        out = self.fn(q, k, v, **kw)
        if isinstance(out, (tuple, list)):
            if not out:
                raise _Fail("returned an empty tuple", case)
            o, state = out[0], (out[1] if len(out) > 1 else None)
        else:
            o, state = out, None
        if not isinstance(o, self.torch.Tensor):
            raise _Fail(f"returned {type(o).__name__}, expected a tensor o or (o, state)", case)
        want = tuple(v.shape[:3]) + (v.shape[3],)
        if tuple(o.shape) != want:
            raise _Fail(f"returned o of shape {tuple(o.shape)}, expected {want} (v's shape)", case)
        return o, state, kw

    def _smoke(self):
        """One call on a small input; a failure here is a usage error (exit 2)."""
        case = Case(B=1, T=3, H=1, d=2, dv=2, gamma=1.0, chunk_size=self.cfg.chunk_sizes[0])
        q, k, v = (self._tensor(x) for x in _inputs(case, self.cfg, True, True))
        try:
            self.call(q, k, v, case=case)
        except _Fail as e:
            raise UsageError(f"{self.target} {e.message} on q, k, v of shape {tuple(q.shape)}") from None
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"{self.target} cannot be called as f(q, k, v) on {self.cfg.dtype} tensors of shape "
                             f"{tuple(q.shape)} on {self.cfg.device}: {type(e).__name__}: {e}") from None

    # -- judgement
    def _model_args(self, case):
        C = case.chunk_size or 64
        return dict(T=case.T, d=case.d, chunk_size=C, gamma=float(case.gamma),
                    op="hla3" if self.cfg.op.startswith("hla3") else None)

    def bound_text(self, prop):
        if prop == "determinism":
            return "bitwise equal outputs (and states) across two calls"
        if not self.low:
            return f"||err||_2 <= {FLOAT64_TOL:g} ||ref||_2 per (b, h)" + (
                " (normalized: relative to the quotient rule's two terms)" if prop == "gradients" else "")
        if prop == "gradients":
            return "||err||_2 <= rho_bwd ||ref||_2 per (b, h), inputs >= 0 (backward error model)"
        return "||err||_2 <= rho ||ref||_2 + sqrt(M) eta/2 per (b, h), inputs >= 0 (hla_core.error_model)"

    def judge(self, got, ref, case, what, normalize=None, grad=False, scale=None):
        """Worst ratio error / bound over (batch, head); raise _Fail above 1. scale [B, H]:
        the norm the float64 bound is relative to, where not ||ref|| (normalized gradients)."""
        torch = self.torch
        got = _heads(got.detach().to("cpu", torch.float64), self.cfg.layout)
        ref = _heads(ref.detach().to("cpu", torch.float64), self.cfg.layout)
        if not bool(torch.isfinite(got).all()):
            raise _Fail(f"{what}: non-finite values", case)
        worst, where = 0.0, None
        for b in range(got.shape[0]):
            for h in range(got.shape[2]):
                r, g = ref[b, :, h].numpy(), got[b, :, h].numpy()
                err = float(np.linalg.norm(g - r))
                if not self.low:
                    bound = FLOAT64_TOL * (float(np.linalg.norm(r)) if scale is None else scale[b, h])
                elif grad:
                    bound = _backward_coefficient(self.cfg.dtype, **self._model_args(case)) * float(np.linalg.norm(r))
                else:
                    bound = error_model.normwise_bound(self.cfg.dtype, o_ref=r, normalize=bool(
                        case.normalize if normalize is None else normalize), **self._model_args(case))
                ratio = err / bound if bound > 0 else (0.0 if err == 0 else math.inf)
                if ratio > worst:
                    worst, where = ratio, (b, h, err, float(np.linalg.norm(r)))
        if worst > 1:
            b, h, err, rn = where
            raise _Fail(f"{what}: batch {b} head {h}: ||err||_2 = {err:.3e}, ||ref||_2 = {rn:.3e} "
                        f"(error / bound = {worst:.3g})", case, worst)
        return worst

    def inputs(self, case, with_do=False):
        pos_qk = self.low or case.normalize
        arrs = _inputs(case, self.cfg, pos_qk, self.low, with_do)
        return [self._tensor(a) for a in arrs]

    def ref(self, q, k, v, case, cu=None):
        return reference(self.cfg.op, q, k, v, gamma=case.gamma, normalize=case.normalize, eps=self.cfg.eps,
                         layout=self.cfg.layout, cu_seqlens=cu)

    # -- properties: each returns the worst ratio or raises _Fail
    def check_output(self, case):
        q, k, v = self.inputs(case)
        o, _, _ = self.call(q, k, v, case=case)
        return self.judge(o, self.ref(q, k, v, case), case, "output")

    check_decay = check_normalize = check_output

    def _split(self, x, lo, hi):
        return (x[:, :, lo:hi] if self.cfg.layout == "bhtd" else x[:, lo:hi]).contiguous()

    def check_handoff(self, case):
        q, k, v = self.inputs(case)
        s, T = case.split, case.T
        o1, st1, _ = self.call(*(self._split(x, 0, s) for x in (q, k, v)), case=case, output_final_state=True)
        if st1 is None:
            raise _Fail("returned no state after the first segment (output_final_state=True)", case)
        o2, st2, _ = self.call(*(self._split(x, s, T) for x in (q, k, v)), case=case, initial_state=st1,
                               output_final_state=True)
        o = self.torch.cat([o1, o2], dim=2 if self.cfg.layout == "bhtd" else 1)
        worst = self.judge(o, self.ref(q, k, v, case), case, f"output of the hand-off at token {s}")
        if not self.low and st2 is not None:
            _, whole, _ = self.call(q, k, v, case=case, output_final_state=True)
            a, b = flat_tensors(st2), flat_tensors(whole)
            if len(a) != len(b):
                raise _Fail(f"final state after the hand-off has {len(a)} tensors, the whole run's {len(b)}", case)
            for i, (x, y) in enumerate(zip(a, b)):
                if tuple(x.shape) != tuple(y.shape):
                    raise _Fail(f"final state tensor {i}: shape {tuple(x.shape)} after the hand-off, "
                                f"{tuple(y.shape)} for the whole sequence", case)
                x, y = x.detach().to("cpu", self.torch.float64), y.detach().to("cpu", self.torch.float64)
                e, r = float(self.torch.linalg.vector_norm(x - y)), float(self.torch.linalg.vector_norm(y))
                ratio = e / (FLOAT64_TOL * r) if r > 0 else (0.0 if e == 0 else math.inf)
                if ratio > 1:
                    raise _Fail(f"final state tensor {i} after the hand-off at token {s} differs from the whole "
                                f"sequence's: ||diff||_2 = {e:.3e}, ||whole||_2 = {r:.3e}", case, ratio)
                worst = max(worst, ratio)
        return worst

    def check_varlen(self, case):
        q, k, v = self.inputs(case)
        cu = self.torch.tensor([0] + list(np.cumsum(case.lens)), dtype=self.torch.int64, device=self.device)
        o, _, _ = self.call(q, k, v, case=case, cu_seqlens=cu)
        return self.judge(o, self.ref(q, k, v, case, cu=cu.cpu()), case, f"varlen output (lens {list(case.lens)})")

    def check_gradients(self, case):
        q, k, v, do = self.inputs(case, with_do=True)
        q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
        o, _, _ = self.call(q, k, v, case=case)
        if not o.requires_grad:
            raise _Fail("the output does not require grad although q, k, v do", case)
        grads = self.torch.autograd.grad(o, (q, k, v), do.to(o.dtype), allow_unused=True)
        refs = reference_vjp(self.cfg.op, q, k, v, do, gamma=case.gamma, normalize=case.normalize,
                             eps=self.cfg.eps, layout=self.cfg.layout)
        scale = None
        if case.normalize and not self.low:
            scale = _quotient_terms(self.cfg.op, *(_heads(x, self.cfg.layout).detach().to("cpu", self.torch.float64)
                                                   .numpy() for x in (q, k, v, do)), case.gamma, self.cfg.eps)
        worst = 0.0
        for i, (name, g, r) in enumerate(zip(("dq", "dk", "dv"), grads, refs)):
            if g is None:
                raise _Fail(f"{name} is None: the output does not depend on {name[1]} in the autograd graph", case)
            worst = max(worst, self.judge(g, r, case, name, grad=True,
                                          scale=None if scale is None else scale[:, :, i]))
        return worst

    def check_determinism(self, case):
        q, k, v = self.inputs(case)
        first = self.call(q, k, v, case=case, output_final_state=True)
        second = self.call(q, k, v, case=case, output_final_state=True)
        if not self.torch.equal(first[0], second[0]):
            diff = float((first[0].double() - second[0].double()).abs().max())
            raise _Fail(f"two calls on the same inputs gave different outputs (max |diff| = {diff:.3e})", case)
        a, b = flat_tensors(first[1]), flat_tensors(second[1])
        if len(a) != len(b) or not all(x.shape == y.shape and self.torch.equal(x, y) for x, y in zip(a, b)):
            raise _Fail("two calls on the same inputs gave different final states", case)
        return 0.0

    # -- applicability and strategies
    def plan(self, prop):
        """(gammas, normalize values) to draw for `prop`, or a string: why it is not applicable."""
        cfg, kw = self.cfg, self.kw
        gammas = [g for g in cfg.gammas if g == 1 or "gamma" in kw]
        norms = [n for n in {"off": [False], "on": [True], "both": [False, True]}[cfg.normalize]
                 if not n or "normalize" in kw]
        if not gammas:
            return "the function has no gamma argument and gamma = 1 was not requested"
        if not norms:
            return "the function has no normalize argument and --normalize on was requested"
        if prop == "output":
            if 1.0 not in gammas:
                return "gamma = 1 was not requested"
            return ([1.0], [False]) if False in norms else "--normalize on: unnormalized output not requested"
        if prop == "decay":
            if "gamma" not in kw:
                return "the function has no gamma argument"
            dec = [g for g in cfg.gammas if g < 1]
            if not dec:
                return "no gamma < 1 requested (--gamma 1)"
            return (dec, [False]) if False in norms else "--normalize on: unnormalized output not requested"
        if prop == "normalize":
            if "normalize" not in kw:
                return "the function has no normalize argument"
            if True not in norms:
                return "--normalize off"
            return gammas, [True]
        if prop == "handoff" and "initial_state" not in kw:
            return "the function has no initial_state argument"
        if prop == "varlen" and "cu_seqlens" not in kw:
            return "the function has no cu_seqlens argument"
        if prop == "gradients":
            why = self._grad_probe()
            if why:
                return why
            if self.low:
                norms = [n for n in norms if not n]
                if not norms:
                    return f"no error model for normalized gradients in {cfg.dtype}"
        return gammas, norms

    def _grad_probe(self):
        case = Case(B=1, T=3, H=1, d=2, dv=2, chunk_size=self.cfg.chunk_sizes[0])
        q, k, v = (x.detach().requires_grad_(True) for x in self.inputs(case))
        try:
            o, _, _ = self.call(q, k, v, case=case)
        except Exception as e:  # noqa: BLE001
            return f"the function raises on inputs that require grad ({type(e).__name__}: {e})"[:200]
        if not o.requires_grad:
            return "the output does not require grad"
        return None

    def strategy(self, prop, gammas, norms):
        from hypothesis import strategies as st
        cfg, chunked = self.cfg, "chunk_size" in self.kw

        @st.composite
        def cases(draw):
            lens, split = None, None
            if prop == "varlen":
                B = 1
                n = draw(st.integers(1, 3))
                lens = tuple(draw(st.integers(1, max(1, cfg.max_T // 2))) for _ in range(n))
                T = sum(lens)
            else:
                B = draw(st.integers(1, cfg.max_batch))
                T = draw(st.integers(2 if prop == "handoff" else 1, cfg.max_T))
            H = draw(st.integers(1, cfg.max_heads))
            d = draw(st.integers(1, cfg.max_dim))
            dv = draw(st.integers(1, cfg.max_dim))
            gamma = draw(st.sampled_from(gammas))
            normalize = draw(st.sampled_from(norms))
            chunk = draw(st.sampled_from(cfg.chunk_sizes)) if chunked else None
            if prop == "handoff":
                split = draw(st.integers(1, T - 1))
            seed = draw(st.integers(0, 2 ** 16))
            return Case(B=B, T=T, H=H, d=d, dv=dv, gamma=gamma, normalize=normalize, seed=seed,
                        chunk_size=chunk, split=split, lens=lens)
        return cases()

    def explicit(self, prop, gammas, norms):
        """Cases run on every run: T = 1 (T = 2 for the hand-off) with d = dv = 1, and odd sizes."""
        cfg = self.cfg
        c0 = cfg.chunk_sizes[0] if "chunk_size" in self.kw else None
        # the decay closest to 1 below it (0.95 by default: not dyadic, unlike 0.5, so the
        # float64 arithmetic is not exact), else the one requested
        g, n = max([x for x in gammas if x < 1], default=gammas[0]), norms[-1]
        odd = lambda x: min(x, cfg.max_dim if cfg.max_dim % 2 else cfg.max_dim - 1) or 1  # noqa: E731
        T_odd = min(7, cfg.max_T if cfg.max_T % 2 else cfg.max_T - 1)
        if prop == "varlen":
            return [Case(B=1, T=1, H=1, d=1, dv=1, gamma=g, normalize=n, chunk_size=c0, lens=(1,)),
                    Case(B=1, T=T_odd + 1, H=1, d=odd(3), dv=odd(5), gamma=g, normalize=n, chunk_size=c0,
                         lens=(1, T_odd))]
        if prop == "handoff":
            return [Case(B=1, T=2, H=1, d=1, dv=1, gamma=g, normalize=n, chunk_size=c0, split=1),
                    Case(B=1, T=T_odd, H=1, d=odd(3), dv=odd(5), gamma=g, normalize=n, chunk_size=c0,
                         split=T_odd // 2)]
        return [Case(B=1, T=1, H=1, d=1, dv=1, gamma=g, normalize=n, chunk_size=c0),
                Case(B=1, T=T_odd, H=1, d=odd(3), dv=odd(5), gamma=g, normalize=n, chunk_size=c0)]

    def run_property(self, prop) -> Row:
        from hypothesis import HealthCheck, Phase, Verbosity, given, settings
        from hypothesis import seed as hseed
        from hypothesis import target as htarget
        from hypothesis.errors import Flaky

        t0 = time.perf_counter()
        row = Row(prop, NA, bound=self.bound_text(prop))
        plan = self.plan(prop)
        if isinstance(plan, str):
            row.reason = plan
            return row
        gammas, norms = plan
        check = getattr(self, f"check_{prop}")
        stats = {"n": 0, "worst": 0.0}

        def body(case, searching=True):
            stats["n"] += 1
            try:
                ratio = check(case)
            except _Fail:
                raise
            except Exception as e:  # noqa: BLE001 - the target raised on a valid input
                raise _Fail(f"raised {type(e).__name__}: {e}", case) from None
            stats["worst"] = max(stats["worst"], ratio)
            if searching and math.isfinite(ratio):
                htarget(ratio)  # Phase.target: search toward larger error / bound
            return None

        test = given(self.strategy(prop, gammas, norms))(lambda case: body(case))
        test = settings(max_examples=self.cfg.max_examples, deadline=None, database=None,
                        derandomize=False, report_multiple_bugs=False, verbosity=Verbosity.quiet,
                        suppress_health_check=list(HealthCheck),
                        phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink])(test)
        test = hseed(self.cfg.seed)(test)
        try:
            test()
            # then the explicit cases (T = 1, odd sizes); after the search, so that a failure
            # the search can find is shrunk (Hypothesis never shrinks explicit examples)
            for c in self.explicit(prop, gammas, norms):
                body(c, searching=False)
            row.status = PASSED
        except _Fail as e:
            row.status, row.failure, row.case = FAILED, e.message, e.case
            row.worst = max(stats["worst"], e.ratio)
            row.snippet = self.snippet(prop, e.case, e.message)
        except Flaky as e:
            row.status, row.failure = FAILED, f"the failure does not reproduce on the same input (flaky): {e}"
        row.examples = stats["n"]
        if row.status == PASSED:
            row.worst = stats["worst"]
        row.seconds = time.perf_counter() - t0
        return row

    # -- reproduction snippets
    def snippet(self, prop, case: Case, message: str) -> str:
        cfg = self.cfg
        with_do = prop == "gradients"
        arrs = [self._tensor(a).cpu() for a in
                _inputs(case, cfg, self.low or case.normalize, self.low, with_do)]
        names = ["q", "k", "v", "do"][:len(arrs)]
        layout = "[B, H, T, dim]" if cfg.layout == "bhtd" else "[B, T, H, dim]"
        dt = f"torch.{cfg.dtype}"
        kw = self._case_kwargs(case)
        kws = "".join(f", {n}={x!r}" for n, x in kw.items())
        lines = [f"# {self.target}: property {prop!r} fails for op {cfg.op!r}: {message}",
                 "import torch",
                 "from hla_core.conformance import flat_tensors, load_target, max_relative_error, reference, "
                 "reference_vjp",
                 (f"f = load_target({self.target!r})"
                  if ":" in self.target and "<" not in self.target and not self.target.startswith("__main__")
                  else f"f = ...  # your function ({self.target})"),
                 f"dev = {cfg.device!r}"]
        for n, t in zip(names, arrs):
            lines.append(f"{n} = torch.tensor({_fmt(t.tolist())}, dtype={dt}, device=dev)  # {layout}, "
                         f"shape {tuple(t.shape)}")
        refkw = f"gamma={case.gamma!r}, normalize={case.normalize!r}, eps={cfg.eps!r}" + \
            (", layout='bhtd'" if cfg.layout == "bhtd" else "")
        lay = ", layout='bhtd'" if cfg.layout == "bhtd" else ""
        tol = "1e-10" if not self.low else "<the error model's rho (hla_core.error_model.normwise_coefficient)>"
        first = lambda call: f"{call}\no = o[0] if isinstance(o, (tuple, list)) else o"  # noqa: E731
        if prop in ("output", "decay", "normalize"):
            lines.append(first(f"o = f(q, k, v{kws})"))
            lines.append(f"ref = reference({cfg.op!r}, q, k, v, {refkw})")
            lines.append(f"assert max_relative_error(o, ref{lay}) <= {tol}")
        elif prop == "handoff":
            s, tdim = case.split, (2 if cfg.layout == "bhtd" else 1)
            sl = (lambda a, b: f"[:, :, {a}:{b}]") if cfg.layout == "bhtd" else (lambda a, b: f"[:, {a}:{b}]")
            fs = ", output_final_state=True" if "output_final_state" in self.kw else ""
            lines.append(f"o1, state = f(q{sl('', s)}, k{sl('', s)}, v{sl('', s)}{kws}{fs})")
            lines.append(f"o2, end = f(q{sl(s, '')}, k{sl(s, '')}, v{sl(s, '')}{kws}, initial_state=state{fs})")
            lines.append(f"ref = reference({cfg.op!r}, q, k, v, {refkw})")
            lines.append(f"assert max_relative_error(torch.cat([o1, o2], dim={tdim}), ref{lay}) <= {tol}")
            if not self.low:
                lines.append(f"_, whole = f(q, k, v{kws}{fs})  # the final states of both runs agree")
                lines.append("for a, b in zip(flat_tensors(end), flat_tensors(whole)):")
                lines.append("    assert torch.linalg.vector_norm(a - b) <= 1e-10 * torch.linalg.vector_norm(b)")
        elif prop == "varlen":
            cu = [0] + [int(x) for x in np.cumsum(case.lens)]
            lines.append(f"cu_seqlens = torch.tensor({cu}, dtype=torch.int64, device=dev)")
            lines.append(first(f"o = f(q, k, v{kws}, cu_seqlens=cu_seqlens)"))
            lines.append(f"ref = reference({cfg.op!r}, q, k, v, {refkw}, cu_seqlens=cu_seqlens.cpu())")
            lines.append(f"assert max_relative_error(o, ref{lay}) <= {tol}")
        elif prop == "gradients":
            lines.append("q, k, v = (x.requires_grad_(True) for x in (q, k, v))")
            lines.append(first(f"o = f(q, k, v{kws})"))
            lines.append("grads = torch.autograd.grad(o, (q, k, v), do)")
            lines.append(f"refs = reference_vjp({cfg.op!r}, q, k, v, do, {refkw})")
            lines.append("for g, r in zip(grads, refs):")
            lines.append(f"    assert max_relative_error(g, r{lay}) <= {tol}")
        else:
            kws2 = kws + (", output_final_state=True" if "output_final_state" in self.kw else "")
            lines.append(f"a, b = f(q, k, v{kws2}), f(q, k, v{kws2})")
            lines.append("a, b = (x[0] if isinstance(x, (tuple, list)) else x for x in (a, b))")
            lines.append("assert torch.equal(a, b)")
        return "\n".join(lines)

    def run(self, properties=PROPERTIES, progress=None) -> Report:
        report = Report(self.target, self.cfg)
        for prop in properties:
            if prop not in PROPERTIES:
                raise UsageError(f"unknown property {prop!r}; known: {', '.join(PROPERTIES)}")
            row = self.run_property(prop)
            report.rows.append(row)
            if progress:
                extra = row.reason if row.status == NA else f"{row.examples} examples, {row.seconds:.1f} s"
                progress(f"{prop:<12} {row.status} ({extra})")
        return report


def _fmt(x):
    """Nested lists of floats, shortest exact repr (inputs are multiples of 1/16)."""
    if isinstance(x, list):
        return "[" + ", ".join(_fmt(e) for e in x) + "]"
    return repr(float(x))


def flat_tensors(state):
    """The tensors of a state (a tensor, tuple / NamedTuple / list, dict by sorted key; None
    entries skipped), in order: states are compared without knowing their layout."""
    torch = _torch()
    if state is None:
        return []
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in flat_tensors(state[key])]
    if isinstance(state, (tuple, list)):
        return [t for s in state for t in flat_tensors(s)]
    return []


def _backward_coefficient(dtype, *, T, d, chunk_size, gamma, op=None):
    """rho_bwd: ||g_hat - g|| <= rho_bwd ||g|| for nonnegative inputs, unnormalized
    (M_BWD operand roundings, 3 times the forward accumulation depth; the model of
    property_tests/test_kernels_backward.py)."""
    u_op = error_model.OPERAND_ROUNDOFF[dtype]
    u_acc = error_model.UNIT_ROUNDOFF["float32"]
    n = 3 * error_model.accumulation_depth(T, d, chunk_size, gamma, op=op)
    gam = error_model._gam
    b = (1 + gam(M_BWD, u_op)) * (1 + gam(n, u_acc)) * (1 + gam(n, error_model.UNIT_ROUNDOFF["float64"])) - 1
    u_out = error_model.UNIT_ROUNDOFF[dtype]
    return b + u_out * (1 + b)


# ----------------------------------------------------------------------------- public API

def check(fn, op, *, properties=PROPERTIES, progress=None, **options) -> Report:
    """Run the conformance properties on `fn` (a function or a TARGET string) for operator
    `op`; options are Config's fields (gammas, normalize, device, dtype, layout,
    max_examples, seed, eps, max_T, max_dim, max_batch, max_heads, chunk_sizes).
    Raises UsageError for a bad target or options."""
    target = fn if isinstance(fn, str) else None
    if isinstance(fn, str):
        fn = load_target(fn)
    cfg = Config(op=op, **options)
    if isinstance(cfg.gammas, (int, float)):
        cfg.gammas = (float(cfg.gammas),)
    cfg.gammas = tuple(float(g) for g in cfg.gammas)
    return Checker(fn, cfg, target).run(properties, progress)


def assert_conforms(fn, op, **options) -> Report:
    """check(...) and raise AssertionError with the formatted report if a property fails."""
    report = check(fn, op, **options)
    if not report.ok:
        raise AssertionError("\n" + report.format())
    return report


def make_test(fn, op, *, properties=PROPERTIES, **options):
    """A pytest test function parametrized over the properties:

        test_my_hla2 = make_test(my_hla2, "hla2", max_examples=10)

    a property that does not apply is skipped (with the reason), a failing one fails with
    the smallest failing input and its reproduction."""
    import pytest

    @pytest.mark.parametrize("prop", list(properties))
    def test_conformance(prop):
        report = check(fn, op, properties=[prop], **options)
        row = report.rows[0]
        if row.status == NA:
            pytest.skip(row.reason)
        assert row.status == PASSED, "\n" + report.format()
    return test_conformance


# ----------------------------------------------------------------------------- CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _floats(s):
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _ints(s):
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def main(argv=None) -> int:
    p = _Parser(prog="python -m hla_core.conformance",
                description="Check an HLA implementation against the derived reference (docs/conformance.md). "
                            "Exit status: 0 every applicable property holds, 1 one fails, 2 usage error.")
    p.add_argument("target", help="package.module:function or path/to/file.py:function")
    p.add_argument("--op", required=True, help=f"operator: {', '.join(sorted(OPERATORS))}")
    p.add_argument("--gamma", type=_floats, default=(1.0, 0.95, 0.5),
                   help="comma-separated decays to test (default 1,0.95,0.5; '--gamma 1': undecayed only)")
    p.add_argument("--normalize", choices=("off", "on", "both"), default="both")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float64", choices=tuple(error_model.UNIT_ROUNDOFF))
    p.add_argument("--layout", choices=("bthd", "bhtd"), default="bthd")
    p.add_argument("--max-examples", type=int, default=20, help="Hypothesis examples per property (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eps", type=float, default=1e-6, help="eps of the normalized form (passed if declared)")
    p.add_argument("--max-T", type=int, default=None, help="largest sequence length (default 24 on cpu, 160 on cuda)")
    p.add_argument("--max-dim", type=int, default=None, help="largest d, dv (default 8 on cpu, 64 on cuda)")
    p.add_argument("--max-batch", type=int, default=2)
    p.add_argument("--max-heads", type=int, default=2)
    p.add_argument("--chunk-sizes", type=_ints, default=(16, 32, 64),
                   help="chunk_size values to draw when the function declares chunk_size")
    p.add_argument("--properties", default=",".join(PROPERTIES), help="comma-separated subset of " + ",".join(PROPERTIES))
    a = p.parse_args(argv)
    if str(a.device) == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton targets on CPU tensors need the interpreter
    props = [x.strip() for x in a.properties.split(",") if x.strip()]
    try:
        if a.op not in OPERATORS:
            raise UsageError(f"unknown operator {a.op!r}; registered: {', '.join(sorted(OPERATORS))}")
        bad = [x for x in props if x not in PROPERTIES]
        if bad:
            raise UsageError(f"unknown property {bad[0]!r}; known: {', '.join(PROPERTIES)}")
        if not a.chunk_sizes:
            raise UsageError("--chunk-sizes: at least one value")
        fn = load_target(a.target)
        cfg = Config(op=a.op, gammas=a.gamma, normalize=a.normalize, device=a.device, dtype=a.dtype,
                     layout=a.layout, max_examples=a.max_examples, seed=a.seed, eps=a.eps, max_T=a.max_T,
                     max_dim=a.max_dim, max_batch=a.max_batch, max_heads=a.max_heads, chunk_sizes=a.chunk_sizes)
        checker = Checker(fn, cfg, a.target)
        report = checker.run(props, progress=lambda line: print(line, flush=True))
    except UsageError as e:
        sys.stderr.write(f"conformance: error: {e}\n")
        return 2
    print()
    print(report.format())
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
