"""Worker processes for property_tests/test_cp.py (and the GPU check in kernels/bench_cp.py):
each rank runs every scenario on its slice with cp_group and saves what it got.

A scenario is a dict: op, lengths (tokens per rank), B, H, d, dv, gamma (None, float or
per-head list), normalize, init (rank 0 passes an initial state), dfin (each rank puts a
cotangent on its final state), chunk_size, segment_chunks, seed, dtype. The inputs are
the same on every rank (drawn from the seed); each rank keeps its slice.
"""
from __future__ import annotations

import os

import torch

import kernels

OPS = {"hla2": (kernels.chunk_hla2, kernels.HLA2State), "ahla": (kernels.chunk_ahla, kernels.AHLAState),
       "hla3": (kernels.chunk_hla3, kernels.HLA3State)}


def inputs(sc, device="cpu"):
    """Full-sequence q, k, v, do, and the initial state / final-state cotangents (by rank)."""
    dt = getattr(torch, sc.get("dtype", "float64"))
    g = torch.Generator().manual_seed(sc["seed"])
    B, H, d, dv, T = sc["B"], sc["H"], sc["d"], sc["dv"], sum(sc["lengths"])
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    # nonnegative q, k keep normalized denominators away from zero
    q = (rnd(B, T, H, d).abs() / d ** 0.5) if sc["normalize"] else rnd(B, T, H, d) / d ** 0.5
    k = (rnd(B, T, H, d).abs() / d ** 0.5) if sc["normalize"] else rnd(B, T, H, d) / d ** 0.5
    v = rnd(B, T, H, dv) / T
    do = rnd(B, T, H, dv)
    cls = OPS[sc["op"]][1]
    # a template state gives the shapes: run one token without a state
    with torch.no_grad():
        one = [x[:, :1].to(device) for x in (q, k, v)]
        _, tmpl = OPS[sc["op"]][0](*one, gamma=_gamma(sc), normalize=sc["normalize"], output_final_state=True)
    init = None
    if sc.get("init"):
        init = cls(*[None if x is None else (rnd(*x.shape).abs() if sc["normalize"] else rnd(*x.shape)) / T
                     for x in tmpl])
    dfin = []
    for _ in sc["lengths"]:
        dfin.append(cls(*[None if x is None else rnd(*x.shape) for x in tmpl]) if sc.get("dfin") else None)
    cast = lambda x: x.to(device=device, dtype=dt)  # noqa: E731
    cast_s = lambda s: None if s is None else type(s)(*[None if x is None else x.to(device) for x in s])  # noqa: E731
    return cast(q), cast(k), cast(v), cast(do), cast_s(init), [cast_s(x) for x in dfin]


def _gamma(sc):
    g = sc.get("gamma")
    return torch.tensor(g, dtype=torch.float64) if isinstance(g, list) else g


def run_rank(sc, rank, group, device="cpu"):
    """This rank's (o, final state, dq, dk, dv, d initial state or None) of scenario sc."""
    fn = OPS[sc["op"]][0]
    q, k, v, do, init, dfin = inputs(sc, device)
    lo = sum(sc["lengths"][:rank])
    hi = lo + sc["lengths"][rank]
    xs = [x[:, lo:hi].clone().requires_grad_(True) for x in (q, k, v)]
    st = None
    if rank == 0 and init is not None:
        st = type(init)(*[None if x is None else x.clone().requires_grad_(True) for x in init])
    gamma, normalize = _gamma(sc), sc["normalize"]
    bad = sc.get("bad") if rank == 1 or sc.get("bad") == "varlen" else None  # test_cp: rank 1 differs
    if bad == "gamma":
        gamma = 0.5
    elif bad == "dv":
        xs[2] = xs[2][..., :-1].detach().requires_grad_(True)
    elif bad == "normalize":
        normalize = not normalize
    elif bad == "local_gamma":   # fails rank 1's own checks, before the ranks compare headers
        gamma = 1.5
    elif bad == "local_shape":
        xs[1] = xs[1][..., :-1].detach().requires_grad_(True)
    elif bad == "varlen":  # on every rank
        cu = torch.tensor([0, hi - lo], dtype=torch.int32, device=device)
        return dict(o=fn(*xs, cu_seqlens=cu, cp_group=group))
    elif bad == "init":
        _, st = fn(xs[0][:, :1].detach(), xs[1][:, :1].detach(), xs[2][:, :1].detach(), output_final_state=True)
    import kernels.backward as kb
    query_pair = kb.QUERY_PAIR
    if bad == "fusions":  # a different backward launch plan (HLA_BWD_QUERY_PAIR=0 on rank 1 only)
        kb.QUERY_PAIR = False
    try:
        o, fin = fn(*xs, gamma=gamma, normalize=normalize, chunk_size=sc.get("chunk_size", 64),
                    segment_chunks=sc.get("segment_chunks"), initial_state=st, output_final_state=True,
                    cp_group=group)
    finally:
        kb.QUERY_PAIR = query_pair
    loss = (o * do[:, lo:hi]).sum()
    if dfin[rank] is not None:
        loss = loss + sum((a * b).sum() for a, b in zip(fin, dfin[rank]) if a is not None)
    loss.backward()
    dst = None if st is None else [None if x is None else x.grad for x in st]
    return dict(o=o.detach(), fin=[None if x is None else x.detach() for x in fin],
                grads=[x.grad for x in xs], dinit=dst)


def worker(rank, world, scenarios, init_file, out_dir, backend="gloo"):
    import torch.distributed as dist
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    device = "cuda" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    try:
        res = []
        for sc in scenarios:
            try:
                r = run_rank(sc, rank, dist.group.WORLD, device)
                res.append({key: _cpu(val) for key, val in r.items()})
            except Exception as exc:  # noqa: BLE001 - reported to the test
                res.append({"error": f"{type(exc).__name__}: {exc}"})
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, (list, tuple)):
        return [_cpu(y) for y in x]
    return x
