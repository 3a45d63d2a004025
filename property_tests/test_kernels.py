"""Property tests: Triton HLA2 / AHLA kernels against the float64 references.

CPU (CI): TRITON_INTERPRET=1, small shapes (`ci` profile). GPU: HYPOTHESIS_PROFILE=gpu
without TRITON_INTERPRET, larger shapes, same properties. Tolerances: float64 kernels
must match to <= 1e-10 relative (algorithm check); every dtype must satisfy the
element-wise bound of hla_core/error_model.py (rounding check). bf16 in the
interpreter goes through fp32 dots (kernels._common.dot_dtype), never a bf16 tl.dot.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import assume, given, note, settings
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
# On the GPU every new shape/flag combination compiles a kernel; the `gpu` profile's
# budget is spread over the parametrized cases (4 op/mode cases -> 15 examples each).
PER_CASE = settings(max_examples=15) if ON_GPU else settings()
MAX_D = 64 if ON_GPU else 12
MAX_B = 3 if ON_GPU else 2
MAX_H = 4 if ON_GPU else 3

FNS = {
    ("hla2", "chunk"): kernels.chunk_hla2, ("hla2", "recurrent"): kernels.fused_recurrent_hla2,
    ("ahla", "chunk"): kernels.chunk_ahla, ("ahla", "recurrent"): kernels.fused_recurrent_ahla,
}
STATE_CLS = {"hla2": kernels.HLA2State, "ahla": kernels.AHLAState}
TDT = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- reference
# The generated float64 references (hla_core, derived and proved by the engine).

def reference(op, q, k, v, *, gamma=1.0, normalize=False, eps=1e-6, initial_state=None,
              return_state=False):
    return hla_core.evaluate(op, q, k, v, form="recurrent", gamma=gamma, normalize=normalize, eps=eps,
                             initial_state=initial_state, return_state=return_state)


# ----------------------------------------------------------------------------- helpers

@st.composite
def problems(draw, op, dtypes=("float64",), allow_varlen=True, allow_init=True, scale_range=(0, 0)):
    B = draw(st.integers(1, MAX_B))
    H = draw(st.integers(1, MAX_H))
    d = draw(st.integers(1, MAX_D))
    dv = draw(st.integers(1, MAX_D))
    C = draw(st.sampled_from([16, 16, 32, 64]))
    varlen = allow_varlen and draw(st.booleans())
    if varlen:
        nseq = draw(st.integers(1, 3))
        lens = [draw(st.integers(1, MAX_T // 2)) for _ in range(nseq)]
        B, T = 1, sum(lens)
    else:
        lens = None
        # half the draws span several chunks (T > C): small T alone would never test the carry
        T = draw(st.one_of(st.integers(1, MAX_T), st.integers(C + 1, max(C + 1, MAX_T))))
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
    lo, hi = scale_range
    return dict(op=op, B=B, T=T, H=H, d=d, dv=dv, C=C, lens=lens, gamma=gamma, per_head=per_head,
                normalize=normalize, dtype=dtype, init=init, seed=seed, scale=(lo, hi), seg=seg)


def make_inputs(p):
    rng = np.random.default_rng(p["seed"])
    B, T, H, d, dv = p["B"], p["T"], p["H"], p["d"], p["dv"]
    lo, hi = p["scale"]
    def draw(*shape):
        x = rng.standard_normal(shape)
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
    """A random initial state (the carry is any tensor of the right shape)."""
    N, H, d, dv = len(seqs(p)), p["H"], p["d"], p["dv"]
    f = lambda *s: torch.tensor(rng.standard_normal((N, H) + s))  # noqa: E731
    if p["op"] == "hla2":
        kk = f(d, d)
        kk = kk + kk.transpose(-1, -2)  # KK = sum k k^T is symmetric: keep the state realistic
        return kernels.HLA2State(kk, f(d, dv), f(d, 1) if p["normalize"] else None)
    return kernels.AHLAState(f(d, dv), f(d, dv), f(d, 1) if p["normalize"] else None,
                             f(d, 1) if p["normalize"] else None)


def state_slice(state, n, h):
    return {name: getattr(state, name)[n, h].double().cpu().numpy()
            for name in state._fields if getattr(state, name) is not None}


def to_device_state(state, dtype):
    return type(state)(*[None if x is None else x.to(device=DEVICE, dtype=dtype) for x in state])


def run_kernel(p, mode, tq, initial_state=None, output_final_state=True):
    fn = FNS[(p["op"], mode)]
    q, k, v = (x.to(DEVICE) for x in tq)
    cu = None
    if p["lens"] is not None:
        cu = torch.tensor(np.concatenate([[0], np.cumsum(p["lens"])]), dtype=torch.int32, device=DEVICE)
    sdt = torch.float64 if p["dtype"] == "float64" else torch.float32
    init = None if initial_state is None else to_device_state(initial_state, sdt)
    kw = dict(segment_chunks=p.get("seg")) if mode == "chunk" else {}
    o, st_ = fn(q, k, v, gamma=gamma_arg(p), normalize=p["normalize"], chunk_size=p["C"],
                initial_state=init, output_final_state=output_final_state, cu_seqlens=cu, **kw)
    return o.double().cpu().numpy(), st_


def check_against_reference(p, o, nq, init_state=None, final_state=None, rel_tol=None):
    """Element-wise error-model bound on every output; relative norm check for float64."""
    q, k, v = nq
    dtype = p["dtype"]
    worst = 0.0
    for n, (b, s, e) in enumerate(seqs(p)):
        for h in range(p["H"]):
            g = gamma_of(p, h)
            sl = (b, slice(s, e), h)
            init = state_slice(init_state, n, h) if init_state is not None else None
            ref, ref_state = reference(p["op"], q[sl], k[sl], v[sl], gamma=g, normalize=p["normalize"],
                                       initial_state=init, return_state=True)
            absinit = {kk: np.abs(x) for kk, x in init.items()} if init is not None else None
            num_abs = reference(p["op"], np.abs(q[sl]), np.abs(k[sl]), np.abs(v[sl]), gamma=g,
                                initial_state=_num_state(p["op"], absinit))
            kw = {}
            if p["normalize"]:
                ones = np.ones((e - s, 1))
                one_init = _ones_state(p["op"], init)
                one_abs = _ones_state(p["op"], absinit)
                kw = dict(normalize=True, eps=1e-6,
                          den_ref=reference(p["op"], q[sl], k[sl], ones, gamma=g, initial_state=one_init)[:, 0],
                          den_abs=reference(p["op"], np.abs(q[sl]), np.abs(k[sl]), ones, gamma=g,
                                            initial_state=one_abs)[:, 0])
            bound = error_model.output_bound(dtype, o_ref=ref, num_abs=num_abs, T=e - s, d=p["d"],
                                             chunk_size=p["C"], gamma=g, **kw)
            err = np.abs(o[sl] - ref)
            assert np.all(np.isfinite(o[sl])), "non-finite kernel output"
            bad = err > bound
            if bad.any():
                i = np.argwhere(bad)[0]
                raise AssertionError(f"seq {n} head {h}: |err| {err[tuple(i)]:.3e} > bound {bound[tuple(i)]:.3e} "
                                     f"at (t, col) = {tuple(i)}, ref {ref[tuple(i)]:.3e}, |op| {num_abs[tuple(i)]:.3e}")
            if rel_tol is not None:
                rel = np.linalg.norm(o[sl] - ref) / max(np.linalg.norm(ref), 1e-300)
                worst = max(worst, rel)
                assert rel <= rel_tol, f"seq {n} head {h}: relative error {rel:.3e} > {rel_tol}"
            if final_state is not None and rel_tol is not None:
                ks = state_slice(final_state, n, h)
                for name, x in ref_state.items():
                    scale = max(np.linalg.norm(x), 1e-300)
                    rs = np.linalg.norm(ks[name] - x) / scale
                    assert rs <= rel_tol, f"state {name} seq {n} head {h}: relative error {rs:.3e}"
    return worst


def _num_state(op, init):
    """The numerator (unnormalized) part of a state dict."""
    if init is None:
        return None
    keys = ("KK", "KK_QV") if op == "hla2" else ("KV", "KQ_KV")
    return {kk: init[kk] for kk in keys}


def _ones_state(op, init):
    """The v -> 1 part of a state dict (denominator of the normalized form)."""
    if init is None:
        return None
    if op == "hla2":
        return {"KK": init["KK"], "KK_QV": init["KK_Q1"]}
    return {"KV": init["K1"], "KQ_KV": init["KQ_K1"]}


# ----------------------------------------------------------------------------- properties

OPS_MODES = pytest.mark.parametrize("op,mode", list(FNS), ids=["_".join(k) for k in FNS])


@OPS_MODES
@PER_CASE
@given(data=st.data())
def test_float64_matches_reference(op, mode, data):
    """float64 end to end: <= 1e-10 relative, and the final state equals the reference state."""
    p = data.draw(problems(op, dtypes=("float64",)))
    note(str(p))
    tq, nq = make_inputs(p)
    init = random_state(p, np.random.default_rng(p["seed"] + 1)) if p["init"] else None
    o, fin = run_kernel(p, mode, tq, initial_state=init)
    check_against_reference(p, o, nq, init_state=init, final_state=fin, rel_tol=1e-10)


@OPS_MODES
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@PER_CASE
@given(data=st.data())
def test_low_precision_within_error_model(op, mode, dtype, data):
    """fp32 / fp16 / bf16 inputs (fp32 accumulation) stay inside the derived bound."""
    p = data.draw(problems(op, dtypes=(dtype,), allow_init=False))
    note(str(p))
    tq, nq = make_inputs(p)
    o, _ = run_kernel(p, mode, tq, output_final_state=False)
    check_against_reference(p, o, nq)


@OPS_MODES
@PER_CASE
@given(data=st.data())
def test_adversarial_magnitudes(op, mode, data):
    """Rows scaled by 2^U(-12, 12): errors stay inside the bound relative to |op|."""
    p = data.draw(problems(op, dtypes=("float64", "float32"), allow_init=False, scale_range=(-12, 12)))
    note(str(p))
    tq, nq = make_inputs(p)
    o, _ = run_kernel(p, mode, tq, output_final_state=False)
    check_against_reference(p, o, nq)


@pytest.mark.parametrize("op", ["hla2", "ahla"])
@PER_CASE
@given(data=st.data(),
       modes=st.tuples(st.sampled_from(["chunk", "recurrent", "reference"]),
                       st.sampled_from(["chunk", "recurrent", "reference"])),
       split=st.floats(0, 1))
def test_state_handoff(op, data, modes, split):
    """Split at any token s: first part in one mode, state handed to the other mode."""
    p = data.draw(problems(op, dtypes=("float64",), allow_varlen=False, allow_init=False))
    note(str(p))
    assume(p["T"] >= 2)  # a split needs two non-empty parts
    s = min(max(1, int(split * p["T"])), p["T"] - 1)
    tq, nq = make_inputs(p)
    full_ref = []
    for b in range(p["B"]):
        for h in range(p["H"]):
            sl = (b, slice(None), h)
            full_ref.append(reference(p["op"], nq[0][sl], nq[1][sl], nq[2][sl], gamma=gamma_of(p, h),
                                      normalize=p["normalize"]))
    parts = []
    state = None
    for mode, (a, e) in zip(modes, ((0, s), (s, p["T"]))):
        pp = dict(p, T=e - a)
        tqa = [x[:, a:e] for x in tq]
        if mode == "reference":
            o = np.zeros((p["B"], e - a, p["H"], p["dv"]))
            sts = {}
            for b in range(p["B"]):
                for h in range(p["H"]):
                    sl = (b, slice(a, e), h)
                    init = state_slice(state, b, h) if state is not None else None
                    o[b, :, h], sts[(b, h)] = reference(p["op"], nq[0][sl], nq[1][sl], nq[2][sl],
                                                        gamma=gamma_of(p, h), normalize=p["normalize"],
                                                        initial_state=init, return_state=True)
            names = list(sts[(0, 0)].keys())
            fields = {nm: torch.tensor(np.stack([np.stack([sts[(b, h)][nm] for h in range(p["H"])])
                                                 for b in range(p["B"])])) for nm in names}
            state = STATE_CLS[p["op"]](**fields)
        else:
            o, state = run_kernel(pp, mode, tqa, initial_state=state)
        parts.append(o)
    o = np.concatenate(parts, axis=1)
    i = 0
    for b in range(p["B"]):
        for h in range(p["H"]):
            ref = full_ref[i]
            i += 1
            rel = np.linalg.norm(o[b, :, h] - ref) / max(np.linalg.norm(ref), 1e-300)
            assert rel <= 1e-10, f"{modes} split {s}: relative error {rel:.3e}"


# Shapes on which the earlier one-program bf16 HLA2 chunk kernel failed on an H200 / triton 3.6
# (illegal memory access, or errors past the bound that depended on num_warps; docs/benchmarks.md):
# small d / dv (blocks padded to 16), T < C, one value block of 32 at d = 128.
# (B, T, H, d, dv, C, gamma, normalize, gpu_only)
REGRESSION_SHAPES = [
    (1, 40, 1, 2, 1, 64, 1.0, False, False), (1, 40, 1, 33, 1, 64, 1.0, False, False),
    (2, 200, 3, 33, 1, 64, 0.9, True, True), (1, 17, 1, 5, 3, 16, 0.5, True, False),
    (1, 100, 1, 64, 17, 32, 0.95, False, True), (1, 300, 2, 128, 128, 64, 0.99, False, True),
]


@pytest.mark.parametrize("op", ["hla2", "ahla"])
@pytest.mark.parametrize("shape", REGRESSION_SHAPES, ids=lambda s: "B{}T{}H{}d{}dv{}C{}g{}n{}".format(*s[:8]))
def test_bf16_regression_shapes(op, shape):
    """bf16 chunk kernel on the shapes that broke before: inside the error-model bound, and
    bit-identical over repeated runs (a result that moves between runs is a race or a read
    of uninitialized memory, not rounding)."""
    B, T, H, d, dv, C, g, norm, gpu_only = shape
    if gpu_only and not ON_GPU:
        pytest.skip("large shape: GPU only")
    p = dict(op=op, B=B, T=T, H=H, d=d, dv=dv, C=C, lens=None, gamma=g, per_head=False, normalize=norm,
             dtype="bfloat16", init=False, seed=T * 1000 + d, scale=(0, 0))
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


# ----------------------------------------------------------------------------- bad inputs

def _good(B=1, T=5, H=2, d=4, dv=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(DEVICE)  # noqa: E731
    return mk(B, T, H, d), mk(B, T, H, d), mk(B, T, H, dv)


@pytest.mark.parametrize("fn", list(FNS.values()), ids=["_".join(k) for k in FNS])
@pytest.mark.parametrize("case,exc,match", [
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
    ("nan", ValueError, "q contains non-finite"),
    ("inf", ValueError, "v contains non-finite"),
    ("chunk", ValueError, "chunk_size"),
    ("eps", ValueError, "eps"),
    ("cu_B", ValueError, "batch size must be 1"),
    ("cu_end", ValueError, "end at T"),
    ("cu_order", ValueError, "strictly increasing"),
    ("cu_dtype", TypeError, "cu_seqlens must be int32"),
    ("state_type", TypeError, "initial_state must be"),
    ("state_shape", ValueError, "initial_state"),
    ("device", ValueError, "on one device"),
])
def test_bad_inputs_raise_clear_errors(fn, case, exc, match):
    q, k, v = _good()
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
        kw["gamma"] = 1.5
    elif case == "gammanan":
        kw["gamma"] = float("nan")
    elif case == "gammashape":
        kw["gamma"] = torch.tensor([0.5, 0.5, 0.5])
    elif case == "nan":
        q = q.clone()
        q[0, 1, 0, 0] = float("nan")
    elif case == "inf":
        v = v.clone()
        v[0, 2, 1, 0] = float("inf")
    elif case == "chunk":
        kw["chunk_size"] = 24
    elif case == "eps":
        kw["eps"] = 0.0
    elif case == "cu_B":
        q, k, v = _good(B=2)
        kw["cu_seqlens"] = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    elif case == "cu_end":
        kw["cu_seqlens"] = torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE)
    elif case == "cu_order":
        kw["cu_seqlens"] = torch.tensor([0, 3, 3, 5], dtype=torch.int32, device=DEVICE)
    elif case == "cu_dtype":
        kw["cu_seqlens"] = torch.tensor([0, 2.0, 5.0], device=DEVICE)
    elif case == "state_type":
        kw["initial_state"] = torch.zeros(1)
    elif case == "state_shape":
        cls = kernels.HLA2State if "hla2" in fn.__name__ else kernels.AHLAState
        kw["initial_state"] = cls(*(torch.zeros(1, 2, 4, 4, device=DEVICE) for _ in range(2)))
    elif case == "device":
        if DEVICE == "cpu":
            pytest.skip("needs two devices")
        k = k.cpu()
    with pytest.raises(exc, match=match):
        fn(q, k, v, **kw)
