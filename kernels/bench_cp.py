"""Context-parallel scaling benchmark (kernels/cp.py): one long sequence on 1, 2, 4 GPUs.

    python -m kernels.bench_cp [--out DIR] [--worlds 1,2,4] [--T 131072,262144,...] [--op hla2]

bf16, B=1, H=16, d=dv=128, gamma=0.99. Each world size runs in its own processes (NCCL,
one GPU per rank; world 1 is the plain single-GPU call, no process group). Rank r holds
T / world tokens. Forward: `torch.no_grad()`; forward+backward: `o.backward(do)`; each
timed between barriers with CUDA events, the slowest rank's time, median of the repeats.
Peak memory: the largest rank's `max_memory_allocated` over one training step (inputs,
cotangent and gradients included). A T runs only where the peak predicted from the two
shorter runs (linear in T / world) fits in 92% of the GPU's memory, so nothing runs out of
memory mid-collective; the longest T that ran is "fits". Prints progress and a table;
writes bench_cp.json into --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

B, H, D, GAMMA = 1, 16, 128, 0.99


def _fn(op):
    import kernels
    return {"hla2": kernels.chunk_hla2, "ahla": kernels.chunk_ahla, "hla3": kernels.chunk_hla3}[op]


def _time(run, reps, group):
    """Median over reps of the slowest rank's time of run() (ms)."""
    out = []
    for _ in range(reps):
        if group is not None:
            dist.barrier(group)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        torch.cuda.synchronize()
        ms = torch.tensor([a.elapsed_time(b)], device="cuda")
        if group is not None:
            dist.all_reduce(ms, op=dist.ReduceOp.MAX, group=group)
        out.append(ms.item())
    return statistics.median(out)


class Timeline:
    """Where a call's GPU time goes, per rank (`with Timeline() as t:`): CUDA events (and host clock readings) at the
    entry and exit of every LA launch (kernels/gla.py Chain.__call__; pair>: the fused
    reversed key/value launch of kernels/backward_pair.py), of its cross-rank
    carry (ContextParallel.carry_in) and of the all_gather inside it. The intervals between
    consecutive marks name what ran: launch>..carry> the slice summary, carry>..ag> the
    slice's W, ag>..<ag the collective (its wait for the other ranks included), <ag..<carry
    the fold, <carry..<launch the chunk kernel; <launch..launch> what runs between launches.
    `lag` is the host's clock minus the GPU's at a mark: near zero, the GPU waited for the host."""

    def __init__(self):
        self.marks = []
        self._patches = contextlib.ExitStack()

    def __enter__(self):
        from kernels import backward, cp, gla
        for name, (owner, attr) in {"launch": (gla.Chain, "__call__"), "pair": (backward, "reversed_pair"),
                                    "carry": (cp.ContextParallel, "carry_in"), "ag": (dist, "all_gather")}.items():
            self._patches.enter_context(mock.patch.object(owner, attr, self._marked(name, getattr(owner, attr))))
        self.mark("start")
        return self

    def __exit__(self, *exc):
        self.mark("end")
        self._patches.close()

    def _marked(self, name, f):
        def run(*a, **kw):
            self.mark(name + ">")
            r = f(*a, **kw)
            self.mark("<" + name)
            return r
        return run

    def mark(self, name):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.marks.append((name, e, time.perf_counter()))

    def intervals(self):
        """[(from-mark..to-mark, GPU ms, host-minus-GPU lag at the end, ms)] in order."""
        torch.cuda.synchronize()
        (_, e0, h0), out = self.marks[0], []
        for (a, ea, _), (b, eb, hb) in zip(self.marks, self.marks[1:]):
            out.append((f"{a}..{b}", ea.elapsed_time(eb), (hb - h0) * 1e3 - e0.elapsed_time(eb)))
        return out


