"""kernels.resources compiles the training launches for Hopper on any machine and reads
registers and stack frame from the cubin (the static evidence docs/benchmarks.md quotes).
It needs the compiler, so it runs in a subprocess without TRITON_INTERPRET."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def table():
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("this Triton ships no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "kernels.resources", "--d", "64,128"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0].isdigit():
            rows[(int(cells[0]), cells[1].split(" (")[0])] = (int(cells[4]), int(cells[5]), int(cells[6]))
    return rows


def test_every_launch_is_counted(table):
    assert len(table) == 14   # seven launches at each of two head sizes
    for regs, stack, _ in table.values():
        assert 32 <= regs <= 255 and 0 <= stack < 64 * 1024   # Hopper's per-thread register cap


def test_wider_fused_carry_keeps_more_on_the_stack(table):
    """What docs/benchmarks.md's explanation of the d = 128 fused output stage rests on: it
    spills where the reversed LA it replaces (two value-block programs per head) barely does."""
    out, rev = "fused key/value, output stage", "LA reversed, fp32 output, value block 64"
    assert table[(128, out)][2] > 2 * table[(64, out)][2]
    assert table[(128, out)][2] > 4 * 2 * table[(128, rev)][2]


def test_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "kernels.resources"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "TRITON_INTERPRET" in out.stderr
