"""Numerics study: kernel error against a float64 reference as T grows (see docs/numerics.md).

    python -m kernels.numerics --out DIR            # on the GPU
    python -m kernels.numerics --mpmath --out DIR   # on the CPU: float64 vs mpmath, small d
    python -m kernels.numerics --tables --out DIR   # the markdown tables of docs/numerics.md
    python -m kernels.numerics --backward --out DIR # gradients on the GPU (numerics_backward.json / .png)
    python -m kernels.numerics --backward-tables --out DIR

GPU part: B=1, H=4, d=dv=64, inputs N(0,1)/sqrt(d) rounded to the tested dtype, T up to
16K, gamma in {1, 0.99}, ops hla2 / ahla / hla3 (--ops), dtypes bf16 / fp32, chunked and (T <= 4K)
recurrent kernels. The reference is the float64 chunked kernel on the same rounded
inputs; its own error is bounded by the error model with u = 2^-53 (about 1e-11 of
|op| at T = 16K) and it is checked against mpmath by the --mpmath part. Also computed:
the paper's state form o_t = q_t^T (S_t C_t - G_t) for HLA2 in fp32 (torch, token by
token), where G_t = g^2 G_{t-1} + g k_t k_t^T C_{t-1} removes the i > j terms.

--backward: the same inputs with a cotangent do ~ N(0, 1) rounded likewise; the gradients
dq, dk, dv of sum(o * do) through the kernels' backward (kernels/backward.py) against the
float64 kernel gradients on the same rounded inputs, and max |err| / |g|abs against the
backward model's beta_b (hla_core/error_model.py: |g|abs is the float64 gradient on
|q|, |k|, |v|, |do|).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def paper_form_hla2(q, k, v, gamma):
    """q_t^T (S_t C_t - G_t) token by token in fp32, all heads at once ([1, T, H, d])."""
    _, T, H, d = q.shape
    dv = v.shape[-1]
    q, k, v = (x[0].float() for x in (q, k, v))
    S = torch.zeros(H, d, d, device=q.device)
    Cm = torch.zeros(H, d, dv, device=q.device)
    G = torch.zeros(H, d, dv, device=q.device)
    o = torch.empty(T, H, dv, device=q.device)
    for t in range(T):
        kt, qt, vt = k[t], q[t], v[t]
        kk = kt[:, :, None] * kt[:, None, :]
        G = gamma * gamma * G + gamma * kk @ Cm
        S = gamma * S + kk
        Cm = gamma * Cm + qt[:, :, None] * vt[:, None, :]
        o[t] = (qt[:, None, :] @ (S @ Cm - G))[:, 0]
    return o[None]


def gpu_study(out, ops=("hla2", "ahla", "hla3")):
    import kernels
    dev = "cuda"
    H, d = 4, 64
    Ts = [256, 1024, 4096, 16384]
    rows = []
    for op in ops:
        chunk = getattr(kernels, f"chunk_{op}")
        rec = getattr(kernels, f"fused_recurrent_{op}")
        for gamma in (1.0, 0.99):
            for T in Ts:
                g = torch.Generator(device=dev).manual_seed(T)
                base = torch.randn(3, 1, T, H, d, device=dev, generator=g, dtype=torch.float64) * d ** -0.5
                for dtn, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
                    q, k, v = (x.to(dt) for x in base)
                    q64, k64, v64 = (x.double() for x in (q, k, v))
                    t0 = time.time()
                    ref, st = chunk(q64, k64, v64, gamma=gamma, output_final_state=True)
                    absop, _ = chunk(q64.abs(), k64.abs(), v64.abs(), gamma=gamma)
                    o, _ = chunk(q, k, v, gamma=gamma)
                    r = dict(op=op, gamma=gamma, T=T, dtype=dtn,
                             chunk_rel=rel(o, ref),
                             chunk_vs_absop=((o.double() - ref).abs() / absop).max().item(),
                             state_max=max(x.abs().max().item() for x in st if x is not None),
                             state_max_by={nm: x.abs().max().item() for nm, x in st._asdict().items()
                                           if x is not None},
                             out_max=ref.abs().max().item(), absop_over_out=(absop.norm() / ref.norm()).item())
                    if T <= 4096:
                        orec, _ = rec(q, k, v, gamma=gamma)
                        r["recurrent_rel"] = rel(orec, ref)
                    if op == "hla2" and dtn == "fp32" and T <= 4096:
                        r["paper_form_fp32_rel"] = rel(paper_form_hla2(q, k, v, gamma), ref)
                    rows.append(r)
                    print(f"[numerics] {json.dumps(r)} ({time.time() - t0:.1f}s)", flush=True)
    os.makedirs(out, exist_ok=True)
    name = "numerics.json" if tuple(ops) == ("hla2", "ahla", "hla3") else f"numerics_{'_'.join(ops)}.json"
    with open(os.path.join(out, name), "w") as fh:
        json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows), fh, indent=1)
    plot(rows, os.path.join(out, name.replace(".json", ".png")))


def _figure(rows):
    """One log-log panel per operator in rows, sharing the error axis: (figure, [(axis, op)])."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ops = [o for o in ("hla2", "ahla", "hla3") if any(r["op"] == o for r in rows)]
    fig, axes = plt.subplots(1, len(ops), figsize=(5.5 * len(ops), 4.2), sharey=True, squeeze=False)
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.grid(alpha=.3)
    return fig, list(zip(axes[0], ops))


