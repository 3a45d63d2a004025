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
in the same order (the backward's plan is made from flags all ranks agree on, checked in
`setup`). Communication per launch and rank: one all_gather of a carry (d x dv per
sequence and head, plus the side channels), e.g. 1 MiB for B=1, H=16, d=dv=128 in fp32.
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEADS = 4096  # gamma travels padded to this length in the one setup collective


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
class ContextParallel:
    """One chain call's view of its process group (made by `setup`)."""
    group: object
    rank: int
    world: int
    lengths: tuple      # tokens of each rank's slice
    init_grad: bool     # rank 0 has an initial state whose gradient is wanted (all ranks know)
    gamma: torch.Tensor  # per-head gamma, float64 on the tensors' device (no host copies later)

    def carry_in(self, power, seg, parts, boundary, shift, reverse):
        """The carry a launch starts its slice from.

        power: the launch's decay is g = gamma^power per head; seg: tokens per segment of the
        launch; parts: its segment summaries (X [N, H, S, d, w] and, where used, the side
        carries [N, H, S, d] / [N, H, S, w]); boundary: the carry this rank brings (same
        layout without the segment axis, or None for zero). Returns the carries, one per
        part, in the layout the kernel reads (contiguous).
        """
        L = self.lengths[self.rank]
        n_seg = parts[0].shape[2]
        ends = [min((s + 1) * seg, L) for s in range(n_seg)]
        dt = parts[0].dtype
        g_power = self.gamma ** power  # device ops with Python exponents: nothing waits on the GPU
        # g^(L - end_s): Horner over the segments, as the kernel folds them
        w = torch.stack([g_power ** (L - e) for e in ends], 1).to(dt)   # [H, S]
        lead = g_power.to(dt) if shift else None
        W, own = [], []
        for x, b in zip(parts, boundary):
            wv = w.view((1,) + w.shape + (1,) * (x.dim() - 3))
            z = (x * wv).sum(2)
            if lead is not None:
                z = z * lead.view((1, -1) + (1,) * (z.dim() - 2))
            if b is not None:
                b = b.reshape(z.shape).to(dt)
                z = z + self._rho(g_power, L, z) * b
            W.append(z)
            own.append(b)
        flat = torch.cat([x.reshape(-1) for x in W])
        got = [torch.empty_like(flat) for _ in range(self.world)]
        torch.distributed.all_gather(got, flat, group=self.group)
        combine = reverse_combine() if reverse else forward_combine()
        others = range(self.world - 1, self.rank, -1) if reverse else range(self.rank)
        out = []
        off = 0
        for x, b in zip(W, own):
            n = x.numel()
            acc = torch.zeros_like(x)
            for s in others:
                acc = combine(acc, got[s][off:off + n].view(x.shape), self._rho(g_power, self.lengths[s], x))
            off += n
            out.append((acc if b is None else acc + b).contiguous())
        return out

    @staticmethod
    def _rho(g_power, length, like):
        r = (g_power ** length).to(like.dtype)
        return r.view((1, -1) + (1,) * (like.dim() - 2))


def _header(p, q, fields):
    """What every rank must agree on, as float64 numbers (one tensor per rank)."""
    return torch.tensor([p["B"], p["H"], p["d"], p["dv"], _DTYPES.index(q.dtype)] + fields, dtype=torch.float64)


def setup(group, chain_id, p, q, *, normalize, eps, scale, chunk_size, output_final_state, has_init,
          init_grad, needs) -> ContextParallel:
    """Check `group` and that all ranks called with matching arguments; gather the slice
    lengths. Raises the same error on every rank (each sees every rank's header)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("cp_group: torch.distributed is not initialized (call "
                           "torch.distributed.init_process_group first)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"cp_group: expected a torch.distributed ProcessGroup, got {type(group).__name__}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    names = ["B", "H", "d", "dv", "dtype", "chain", "normalize", "eps", "scale", "chunk_size",
             "output_final_state", "requires grad (q, k, v)", "cu_seqlens given"]
    head = _header(p, q, [chain_id, float(bool(normalize)), float(eps), float(scale), float(chunk_size),
                          float(bool(output_final_state)), float(needs), float(p["cu"] is not None)])
    # one collective: the header, this rank's length and initial-state flags, and gamma
    # padded to MAX_HEADS (compared once the head count is known to agree)
    dev = q.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    if p["H"] > MAX_HEADS:
        raise ValueError(f"cp_group: at most {MAX_HEADS} heads, got {p['H']}")
    gpad = torch.full((MAX_HEADS,), -1.0, dtype=torch.float64)
    gpad[:p["H"]] = p["g64"].cpu()
    extra = torch.tensor([p["T"], float(bool(has_init)), float(bool(init_grad))], dtype=torch.float64)
    mine = torch.cat([head, extra, gpad]).to(dev)
    got = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(got, mine, group=group)
    got = torch.stack(got).cpu()   # the one wait on the other ranks
    for i, name in enumerate(names):
        vals = got[:, i].tolist()
        if len(set(vals)) > 1:
            shown = [(_DTYPES[int(v)] if name == "dtype" else v) for v in vals]
            raise ValueError(f"cp_group: the ranks disagree on {name}: {shown} (rank 0, 1, ...)")
    n = len(names)
    if any(not torch.equal(got[0, n + 3:], x[n + 3:]) for x in got[1:]):
        raise ValueError(f"cp_group: the ranks disagree on gamma: {got[:, n + 3:n + 3 + p['H']].tolist()}")
    if p["cu"] is not None:  # raised after the exchange: every rank raises, none waits
        raise ValueError("cu_seqlens: not supported together with cp_group (each rank's slice is one "
                         "contiguous part of B equal-length sequences)")
    lengths = tuple(int(x) for x in got[:, n].tolist())
    has = [bool(x) for x in got[:, n + 1].tolist()]
    if any(has[1:]):
        raise ValueError(f"initial_state: with cp_group it is taken on rank 0 only (the other ranks start "
                         f"from the carry of the ranks before them); given on ranks "
                         f"{[r for r, h in enumerate(has) if h and r > 0]}")
    return ContextParallel(group, rank, world, lengths, bool(got[0, n + 2].item()),
                           p["g_dev"] if dev.type == "cuda" else p["g64"])


def chain_id(chain) -> float:
    """A number naming the chain (ranks must run the same operator): CRC-32 of its stages."""
    return float(zlib.crc32(repr(tuple(tuple(st) for st in chain)).encode()))


def check_mode(mode, cp_group):
    if cp_group is not None and mode != "chunk":
        raise ValueError("cp_group: context parallelism runs the chunked kernels only (chunk_*), "
                         "not the token-by-token fused_recurrent_*")


