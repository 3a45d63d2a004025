"""Property tests: Triton HLA2 / AHLA kernels against the float64 references, and the
helpers every kernel test shares (test_kernels_hla3.py runs the same checks for HLA3).

CPU (CI): TRITON_INTERPRET=1, small shapes (`ci` profile). GPU: HYPOTHESIS_PROFILE=gpu
without TRITON_INTERPRET, larger shapes, same properties. What is checked, and why it can
fail:

- Algorithm (float64): <= 1e-10 relative, output and final state. Hypothesis draws the
  shapes; explicit cases (PATH_CASES) run on every run the paths a random draw seldom
  reaches: several sequence segments (the summary-and-fold path) with and without an
  initial state, varlen (int32 and int64 cu_seqlens) and normalize, chunk_size 128,
  several value blocks per head, non-contiguous inputs and states, eps != 1e-6, gamma <
  1e-3. Hand-off: every ordered pair of chunk / recurrent / reference that runs a
  kernel, split at a random token, output and final state checked.
- Rounding (fp32 / fp16 / bf16): nonnegative q, k, v and initial state, where |op| = o
  and the error model (hla_core/error_model.py) bounds the error norm-wise by about beta
  ||o|| (2 beta normalized): an output 10% off or a dropped carry fails. Random-sign and
  adversarially scaled inputs keep the element-wise bound relative to |op|, which is all
  the model can promise there (|op| can exceed |o| by orders of magnitude). Final states
  come back in fp32 and are checked the same way.
- Arguments: every bad input raises an error naming the argument and what was expected;
  numpy scalars are accepted; a gamma that requires grad raises (the backward, tested in
  test_kernels_backward.py, has no gamma gradient), and so does any input that requires
  grad in the forward-only runner kernels.gla.run_chain.

bf16 in the interpreter goes through fp32 dots (kernels._common.dot_dtype), never a bf16
tl.dot; the bf16 regression shapes (a GPU bf16-dot failure, run-to-run variation) run on
the GPU only.
"""
from __future__ import annotations

import inspect
import os

import numpy as np
import pytest
import torch
import triton
from hypothesis import Phase, given, note, settings
from hypothesis import strategies as st

import hla_core
import kernels
from hla_core import error_model

ON_GPU = os.environ.get("HYPOTHESIS_PROFILE") == "gpu" and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] != "1":
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1", allow_module_level=True)

MAX_T = 300 if ON_GPU else 72
MAX_D = 64 if ON_GPU else 12
MAX_B = 3 if ON_GPU else 2
MAX_H = 4 if ON_GPU else 3

FNS = {
    ("hla2", "chunk"): kernels.chunk_hla2, ("hla2", "recurrent"): kernels.fused_recurrent_hla2,
    ("ahla", "chunk"): kernels.chunk_ahla, ("ahla", "recurrent"): kernels.fused_recurrent_ahla,
    ("hla3", "chunk"): kernels.chunk_hla3, ("hla3", "recurrent"): kernels.fused_recurrent_hla3,
}
STATE_CLS = {"hla2": kernels.HLA2State, "ahla": kernels.AHLAState, "hla3": kernels.HLA3State}
# numerator carries, and {numerator key: v -> 1 carry} (the denominator of the normalized form)
NUM_KEYS = {"hla2": ("KK", "KK_QV"), "ahla": ("KV", "KQ_KV"), "hla3": ("KK", "KV", "KK_QQ_KV")}
ONES_KEYS = {"hla2": {"KK": "KK", "KK_QV": "KK_Q1"}, "ahla": {"KV": "K1", "KQ_KV": "KQ_K1"},
             "hla3": {"KK": "KK", "KV": "K1", "KK_QQ_KV": "KK_QQ_K1"}}
TDT = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LOW = ["float32", "float16", "bfloat16"]
# every ordered pair of modes that runs at least one kernel (reference -> reference runs none)
HANDOFFS = [(a, b) for a in ("chunk", "recurrent", "reference") for b in ("chunk", "recurrent", "reference")
            if (a, b) != ("reference", "reference")]


def examples(ci: int, gpu: int = 15):
    """Examples per parametrized case: `ci` under the `ci` profile (scaled with the profile's
    max_examples, e.g. 16x under `thorough`), `gpu` on the GPU. On the GPU without the shrink
    phase: every shrink step compiles new kernel variants, which outran the device-time
    budget; the failing example is printed unshrunk."""
    if ON_GPU:
        return settings(max_examples=gpu, phases=[Phase.explicit, Phase.reuse, Phase.generate])
    return settings(max_examples=max(1, round(ci * settings.default.max_examples / 25)))


# ----------------------------------------------------------------------------- reference
# The generated float64 references (hla_core, derived and proved by the engine).

def reference(op, q, k, v, *, gamma=1.0, normalize=False, eps=1e-6, initial_state=None,
              return_state=False):
    return hla_core.evaluate(op, q, k, v, form="recurrent", gamma=gamma, normalize=normalize, eps=eps,
                             initial_state=initial_state, return_state=return_state)


# ----------------------------------------------------------------------------- problems

def problem(op, **kw):
    """A problem dict with defaults for every key the helpers read."""
    p = dict(op=op, B=1, T=8, H=1, d=3, dv=2, C=16, lens=None, gamma=1.0, per_head=False, normalize=False,
             dtype="float64", init=False, seed=0, scale=(0, 0), seg=None, eps=1e-6, positive=False,
             cu_dtype="int32", layout="contiguous", block_v=None)
    p.update(kw)
    return p