def _save(fig, panels, ylabel, path, **legend):
    panels[0][0].set_ylabel(ylabel)
    panels[-1][0].legend(**legend)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(rows, path):
    fig, panels = _figure(rows)
    for ax, op in panels:
        for gamma, ls in ((1.0, "-"), (0.99, "--")):
            for dtn, c in (("bf16", "C0"), ("fp32", "C1")):
                rr = [r for r in rows if r["op"] == op and r["gamma"] == gamma and r["dtype"] == dtn]
                ax.plot([r["T"] for r in rr], [r["chunk_rel"] for r in rr], ls, color=c, marker="o",
                        label=f"chunk {dtn}, gamma={gamma}")
                rq = [r for r in rr if "recurrent_rel" in r]
                ax.plot([r["T"] for r in rq], [r["recurrent_rel"] for r in rq], ls, color=c, marker="x", alpha=.5,
                        label=f"recurrent {dtn}, gamma={gamma}")
            pf = [r for r in rows if r["op"] == op and r["gamma"] == gamma and "paper_form_fp32_rel" in r]
            if pf:
                ax.plot([r["T"] for r in pf], [r["paper_form_fp32_rel"] for r in pf], ls, color="C3", marker="s",
                        label=f"paper form S C - G fp32, gamma={gamma}")
        ax.set_title(op)
    _save(fig, panels, "||o - o_ref|| / ||o_ref||", path, fontsize=7)
    print(f"[numerics] plot saved to {path}")


def _grads(fn, xs, do, dt, gamma):
    xs = [x.detach().to(dt).clone().requires_grad_(True) for x in xs]
    o, _ = fn(*xs, gamma=gamma)
    (o * do.to(dt)).sum().backward()
    return [x.grad.double() for x in xs]


def backward_study(out, ops=("hla2", "ahla", "hla3"), dev="cuda", Ts=(256, 1024, 4096, 16384), H=4, d=64):
    """Gradient error vs T on the GPU (module docstring, --backward)."""
    import kernels
    from hla_core import error_model
    C = 64
    rows = []
    for op in ops:
        chunk = getattr(kernels, f"chunk_{op}")
        rec = getattr(kernels, f"fused_recurrent_{op}")
        mop = "hla3" if op == "hla3" else None
        for gamma in (1.0, 0.99):
            for T in Ts:
                g = torch.Generator(device=dev).manual_seed(T)
                base = torch.randn(4, 1, T, H, d, device=dev, generator=g, dtype=torch.float64)
                base[:3] *= d ** -0.5
                for dtn, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
                    q, k, v, do = (x.to(dt).double() for x in base)
                    t0 = time.time()
                    ref = _grads(chunk, (q, k, v), do, torch.float64, gamma)
                    gabs = _grads(chunk, (q.abs(), k.abs(), v.abs()), do.abs(), torch.float64, gamma)
                    got = _grads(chunk, (q, k, v), do, dt, gamma)
                    bb = error_model.backward_beta(dt, T, d, C, gamma, op=mop)
                    r = dict(op=op, gamma=gamma, T=T, dtype=dtn, beta_b=bb,
                             rho_b=error_model.backward_normwise_coefficient(dt, T=T, d=d, chunk_size=C,
                                                                             gamma=gamma, op=mop))
                    for nm, a, b, ga in zip("qkv", got, ref, gabs):
                        r[f"d{nm}_rel"] = rel(a, b)
                        r[f"d{nm}_vs_gabs"] = ((a - b).abs() / ga).max().item()
                        r[f"d{nm}_gabs_over_g"] = (ga.norm() / b.norm()).item()
                        r[f"d{nm}_max"] = b.abs().max().item()
                    r["max_vs_gabs"] = max(r[f"d{nm}_vs_gabs"] for nm in "qkv")
                    if T <= 4096:
                        grec = _grads(rec, (q, k, v), do, dt, gamma)
                        for nm, a, b in zip("qkv", grec, ref):
                            r[f"d{nm}_rec_rel"] = rel(a, b)
                    rows.append(r)
                    print(f"[numerics-bwd] {json.dumps(r)} ({time.time() - t0:.1f}s)", flush=True)
    os.makedirs(out, exist_ok=True)
    name = "numerics_backward.json" if tuple(ops) == ("hla2", "ahla", "hla3") else \
        f"numerics_backward_{'_'.join(ops)}.json"
    with open(os.path.join(out, name), "w") as fh:
        json.dump(dict(gpu=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
                       B=1, H=H, d=d, dv=d, chunk=C,
                       rows=rows), fh, indent=1)
    plot_backward(rows, os.path.join(out, name.replace(".json", ".png")))


