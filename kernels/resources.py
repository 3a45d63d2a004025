"""Static resource use of the LA kernels as compiled for a Hopper GPU, without a GPU.

    python -m kernels.resources [--arch 90] [--d 64,128] [--out docs]

Triton compiles the kernels of the bf16 training path at a shape like the benchmark's
(T, H, d multiples of 16: pointers and those sizes get the 16-divisibility the JIT would
give them) with the launch configurations of kernels/gla.py, kernels/backward_pair.py and backward_query.py
(called, not copied) for sm_<arch>: the segment summary, the forward LA, the forward LA
that adds into an fp32 gradient (dq), the reversed LA with an fp32 output, and the fused
reversed key/value launch of an output stage and of a key stage, and the query pair (both
stages' dq rules in one forward launch). cuobjdump (shipped with
Triton) reads registers per thread and the stack frame per thread from the cubin. At the 255-register cap the stack frame holds what did not fit in
registers (spills), so a frame that grows with the tile is evidence of register pressure;
it is the frame's size, not the traffic through it. The numbers belong to the Triton
installed here, which may differ from the GPU machine's. Prints a table.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .backward_pair import _la_rev_pair_kernel, pair_launch_config
from .backward_query import _la_sum2_kernel, sum2_launch_config
from .gla import _la_chunk_kernel, _la_summary_kernel, launch_config

C = 64
BF16 = dict(DOT=tl.bfloat16, ACC=tl.float32, PREC="ieee", TABLE=False, VARLEN=False, C=C)


SCALARS = ("T", "H", "D", "DV", "W", "D1", "D2", "SEG", "NSUM")
DIVISIBLE = ("T", "H", "D", "DV", "W", "D1", "D2", "SEG")  # multiples of 16 at the benchmark's shapes


def _signature(fn, pointers, constexprs):
    """Triton signature (every argument a pointer of the given type, default fp32, an i32
    scalar or a constexpr) and the 16-divisibility attributes of pointers and sizes."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = "i32" if name in SCALARS else pointers.get(name, "*fp32")
        if name not in SCALARS or name in DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def usage(fn, pointers, constexprs, launch, arch):
    """(registers per thread, stack frame bytes per thread) of one compiled launch."""
    sig, attrs = _signature(fn, pointers, constexprs)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=launch)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as fh:
        fh.write(compiled.asm["cubin"])
        fh.flush()
        text = subprocess.run([tool, "-res-usage", fh.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", text).group(1)), int(re.search(r"STACK:(\d+)", text).group(1))


def cases(d):
    """(label, kernel, pointer types, constexprs, launch) of the bf16 training path at head size d."""
    BK, BV, launch = launch_config(tl.bfloat16, d, d)
    launch = dict(launch, num_warps=launch.get("num_warps", 4))  # Triton's default
    chunk = dict(BK=BK, BV=BV, SIDE=0, DIVIDE=False, STORE_O1=False, HAS_INIT=False, STORE_FINAL=False,
                 QS=0, KS=1, SHIFT=False, ACCUM=False, ACCUM1=False, **BF16)
    bf = {n: "*bf16" for n in ("q", "k", "v", "o")}
    summary = dict(BK=BK, BV=BV, SIDE=0, QS=0, KS=1, REV=False, **BF16)
    yield (f"segment summary, value block {BV}", _la_summary_kernel, dict(bf, cu="*i32"), summary, launch)
    yield (f"LA forward, value block {BV}", _la_chunk_kernel, dict(bf, cu="*i32"), dict(chunk, REV=False), launch)
    yield (f"LA forward adding into fp32 (dq), value block {BV}", _la_chunk_kernel, dict(bf, o="*fp32", cu="*i32"),
           dict(chunk, REV=False, ACCUM=True), launch)
    yield (f"LA reversed, fp32 output, value block {BV}", _la_chunk_kernel, dict(bf, o="*fp32", cu="*i32"),
           dict(chunk, REV=True), launch)
    PK, PW, plaunch = pair_launch_config(tl.bfloat16, d, d)
    pair = dict(BK=PK, BW=PW, ACCUM_A=False, ACCUM_B=False, HAS_INIT=False, **BF16)
    pb = {n: "*bf16" for n in ("q", "a", "b", "dn", "oa", "ob")}
    yield (f"fused key/value, output stage ({PK} x {PW} carry)", _la_rev_pair_kernel, dict(pb, cu="*i32"),
           dict(pair, SAME=False), plaunch)
    yield (f"fused key/value, key stage ({PK} x {PW} carry)", _la_rev_pair_kernel, dict(pb, cu="*i32"),
           dict(pair, SAME=True), plaunch)
    K1, K2, QV, qlaunch = sum2_launch_config(tl.bfloat16, d, d, d)
    qb = {n: "*bf16" for n in ("q1", "k1", "v1", "q2", "k2", "v2", "o")}
    yield (f"query pair (dq), two {K1} x {QV} carries", _la_sum2_kernel, dict(qb, cu="*i32"),
           dict(BK1=K1, BK2=K2, BV=QV, ACCUM=False, HAS_INIT=False, **BF16), qlaunch)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kernels.resources", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (default 90: H100 / H200)")
    ap.add_argument("--d", default="64,128", help="head sizes d = dv (default 64,128)")
    ap.add_argument("--out", default=None, help="also write the table to OUT/resources_sm<arch>.md")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("kernels.resources: compiles kernels, so it needs TRITON_INTERPRET unset (it is set here)")
    rows = []
    for d in (int(x) for x in args.d.split(",")):
        for label, fn, ptrs, const, launch in cases(d):
            print(f"[resources] d={d} {label}: compiling for sm_{args.arch} ...", flush=True)
            regs, stack = usage(fn, ptrs, const, launch, args.arch)
            threads = 32 * launch["num_warps"]
            rows.append((d, label, launch["num_warps"], launch["num_stages"], regs, stack, threads * stack))
    lines = [f"Triton {triton.__version__}, sm_{args.arch}, bf16 operands, chunk {C}", "",
             "| d | launch | warps | stages | registers / thread | stack / thread (B) | stack / program (KiB) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {d} | {label} | {nw} | {ns} | {regs} | {stack} | {per_prog / 1024:.0f} |"
              for d, label, nw, ns, regs, stack, per_prog in rows]
    print("\n" + "\n".join(lines))
    if args.out:
        path = os.path.join(args.out, f"resources_sm{args.arch}.md")
        with open(path, "w") as fh:
            fh.write(f"<!-- GENERATED by `python -m kernels.resources --out {args.out}`: do not edit by hand. -->\n\n"
                     f"# Registers and stack per thread of the training launches (compiled, not run)\n\n"
                     + "\n".join(lines) + "\n\nHow and what it means: `kernels/resources.py`; used in "
                     "docs/benchmarks.md (the d = 128 fused output stage).\n")
        print(f"[resources] written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
