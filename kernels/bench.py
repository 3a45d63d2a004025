"""Benchmark: HLA kernels vs first-order fla, SDPA and a plain-PyTorch chunked HLA2.

    python -m kernels.bench [--out DIR] [--quick]
    python -m kernels.bench --train [--train-shapes '16384,128;4096,64']   (forward+backward;
        default T in {4K, 16K} x d in {64, 128}; rows bench_train.json, plot bench_train.png)

bf16 inputs, B=4, H=16, T in {4096, 16384}, d = dv in {64, 128}, decay gamma = 0.99
(every method that takes a decay gets it). first_order_la is the chained building block
of the HLA kernels alone (one LA launch, kernels/gla.py), the same operator as fla's
chunk_simple_gla with a scalar per-head decay. Times are medians of
triton.testing.do_bench (CUDA events, warm-up first). TFLOP/s are on *counted*
algorithmic FLOPs (formulas in flops_*; causal halves are not counted twice, redundant
recomputation inside a kernel is not counted). Prints progress, then a short table;
writes bench.json and bench.png into --out (default docs/).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

import torch

B, H, GAMMA, C = 4, 16, 0.99, 64
SHAPES = [(4096, 64), (16384, 64), (4096, 128), (16384, 128)]
PEAK_BF16_TFLOPS = 785.0  # measured bf16 matmul rate (docs/benchmarks.md)


def flops_sdpa(T, d):        # causal: QK^T and PV, half of each
    return B * H * 2 * T * T * d


def flops_la(T, d, dv):
    """One first-order chunked linear attention (kernels/gla.py; also fla's simple_gla):
    per token Q K^T 2Cd and A V 2C dv (intra-chunk), Q X 2d dv and K^T V 2d dv (carry)."""
    return B * H * T * (4 * d * dv + 2 * C * (d + dv))


def flops_simple_gla(T, d):
    return flops_la(T, d, d)


def flops_hla2(T, d, dv=None):
    """The chain kt = LA(q, k, k), o = LA(q, kt, v) (kernels/hla2.py)."""
    dv = dv or d
    return flops_la(T, d, d) + flops_la(T, d, dv)


def flops_ahla(T, d, dv=None):
    """The chain vt = LA(q, k, v), o = LA(q, k, vt) (kernels/ahla.py)."""
    dv = dv or d
    return 2 * flops_la(T, d, dv)


def flops_hla3(T, d, dv=None):
    """The chain kt = LA(q, k, k), vt = LA(q, k, v), o = LA(q, kt, vt) (kernels/hla3.py)."""
    dv = dv or d
    return flops_la(T, d, d) + 2 * flops_la(T, d, dv)


def state_bytes_per_head(op, d, dv=None):
    """fp32 carry per (sequence, head), unnormalized: HLA2 KK + KK_QV, AHLA KV + KQ_KV,
    HLA3 KK + KV + KK_QQ_KV."""
    dv = dv or d
    return 4 * {"chunk_hla2": d * d + d * dv, "chunk_ahla": 2 * d * dv, "chunk_hla3": d * d + 2 * d * dv}[op]


def torch_chunked_hla2(q, k, v, gamma, chunk=C, collect=False):
    """Plain-PyTorch chunked HLA2 (batched matmuls, fp32 state, bf16 operands).

    The direct chunk form of the HLA2 carry (S = KK, X = KK_QV): local C x C weights for
    all chunks at once, then a Python loop over chunks for S (d x d) and X (d x dv), with
    the d x d x dv product S0 M per chunk that the LA chain of kernels/hla2.py avoids.
    collect=False (the forward benchmark) writes each chunk's output into one tensor in
    place; collect=True (torch_chunked_hla2_autograd) keeps them in a list and
    concatenates once, what a user training through it would write (autograd of the
    in-place form copies the whole output's gradient at every chunk).
    """
    Bq, T, Hq, d = q.shape
    dv = v.shape[-1]
    assert T % chunk == 0
    N = T // chunk
    dt = q.dtype
    f = lambda x: x.view(Bq, N, chunk, Hq, x.shape[-1]).permute(0, 3, 1, 2, 4)  # noqa: E731  [B,H,N,C,*]
    Q, K, V = f(q), f(k), f(v)
    r = torch.arange(chunk, device=q.device, dtype=torch.float32)
    lg = math.log(gamma)
    rr, cc = r[:, None], r[None, :]
    low = cc <= rr
    D1 = torch.where(low, torch.exp(lg * (2 * rr - cc + 1)), 0.0)
    D2 = torch.where(low, torch.exp(lg * 2 * (rr - cc)), 0.0)
    Dw = torch.where(low, torch.exp(lg * (rr - cc)), 0.0)
    DU = torch.where(rr <= cc, torch.exp(lg * (2 * chunk - 2 - rr - cc)), 0.0)
    b2 = torch.exp(lg * 2 * (r + 1))[:, None]
    e = torch.exp(lg * (2 * chunk - 1 - r))[:, None]
    gk = torch.exp(lg * (chunk - 1 - r))[:, None]
    gC = gamma ** chunk
    W = (Q @ K.transpose(-1, -2)).float()                                  # [B,H,N,C,C]
    A3 = ((W.to(dt) @ (W * Dw).to(dt).transpose(-1, -2)).float() * D2)
    M = ((Q.float() * e).to(dt).transpose(-1, -2) @ V).float()            # [B,H,N,d,dv]
    UV = ((W.transpose(-1, -2) * DU).to(dt) @ V).float()
    KUV = (K.transpose(-1, -2) @ UV.to(dt)).float()
    dS = ((K.float() * gk).to(dt).transpose(-1, -2) @ K).float()
    S = torch.zeros(Bq, Hq, d, d, device=q.device)
    X = torch.zeros(Bq, Hq, d, dv, device=q.device)
    o = [] if collect else torch.empty(Bq, Hq, N, chunk, dv, device=q.device, dtype=dt)
    for c in range(N):
        Qc = Q[:, :, c]
        QS = (Qc @ S.to(dt)).float()
        A = A3[:, :, c] + (QS.to(dt) @ Qc.transpose(-1, -2)).float() * D1
        oc = (b2 * (Qc @ X.to(dt)).float() + (A.to(dt) @ V[:, :, c]).float()).to(dt)
        if collect:
            o.append(oc)
        else:
            o[:, :, c] = oc
        X = gC * gC * X + (S.to(dt) @ M[:, :, c].to(dt)).float() + KUV[:, :, c]
        S = gC * S + dS[:, :, c]
    if collect:
        o = torch.stack(o, 2)
    return o.permute(0, 2, 3, 1, 4).reshape(Bq, T, Hq, dv)


def torch_chunked_hla2_autograd(q, k, v, gamma, chunk=C):
    """torch_chunked_hla2 without in-place writes (chunk outputs collected, stacked once):
    the plain-torch baseline of the training rows (python -m kernels.bench --train)."""
    return torch_chunked_hla2(q, k, v, gamma, chunk, collect=True)


def train(args):
    """Forward+backward (training step) rows: time (median of do_bench, grads reset each
    run), forward-only time (no_grad), and peak GPU memory of one step (inputs and their
    gradients included; `extra` = peak minus what was allocated before the step).
    Methods: chunk_hla2 / chunk_ahla / chunk_hla3 (kernels/backward.py; *_two_launch: the
    key and value rules of a stage as two reversed launches, kernels.backward.PAIR off,
    instead of the fused one of kernels/backward_pair.py), autograd through
    the plain-torch chunked HLA2 without in-place writes (torch_chunked_hla2_autograd;
    torch_chunked_hla2, the in-place form, with --train-inplace-baseline), SDPA causal, and
    with fla importable its chunk_simple_gla with the per-head decay g_gamma (ungated: fla
    0.6 refuses the per-token-gate backward on Hopper with Triton < 3.7.1, its issue #640),
    and HLA2 chained on fla (kt = chunk_simple_gla(q, k, k, g_gamma), o = chunk_simple_gla(q,
    kt, v, 2 g_gamma))."""
    import triton
    import kernels
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as exc:  # noqa: BLE001
        print(f"[train] fla not importable ({exc!r}); its rows are skipped", flush=True)
        chunk_simple_gla = None
    dev = "cuda"
    name = torch.cuda.get_device_name()
    print(f"[train] {name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    # bf16 gradients against the float64 kernel gradients on the same inputs (small shape)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (torch.randn(1, 2048, 2, 64, device=dev, generator=g, dtype=torch.bfloat16) * 0.125
                   for _ in range(4))
    checks, la_rows, tuned = {}, [], {}
    for nm in ("chunk_hla2", "chunk_ahla", "chunk_hla3", "torch_chunked_hla2_autograd"):
        fn = getattr(kernels, nm, None)
        res = []
        for dt in (torch.float64, torch.bfloat16):
            xs = [x.detach().clone().to(dt).requires_grad_(True) for x in (q, k, v)]
            if fn is None:  # the plain-torch baseline against the float64 kernel
                o = (kernels.chunk_hla2(*xs, gamma=GAMMA)[0] if dt == torch.float64
                     else torch_chunked_hla2_autograd(*xs, GAMMA))
            else:
                o, _ = fn(*xs, gamma=GAMMA)
            (o * do.to(dt)).sum().backward()
            res.append([x.grad.double() for x in xs])
        errs = [((b - a).norm() / a.norm()).item() for a, b in zip(*res)]
        checks[nm] = dict(dq=errs[0], dk=errs[1], dv=errs[2])
        print(f"[train] check {nm} bf16 grads vs float64 kernel grads (T=2048, d=64): rel err dq {errs[0]:.2e} "
              f"dk {errs[1]:.2e} dv {errs[2]:.2e}", flush=True)
    rows = []
    shapes = [(int(x.split(",")[0]), int(x.split(",")[1])) for x in args.train_shapes.split(";")]

    def save():
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_train.json"), "w") as fh:
            json.dump(dict(gpu=name, torch=torch.__version__, triton=triton.__version__, B=B, H=H, gamma=GAMMA,
                           rows=rows, checks=checks, la_rows=la_rows, pair_launch=tuned), fh, indent=1)
    from kernels._common import prepare
    from kernels.gla import Chain
    for T, d in sorted(shapes, key=lambda s: -s[0]):  # one LA launch forward, and read backward in time
        gen = torch.Generator(device=dev).manual_seed(1)
        q, k, v = (torch.randn(B, T, H, d, device=dev, generator=gen, dtype=torch.bfloat16) * d ** -0.5
                   for _ in range(3))
        p = prepare(q, k, v, GAMMA, 1e-6, C, None, False)
        la = Chain(p, "chunk")
        dq32 = torch.randn(B, T, H, d, device=dev, dtype=torch.float32)
        for nm, f in (("LA forward, bf16 in/out", lambda: la(q, k, v, 1, last=True)),
                      ("LA reversed, bf16 in, fp32 out", lambda: la(q, k, v, 1, reverse=True,
                                                                    out_dtype=torch.float32)),
                      ("LA reversed, fp32 query in, fp32 accumulate", lambda: la(dq32, k, v, 1, reverse=True,
                                                                                  out=dq32, acc=dq32))):
            ms = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
            la_rows.append(dict(T=T, d=d, launch=nm, ms=ms))
            print(f"[train] T={T} d={d} one {nm}: {ms:.3f} ms", flush=True)
        # a stage's key and value rules: two reversed launches against one fused launch
        # (kernels/backward_pair.py), for the output stage of HLA2 (a = kt, b = v, both
        # outputs bf16) and its key stage (a = b = k, one output da + db: two launches
        # accumulate in fp32 and convert, the fused one writes bf16 at once)
        from kernels import backward_pair
        from kernels.backward_pair import reversed_pair
        dn = torch.randn(B, T, H, d, device=dev, dtype=torch.bfloat16) * d ** -0.5
        bf = torch.bfloat16

        def two_out():
            la(v, dn, q, 2, reverse=True, out_dtype=bf)
            la(k, q, dn, 2, reverse=True, out_dtype=bf)

        def two_key():
            acc = la(k, dn, q, 1, reverse=True, out_dtype=torch.float32)[0]
            la(k, q, dn, 1, reverse=True, acc=acc, out_dtype=bf)
        cases = [("two reversed LAs (output stage)", two_out), ("two reversed LAs (key stage, fp32 acc)", two_key)]
        if T < 16384:
            del q, k, v, p, la, dq32, dn
            continue  # the launch rows are taken at T = 16K only
        configs = [(4, 1), (4, 2), (4, 3), (8, 1), (8, 2), (8, 3)] if args.pair_sweep else \
            [backward_pair.LAUNCH_2BYTE.get((max(64, triton.next_power_of_2(d)),) * 2, (8, 2))]
        for nw, ns in configs:
            cases.append((f"fused pair (output stage) warps={nw} stages={ns}",
                          lambda nw=nw, ns=ns: reversed_pair(la, q, k, v, dn, 2, dtype_a=bf, dtype_b=bf,
                                                             num_warps=nw, num_stages=ns)))
            cases.append((f"fused pair (key stage) warps={nw} stages={ns}",
                          lambda nw=nw, ns=ns: reversed_pair(la, q, k, k, dn, 1, same=True, dtype_a=bf,
                                                             num_warps=nw, num_stages=ns)))
        ref = (la(v, dn, q, 2, reverse=True, out_dtype=torch.float32)[0],
               la(k, q, dn, 2, reverse=True, out_dtype=torch.float32)[0])
        ref_key = (la(k, dn, q, 1, reverse=True, out_dtype=torch.float32)[0]
                   + la(k, q, dn, 1, reverse=True, out_dtype=torch.float32)[0])
        for nm, f in cases:
            try:
                if nm.startswith("fused pair (output"):
                    x, y = f()
                    err = max(((x.float() - r).norm() / r.norm()).item() for x, r in zip((x, y), ref))
                elif nm.startswith("fused pair (key"):
                    x = f()[0]
                    err = ((x.float() - ref_key).norm() / ref_key.norm()).item()
                else:
                    f()
                    err = float("nan")
                ms = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
            except Exception as exc:  # noqa: BLE001
                print(f"[train] T={T} d={d} {nm}: FAILED {str(exc)[:200]!r}", flush=True)
                continue
            la_rows.append(dict(T=T, d=d, launch=nm, ms=ms, rel_err=err))
            print(f"[train] T={T} d={d} {nm}: {ms:.3f} ms (rel err vs two launches {err:.2e})", flush=True)
        # the query rules of HLA2's two stages (dq): one forward launch each, through an fp32
        # buffer, against one launch for both (kernels/backward_query.py)
        from kernels import backward_query
        from kernels.backward_query import query_pair
        kt = la(q, k, k, 1)[0]
        dkt = torch.randn(B, T, H, d, device=dev, dtype=torch.bfloat16) * d ** -0.5

        def two_dq():
            acc = la(dn, v, kt, 2, out_dtype=torch.float32)[0]
            return la(dkt, k, k, 1, acc=acc, out_dtype=bf)[0]
        ref_dq = two_dq().float()
        dq_cases = [("two forward LAs (dq, fp32 acc)", two_dq)]
        bk = max(64, triton.next_power_of_2(d))
        qconfigs = [(4, 1), (4, 2), (4, 3), (8, 1), (8, 2), (8, 3)] if args.pair_sweep else \
            [backward_query.LAUNCH_2BYTE.get((bk, bk, 64), (8, 2))]
        for nw, ns in qconfigs:
            dq_cases.append((f"query pair (dq) warps={nw} stages={ns}",
                             lambda nw=nw, ns=ns: query_pair(la, [(dn, v, kt, 2, None), (dkt, k, k, 1, None)], out_dtype=bf,
                                                             num_warps=nw, num_stages=ns)))
        qswept = {}
        for nm, f in dq_cases:
            try:
                err = ((f().float() - ref_dq).norm() / ref_dq.norm()).item()
                ms = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
            except Exception as exc:  # noqa: BLE001
                print(f"[train] T={T} d={d} {nm}: FAILED {str(exc)[:200]!r}", flush=True)
                continue
            la_rows.append(dict(T=T, d=d, launch=nm, ms=ms, rel_err=err))
            print(f"[train] T={T} d={d} {nm}: {ms:.3f} ms (rel err vs two launches {err:.2e})", flush=True)
            if "warps=" in nm:
                qswept[nm.split(") ")[1]] = ms
        if args.pair_sweep and qswept:
            best = min(qswept, key=qswept.get)
            nw, ns = (int(x.split("=")[1]) for x in best.split())
            backward_query.LAUNCH_2BYTE[(bk, bk, 64)] = (nw, ns)
            print(f"[train] T={T} d={d} query pair launch for the training rows: {best} ({qswept[best]:.3f} ms)",
                  flush=True)
            tuned[f"query_{d}"] = (nw, ns)
        del kt, dkt
        swept = {}
        for r in la_rows:
            if (r["T"], r["d"]) == (T, d) and r["launch"].startswith("fused pair") and "warps=" in r["launch"]:
                cfg = r["launch"].split(") ")[1]
                swept[cfg] = swept.get(cfg, 0.0) + r["ms"]
        if args.pair_sweep and swept:  # the training rows use this sweep's best (output + key stage)
            best = min(swept, key=swept.get)
            nw, ns = (int(x.split("=")[1]) for x in best.split())
            bk = max(64, triton.next_power_of_2(d))
            backward_pair.LAUNCH_2BYTE[(bk, bk)] = (nw, ns)
            print(f"[train] T={T} d={d} fused pair launch for the training rows: {best} "
                  f"(output + key stage {swept[best]:.3f} ms)", flush=True)
            tuned[d] = (nw, ns)
        del q, k, v, p, la, dq32, dn
    for T, d in shapes:
        gen = torch.Generator(device=dev).manual_seed(T + d)
        q, k, v, do = (torch.randn(B, T, H, d, device=dev, generator=gen, dtype=torch.bfloat16) * d ** -0.5
                       for _ in range(4))
        glog = torch.full((H,), math.log(GAMMA), device=dev, dtype=torch.float32)
        bhtd = lambda x: x.transpose(1, 2)  # noqa: E731
        methods = {
            "chunk_hla2": lambda q, k, v: kernels.chunk_hla2(q, k, v, gamma=GAMMA, check_finite=False)[0],
            "chunk_ahla": lambda q, k, v: kernels.chunk_ahla(q, k, v, gamma=GAMMA, check_finite=False)[0],
            "chunk_hla3": lambda q, k, v: kernels.chunk_hla3(q, k, v, gamma=GAMMA, check_finite=False)[0],
            "torch_chunked_hla2_autograd": lambda q, k, v: torch_chunked_hla2_autograd(q, k, v, GAMMA),
            "sdpa_causal": lambda q, k, v: sdpa(bhtd(q), bhtd(k), bhtd(v), is_causal=True),
        }
        for nm in ("chunk_hla2", "chunk_ahla", "chunk_hla3"):  # the backward with two reversed launches per stage
            methods[nm + "_two_launch"] = methods[nm]
        for nm in ("chunk_hla2", "chunk_ahla", "chunk_hla3"):  # one query-rule launch per stage
            methods[nm + "_query_split"] = methods[nm]
        if args.train_inplace_baseline:
            methods["torch_chunked_hla2"] = lambda q, k, v: torch_chunked_hla2(q, k, v, GAMMA)
        if chunk_simple_gla is not None:
            methods["fla_chunk_simple_gla"] = lambda q, k, v: chunk_simple_gla(q, k, v, g_gamma=glog)[0]
            methods["fla_chained_hla2"] = lambda q, k, v: chunk_simple_gla(
                q, chunk_simple_gla(q, k, k, g_gamma=glog, scale=1.0)[0], v, g_gamma=2 * glog, scale=1.0)[0]
        for mname, fn in methods.items():
            if args.only and mname not in args.only.split(","):
                continue
            t0 = time.time()
            kernels.backward.PAIR = not mname.endswith("_two_launch")
            kernels.backward.QUERY_PAIR = not mname.endswith("_query_split")
            xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
            dd = do if mname != "sdpa_causal" else do.transpose(1, 2)

            def step():
                fn(*xs).backward(dd)
            try:
                step()
                with torch.no_grad():
                    ms_f = triton.testing.do_bench(lambda: fn(*xs), warmup=25, rep=100, return_mode="median")
                ms = triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=xs, return_mode="median")
                for x in xs:
                    x.grad = None
                gc.collect()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
            except Exception as exc:  # noqa: BLE001
                print(f"[train] T={T} d={d} {mname}: FAILED {exc!r}", flush=True)
                continue
            rows.append(dict(T=T, d=d, method=mname, fwd_ms=ms_f, fwdbwd_ms=ms, peak_gib=peak / 2 ** 30,
                             extra_gib=(peak - base) / 2 ** 30))
            print(f"[train] T={T:6d} d={d:4d} {mname:28s} fwd {ms_f:8.3f} ms  fwd+bwd {ms:8.3f} ms  "
                  f"peak {peak / 2 ** 30:6.2f} GiB (step extra {(peak - base) / 2 ** 30:6.2f}) "
                  f"({time.time() - t0:.1f}s wall)", flush=True)
            del xs
            kernels.backward.PAIR = kernels.backward.QUERY_PAIR = True
            torch.cuda.empty_cache()
        save()  # after every shape: a run cut short keeps what it measured
    save()
    print_train_table(rows)
    try:
        plot_train(rows, os.path.join(args.out, "bench_train.png"), name)
    except Exception as exc:  # noqa: BLE001
        print(f"[train] plot failed: {exc!r}")


def print_train_table(rows):
    """The forward+backward table of docs/benchmarks.md (python -m kernels.bench --train-table JSON)."""
    ref = {(r["T"], r["d"]): r for r in rows if r["method"] == "fla_chunk_simple_gla"}
    print("\n| T, d | method | forward | forward+backward | peak memory (step extra) | fwd+bwd / fla |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        f = ref.get((r["T"], r["d"]))
        ratio = f"{r['fwdbwd_ms'] / f['fwdbwd_ms']:.2f}" if f else "-"
        print(f"| {r['T'] // 1024}K, {r['d']} | {r['method']} | {r['fwd_ms']:.2f} ms | {r['fwdbwd_ms']:.2f} ms | "
              f"{r['peak_gib']:.2f} GiB ({r['extra_gib']:.2f}) | {ratio} |")
    sys.stdout.flush()


def plot_train(rows, path, gpu):
    """docs/bench_train.png: forward+backward time (left) and peak memory (right) per shape."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = sorted({(r["T"], r["d"]) for r in rows}, key=lambda s: (s[1], s[0]))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["T"], r["d"], r["method"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    w = 0.8 / len(methods)
    for ax, key, lab in ((axes[0], "fwdbwd_ms", "forward+backward ms (median, log scale)"),
                         (axes[1], "peak_gib", "peak memory of one step, GiB (log scale)")):
        for i, m in enumerate(methods):
            ax.bar([j + i * w for j in range(len(shapes))],
                   [by[(T, d, m)][key] if (T, d, m) in by else float("nan") for T, d in shapes], w, label=m)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(shapes))])
        ax.set_xticklabels([f"T={T // 1024}K, d={d}" for T, d in shapes])
        ax.set_yscale("log")
        ax.set_ylabel(lab)
        ax.grid(axis="y", alpha=.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"training step (forward+backward), bf16, B={B}, H={H}, gamma={GAMMA} on {gpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"[train] plot saved to {path}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs")
    ap.add_argument("--train", action="store_true", help="forward+backward rows (time, peak memory) instead")
    ap.add_argument("--train-shapes", default="4096,64;16384,64;4096,128;16384,128", help="'T,d;T,d' for --train")
    ap.add_argument("--train-inplace-baseline", action="store_true",
                    help="--train: also the in-place plain-torch HLA2 (autograd of it takes ~1.6 s at 16K, 128)")
    ap.add_argument("--pair-sweep", action="store_true",
                    help="--train: sweep the fused key/value launch's warps and stages at T = 16K first")
    ap.add_argument("--train-plot", default=None, metavar="JSON", help="only plot a saved bench_train.json")
    ap.add_argument("--quick", action="store_true", help="only (4096, 64)")
    ap.add_argument("--block-v", type=int, default=None)
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--num-stages", type=int, default=None)
    ap.add_argument("--sweep", action="store_true", help="sweep chunk size, value block, warps first")
    ap.add_argument("--only", default=None, help="comma-separated method names to run (default: all)")
    ap.add_argument("--table", default=None, metavar="JSON", help="only print the table of a saved bench.json")
    ap.add_argument("--train-table", default=None, metavar="JSON", help="only print the table of a saved bench_train.json")
    args = ap.parse_args(argv)
    if args.train_plot:
        with open(args.train_plot) as fh:
            j = json.load(fh)
        plot_train(j["rows"], os.path.join(os.path.dirname(args.train_plot), "bench_train.png"), j["gpu"])
        return
    if args.train_table:
        with open(args.train_table) as fh:
            print_train_table(json.load(fh)["rows"])
        return
    if args.train:
        return train(args)
    if args.table:
        with open(args.table) as fh:
            print_table(json.load(fh)["rows"])
        return
    import triton
    import kernels
    from kernels._common import prepare
    from kernels.gla import Chain
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as exc:  # noqa: BLE001
        print(f"[bench] fla not importable ({exc!r}); its column is skipped", flush=True)
        chunk_simple_gla = None
    dev = "cuda"
    name = torch.cuda.get_device_name()
    print(f"[bench] {name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    kw = dict(block_v=args.block_v, num_warps=args.num_warps, num_stages=args.num_stages)

    # correctness spot check before timing: the bf16 kernel and the plain-torch version
    try:
        # against the float64 kernel on the same (bf16-rounded) inputs
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, 1024, 2, 64, device=dev, generator=g, dtype=torch.bfloat16) * 0.125 for _ in range(3))
        want = (lambda m: not args.only or m in args.only.split(","))
        for nm, fn in (("chunk_hla2", kernels.chunk_hla2), ("chunk_ahla", kernels.chunk_ahla),
                       ("chunk_hla3", kernels.chunk_hla3), ("torch_chunked_hla2", None)):
            if not want(nm):
                continue
            if fn is None:
                ref, _ = kernels.chunk_hla2(q.double(), k.double(), v.double(), gamma=GAMMA)
                out = torch_chunked_hla2(q, k, v, GAMMA)
            else:
                ref, _ = fn(q.double(), k.double(), v.double(), gamma=GAMMA)
                out = fn(q, k, v, gamma=GAMMA, **kw)[0]
            rel = ((out.double() - ref).norm() / ref.norm()).item()
            print(f"[bench] check {nm} bf16 vs float64 kernel: rel err {rel:.2e}", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"[bench] check FAILED: {exc!r}", flush=True)

    # launch-configuration sweep at T=16K (compile + time each), best per (op, d) is used below
    best = {}
    if args.sweep:
        for d in sorted({d for _, d in SHAPES}):
            gen = torch.Generator(device=dev).manual_seed(d)
            q, k, v = (torch.randn(B, 16384, H, d, device=dev, generator=gen, dtype=torch.bfloat16) * d ** -0.5
                       for _ in range(3))
            for op, fn in (("chunk_hla2", kernels.chunk_hla2), ("chunk_ahla", kernels.chunk_ahla),
                           ("chunk_hla3", kernels.chunk_hla3)):
                if args.only and op not in args.only.split(","):
                    continue
                res = []
                cands = [(64, 64, 4), (64, 64, 8), (64, 128, 8), (128, 64, 8)]
                for cs, bv, nw in cands:
                    cfg = dict(chunk_size=cs, block_v=bv, num_warps=nw)
                    try:
                        ms = triton.testing.do_bench(
                            lambda: fn(q, k, v, gamma=GAMMA, check_finite=False, **cfg),
                            warmup=10, rep=40, return_mode="median")
                    except Exception as exc:  # noqa: BLE001
                        print(f"[sweep] {op} d={d} {cfg}: FAILED {type(exc).__name__}", flush=True)
                        continue
                    res.append((ms, cfg))
                    print(f"[sweep] {op} T=16K d={d} {cfg}: {ms:.3f} ms", flush=True)
                if res:
                    best[(op, d)] = min(res, key=lambda x: x[0])[1]
                    print(f"[sweep] best {op} d={d}: {best[(op, d)]}", flush=True)

    def first_order(q, k, v):
        """The building block alone: one LA(q, k, v; gamma) launch (kernels/gla.py)."""
        p = prepare(q, k, v, GAMMA, 1e-6, C, None, False)
        return Chain(p, "chunk")(p["q"], p["k"], p["v"], 1, last=True)

    rows = []
    shapes = SHAPES[:1] if args.quick else SHAPES
    for T, d in shapes:
        gen = torch.Generator(device=dev).manual_seed(T + d)
        q, k, v = (torch.randn(B, T, H, d, device=dev, generator=gen, dtype=torch.bfloat16) * d ** -0.5
                   for _ in range(3))
        qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        glog = torch.full((H,), math.log(GAMMA), device=dev, dtype=torch.float32)
        methods = {
            "chunk_hla2": (lambda: kernels.chunk_hla2(q, k, v, gamma=GAMMA, check_finite=False,
                                                      **best.get(("chunk_hla2", d), kw)), flops_hla2(T, d)),
            "chunk_ahla": (lambda: kernels.chunk_ahla(q, k, v, gamma=GAMMA, check_finite=False,
                                                      **best.get(("chunk_ahla", d), kw)), flops_ahla(T, d)),
            "chunk_hla3": (lambda: kernels.chunk_hla3(q, k, v, gamma=GAMMA, check_finite=False,
                                                      **best.get(("chunk_hla3", d), kw)), flops_hla3(T, d)),
            "first_order_la": (lambda: first_order(q, k, v), flops_la(T, d, d)),
            "sdpa_causal": (lambda: sdpa(qh, kh, vh, is_causal=True), flops_sdpa(T, d)),
            "torch_chunked_hla2": (lambda: torch_chunked_hla2(q, k, v, GAMMA), flops_hla2(T, d)),
        }
        for nm in ("chunk_hla2", "chunk_ahla", "chunk_hla3"):  # the backward with two reversed launches per stage
            methods[nm + "_two_launch"] = methods[nm]
        for nm in ("chunk_hla2", "chunk_ahla", "chunk_hla3"):  # one query-rule launch per stage
            methods[nm + "_query_split"] = methods[nm]
        if args.train_inplace_baseline:
            methods["torch_chunked_hla2"] = lambda q, k, v: torch_chunked_hla2(q, k, v, GAMMA)
        if chunk_simple_gla is not None:
            methods["fla_chunk_simple_gla"] = (lambda: chunk_simple_gla(q, k, v, g_gamma=glog),
                                               flops_simple_gla(T, d))
        for mname, (fn, fl) in methods.items():
            if args.only and mname not in args.only.split(","):
                continue
            t0 = time.time()
            try:
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            except Exception as exc:  # noqa: BLE001
                print(f"[bench] T={T} d={d} {mname}: FAILED {exc!r}", flush=True)
                continue
            rows.append(dict(T=T, d=d, method=mname, ms=ms, tflops=fl / ms / 1e9, flops=fl,
                             frac_bf16_peak=fl / ms / 1e9 / PEAK_BF16_TFLOPS))
            if mname.startswith("chunk_"):
                rows[-1]["state_bytes_per_head"] = state_bytes_per_head(mname, d)
            print(f"[bench] T={T:6d} d={d:4d} {mname:22s} {ms:8.3f} ms {fl / ms / 1e9:7.1f} TFLOP/s "
                  f"({100 * fl / ms / 1e9 / PEAK_BF16_TFLOPS:.1f}% of bf16 peak) ({time.time() - t0:.1f}s wall)",
                  flush=True)
        torch.cuda.empty_cache()

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as fh:
        json.dump(dict(best={f"{o}_d{d}": c for (o, d), c in best.items()}, gpu=name, torch=torch.__version__, triton=triton.__version__, B=B, H=H, gamma=GAMMA,
                       chunk=C, rows=rows), fh, indent=1)
    print_table(rows)
    try:
        plot(rows, os.path.join(args.out, "bench.png"), name)
    except Exception as exc:  # noqa: BLE001
        print(f"[bench] plot failed: {exc!r}")


