"""Context parallelism: one sequence split across the ranks of a torch.distributed group.

Rank r holds the contiguous slice of L_r tokens that follows rank r-1's (rank order =
sequence order; slices may differ in length, down to one token). Every LA launch of a
chain (kernels/gla.py: stages forward, the VJP rules of kernels/backward.py in either
direction of time) needs the carry at its slice's start, which depends on every earlier
slice (read backward in time: every later one). The two-level scheme the chunked kernel
already runs for segments inside one GPU (segment summaries, then each segment finishes
from the folded carry) is taken one level up:

1. the launch's segment summaries (_la_summary_kernel, computed anyway when a sequence is
   cut into segments; here also for the last segment) fold into the slice's summary Z_r,
   the carry the slice adds starting from zero;
2. W_r = rho_r b_r + Z_r (rho_r = g^(L_r), b_r the carry this rank brings itself: the
   caller's initial state on rank 0, a final-state cotangent read backward) is
   all-gathered: O(state) per rank, never O(T);
3. each rank folds the W of the ranks before it (backward in time: after it) with the
   engine's ⊕ for first-order linear attention, generated into hla_core/generated/la.py:
   forward the segment combine (KV_A, KV_B) -> rho_B KV_A + KV_B, backward the suffix ⊕
   of the same operator's value-gradient term (its state QO = sum_{t >= j} q_t do_t^T);
   property_tests/test_cp.py checks both are the derivation's and that the kernels fold
   with them;
4. the launch runs its slice from that carry.

Read backward in time, a launch's carry is "shifted" (kernels/gla.py: SHIFT, it is the
state after a virtual first update), so a slice hands on g Z_r rather than Z_r; the rest
is the same. Every launch exchanges once, collectively: all ranks run the same launches
in the same order (the backward's plan is made from flags all ranks agree on, exchanged
in `setup` and checked in `ContextParallel.resolve`, the backward's launch switches
included). Communication per launch and rank: one all_gather of its carries (d x dv per
sequence and head, plus the side channels; the backward's query pair, kernels/
backward_query.py, gathers its two terms' carries together), e.g. 1 MiB for B=1, H=16,
d=dv=128 in fp32.
"""
from __future__ import annotations

import contextlib
import functools
import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch

from ._common import host_to

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _la_module():
    from hla_core import module
    return module("la")


@functools.cache
def forward_combine():
    """(A, B, rho_B) -> carry of A followed by B: the derived ⊕ of first-order LA."""
    num = _la_module().NUM
    (name,) = num["carry"]
    combine = num["combine"]
    return lambda A, B, rB: combine({name: A}, {name: B}, rB)[name]


@functools.cache
def reverse_combine():
    """(A, B, rho_B) -> suffix carry of B followed by (later) A: the derived suffix ⊕ of the
    value-gradient term of first-order LA (the state a backward-in-time launch carries)."""
    (stream,) = _la_module().NUM["grad_streams"]["v"]
    suffix = stream.suffix
    (name,) = suffix["carry"]
    combine = suffix["combine"]
    return lambda A, B, rB: combine({name: A}, {name: B}, rB)[name]


@dataclass(frozen=True)
class _Weights:
    """The decay factors of one launch kind (power, segment length, direction) on this
    rank's own slice, formed once per call on the device: the host then issues few small
    ops per exchange, which matters because the GPU waits for them between a launch's
    summary and its chunk kernel."""
    seg: torch.Tensor             # [H, S]: g^(L - end_s), segment s's summary carried to the slice's end
    lead: Optional[torch.Tensor]  # [H]: g (a shifted carry enters one step later), or None
    rho: torch.Tensor             # [H]: g^L, the decay across this rank's slice


@dataclass
class _Headers:
    """Every rank's header, on its way to the host (made by `setup`, read by `resolve`)."""
    table: torch.Tensor            # [world, fields] float64 (pinned host memory when it came by NCCL)
    ready: Optional[object]        # CUDA event after the copy to the host, or None (already there)