@st.composite
def problems(draw, op, dtypes=("float64",), allow_varlen=True, allow_init=True, scale_range=(0, 0),
             positive=False, multi_chunk=False, min_T=1):
    """Random problems. multi_chunk: every sequence spans more than one chunk (the carry
    between chunks is what a wrong kernel most often gets wrong); positive: nonnegative
    inputs and initial state (the norm-wise error bound applies)."""
    B = draw(st.integers(1, MAX_B))
    H = draw(st.integers(1, MAX_H))
    d = draw(st.integers(1, MAX_D))
    dv = draw(st.integers(1, MAX_D))
    C = draw(st.sampled_from([16, 16, 32, 64]))
    varlen = allow_varlen and draw(st.booleans())
    if varlen:
        if multi_chunk:  # two sequences at most, each a few tokens past a chunk (CPU time)
            lens = [draw(st.integers(C + 1, C + 8)) for _ in range(draw(st.integers(1, 2)))]
        else:
            lens = [draw(st.integers(1, MAX_T // 2)) for _ in range(draw(st.integers(1, 3)))]
        B, T = 1, sum(lens)
    else:
        lens = None
        long_T = st.integers(C + 1, max(C + 1, MAX_T))
        # half the draws span several chunks (T > C): small T alone would never test the carry
        T = draw(long_T if multi_chunk else st.one_of(st.integers(min_T, MAX_T), long_T))
    per_head = draw(st.booleans())
    gchoice = st.one_of(st.just(1.0), st.floats(0.5, 1.0), st.floats(1e-3, 1.0))
    gamma = [draw(gchoice) for _ in range(H)] if per_head else draw(gchoice)
    normalize = draw(st.booleans())
    dtype = draw(st.sampled_from(dtypes))
    init = allow_init and draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 31 - 1))
    # chunk kernels: sequences cut into parallel segments of `seg` chunks (None: automatic,
    # which is no cut on the CPU), so the summary-and-fold path runs in CI too
    seg = draw(st.sampled_from([None, None, 1, 2]))
    return problem(op, B=B, T=T, H=H, d=d, dv=dv, C=C, lens=lens, gamma=gamma, per_head=per_head,
                   normalize=normalize, dtype=dtype, init=init, seed=seed, scale=scale_range, seg=seg,
                   positive=positive)


def make_inputs(p):
    """(q, k, v as CPU tensors of p's dtype, the same values as float64 numpy arrays)."""
    rng = np.random.default_rng(p["seed"])
    B, T, H, d, dv = p["B"], p["T"], p["H"], p["d"], p["dv"]
    lo, hi = p["scale"]
    def draw(*shape):
        x = rng.standard_normal(shape)
        if p["positive"]:
            x = np.abs(x)
        if hi > lo:  # adversarial magnitudes: every token/head row scaled by 2^U(lo, hi)
            x = x * 2.0 ** rng.uniform(lo, hi, size=shape[:3] + (1,))
        return x
    # attention-style scaling d^-1/2 on q and k; fp16 also scales v by 1/T so that the
    # output (which grows like T^2 for HLA) stays inside fp16's range (the model's domain)
    q, k = draw(B, T, H, d) * d ** -0.5, draw(B, T, H, d) * d ** -0.5
    v = draw(B, T, H, dv) / (T if p["dtype"] == "float16" else 1)
    tq = [torch.tensor(x).to(TDT[p["dtype"]]) for x in (q, k, v)]
    # the reference sees exactly the values the kernel sees (inputs rounded to dtype)
    nq = [x.double().numpy() for x in tq]
    return tq, nq


def state_dtype(p):
    return torch.float64 if p["dtype"] == "float64" else torch.float32


def gamma_of(p, h):
    return p["gamma"][h] if p["per_head"] else p["gamma"]


def gamma_arg(p):
    return torch.tensor(p["gamma"], dtype=torch.float64) if p["per_head"] else p["gamma"]


def seqs(p):
    """List of (batch index, start, end) of the independent sequences."""
    if p["lens"] is None:
        return [(b, 0, p["T"]) for b in range(p["B"])]
    cu = np.concatenate([[0], np.cumsum(p["lens"])])
    return [(0, int(cu[n]), int(cu[n + 1])) for n in range(len(p["lens"]))]


def random_state(p, rng):
    """A random initial state of p's operator, already in the state format (fp32, fp64 for
    fp64 inputs) so that the reference sees the values the kernel sees. KK is not made
    symmetric (a learned initial state need not be): the kernels must read it as the
    reference does (kernels.gla.transposed_fields). p["positive"]: entries >= 0 (the
    norm-wise bound's domain). fp16: scaled by 1/T like v (make_inputs), so that the
    outputs stay inside fp16's range."""
    N, H, d, dv = len(seqs(p)), p["H"], p["d"], p["dv"]
    fields = {}
    for name, shape in hla_core.state_shapes(p["op"], d, dv, p["normalize"]).items():
        x = rng.standard_normal((N, H) + tuple(shape))
        if p["positive"]:
            x = np.abs(x)
        if p["dtype"] == "float16":
            x = x / p["T"]
        fields[name] = torch.tensor(x).to(state_dtype(p))
    return STATE_CLS[p["op"]](**fields)


def state_slice(state, n, h):
    return {name: getattr(state, name)[n, h].double().cpu().numpy()
            for name in state._fields if getattr(state, name) is not None}


def _strided(x):
    """The values of x in a non-contiguous layout: a stride-2 view of a twice wider buffer."""
    buf = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype, device=x.device)
    buf[..., ::2] = x
    return buf[..., ::2]


