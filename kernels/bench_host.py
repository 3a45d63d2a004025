"""Host time per call of the public functions, with every Triton launch stubbed out.

    python -m kernels.bench_host [--reps 7] [--calls 50]

What a call costs the CPU before the GPU can run it: argument checks, the chain's setup,
decay tables, allocations, the autograd op, the backward's planning; not the kernels and
not Triton's own launch cost (each launch is replaced by a no-op). Small float32 CPU
tensors (B=1, T=64, H=2, d=16) keep the few real tensor ops negligible. Where the GPU work
of a call is short (T = 4K rows of docs/benchmarks.md) this host time is what the call
costs. Per row: the least mean over `--reps` batches of `--calls` calls (the least is the
run the machine disturbed least). Runs anywhere (CPU only).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from unittest import mock

import torch

import kernels
from kernels import backward_pair, backward_query, gla

STUBBED = {gla: ("_la_chunk_kernel", "_la_chunk_kernel_ns", "_la_summary_kernel", "_la_summary_kernel_ns",
                 "_la_recurrent_kernel"),
           backward_pair: ("_la_rev_pair_kernel", "_la_summary_kernel"),
           backward_query: ("_la_sum2_kernel", "_la_summary_kernel")}


class _NoLaunch:
    """Stands in for a Triton kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _stubbed():
    """Every launch of STUBBED replaced by a no-op while the returned context is open."""
    stack = contextlib.ExitStack()
    for mod, names in STUBBED.items():
        for name in names:
            stack.enter_context(mock.patch.object(mod, name, _NoLaunch()))
    return stack


def _least_mean_ms(fn, reps, calls):
    for _ in range(3):
        fn()  # warm caches (and the autograd graph machinery)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls * 1e3)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kernels.bench_host", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args(argv)
    with _stubbed():
        torch.manual_seed(0)
        q, k, v, do = (torch.randn(1, 64, 2, 16) for _ in range(4))
        xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
        rows = []
        for name in ("chunk_hla2", "chunk_ahla", "chunk_hla3", "fused_recurrent_hla2"):
            fn = getattr(kernels, name)

            def fwd():
                with torch.no_grad():
                    fn(q, k, v, gamma=0.99, check_finite=False)

            def step():
                o, _ = fn(*xs, gamma=0.99, check_finite=False)
                o.backward(do)
            rows.append((name, _least_mean_ms(fwd, args.reps, args.calls), _least_mean_ms(step, args.reps, args.calls)))
            print(f"[host] {name}: forward {rows[-1][1]:.3f} ms, forward+backward {rows[-1][2]:.3f} ms", flush=True)
    print(f"\nHost time per call, launches stubbed (torch {torch.__version__}; least mean of {args.reps} x "
          f"{args.calls} calls)\n")
    print("| function | forward (ms) | forward+backward (ms) |")
    print("|---|---|---|")
    for name, f, fb in rows:
        print(f"| {name} | {f:.3f} | {fb:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