def plot_backward(rows, path):
    fig, panels = _figure(rows)
    for ax, op in panels:
        for dtn, c in (("bf16", "C0"), ("fp32", "C1")):
            for nm, mk in (("q", "o"), ("k", "s"), ("v", "^")):
                for gamma, ls in ((1.0, "-"), (0.99, "--")):
                    rr = [r for r in rows if r["op"] == op and r["gamma"] == gamma and r["dtype"] == dtn]
                    ax.plot([r["T"] for r in rr], [r[f"d{nm}_rel"] for r in rr], ls, color=c, marker=mk,
                            label=f"d{nm} chunk {dtn}, gamma={gamma}")
        ax.set_title(f"{op}: gradients vs float64 kernel gradients")
    _save(fig, panels, "||g - g_ref|| / ||g_ref||", path, fontsize=6, ncol=2)
    print(f"[numerics-bwd] plot saved to {path}")


def backward_tables(path):
    """Markdown table of docs/numerics.md (gradients) from numerics_backward.json."""
    f = lambda x: "-" if x is None else f"{x:.3g}" if abs(x) >= 0.01 else f"{x:.2e}"  # noqa: E731
    with open(path) as fh:
        rows = json.load(fh)["rows"]
    print("| op | γ | dtype | T | dq rel. err | dk rel. err | dv rel. err | recurrent dq / dk / dv | "
          "max \\|err\\|/\\|g\\|abs | β_b + u_out(1+β_b) | bound / max |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        recs = " / ".join(f(r.get(f"d{n}_rec_rel")) for n in "qkv") if "dq_rec_rel" in r else "-"
        print(f"| {r['op']} | {r['gamma']} | {r['dtype']} | {r['T']} | {f(r['dq_rel'])} | {f(r['dk_rel'])} | "
              f"{f(r['dv_rel'])} | {recs} | {f(r['max_vs_gabs'])} | {f(r['rho_b'])} | "
              f"{r['rho_b'] / r['max_vs_gabs']:.0f} |")


def mpmath_study(out, ops=("hla2", "ahla", "hla3")):
    """float64 recurrent and chunked kernels (interpreter) vs an mpmath recurrence, d = 2, dv = 1."""
    import mpmath
    import kernels
    mpmath.mp.dps = 40
    rows = []
    for op in ops:
        for gamma in (1.0, 0.99):
            for T in (256, 4096, 16384):
                rng = np.random.default_rng(T)
                d, dv = 2, 1
                q, k, v = (rng.standard_normal((T, n)) / np.sqrt(d) for n in (d, d, dv))
                t0 = time.time()
                g = mpmath.mpf(gamma)
                Q = [[mpmath.mpf(float(x)) for x in row] for row in q]
                K = [[mpmath.mpf(float(x)) for x in row] for row in k]
                V = [[mpmath.mpf(float(x)) for x in row] for row in v]
                ref = np.zeros((T, dv))
                if op == "hla2":
                    S = [[mpmath.mpf(0)] * d for _ in range(d)]
                    X = [[mpmath.mpf(0)] * dv for _ in range(d)]
                    for t in range(T):
                        S = [[g * S[a][b] + K[t][a] * K[t][b] for b in range(d)] for a in range(d)]
                        sq = [mpmath.fsum(S[a][b] * Q[t][b] for b in range(d)) for a in range(d)]
                        X = [[g * g * X[a][c] + sq[a] * V[t][c] for c in range(dv)] for a in range(d)]
                        ref[t] = [float(mpmath.fsum(Q[t][a] * X[a][c] for a in range(d))) for c in range(dv)]
                elif op == "hla3":
                    # online update: S = g S + k k^T, P = g P + k v^T, X = g^3 X + (S q)(q^T P)
                    S = [[mpmath.mpf(0)] * d for _ in range(d)]
                    P = [[mpmath.mpf(0)] * dv for _ in range(d)]
                    X = [[mpmath.mpf(0)] * dv for _ in range(d)]
                    for t in range(T):
                        S = [[g * S[a][b] + K[t][a] * K[t][b] for b in range(d)] for a in range(d)]
                        P = [[g * P[a][c] + K[t][a] * V[t][c] for c in range(dv)] for a in range(d)]
                        sq = [mpmath.fsum(S[a][b] * Q[t][b] for b in range(d)) for a in range(d)]
                        qp = [mpmath.fsum(Q[t][a] * P[a][c] for a in range(d)) for c in range(dv)]
                        X = [[g * g * g * X[a][c] + sq[a] * qp[c] for c in range(dv)] for a in range(d)]
                        ref[t] = [float(mpmath.fsum(Q[t][a] * X[a][c] for a in range(d))) for c in range(dv)]
                else:
                    P = [[mpmath.mpf(0)] * dv for _ in range(d)]
                    E = [[mpmath.mpf(0)] * dv for _ in range(d)]
                    for t in range(T):
                        P = [[g * P[a][c] + K[t][a] * V[t][c] for c in range(dv)] for a in range(d)]
                        qp = [mpmath.fsum(Q[t][a] * P[a][c] for a in range(d)) for c in range(dv)]
                        E = [[g * E[a][c] + K[t][a] * qp[c] for c in range(dv)] for a in range(d)]
                        ref[t] = [float(mpmath.fsum(Q[t][a] * E[a][c] for a in range(d))) for c in range(dv)]
                tq, tk, tv = (torch.tensor(x)[None, :, None, :] for x in (q, k, v))
                r = dict(op=op, gamma=gamma, T=T)
                for mode in ("chunk", "fused_recurrent"):
                    o, _ = getattr(kernels, f"{mode}_{op}")(tq, tk, tv, gamma=gamma)
                    o = o[0, :, 0].numpy()
                    r[f"{mode}_f64_rel"] = float(np.linalg.norm(o - ref) / np.linalg.norm(ref))
                rows.append(r)
                print(f"[mpmath] {json.dumps(r)} ({time.time() - t0:.1f}s)", flush=True)
    os.makedirs(out, exist_ok=True)
    name = "numerics_mpmath.json" if tuple(ops) == ("hla2", "ahla", "hla3") else \
        f"numerics_mpmath_{'_'.join(ops)}.json"
    with open(os.path.join(out, name), "w") as fh:
        json.dump(rows, fh, indent=1)


def tables(gpu_json, mpmath_json):
    """Markdown tables of docs/numerics.md from the two studies' raw rows."""
    f = lambda x: "-" if x is None else f"{x:.3g}" if abs(x) >= 0.01 else f"{x:.2e}"  # noqa: E731
    with open(gpu_json) as fh:
        rows = json.load(fh)["rows"]
    print("| op | γ | dtype | T | chunk rel. err | recurrent rel. err | max \\|err\\|/\\|op\\| "
          "| paper form (fp32) rel. err | max \\|state\\| |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['gamma']} | {r['dtype']} | {r['T']} | {f(r['chunk_rel'])} | "
              f"{f(r.get('recurrent_rel'))} | {f(r['chunk_vs_absop'])} | {f(r.get('paper_form_fp32_rel'))} | "
              f"{f(r['state_max'])} |")
    print("\n| op | γ | T | chunk float64 vs mpmath | recurrent float64 vs mpmath |")
    print("|---|---|---|---|---|")
    with open(mpmath_json) as fh:
        mp_rows = json.load(fh)
    for r in mp_rows:
        print(f"| {r['op']} | {r['gamma']} | {r['T']} | {f(r['chunk_f64_rel'])} | {f(r['fused_recurrent_f64_rel'])} |")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs")
    ap.add_argument("--mpmath", action="store_true")
    ap.add_argument("--backward", action="store_true", help="gradient error vs T (GPU)")
    ap.add_argument("--backward-tables", action="store_true", help="print the table of --out/numerics_backward.json")
    ap.add_argument("--ops", default="hla2,ahla,hla3", help="comma-separated subset of hla2,ahla,hla3")
    ap.add_argument("--tables", action="store_true",
                    help="print the markdown tables of --out/numerics.json and --out/numerics_mpmath.json")
    a = ap.parse_args(argv)
    ops = tuple(a.ops.split(","))
    if a.backward_tables:
        backward_tables(os.path.join(a.out, "numerics_backward.json"))
    elif a.backward:
        backward_study(a.out, ops)
    elif a.tables:
        tables(os.path.join(a.out, "numerics.json"), os.path.join(a.out, "numerics_mpmath.json"))
    elif a.mpmath:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        mpmath_study(a.out, ops)
    else:
        gpu_study(a.out, ops)


if __name__ == "__main__":
    main()