def _layout(p, q, k, v):
    """p["layout"] == "strided": q as a transposed view of a [B, H, T, d] buffer, k a stride-2
    view, v a slice of a wider last dimension; all three non-contiguous."""
    if p["layout"] == "contiguous":
        return q, k, v
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k = _strided(k)
    v = torch.cat([v, torch.zeros_like(v[..., :3])], dim=-1)[..., :v.shape[-1]]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous()), "layout is contiguous"
    return q, k, v


def run_kernel(p, mode, tq, initial_state=None, output_final_state=True):
    fn = FNS[(p["op"], mode)]
    q, k, v = _layout(p, *(x.to(DEVICE) for x in tq))
    cu = None
    if p["lens"] is not None:
        cu = torch.tensor(np.concatenate([[0], np.cumsum(p["lens"])]), dtype=getattr(torch, p["cu_dtype"]),
                          device=DEVICE)
    init = None
    if initial_state is not None:
        init = type(initial_state)(*[None if x is None else x.to(device=DEVICE, dtype=state_dtype(p))
                                     for x in initial_state])
        if p["layout"] == "strided":
            init = type(init)(*[None if x is None else _strided(x) for x in init])
    kw = dict(block_v=p["block_v"])
    if mode == "chunk":
        kw["segment_chunks"] = p["seg"]
    if p["eps"] != 1e-6:
        kw["eps"] = p["eps"]
    o, st_ = fn(q, k, v, gamma=gamma_arg(p), normalize=p["normalize"], chunk_size=p["C"],
                initial_state=init, output_final_state=output_final_state, cu_seqlens=cu, **kw)
    assert o.dtype == q.dtype and o.shape == v.shape
    if st_ is not None:
        for name, x in st_._asdict().items():
            assert x is None or x.dtype == state_dtype(p), f"final state {name} is {x.dtype}"
    return o.double().cpu().numpy(), st_


def _sub(init, keys):
    """{key: init[src]} for keys = {key: src}, or None without a state."""
    return None if init is None else {kk: init[src] for kk, src in keys.items()}


def check_against_reference(p, o, nq, init_state=None, final_state=None, rel_tol=None):
    """Kernel output o (and final state) against the float64 reference, per sequence and head.

    Always the element-wise bound of hla_core/error_model.py. p["positive"] (q, k, v and
    the initial state >= 0): also the norm-wise bound, on the output and on the final
    state. rel_tol (float64 runs): norm-wise relative error of output and final state.
    """
    op, q, k, v = p["op"], *nq
    dtype, eps = p["dtype"], p["eps"]
    num_keys = {kk: kk for kk in NUM_KEYS[op]}
    if p["positive"]:
        assert min(x.min() for x in nq) >= 0, "norm-wise bound needs nonnegative inputs"
    for n, (b, s, e) in enumerate(seqs(p)):
        for h in range(p["H"]):
            g = gamma_of(p, h)
            sl = (b, slice(s, e), h)
            init = state_slice(init_state, n, h) if init_state is not None else None
            ref, ref_state = reference(op, q[sl], k[sl], v[sl], gamma=g, normalize=p["normalize"], eps=eps,
                                       initial_state=init, return_state=True)
            absinit = {kk: np.abs(x) for kk, x in init.items()} if init is not None else None
            num_abs = reference(op, np.abs(q[sl]), np.abs(k[sl]), np.abs(v[sl]), gamma=g,
                                initial_state=_sub(absinit, num_keys))
            kw = {}
            if p["normalize"]:
                ones = np.ones((e - s, 1))
                kw = dict(normalize=True, eps=eps,
                          den_ref=reference(op, q[sl], k[sl], ones, gamma=g,
                                            initial_state=_sub(init, ONES_KEYS[op]))[:, 0],
                          den_abs=reference(op, np.abs(q[sl]), np.abs(k[sl]), ones, gamma=g,
                                            initial_state=_sub(absinit, ONES_KEYS[op]))[:, 0])
            model = dict(T=e - s, d=p["d"], chunk_size=p["C"], gamma=g, op=op)
            bound = error_model.output_bound(dtype, o_ref=ref, num_abs=num_abs, **model, **kw)
            assert np.all(np.isfinite(o[sl])), f"seq {n} head {h}: non-finite kernel output"
            err = np.abs(o[sl] - ref)
            bad = err > bound
            if bad.any():
                i = np.argwhere(bad)[0]
                raise AssertionError(f"seq {n} head {h}: |err| {err[tuple(i)]:.3e} > bound {bound[tuple(i)]:.3e} "
                                     f"at (t, col) = {tuple(i)}, ref {ref[tuple(i)]:.3e}, |op| {num_abs[tuple(i)]:.3e}")
            if p["positive"]:
                # every element has a finite bound (no denominator margin <= 0), and the norm-wise one
                assert np.all(np.isfinite(bound)), "nonnegative inputs left an element unchecked"
                nb = error_model.normwise_bound(dtype, o_ref=ref, normalize=p["normalize"], **model)
                ne = np.linalg.norm(o[sl] - ref)
                assert ne <= nb, (f"seq {n} head {h}: ||err|| {ne:.3e} > norm-wise bound {nb:.3e} "
                                  f"(relative {ne / np.linalg.norm(ref):.3e} > "
                                  f"{nb / np.linalg.norm(ref):.3e})")
            if rel_tol is not None:
                rel = np.linalg.norm(o[sl] - ref) / max(np.linalg.norm(ref), 1e-300)
                assert rel <= rel_tol, f"seq {n} head {h}: relative error {rel:.3e} > {rel_tol}"
            if final_state is not None:
                ks = state_slice(final_state, n, h)
                assert set(ks) == set(ref_state), f"state keys {sorted(ks)} != reference {sorted(ref_state)}"
                for name, x in ref_state.items():
                    es = np.linalg.norm(ks[name] - x)
                    if rel_tol is not None:
                        rs = es / max(np.linalg.norm(x), 1e-300)
                        assert rs <= rel_tol, f"state {name} seq {n} head {h}: relative error {rs:.3e}"
                    if p["positive"]:
                        nb = error_model.normwise_bound(dtype, o_ref=x, out_dtype=state_dtype(p), **model)
                        assert es <= nb, f"state {name} seq {n} head {h}: ||err|| {es:.3e} > bound {nb:.3e}"