@dataclass
class ContextParallel:
    """One chain call's view of its process group (made by `setup`). The other ranks'
    headers are checked, and their slice lengths read, on first use (`resolve`, from the
    first exchange): by then the call's first summary and this rank's carry are queued, so
    the GPU works while the host waits for the headers."""
    group: object
    rank: int
    world: int
    length: int          # tokens of this rank's slice
    gamma: torch.Tensor  # per-head gamma, float64 on the tensors' device (no host copies later)
    headers: Optional[_Headers]
    _lengths: tuple = ()     # tokens of each rank's slice
    _init_grad: bool = False  # rank 0 has an initial state whose gradient is wanted (all ranks know)
    _weights: dict = field(default_factory=dict, repr=False)
    _rho: dict = field(default_factory=dict, repr=False)

    @property
    def lengths(self) -> tuple:
        self.resolve()
        return self._lengths

    @property
    def init_grad(self) -> bool:
        self.resolve()
        return self._init_grad

    def resolve(self):
        """Wait for the headers and check them: the same error on every rank (each sees all)."""
        h = self.headers
        if h is None:
            return
        if h.ready is not None:
            h.ready.synchronize()
        got = h.table
        n = len(NAMES)
        failed = [r for r, x in enumerate(got[:, n + FAILED].tolist()) if x]
        if failed:
            raise ValueError(f"cp_group: rank(s) {failed} rejected their arguments before the ranks compared "
                             f"them (their own error says why); this call is abandoned on every rank")
        for i, name in enumerate(NAMES):
            vals = got[:, i].tolist()
            if len(set(vals)) > 1:
                if name == "gamma":
                    shown = [f"[{lo:g} .. {hi:g}], CRC-32 {int(c)}"
                             for c, lo, hi in got[:, [i, n + GAMMA_MIN, n + GAMMA_MAX]].tolist()]
                    raise ValueError(f"cp_group: the ranks disagree on gamma: {shown} (rank 0, 1, ...)")
                shown = [(_DTYPES[int(v)] if name == "dtype" else v) for v in vals]
                raise ValueError(f"cp_group: the ranks disagree on {name}: {shown} (rank 0, 1, ...)")
        if got[0, NAMES.index("cu_seqlens given")]:  # the ranks agree on it by now
            raise ValueError("cu_seqlens: not supported together with cp_group (each rank's slice is one "
                             "contiguous part of B equal-length sequences)")
        has = [bool(x) for x in got[:, n + HAS_INIT].tolist()]
        if any(has[1:]):
            raise ValueError(f"initial_state: with cp_group it is taken on rank 0 only (the other ranks start "
                             f"from the carry of the ranks before them); given on ranks "
                             f"{[r for r, x in enumerate(has) if x and r > 0]}")
        self._lengths = tuple(int(x) for x in got[:, n + LENGTH].tolist())
        self._init_grad = bool(got[0, n + INIT_GRAD].item())
        self.headers = None

    def weights(self, power, seg, n_seg, shift, dtype) -> _Weights:
        """This rank's own decay factors (its own length only: no wait for the headers)."""
        key = (power, seg, n_seg, shift, dtype)
        if key not in self._weights:
            L = self.length
            g = self.gamma ** power  # device ops with Python exponents: nothing waits on the GPU
            ends = torch.arange(1, n_seg + 1, dtype=torch.float64, device=g.device).mul_(seg).clamp_(max=L)
            # g^(L - end_s): Horner over the segments, as the kernel folds them
            self._weights[key] = _Weights(seg=(g[:, None] ** (L - ends)[None, :]).to(dtype),
                                          lead=g.to(dtype) if shift else None, rho=(g ** L).to(dtype))
        return self._weights[key]

    def rho(self, power, dtype) -> torch.Tensor:
        """[world, H]: g^(L_r), the decay across every rank's slice (waits for the headers)."""
        key = (power, dtype)
        if key not in self._rho:
            g = self.gamma ** power
            lengths = host_to(torch.tensor(self.lengths, dtype=torch.float64), g.device)
            self._rho[key] = (g[None, :] ** lengths[:, None]).to(dtype)
        return self._rho[key]

    def carry_in(self, power, seg, parts, boundary, shift, reverse):
        """The carry a launch starts its slice from.

        power: the launch's decay is g = gamma^power per head (a tuple: one power per part,
        parts of launches that exchange together); seg: tokens per segment of the
        launch; parts: its segment summaries (X [N, H, S, d, w] and, where used, the side
        carries [N, H, S, d] / [N, H, S, w]); boundary: the carry this rank brings (same
        layout without the segment axis, or None for zero). Returns the carries, one per
        part, in the layout the kernel reads (contiguous).
        """
        powers = tuple(power) if isinstance(power, tuple) else (power,) * len(parts)
        wts = [self.weights(pw, seg, parts[0].shape[2], bool(shift), parts[0].dtype) for pw in powers]

        def per_head(x, like):  # [H] or [H, S] against [N, H, ...]
            return x.view((1,) + tuple(x.shape) + (1,) * (like.dim() - 1 - x.dim()))
        W, own = [], []
        for x, b, wt in zip(parts, boundary, wts):
            z = (x * per_head(wt.seg, x)).sum(2)
            if wt.lead is not None:
                z = z * per_head(wt.lead, z)
            if b is not None:
                b = b.reshape(z.shape).to(z.dtype)
                z = z + per_head(wt.rho, z) * b
            W.append(z)
            own.append(b)
        flat = torch.cat([x.reshape(-1) for x in W])
        # the first wait for the other ranks' headers, if any: after this rank's W is queued,
        # before the first exchange whose size depends on what the headers check
        rhos = [self.rho(pw, flat.dtype) for pw in powers]
        got = [torch.empty_like(flat) for _ in range(self.world)]
        torch.distributed.all_gather(got, flat, group=self.group)
        combine = reverse_combine() if reverse else forward_combine()
        others = range(self.world - 1, self.rank, -1) if reverse else range(self.rank)
        out = []
        off = 0
        for x, b, rho in zip(W, own, rhos):
            n = x.numel()
            acc = None  # the empty prefix: ⊕'s identity
            for s in others:
                piece = got[s][off:off + n].view(x.shape)
                acc = piece if acc is None else combine(acc, piece, per_head(rho[s], x))
            off += n
            if b is not None:
                acc = b if acc is None else acc + b
            out.append((acc if acc is not None else torch.zeros_like(x)).contiguous())
        return out


