"""Property tests: Triton HLA3 kernels against the float64 hla_core references.

The same properties as test_kernels.py (second order), whose problems, helpers and checks
are shared (they take the operator): float64 end to end <= 1e-10 relative with the final
state equal to the reference state, by hypothesis and on the explicit path cases
(segments x initial state x varlen x normalize, chunk_size 128, value blocks, strided
layouts, eps, small gamma); state hand-off between every ordered pair of modes that runs a
kernel, final state checked; fp32 / fp16 / bf16 on nonnegative inputs inside the
element-wise and norm-wise bounds of hla_core/error_model.py (op="hla3" constants), on
random-sign and adversarially scaled inputs inside the element-wise bound; bad inputs.
CPU (CI): TRITON_INTERPRET=1 with small shapes and fewer examples per case than second
order; GPU: HYPOTHESIS_PROFILE=gpu.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import kernels
from property_tests import test_kernels as base

ON_GPU, DEVICE = base.ON_GPU, base.DEVICE
OP = "hla3"
FNS = {"chunk": kernels.chunk_hla3, "recurrent": kernels.fused_recurrent_hla3}
MODES = pytest.mark.parametrize("mode", list(FNS))
examples = base.examples


# ----------------------------------------------------------------------------- properties

@MODES
@examples(25)
@given(data=st.data())
def test_float64_matches_reference(mode, data):
    """float64 end to end: <= 1e-10 relative, and the final state equals the reference state."""
    p = data.draw(base.problems(OP, dtypes=("float64",)))
    note(str(p))
    base.check_float64(p, mode)


@pytest.mark.parametrize("p", base.path_cases(OP), ids=[base.path_id(p) for p in base.path_cases(OP)])
def test_float64_paths(p):
    """float64 on the explicit path cases of test_kernels.path_cases."""
    base.check_path_case(p)


@pytest.mark.parametrize("modes", base.HANDOFFS, ids=["-".join(m) for m in base.HANDOFFS])
@examples(3, gpu=4)
@given(data=st.data(), split=st.floats(0, 1))
def test_state_handoff(modes, data, split):
    """Split at any token: first part in one mode, state handed to the other mode."""
    p = data.draw(base.problems(OP, dtypes=("float64",), allow_varlen=False, min_T=2))
    note(str(p))
    base.check_handoff(p, modes, split)


@pytest.mark.parametrize("dtype", base.LOW)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "norm"])
@examples(4, gpu=5)
@given(data=st.data())
def test_low_precision_nonnegative_chunk(dtype, normalize, data):
    """fp32 / fp16 / bf16 chunk kernels, nonnegative inputs, every sequence spanning several
    chunks, fp32 initial state: inside the element-wise and the norm-wise bound (about
    beta ||o||); the fp32 final state too."""
    p = data.draw(base.problems(OP, dtypes=(dtype,), positive=True, multi_chunk=True))
    p["normalize"] = normalize
    note(str(p))
    base.check_low_precision_nonnegative(p, "chunk")


@pytest.mark.parametrize("dtype", base.LOW)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "norm"])
@examples(2, gpu=5)
@given(data=st.data())
def test_low_precision_nonnegative_recurrent(dtype, normalize, data):
    """As the chunk test, for the recurrent kernels (no chunks, so short sequences suffice)."""
    p = data.draw(base.problems(OP, dtypes=(dtype,), positive=True))
    p["normalize"] = normalize
    note(str(p))
    base.check_low_precision_nonnegative(p, "recurrent")


@MODES
@pytest.mark.parametrize("dtype", base.LOW)
@examples(6, gpu=8)
@given(data=st.data())
def test_low_precision_signed(mode, dtype, data):
    """fp32 / fp16 / bf16, random signs: inside the element-wise bound relative to |op|."""
    p = data.draw(base.problems(OP, dtypes=(dtype,), allow_init=False))
    note(str(p))
    base.check_element_wise(p, mode)


@MODES
@examples(15)
@given(data=st.data())
def test_adversarial_magnitudes(mode, data):
    """Rows scaled by 2^U(-12, 12): errors stay inside the bound relative to |op|."""
    p = data.draw(base.problems(OP, dtypes=("float64", "float32"), allow_init=False, scale_range=(-12, 12)))
    note(str(p))
    base.check_element_wise(p, mode)


@base.GPU_ONLY
@pytest.mark.parametrize("shape", [
    # the bf16 case that came out wrong on an H200 (triton 3.6) while its value tile was
    # 32 wide (docs/benchmarks.md); then the benchmark's head size
    dict(B=1, T=21, H=3, d=46, dv=20, lens=[4, 17], gamma=0.23475447186817053, seed=65375003),
    dict(B=1, T=300, H=2, d=128, dv=128, gamma=0.99, seed=300128),
], ids=["d46dv20varlen", "d128dv128"])
def test_bf16_regression_hla3(shape):
    """bf16 chunk kernel inside the bound and bit-identical over repeated runs."""
    p = base.problem(OP, C=64, dtype="bfloat16", **shape)
    tq, nq = base.make_inputs(p)
    outs = [base.run_kernel(p, "chunk", tq, output_final_state=False)[0] for _ in range(3)]
    for o in outs[1:]:
        assert np.array_equal(o, outs[0]), "bf16 chunk output changed between identical runs"
    base.check_against_reference(p, outs[0], nq)


def test_state_matches_hla_core_shapes():
    """HLA3State fields are exactly hla_core.state_shapes("hla3", ...) (per sequence and head)."""
    import hla_core
    q, k, v = base._good(dtype=torch.float64)
    for normalize in (False, True):
        _, stt = kernels.chunk_hla3(q, k, v, normalize=normalize, output_final_state=True)
        want = hla_core.state_shapes(OP, 4, 3, normalize)
        got = {nm: tuple(x.shape[2:]) for nm, x in stt._asdict().items() if x is not None}
        assert got == want


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("fn", list(FNS.values()), ids=list(FNS))
@pytest.mark.parametrize("case,exc,match", base.BAD_CASES + [
    ("state_missing", ValueError, "initial_state.KV is missing"),
    ("state_norm", ValueError, "initial_state.K1 is missing"),
])
def test_bad_inputs_raise_clear_errors(fn, case, exc, match):
    q, k, v = base._good()
    kw = {}
    mk = lambda *s: torch.zeros(*s, device=DEVICE)  # noqa: E731
    if case == "state_missing":
        kw["initial_state"] = kernels.HLA3State(mk(1, 2, 4, 4), None, mk(1, 2, 4, 3))
    elif case == "state_norm":
        kw["initial_state"] = kernels.HLA3State(mk(1, 2, 4, 4), mk(1, 2, 4, 3), mk(1, 2, 4, 3))
        kw["normalize"] = True
    else:
        # every other case builds its inputs exactly as the second-order test does
        return base.test_bad_inputs_raise_clear_errors(fn, case, exc, match)
    with pytest.raises(exc, match=match):
        fn(q, k, v, **kw)