# ----------------------------------------------------------------------------- shared checks
# Each takes the operator, so that test_kernels_hla3.py runs them for HLA3.

def check_float64(p, mode):
    """float64 end to end: <= 1e-10 relative, output and final state."""
    tq, nq = make_inputs(p)
    init = random_state(p, np.random.default_rng(p["seed"] + 1)) if p["init"] else None
    o, fin = run_kernel(p, mode, tq, initial_state=init)
    check_against_reference(p, o, nq, init_state=init, final_state=fin, rel_tol=1e-10)


def path_cases(op):
    """Explicit float64 cases for the paths a random draw seldom reaches (module docstring).
    Chunk mode: segments of `seg` chunks (always more than one segment) x initial state x
    varlen x normalize; varlen packs a sequence shorter than one segment, one of a whole number of
    segments and one ending in a partial segment. Then chunk_size 128, several value
    blocks per head (chunk: default float64 blocks of 32 at dv = 40; recurrent: block_v=16
    at dv = 20), recurrent with an initial state and varlen. Per-head gamma includes values
    below 1e-3; normalized cases use eps 0.5 or np.float32(1e-3)."""
    cases = []
    for init in (False, True):
        for varlen in (False, True):
            for normalize in (False, True):
                i = len(cases)
                cases.append(dict(
                    mode="chunk", seg=1 + i % 2, init=init, normalize=normalize, H=2,
                    d=1 if i == 2 else 3, dv=1 if i == 5 else 4,  # d or dv = 1: unspecialized kernels
                    **(dict(lens=[5, 32, 45], B=1, T=82, cu_dtype="int64" if init else "int32") if varlen
                       else dict(B=2, T=45)),
                    per_head=True, gamma=[0.95, 1e-4] if i % 2 else [1.0, 0.7],
                    eps=(0.5 if init else np.float32(1e-3)) if normalize else 1e-6,
                    layout="strided" if init and not varlen else "contiguous"))
    cases += [
        dict(mode="chunk", C=128, seg=1, T=140, H=1, d=2, dv=3, init=True, normalize=True, gamma=0.99),
        dict(mode="chunk", seg=1, lens=[20, 37], B=1, T=57, H=1, d=3, dv=40, init=True, normalize=True,
             gamma=0.9, cu_dtype="int64"),
        dict(mode="recurrent", lens=[7, 30], B=1, T=37, H=2, d=3, dv=20, block_v=16, init=True, normalize=True,
             per_head=True, gamma=[1.0, 1e-5], eps=0.25),
        dict(mode="recurrent", B=2, T=30, H=2, d=4, dv=3, init=True, normalize=False, gamma=1e-4,
             layout="strided"),
    ]
    return [problem(op, seed=1000 + i, **c) for i, c in enumerate(cases)]


def path_id(p):
    bits = [p["mode"], f"C{p['C']}"]
    if p["mode"] == "chunk":
        bits.append(f"seg{p['seg']}")
    bits += [f"d{p['d']}", f"dv{p['dv']}", "init" if p["init"] else "noinit", "norm" if p["normalize"] else "plain"]
    if p["lens"] is not None:
        bits.append(f"varlen-{p['cu_dtype']}")
    if p["layout"] != "contiguous":
        bits.append(p["layout"])
    if p["block_v"] is not None:
        bits.append(f"bv{p['block_v']}")
    return "-".join(bits)


def check_path_case(p):
    """Run one path case and check that it really reaches the path it is listed for."""
    lens = p["lens"] or [p["T"]]
    if p["mode"] == "chunk" and p["seg"] is not None:
        assert triton.cdiv(max(lens), p["C"] * p["seg"]) > 1, "case does not split into segments"
    if p["dv"] > 16:  # the value-block cases: more than one block per head
        bv = p["block_v"] or 32  # float64 chunk default below head size 128 (kernels/gla.py: launch_config)
        assert triton.cdiv(p["dv"], bv) > 1, "case has one value block"
    check_float64(p, p["mode"])


