"""Context parallelism (kernels/cp.py): a sequence split across the ranks of a process group
computes what one process computes on the whole sequence.

Every rank (gloo, separate processes, float64 under TRITON_INTERPRET on CPU) runs its slice
with cp_group, a cotangent on its output and on its final state, and backward. The
single-process lines it is compared with, both in this process: the whole sequence in one
call (outputs, and the last rank's final state), and the same slices run one after the
other, each continuing from the previous one's final state, autograd through the hand-off
(outputs, every rank's final state, and every gradient, the initial state's included).
The cross-rank ⊕ is the engine's: the generated first-order ⊕ and suffix ⊕ are checked
against the derivation symbolically.
"""
from __future__ import annotations

import os
import tempfile
import time

import pytest
import sympy
import torch
import torch.multiprocessing as mp

from property_tests import cp_worker as W

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

TOL = 1e-10


def run_world(world, scenarios, backend="gloo", timeout=None):
    """Spawn `world` ranks running every scenario; returns [rank][scenario] results. Ranks
    still running after `timeout` seconds are killed and the test fails: a hang (a rank
    waiting in a collective the others never join) is a failure, not a stuck suite."""
    # a fresh GPU machine compiles every float64 kernel first (the 2-rank GPU case took most of 200 s)
    timeout = timeout or (600 if backend == "nccl" else 240) + 60 * len(scenarios)
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        ctx = mp.start_processes(W.worker, args=(world, scenarios, init_file, tmp, backend), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail(f"the {world} ranks did not finish within {timeout} s: a rank hangs in a collective")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def single_process(sc, device="cpu"):
    """(whole-sequence o and final state; per-slice hand-off results like the ranks')."""
    fn = W.OPS[sc["op"]][0]
    q, k, v, do, init, dfin = W.inputs(sc, device)
    kw = dict(gamma=W._gamma(sc), normalize=sc["normalize"], chunk_size=sc.get("chunk_size", 64),
              output_final_state=True)
    with torch.no_grad():
        whole = fn(q, k, v, initial_state=init, **kw)
    xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    st0 = None if init is None else type(init)(*[None if x is None else x.clone().requires_grad_(True)
                                                  for x in init])
    st, lo, per, loss = st0, 0, [], 0
    for r, n in enumerate(sc["lengths"]):
        o, fin = fn(*(x[:, lo:lo + n] for x in xs), initial_state=st, **kw)
        loss = loss + (o * do[:, lo:lo + n]).sum()
        if dfin[r] is not None:
            loss = loss + sum((a * b).sum() for a, b in zip(fin, dfin[r]) if a is not None)
        per.append((o, fin))
        st, lo = fin, lo + n
    loss.backward()
    dinit = None if st0 is None else [None if x is None else x.grad for x in st0]
    return whole, per, [x.grad for x in xs], dinit


def rel(got, want):
    got, want = got.cpu(), want.cpu()
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def check(sc, results, device="cpu"):
    (wo, wfin), per, grads, dinit = single_process(sc, device)
    bounds = [0]
    for n in sc["lengths"]:
        bounds.append(bounds[-1] + n)
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}: {res.get('error')}"
        lo, hi = bounds[r], bounds[r + 1]
        o, fin = per[r]
        assert rel(res["o"], wo[:, lo:hi]) <= TOL, (r, "o vs whole sequence")
        assert rel(res["o"], o.detach()) <= TOL, (r, "o vs hand-off")
        for a, b in zip(res["fin"], fin):
            if b is not None:
                assert rel(a, b.detach()) <= TOL, (r, "final state")
        for name, a, b in zip("qkv", res["grads"], grads):
            assert rel(a, b[:, lo:hi]) <= TOL, (r, f"d{name}")
    for a, b in zip(*(results[-1]["fin"], wfin)):
        if b is not None:
            assert rel(a, b) <= TOL, "last rank's final state vs whole sequence"
    if dinit is not None:
        for a, b in zip(results[0]["dinit"], dinit):
            if b is not None:
                assert rel(a, b) <= TOL, "initial-state gradient"


BASE = dict(B=1, H=2, d=4, dv=3, chunk_size=16, segment_chunks=1, dtype="float64")
SCENARIOS = {
    2: [dict(BASE, op="hla2", lengths=[21, 40], gamma=0.9, normalize=False, init=True, dfin=True, seed=1),
        dict(BASE, op="ahla", lengths=[1, 33], gamma=[0.8, 0.95], normalize=True, init=True, dfin=True, seed=2,
             B=2),
        dict(BASE, op="hla3", lengths=[17, 5], gamma=None, normalize=False, init=False, dfin=True, seed=3,
             segment_chunks=None)],
    3: [dict(BASE, op="hla2", lengths=[18, 1, 35], gamma=[0.7, 0.9], normalize=True, init=True, dfin=True, seed=4),
        dict(BASE, op="ahla", lengths=[16, 20, 3], gamma=None, normalize=False, init=False, dfin=False, seed=5),
        dict(BASE, op="hla3", lengths=[5, 33, 1], gamma=0.85, normalize=True, init=True, dfin=True, seed=6)],
}