def _timeline(fn, args, kw, do, group, rank, world, T):
    """One forward and one forward+backward under a Timeline; rank 0 prints every rank's
    intervals summed by kind and the ten longest single intervals. Also lists the calls
    that synchronize a stream or the device (torch.cuda sync debug mode: its warnings only)
    in one step; an event wait, such as cp's header wait, is not among them."""
    import collections
    import traceback
    import warnings
    xs = [x.detach().clone().requires_grad_(True) for x in args]
    res = {}
    for what in ("fwd", "fwd+bwd"):
        if group is not None:
            dist.barrier(group)
        torch.cuda.synchronize()
        with Timeline() as tl_:
            if what == "fwd":
                with torch.no_grad():
                    fn(*args, **kw)
            else:
                o, _ = fn(*xs, **kw)
                o.backward(do)
        res[what] = tl_.intervals()
    if group is not None:  # the bare collective of one exchange (B=1, H=16, d=dv=128 fp32: 1 MiB)
        flat = torch.zeros(B * H * D * D, device="cuda")
        outs = [torch.empty_like(flat) for _ in range(world)]
        for _ in range(5):
            dist.all_gather(outs, flat, group=group)
        dist.barrier(group)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(50):
            dist.all_gather(outs, flat, group=group)
        b.record()
        torch.cuda.synchronize()
        res["bare all_gather (ms each)"] = [("50 back to back", a.elapsed_time(b) / 50, 0.0)]
    syncs = collections.Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):  # torch's sync debug warning only
            return
        frames = [f for f in traceback.extract_stack() if "/kernels/" in f.filename and "bench_cp" not in f.filename]
        where = " < ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in frames[::-1][:3])
        syncs[where or "outside kernels/"] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode(1)
        try:
            o, _ = fn(*xs, **kw)
            o.backward(do)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    got = [None] * world
    if group is not None:
        dist.all_gather_object(got, (res, dict(syncs)), group=group)
    else:
        got = [(res, dict(syncs))]
    if rank != 0:
        return
    for r, (res_r, syncs_r) in enumerate(got):
        for what, iv in res_r.items():
            total = sum(ms for _, ms, _ in iv)
            kinds = collections.defaultdict(float)
            for name, ms, _ in iv:
                kinds[name] += ms
            print(f"[timeline] world {world} T={T} rank {r} {what}: {total:.3f} ms; by kind: " +
                  ", ".join(f"{k} {v:.3f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])), flush=True)
            top = sorted(range(len(iv)), key=lambda i: -iv[i][1])[:10]
            print("    longest: " + "; ".join(f"#{i} {iv[i][0]} {iv[i][1]:.3f} (lag {iv[i][2]:+.2f})"
                                             for i in sorted(top)), flush=True)
        print(f"[timeline] world {world} rank {r} synchronizing calls in one step: "
              f"{syncs_r if syncs_r else 'none'}", flush=True)


def _rank(rank, world, Ts, op, reps, init_file, out_file, as_group=False, profile_T=0, timeline_T=0,
          segment_chunks=None):
    torch.cuda.set_device(rank)
    group = None
    if world > 1 or as_group:  # as_group: one rank with a process group (the exchange's own cost)
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))
        group = dist.group.WORLD
    fn = _fn(op)
    cap = torch.cuda.get_device_properties(rank).total_memory
    rows, peaks = [], []
    for T in Ts:
        n = T // world
        if len(peaks) >= 2:  # predicted peak, linear in the slice length
            (n1, p1), (n2, p2) = peaks[-2:]
            pred = p2 + (p2 - p1) / (n2 - n1) * (n - n2)
            if pred > 0.92 * cap:
                if rank == 0:
                    print(f"[cp] world {world} T={T}: predicted peak {pred / 2**30:.1f} GiB > 92% of "
                          f"{cap / 2**30:.0f} GiB, stop", flush=True)
                break
        g = torch.Generator(device="cuda").manual_seed(1234 + rank)
        mk = lambda w: (torch.randn(B, n, H, w, device="cuda", generator=g) / D ** 0.5).to(torch.bfloat16)  # noqa: E731
        q, k, v, do = mk(D), mk(D), mk(D), mk(D)
        kw = dict(gamma=GAMMA, cp_group=group, check_finite=False, segment_chunks=segment_chunks)
        with torch.no_grad():
            fn(q, k, v, **kw)  # compile / warm up
        ms_f = _time(lambda: fn(q, k, v, **kw), reps, group)
        xs = [x.clone().requires_grad_(True) for x in (q, k, v)]

        def step():
            for x in xs:
                x.grad = None
            o, _ = fn(*xs, **kw)
            o.backward(do)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.tensor([float(torch.cuda.max_memory_allocated())], device="cuda")
        if group is not None:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        ms = _time(step, reps, group)
        if T == timeline_T:  # after the warm-up steps: nothing compiles inside it
            _timeline(fn, (q, k, v), kw, do, group, rank, world, T)
        if T == profile_T:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            if rank == 0:
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True)
        peaks.append((n, peak.item()))
        row = dict(op=op, world=world, T=T, slice=n, fwd_ms=ms_f, fwdbwd_ms=ms, peak_gib=peak.item() / 2**30,
                   cp_group=group is not None, segment_chunks=segment_chunks)
        rows.append(row)
        if rank == 0:
            print(f"[cp] {op} world {world} T={T:8d} fwd {ms_f:9.3f} ms  fwd+bwd {ms:9.3f} ms  "
                  f"peak/rank {row['peak_gib']:6.2f} GiB", flush=True)
        del q, k, v, do, xs
        torch.cuda.empty_cache()
    if rank == 0:
        with open(out_file, "w") as fh:
            json.dump(rows, fh)
    if group is not None:
        dist.destroy_process_group()