def check_handoff(p, modes, split):
    """Split every sequence at token s: the first part in modes[0], its final state handed
    to modes[1] for the rest. Output and final state must match the reference run on the
    whole sequence (from p's initial state, if any) to <= 1e-10."""
    op, B, H, T = p["op"], p["B"], p["H"], p["T"]
    s = min(max(1, int(split * T)), T - 1)
    tq, nq = make_inputs(p)
    state = random_state(p, np.random.default_rng(p["seed"] + 1)) if p["init"] else None
    full = {}
    for b in range(B):
        for h in range(H):
            sl = (b, slice(None), h)
            init = state_slice(state, b, h) if state is not None else None
            full[(b, h)] = reference(op, nq[0][sl], nq[1][sl], nq[2][sl], gamma=gamma_of(p, h),
                                     normalize=p["normalize"], initial_state=init, return_state=True)
    parts = []
    for mode, (a, e) in zip(modes, ((0, s), (s, T))):
        if mode == "reference":
            o = np.zeros((B, e - a, H, p["dv"]))
            sts = {}
            for b in range(B):
                for h in range(H):
                    sl = (b, slice(a, e), h)
                    init = state_slice(state, b, h) if state is not None else None
                    o[b, :, h], sts[(b, h)] = reference(op, nq[0][sl], nq[1][sl], nq[2][sl], gamma=gamma_of(p, h),
                                                        normalize=p["normalize"], initial_state=init,
                                                        return_state=True)
            state = STATE_CLS[op](**{nm: torch.tensor(np.stack([np.stack([sts[(b, h)][nm] for h in range(H)])
                                                                for b in range(B)]))
                                     for nm in sts[(0, 0)]})
        else:
            o, state = run_kernel(dict(p, T=e - a), mode, [x[:, a:e] for x in tq], initial_state=state)
        parts.append(o)
    o = np.concatenate(parts, axis=1)
    for (b, h), (ref, ref_state) in full.items():
        rel = np.linalg.norm(o[b, :, h] - ref) / max(np.linalg.norm(ref), 1e-300)
        assert rel <= 1e-10, f"{modes} split {s} batch {b} head {h}: relative error {rel:.3e}"
        got = state_slice(state, b, h)
        assert set(got) == set(ref_state), f"state keys {sorted(got)} != reference {sorted(ref_state)}"
        for name, x in ref_state.items():
            rs = np.linalg.norm(got[name] - x) / max(np.linalg.norm(x), 1e-300)
            assert rs <= 1e-10, f"{modes} split {s}: final state {name} relative error {rs:.3e}"


def check_low_precision_nonnegative(p, mode):
    """Nonnegative q, k, v and fp32 initial state: element-wise and norm-wise bounds on the
    output, norm-wise bound on the fp32 final state."""
    tq, nq = make_inputs(p)
    init = random_state(p, np.random.default_rng(p["seed"] + 1)) if p["init"] else None
    o, fin = run_kernel(p, mode, tq, initial_state=init, output_final_state=True)
    check_against_reference(p, o, nq, init_state=init, final_state=fin)


def check_element_wise(p, mode):
    tq, nq = make_inputs(p)
    o, _ = run_kernel(p, mode, tq, output_final_state=False)
    check_against_reference(p, o, nq)


# ----------------------------------------------------------------------------- properties

OPS2 = ("hla2", "ahla")
OPS_MODES = pytest.mark.parametrize("op,mode", [k for k in FNS if k[0] in OPS2],
                                    ids=["_".join(k) for k in FNS if k[0] in OPS2])


@OPS_MODES
@examples(25)
@given(data=st.data())
def test_float64_matches_reference(op, mode, data):
    """float64 end to end: <= 1e-10 relative, and the final state equals the reference state."""
    p = data.draw(problems(op, dtypes=("float64",)))
    note(str(p))
    check_float64(p, mode)


@pytest.mark.parametrize("p", [p for op in OPS2 for p in path_cases(op)],
                         ids=[f"{op}-{path_id(p)}" for op in OPS2 for p in path_cases(op)])
def test_float64_paths(p):
    """float64 on the explicit path cases (segments, initial state, varlen, normalize, C = 128,
    value blocks, strided layouts, eps, small gamma): <= 1e-10, output and final state."""
    check_path_case(p)


@pytest.mark.parametrize("op", OPS2)
@pytest.mark.parametrize("modes", HANDOFFS, ids=["-".join(m) for m in HANDOFFS])
@examples(3, gpu=4)
@given(data=st.data(), split=st.floats(0, 1))
def test_state_handoff(op, modes, data, split):
    """Split at any token: first part in one mode, state handed to the other mode."""
    p = data.draw(problems(op, dtypes=("float64",), allow_varlen=False, min_T=2))  # two non-empty parts
    note(str(p))
    check_handoff(p, modes, split)


@pytest.mark.parametrize("op", OPS2)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "norm"])
@examples(5, gpu=5)
@given(data=st.data())
def test_low_precision_nonnegative_chunk(op, dtype, normalize, data):
    """fp32 / fp16 / bf16 chunk kernels, nonnegative inputs, every sequence spanning several
    chunks, fp32 initial state: inside the element-wise and the norm-wise bound (about
    beta ||o||); the fp32 final state too."""
    p = data.draw(problems(op, dtypes=(dtype,), positive=True, multi_chunk=True))
    p["normalize"] = normalize
    note(str(p))
    check_low_precision_nonnegative(p, "chunk")


@pytest.mark.parametrize("op", OPS2)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "norm"])
@examples(3, gpu=5)
@given(data=st.data())
def test_low_precision_nonnegative_recurrent(op, dtype, normalize, data):
    """As the chunk test, for the recurrent kernels (no chunks: the sequences need not be
    long, which keeps the token-by-token interpreter run short)."""
    p = data.draw(problems(op, dtypes=(dtype,), positive=True))
    p["normalize"] = normalize
    note(str(p))
    check_low_precision_nonnegative(p, "recurrent")