# CI runs the first scenario of each world size (operators, decays, normalization, initial
# state and uneven slices are spread over the two); the thorough profile runs them all
CI_SCENARIOS = {2: [dict(SCENARIOS[2][0], lengths=[21, 19])], 3: [dict(SCENARIOS[3][0], lengths=[5, 1, 20])]}


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_one_process(world):
    thorough = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
    scenarios = SCENARIOS[world] if thorough else CI_SCENARIOS[world]
    results = run_world(world, scenarios)
    for i, sc in enumerate(scenarios):
        check(sc, [results[r][i] for r in range(world)])


GPU = dict(B=2, H=4, d=32, dv=24, chunk_size=64, segment_chunks=2, dtype="float64")
GPU_SCENARIOS = [
    dict(GPU, op="hla2", lengths=[300, 1, 517, 190], gamma=[0.9, 0.99, 0.999, 1.0], normalize=False, init=True,
         dfin=True, seed=11),
    dict(GPU, op="ahla", lengths=[129, 64, 250, 3], gamma=0.97, normalize=True, init=True, dfin=True, seed=12),
    dict(GPU, op="hla3", lengths=[200, 333, 1, 65], gamma=0.95, normalize=True, init=True, dfin=True, seed=13,
         segment_chunks=None),
]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_equal_one_process_gpu(world):
    """The same on GPUs (NCCL, one GPU per rank), float64, longer uneven slices."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    scenarios = [dict(sc, lengths=sc["lengths"][:world - 1] + [sum(sc["lengths"][world - 1:])]) for sc in GPU_SCENARIOS]
    results = run_world(world, scenarios, backend="nccl")
    for i, sc in enumerate(scenarios):
        check(sc, [results[r][i] for r in range(world)], device="cuda")


def test_bad_use_is_named():
    """Ranks disagreeing on the arguments (or on the backward's launch switches, which decide
    its exchanges), an initial state off rank 0, cu_seqlens: the same
    clear error on every rank; arguments that fail one rank's own checks: that error there,
    and on the others an error naming that rank (nothing hangs either way)."""
    sc = dict(BASE, op="hla2", lengths=[3, 4], gamma=0.9, normalize=False, init=False, dfin=False, seed=7)
    rejected = "rank(s) [1] rejected their arguments"
    want = {"gamma": ["disagree on gamma"] * 2, "dv": ["disagree on dv"] * 2,
            "init": ["initial_state: with cp_group"] * 2, "normalize": ["disagree on normalize"] * 2,
            "varlen": ["cu_seqlens: not supported"] * 2,
            "fusions": ["disagree on backward launch fusions"] * 2,
            "local_gamma": [rejected, "gamma must lie in (0, 1]"],
            "local_shape": [rejected, "k shape"]}
    bad = [dict(sc, bad=b) for b in want]
    results = run_world(2, bad, timeout=240)   # cp_worker.run_rank applies `bad` on rank 1 (varlen: on both)
    for i, b in enumerate(bad):
        for r in range(2):
            err = results[r][i].get("error", "")
            assert want[b["bad"]][r] in err, (b["bad"], r, err)


def test_cp_group_needs_chunk_form_and_a_group():
    import kernels
    q = torch.randn(1, 4, 1, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="cp_group"):   # the token-by-token form has no cp_group
        kernels.fused_recurrent_hla2(q, q, q, cp_group=object())
    with pytest.raises((RuntimeError, TypeError), match="cp_group"):
        kernels.chunk_hla2(q, q, q, cp_group=object())


def test_cross_rank_combines_are_the_derivation():
    """The generated ⊕ kernels/cp.py folds with equals the engine's first-order ⊕ (and the
    suffix ⊕ of its value-gradient term), as symbols."""
    from derivations import derive
    from derivations.gradients import all_gradient_terms, synthesize_term
    from hla_core.registry import OPERATORS
    from kernels import cp
    pattern = OPERATORS["la"].pattern
    A, B, r = sympy.symbols("A B r")

    def as_symbols(combine):
        (name,) = combine
        by_name = {str(x): x for x in combine[name].free_symbols}
        return combine[name].subs({by_name[f"{name}_A"]: A, by_name[f"{name}_B"]: B, by_name["rho_B"]: r})
    forward = as_symbols(derive(pattern, prove=False).combine)
    (term,) = all_gradient_terms(pattern)["v"]
    suffix = as_symbols(synthesize_term(term).suffix.combine_sympy())
    assert sympy.expand(cp.forward_combine()(A, B, r) - forward) == 0, forward
    assert sympy.expand(cp.reverse_combine()(A, B, r) - suffix) == 0, suffix