def _header(p, q, fields):
    """What every rank must agree on (NAMES), then its slice length and flags, as numbers."""
    return [p["B"], p["H"], p["d"], p["dv"], _DTYPES.index(q.dtype)] + fields


NAMES = ["B", "H", "d", "dv", "dtype", "chain", "normalize", "eps", "scale", "chunk_size",
         "output_final_state", "requires grad (q, k, v)", "cu_seqlens given", "gamma",
         "backward launch fusions (1: HLA_BWD_PAIR, 2: HLA_BWD_QUERY_PAIR)"]
# after NAMES, a header holds (offsets from len(NAMES)):
EXTRA = 6
LENGTH, HAS_INIT, INIT_GRAD, GAMMA_MIN, GAMMA_MAX, FAILED = range(EXTRA)
HEADER = len(NAMES) + EXTRA


def _check_group(group):
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("cp_group: torch.distributed is not initialized (call "
                           "torch.distributed.init_process_group first)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"cp_group: expected a torch.distributed ProcessGroup, got {type(group).__name__}")


def _usable(group) -> bool:
    try:
        _check_group(group)
    except (RuntimeError, TypeError):
        return False
    return True


def _gather_headers(group, mine, device):
    """Every rank's header [world, HEADER]: one all_gather, on `device` under NCCL (None:
    the current CUDA device)."""
    dist = torch.distributed
    if dist.get_backend(group) == "nccl":
        mine = host_to(mine, device if device is not None else torch.device("cuda", torch.cuda.current_device()))
    got = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(got, mine, group=group)
    return torch.stack(got)


def setup(group, chain_id, p, q, *, normalize, eps, scale, chunk_size, output_final_state, has_init,
          init_grad, needs, fusions) -> ContextParallel:
    """Check `group` and start the exchange of the ranks' headers (what they must agree on,
    and their slice lengths): one small collective per call, read on first use. fusions:
    the process's backward launch switches as a number (kernels/backward.py); they decide
    which launches, hence which exchanges, the backward makes."""
    dist = torch.distributed
    _check_group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    g64 = p["g64"]
    # gamma as its CRC-32 (exact in float64), with its least and largest value for the message
    gsum = float(zlib.crc32(g64.numpy().tobytes()))
    extra = [0.0] * EXTRA
    extra[LENGTH], extra[HAS_INIT], extra[INIT_GRAD] = p["T"], float(bool(has_init)), float(bool(init_grad))
    extra[GAMMA_MIN], extra[GAMMA_MAX] = g64.min().item(), g64.max().item()
    head = _header(p, q, [chain_id, float(bool(normalize)), float(eps), float(scale), float(chunk_size),
                          float(bool(output_final_state)), float(needs), float(p["cu"] is not None), gsum,
                          float(fusions)] + extra)
    table = _gather_headers(group, torch.tensor(head, dtype=torch.float64), q.device)
    ready = None
    if table.is_cuda:  # to the host without waiting; resolve() waits on the event (on q's device's
        # stream, which the copy runs on even when another device is the current one)
        host = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
        host.copy_(table, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(table.device))
        table = host
    return ContextParallel(group, rank, world, p["T"], p["g_dev"], _Headers(table, ready))


@contextlib.contextmanager
def failures_relayed(group, q):
    """Around a rank's own argument checks: if they raise, the rank still joins the header
    exchange (with a FAILED header) before the error propagates, so the other ranks raise
    too instead of waiting for it. No group, or one no exchange can run on: nothing to do
    (setup then raises the same on every rank)."""
    try:
        yield
    except Exception:
        if group is not None and _usable(group):
            mine = torch.zeros(HEADER, dtype=torch.float64)
            mine[len(NAMES) + FAILED] = 1.0
            _gather_headers(group, mine, q.device if isinstance(q, torch.Tensor) and q.is_cuda else None)
        raise


def chain_id(chain) -> float:
    """A number naming the chain (ranks must run the same operator): CRC-32 of its stages."""
    return float(zlib.crc32(repr(tuple(tuple(st) for st in chain)).encode()))


def check_mode(mode, cp_group):
    if cp_group is not None and mode != "chunk":
        raise ValueError("cp_group: context parallelism runs the chunked kernels only (chunk_*), "
                         "not the token-by-token fused_recurrent_*")