def test_normwise_figures_in_docs():
    """The rho values docs/numerics.md quotes are error_model.normwise_coefficient at the
    shapes it names, rounded to the digits shown (prose figures come from the model)."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "docs" / "numerics.md").read_text()
    N = r"(\d+(?:\.\d+)?(?:e-?\d+)?)"
    m = re.search(rf"At the CI shapes \(T = (\d+), d = (\d+), C = (\d+),\s+γ = {N}\), unnormalized / normalized:"
                  rf"\s+bf16 {N} / {N} \(second order\), {N} / {N}\s+\(HLA3\); fp16 \(TF32 operands\) {N} / {N}"
                  rf" and {N} / {N}; fp32 {N} / {N}\.", text)
    assert m, "docs/numerics.md no longer quotes the norm-wise coefficients in the expected form"
    T, d, C, g = int(m[1]), int(m[2]), int(m[3]), float(m[4])
    printed = m.groups()[4:]
    cases = [(dt, op, nz) for dt, ops in (("bfloat16", (None, "hla3")), ("float16", (None, "hla3")),
                                         ("float32", (None,))) for op in ops for nz in (False, True)]
    for text_value, (dt, op, nz) in zip(printed, cases):
        rho = error_model.normwise_coefficient(dt, T=T, d=d, chunk_size=C, gamma=g, normalize=nz, op=op)
        mant = text_value.split("e")[0]
        last = 10.0 ** (-len(mant.split(".")[1]) if "." in mant else 0)
        last *= 10.0 ** int(text_value.split("e")[1]) if "e" in text_value else 1
        assert abs(float(text_value) - rho) <= last / 2, f"{dt} {op} normalize={nz}: doc {text_value}, model {rho:.3g}"


@OPS_MODES
@pytest.mark.parametrize("dtype", LOW)
@examples(8, gpu=8)
@given(data=st.data())
def test_low_precision_signed(op, mode, dtype, data):
    """fp32 / fp16 / bf16, random signs: inside the element-wise bound relative to |op|."""
    p = data.draw(problems(op, dtypes=(dtype,), allow_init=False))
    note(str(p))
    check_element_wise(p, mode)


@OPS_MODES
@examples(12)
@given(data=st.data())
def test_adversarial_magnitudes(op, mode, data):
    """Rows scaled by 2^U(-12, 12): errors stay inside the bound relative to |op|. (12
    examples per case in CI, where the recurrent forms run token by token in the
    interpreter; 16x that under the thorough profile.)"""
    p = data.draw(problems(op, dtypes=("float64", "float32"), allow_init=False, scale_range=(-12, 12)))
    note(str(p))
    check_element_wise(p, mode)


# Shapes on which the earlier one-program bf16 HLA2 chunk kernel failed on an H200 / triton 3.6
# (illegal memory access, or errors past the bound that depended on num_warps; docs/benchmarks.md):
# small d / dv (blocks padded to 16), T < C, one value block of 32 at d = 128.
# (B, T, H, d, dv, C, gamma, normalize)
REGRESSION_SHAPES = [
    (1, 40, 1, 2, 1, 64, 1.0, False), (1, 40, 1, 33, 1, 64, 1.0, False),
    (2, 200, 3, 33, 1, 64, 0.9, True), (1, 17, 1, 5, 3, 16, 0.5, True),
    (1, 100, 1, 64, 17, 32, 0.95, False), (1, 300, 2, 128, 128, 64, 0.99, False),
]
GPU_ONLY = pytest.mark.skipif(
    not ON_GPU, reason="GPU bf16 dot regression: the interpreter computes bf16 through fp32 dots "
                       "(kernels._common.dot_dtype) and is deterministic, so neither the failing "
                       "bf16 dot nor run-to-run variation can occur on the CPU")


@GPU_ONLY
@pytest.mark.parametrize("op", OPS2)
@pytest.mark.parametrize("shape", REGRESSION_SHAPES, ids=lambda s: "B{}T{}H{}d{}dv{}C{}g{}n{}".format(*s))
def test_bf16_regression_shapes(op, shape):
    """bf16 chunk kernel on the shapes that broke before: inside the error-model bound, and
    bit-identical over repeated runs (a result that moves between runs is a race or a read
    of uninitialized memory, not rounding)."""
    B, T, H, d, dv, C, g, norm = shape
    p = problem(op, B=B, T=T, H=H, d=d, dv=dv, C=C, gamma=g, normalize=norm, dtype="bfloat16", seed=T * 1000 + d)
    tq, nq = make_inputs(p)
    outs = [run_kernel(p, "chunk", tq, output_final_state=False)[0] for _ in range(3)]
    for o in outs[1:]:
        assert np.array_equal(o, outs[0]), "bf16 chunk output changed between identical runs"
    check_against_reference(p, outs[0], nq)


def test_bf16_never_uses_interpreter_dot():
    """Guard: in the interpreter a bf16 tl.dot multiplies bit patterns; the kernels must upcast."""
    from kernels._common import dot_dtype, interpreting
    import triton.language as tl
    if interpreting():
        assert dot_dtype(torch.bfloat16) == tl.float32


# ----------------------------------------------------------------------------- arguments

def _good(B=1, T=5, H=2, d=4, dv=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(DEVICE)  # noqa: E731
    return mk(B, T, H, d), mk(B, T, H, d), mk(B, T, H, dv)


def _op_of(fn):
    return next(op for (op, _), f in FNS.items() if f is fn)


def _zero_state(op, normalize=False, N=1, H=2, d=4, dv=3, **kw):
    shapes = hla_core.state_shapes(op, d, dv, normalize)
    return STATE_CLS[op](**{nm: torch.zeros((N, H) + tuple(s), device=DEVICE, **kw) for nm, s in shapes.items()})


@pytest.mark.parametrize("fn", list(FNS.values()), ids=["_".join(k) for k in FNS])
def test_numpy_scalar_arguments(fn):
    """np.int64 chunk size, np.float32 / np.float64 eps and gamma are accepted and give the
    same output as the equal Python numbers (bit for bit: the same kernels run)."""
    q, k, v = _good(dtype=torch.float64)
    g32, e32 = np.float32(0.9), np.float32(1e-3)
    want, _ = fn(q, k, v, gamma=float(g32), eps=float(e32), normalize=True, chunk_size=16)
    got, _ = fn(q, k, v, gamma=g32, eps=e32, normalize=np.bool_(True), chunk_size=np.int64(16))
    assert torch.equal(got, want)
    got, _ = fn(q, k, v, gamma=np.float64(float(g32)), eps=np.float64(float(e32)), normalize=True,
                chunk_size=np.int32(16))
    assert torch.equal(got, want)


@pytest.mark.parametrize("fn", list(FNS.values()), ids=["_".join(k) for k in FNS])
def test_numpy_integer_launch_knobs(fn):
    """segment_chunks, block_v, num_warps, num_stages accept numpy integers like the other
    int arguments, with the same output as the equal Python ints (bit for bit)."""
    q, k, v = _good(T=40, dtype=torch.float64)
    chunk = "segment_chunks" in inspect.signature(fn).parameters
    kw = dict(gamma=0.9, chunk_size=16) if chunk else dict(gamma=0.9)
    seg = dict(segment_chunks=1) if chunk else {}
    want, _ = fn(q, k, v, block_v=16, num_warps=4, num_stages=1, **seg, **kw)
    seg = dict(segment_chunks=np.int64(1)) if chunk else {}
    got, _ = fn(q, k, v, block_v=np.int32(16), num_warps=np.int64(4), num_stages=np.uint8(1), **seg, **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("fn", list(FNS.values()), ids=["_".join(k) for k in FNS])
def test_check_finite_false(fn):
    """check_finite=False skips only the NaN/Inf scan: finite inputs give the same output as
    with the scan (float64, and against the reference), non-finite inputs no error."""
    op = _op_of(fn)
    q, k, v = _good(T=20, dtype=torch.float64)
    o, _ = fn(q, k, v, gamma=0.9, chunk_size=16, check_finite=False)
    assert torch.equal(o, fn(q, k, v, gamma=0.9, chunk_size=16)[0])
    for h in range(q.shape[2]):
        ref = reference(op, *(x[0, :, h].cpu().numpy() for x in (q, k, v)), gamma=0.9)
        assert np.linalg.norm(o[0, :, h].cpu().numpy() - ref) <= 1e-10 * np.linalg.norm(ref)
    q = q.clone()
    q[0, 3, 1, 0] = float("nan")
    o, _ = fn(q, k, v, gamma=0.9, chunk_size=16, check_finite=False)
    assert torch.isnan(o[0, 3, 1]).all(), "NaN in q did not reach its token's output"
    assert torch.isfinite(o[0, :, 0]).all(), "NaN in head 1 leaked into head 0"


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_forward_only_runner_refuses_grad(mode):
    """kernels.gla.run_chain (the forward-only runner bench and numerics call) builds no
    graph: an input or initial-state tensor that requires grad raises, naming it, instead of
    returning an output without a gradient; under torch.no_grad() the same call runs. (The
    public functions are autograd ops: test_kernels_backward.py.)"""
    from kernels import hla2
    from kernels.gla import run_chain
    q, k, v = _good()
    state = _zero_state("hla2")
    def run(q, k, v, state):
        return run_chain(hla2.CHAIN, kernels.HLA2State, mode, q, k, v, None, False, 1e-6, 16, state, False,
                         None, True)[0]
    want = run(q, k, v, state)
    for name in ("q", "k", "v", "initial_state.KK_QV"):
        args = dict(q=q, k=k, v=v, state=state)
        if name.startswith("initial_state"):
            args["state"] = state._replace(KK_QV=state.KK_QV.clone().requires_grad_(True))
        else:
            args[name] = args[name].clone().requires_grad_(True)
        with pytest.raises(NotImplementedError, match=rf"{name} requires grad.*torch.no_grad\(\)"):
            run(**args)
        with torch.no_grad():
            assert torch.equal(run(**args), want)


BAD_CASES = [
    ("rank", ValueError, "q must have rank 4"),
    ("kshape", ValueError, "k shape"),
    ("vshape", ValueError, "v shape"),
    ("dtype", TypeError, "dtype"),
    ("mixed", TypeError, "share one dtype"),
    ("T0", ValueError, "T = 0"),
    ("gamma0", ValueError, "gamma must lie in"),
    ("gamma2", ValueError, "gamma must lie in"),
    ("gammanan", ValueError, "gamma must lie in"),
    ("gammashape", ValueError, "gamma tensor must have shape"),
    ("gammastr", TypeError, "gamma must be None, a real number"),
    ("gammagrad", NotImplementedError, "gamma requires grad"),
    ("nan", ValueError, "q contains non-finite"),
    ("inf", ValueError, "v contains non-finite"),
    ("chunk", ValueError, r"chunk_size must be a power of two in \[16, 128\], got 24"),
    ("chunk_np", ValueError, r"chunk_size must be a power of two in \[16, 128\], got 256"),
    ("chunk_float", TypeError, "chunk_size must be an integer"),
    ("chunk_bool", TypeError, "chunk_size must be an integer"),
    ("eps", ValueError, "eps must be a finite number > 0"),
    ("eps_np", ValueError, "eps must be a finite number > 0"),
    ("eps_str", TypeError, "eps must be a real number"),
    ("normalize_str", TypeError, "normalize must be True or False, got 'no'"),
    ("normalize_int", TypeError, "normalize must be True or False"),
    ("final_str", TypeError, "output_final_state must be True or False"),
    ("check_finite_str", TypeError, "check_finite must be True or False"),
    ("cu_B", ValueError, "batch size must be 1"),
    ("cu_end", ValueError, "end at T"),
    ("cu_order", ValueError, "strictly increasing"),
    ("cu_dtype", TypeError, "cu_seqlens must be int32"),
    ("state_type", TypeError, "initial_state must be"),
    ("state_shape", ValueError, "initial_state"),
    ("device", ValueError, "on one device"),
    ("block_v", ValueError, r"block_v must be None or a positive power-of-two integer, got 48"),
    ("block_v_float", ValueError, r"block_v must be None or a positive power-of-two integer .*got 64\.0"),
    ("num_warps", ValueError, r"num_warps must be None or a positive power-of-two integer <= 32, got 3"),
    ("num_warps_big", ValueError, r"num_warps must be None or a positive power-of-two integer <= 32, got 64"),
    ("num_stages", ValueError, r"num_stages must be None or a positive integer <= 8, got 0"),
    ("num_stages_bool", ValueError, r"num_stages must be None or a positive integer <= 8 .*got True"),
    ("seg", ValueError, r"segment_chunks must be None or a positive integer, got 0"),
    ("seg_float", ValueError, r"segment_chunks must be None or a positive integer .*got 2\.0"),
]


@pytest.mark.parametrize("fn", [f for (op, _), f in FNS.items() if op in OPS2],
                         ids=["_".join(k) for k in FNS if k[0] in OPS2])
@pytest.mark.parametrize("case,exc,match", BAD_CASES)
def test_bad_inputs_raise_clear_errors(fn, case, exc, match):
    q, k, v = _good()
    op = _op_of(fn)
    kw = {}
    if case == "rank":
        q = q[0]
    elif case == "kshape":
        k = k[:, :, :, :3]
    elif case == "vshape":
        v = v[:, :4]
    elif case == "dtype":
        q, k, v = q.int(), k.int(), v.int()
    elif case == "mixed":
        k = k.double()
    elif case == "T0":
        q, k, v = q[:, :0], k[:, :0], v[:, :0]
    elif case == "gamma0":
        kw["gamma"] = 0.0
    elif case == "gamma2":
        kw["gamma"] = np.float32(1.5)
    elif case == "gammanan":
        kw["gamma"] = float("nan")
    elif case == "gammashape":
        kw["gamma"] = torch.tensor([0.5, 0.5, 0.5])
    elif case == "gammastr":
        kw["gamma"] = "0.9"
    elif case == "gammagrad":
        kw["gamma"] = torch.tensor([0.5, 0.9], requires_grad=True)
    elif case == "nan":
        q = q.clone()
        q[0, 1, 0, 0] = float("nan")
    elif case == "inf":
        v = v.clone()
        v[0, 2, 1, 0] = float("inf")
    elif case == "chunk":
        kw["chunk_size"] = 24
    elif case == "chunk_np":
        kw["chunk_size"] = np.int64(256)
    elif case == "chunk_float":
        kw["chunk_size"] = 64.0
    elif case == "chunk_bool":
        kw["chunk_size"] = True
    elif case == "eps":
        kw["eps"] = 0.0
    elif case == "eps_np":
        kw["eps"] = np.float32(-1e-3)
    elif case == "eps_str":
        kw["eps"] = "1e-6"
    elif case == "normalize_str":
        kw["normalize"] = "no"
    elif case == "normalize_int":
        kw["normalize"] = 1
    elif case == "final_str":
        kw["output_final_state"] = "yes"
    elif case == "check_finite_str":
        kw["check_finite"] = "no"
    elif case == "cu_B":
        q, k, v = _good(B=2)
        kw["cu_seqlens"] = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    elif case == "cu_end":
        kw["cu_seqlens"] = torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE)
    elif case == "cu_order":
        kw["cu_seqlens"] = torch.tensor([0, 3, 3, 5], dtype=torch.int64, device=DEVICE)
    elif case == "cu_dtype":
        kw["cu_seqlens"] = torch.tensor([0, 2.0, 5.0], device=DEVICE)
    elif case == "state_type":
        kw["initial_state"] = torch.zeros(1)
    elif case == "state_shape":
        kw["initial_state"] = STATE_CLS[op](*(torch.zeros(1, 2, 4, 4, device=DEVICE)
                                              for _ in range(len(NUM_KEYS[op]))))
    elif case == "block_v":
        kw["block_v"] = 48
    elif case == "block_v_float":
        kw["block_v"] = 64.0
    elif case == "num_warps":
        kw["num_warps"] = np.int64(3)
    elif case == "num_warps_big":
        kw["num_warps"] = 64
    elif case == "num_stages":
        kw["num_stages"] = 0
    elif case == "num_stages_bool":
        kw["num_stages"] = True
    elif case in ("seg", "seg_float") and "segment_chunks" not in inspect.signature(fn).parameters:
        pytest.skip("segment_chunks: chunk functions only")
    elif case == "seg":
        kw["segment_chunks"] = np.int32(0)
    elif case == "seg_float":
        kw["segment_chunks"] = 2.0
    elif case == "device":
        if DEVICE == "cpu":
            pytest.skip("needs two devices")
        k = k.cpu()
    with pytest.raises(exc, match=match):
        fn(q, k, v, **kw)