def table(rows):
    """Markdown: per T, time on each world size and the speed-up over one GPU."""
    one_cp = {r["T"]: r for r in rows if r["world"] == 1 and r.get("cp_group")}
    rows = [r for r in rows if not (r["world"] == 1 and r.get("cp_group"))]
    worlds = sorted({r["world"] for r in rows})
    by = {(r["world"], r["T"]): r for r in rows}
    head = "| T | " + " | ".join(f"{w} GPU fwd / fwd+bwd (ms)" for w in worlds) + " | " + \
        " | ".join(f"speed-up {w} GPUs fwd / fwd+bwd" for w in worlds if w > 1) + " | peak per GPU (GiB) |"
    L = [head, "|" + "---|" * (2 + len(worlds) + len([w for w in worlds if w > 1]))]
    for T in sorted({r["T"] for r in rows}):
        cells = []
        for w in worlds:
            r = by.get((w, T))
            cells.append(f"{r['fwd_ms']:.2f} / {r['fwdbwd_ms']:.2f}" if r else "does not fit")
        base = by.get((1, T))
        for w in worlds:
            if w == 1:
                continue
            r = by.get((w, T))
            cells.append(f"{base['fwd_ms'] / r['fwd_ms']:.2f}× / {base['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}×"
                         if r and base else "–")
        peaks = " / ".join(f"{by[(w, T)]['peak_gib']:.1f}" if (w, T) in by else "–" for w in worlds)
        L.append(f"| {T // 1024}K | " + " | ".join(cells) + f" | {peaks} |")
    fits = {w: max((r["T"] for r in rows if r["world"] == w), default=0) for w in worlds}
    L.append("")
    L.append("Longest T run (fits): " + ", ".join(f"{w} GPU: {fits[w] // 1024}K" for w in worlds))
    if one_cp:
        L.append("")
        L.append("One GPU with a process group of one rank (every launch exchanges, with itself): " + ", ".join(
            f"{T // 1024}K {r['fwd_ms']:.2f} / {r['fwdbwd_ms']:.2f} ms" for T, r in sorted(one_cp.items())))
    return "\n".join(L)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kernels.bench_cp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--T", default=",".join(str(2**e) for e in range(17, 24)))
    ap.add_argument("--op", default="hla2", choices=["hla2", "ahla", "hla3"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--one-rank-group", action="store_true",
                    help="also run world 1 with a process group (the exchange's cost without other ranks)")
    ap.add_argument("--profile-T", type=int, default=0, help="print a torch.profiler table of one step at this T")
    ap.add_argument("--segment-chunks", type=int, default=None,
                    help="chunks per parallel segment of every launch (default: kernels/gla.py's choice)")
    ap.add_argument("--timeline-T", type=int, default=0,
                    help="print where each rank's GPU time goes (class Timeline) in one step at this T")
    ap.add_argument("--table", default=None, metavar="JSON", help="only print the table of a saved bench_cp.json")
    args = ap.parse_args(argv)
    if args.table:
        with open(args.table) as fh:
            print(table(json.load(fh)["rows"]))
        return 0
    Ts = [int(x) for x in args.T.split(",")]
    worlds = [int(x) for x in args.worlds.split(",")]
    have = torch.cuda.device_count()
    rows = []
    t0 = time.time()
    runs = [(w, False) for w in worlds] + ([(1, True)] if args.one_rank_group else [])
    for w, as_group in runs:
        if w > have:
            print(f"[cp] world {w}: only {have} GPUs, skipped", flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out_file = os.path.join(tmp, "rows.json")
            mp.start_processes(_rank, args=(w, Ts, args.op, args.reps, os.path.join(tmp, "init"), out_file,
                                            as_group, args.profile_T, args.timeline_T,
                                            args.segment_chunks), nprocs=w, join=True, start_method="spawn")
            with open(out_file) as fh:
                rows += json.load(fh)
    os.makedirs(args.out, exist_ok=True)
    meta = dict(gpu=torch.cuda.get_device_name(0), gpus=have, torch=torch.__version__,
                B=B, H=H, d=D, dv=D, gamma=GAMMA, dtype="bfloat16", seconds=time.time() - t0)
    with open(os.path.join(args.out, "bench_cp.json"), "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