def print_table(rows):
    by = {(r["T"], r["d"], r["method"]): r for r in rows}
    shapes = sorted({(r["T"], r["d"]) for r in rows}, key=lambda s: (s[1], s[0]))
    methods = ["chunk_hla2", "chunk_ahla", "chunk_hla3", "first_order_la", "fla_chunk_simple_gla",
               "sdpa_causal", "torch_chunked_hla2"]
    label = {"fla_chunk_simple_gla": "fla chunk_simple_gla", "sdpa_causal": "SDPA causal",
             "torch_chunked_hla2": "plain-torch chunked HLA2"}
    print("\n| T, d | " + " | ".join(label.get(m, m) for m in methods) + " | hla2 / fla | SDPA / hla2 |")
    print("|---" * (len(methods) + 3) + "|")
    for T, d in shapes:
        cells = []
        for m in methods:
            r = by.get((T, d, m))
            cells.append(f"{r['ms']:.3f} ms ({r['tflops']:.0f} TF/s)" if r else "-")
        h = by.get((T, d, "chunk_hla2"))
        f = by.get((T, d, "fla_chunk_simple_gla"))
        s = by.get((T, d, "sdpa_causal"))
        r1 = f"{h['ms'] / f['ms']:.2f}" if h and f else "-"
        r2 = f"{s['ms'] / h['ms']:.2f}" if h and s else "-"
        print(f"| {T // 1024}K, {d} | " + " | ".join(cells) + f" | {r1} | {r2} |")
    sys.stdout.flush()


def plot(rows, path, gpu):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = sorted({(r["T"], r["d"]) for r in rows}, key=lambda s: (s[1], s[0]))
    methods = sorted({r["method"] for r in rows})
    by = {(r["T"], r["d"], r["method"]): r["ms"] for r in rows}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ax.bar([j + i * w for j in range(len(shapes))], [by.get((T, d, m), float("nan")) for T, d in shapes],
               w, label=m)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(shapes))])
    ax.set_xticklabels([f"T={T // 1024}K, d={d}" for T, d in shapes])
    ax.set_yscale("log")
    ax.set_ylabel("ms (median, log scale)")
    ax.set_title(f"bf16, B={B}, H={H}, gamma={GAMMA} on {gpu}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"[bench] plot saved to {path}")


if __name__ == "__main__":
    main()
