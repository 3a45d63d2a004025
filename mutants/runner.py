"""Apply each mutant to a copy of the working tree, run its tests there, classify the result.

Outcomes:
  CAUGHT    pytest exited 1 with a failing test (the first one is reported);
  SURVIVED  pytest exited 0: every selected test passed with the bug in place;
  ERROR     anything else: a collection or usage error (exit 2-5), a crash, a timeout.
            Not counted as caught: a mutant must be seen by a test, not break the run;
  STALE     `old` does not occur exactly once in its file (scope): fix the catalogue.

Every run happens in a fresh copy of the files `git ls-files -co --exclude-standard` lists
(taken once at the start, so all runs see one snapshot), with PYTHONPATH pointing at the
copy; the copy's modules are the ones imported, not the editable install's (checked once
before the baseline). The un-mutated snapshot must pass the union of all targets first.
"""
from __future__ import annotations

import concurrent.futures as futures
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .catalogue import Mutant

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("derivations", "hla_core", "kernels", "property_tests")


@dataclass
class Result:
    mutant: Mutant
    outcome: str
    seconds: float = 0.0
    returncode: int | None = None
    first_failure: str = ""
    message: str = ""
    log_tail: str = ""
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ applying

def scope_region(text: str, scope: str | None) -> tuple[int, int]:
    """(start, end) character offsets of the region `old` is searched in."""
    if scope is None:
        return 0, len(text)
    starts = [m.start() for m in re.finditer(r"(?m)^" + re.escape(scope), text)]
    if len(starts) != 1:
        raise LookupError(f"scope {scope!r} starts {len(starts)} lines (need exactly 1)")
    start = starts[0]
    nl = text.find("\n", start)
    m = re.compile(r"(?m)^\S").search(text, nl + 1 if nl >= 0 else len(text))
    return start, (m.start() if m else len(text))


def apply(text: str, m: Mutant) -> str:
    """The mutated text; LookupError (-> STALE) unless `old` occurs once in the scope."""
    lo, hi = scope_region(text, m.scope)
    region = text[lo:hi]
    n = region.count(m.old)
    if n != 1:
        where = f" in scope {m.scope!r}" if m.scope else ""
        raise LookupError(f"old text occurs {n} times{where} in {m.file} (need exactly 1)")
    return text[:lo] + region.replace(m.old, m.new, 1) + text[hi:]


def stale_reason(tree: Path, m: Mutant) -> str | None:
    path = tree / m.file
    if not path.is_file():
        return f"{m.file} does not exist"
    try:
        new = apply(path.read_text(), m)
    except LookupError as exc:
        return str(exc)
    if m.old == m.new:
        return "old and new are identical"
    try:
        compile(new, str(path), "exec")
    except SyntaxError as exc:
        return f"the mutated file does not compile: {exc}"
    return None


# ------------------------------------------------------------------------------ trees

def tracked_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                         check=True, capture_output=True).stdout.decode()
    files = []
    for f in out.split("\0"):
        if not f or f.startswith(".venv/") or f.startswith("shared/"):
            continue
        if (root / f).is_file():
            files.append(f)
    return files


def snapshot(root: Path, dest: Path, rev: str | None = None) -> Path:
    """Copy the working tree's tracked and untracked-not-ignored files to dest (or, with
    `rev`, the files of that commit: a run that others' unfinished edits cannot disturb)."""
    dest.mkdir(parents=True, exist_ok=True)
    if rev is not None:
        tar = subprocess.run(["git", "archive", "--format=tar", rev], cwd=root, check=True,
                             capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            tf.extractall(dest, filter="data")
        shutil.rmtree(dest / "shared", ignore_errors=True)
        return dest
    for f in tracked_files(root):
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, dest / f)
    return dest


def fresh_copy(snap: Path, work: Path, name: str) -> Path:
    dest = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    shutil.copytree(snap, dest, dirs_exist_ok=True)
    return dest


PLUGIN = "_mutants_pytest_plugin"


def env_for(tree: Path) -> dict:
    """The tree under test first on the path; then only the folder holding the plugin."""
    env = dict(os.environ)
    env.update(TRITON_INTERPRET="1", HYPOTHESIS_PROFILE="ci", PYTHONDONTWRITEBYTECODE="1", COLUMNS="400",
               PYTHONPATH=os.pathsep.join([str(tree), str(tree.parent / "_plugin")]))
    return env


def install_plugin(work: Path):
    (work / "_plugin").mkdir(exist_ok=True)
    shutil.copy2(Path(__file__).with_name("_pytest_plugin.py"), work / "_plugin" / f"{PLUGIN}.py")


def python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def verify_imports(tree: Path) -> dict:
    """Import the project's packages as the test runs will, and check they come from `tree`."""
    code = ("import importlib, json; print(json.dumps({p: importlib.import_module(p).__file__ "
            f"for p in {PACKAGES!r}}}))")
    r = subprocess.run([python(), "-c", code], cwd=tree, env=env_for(tree), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"importing the packages in the copy failed:\n{r.stderr[-3000:]}")
    files = json.loads(r.stdout.strip().splitlines()[-1])
    wrong = {p: f for p, f in files.items() if not Path(f).resolve().is_relative_to(tree.resolve())}
    if wrong:
        raise RuntimeError(f"the copy at {tree} imports packages from elsewhere: {wrong}")
    return files


# ------------------------------------------------------------------------------ pytest

def _kill(proc: subprocess.Popen):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_pytest(tree: Path, args: list[str], timeout: float, extra: tuple = ("-x",)):
    """(returncode or None on timeout, output, seconds)."""
    # the project's addopts are overridden so that -q means one level of quiet everywhere
    cmd = [python(), "-m", "pytest", "-o", "addopts=", "-p", PLUGIN, *extra, "-q", "-p", "no:cacheprovider", *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tree, env=env_for(tree), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, _ = proc.communicate()
        rc = None
    return rc, out, time.monotonic() - t0


def collect(tree: Path, args: list[str], timeout: float) -> list[str]:
    rc, out, _ = run_pytest(tree, args, timeout, extra=("--collect-only",))
    if rc not in (0, 5):
        raise RuntimeError(f"collecting {' '.join(args)} failed (exit {rc}):\n{out[-3000:]}")
    return [line.strip() for line in out.splitlines() if "::" in line and not line.startswith(" ")]


FAILED = re.compile(r"^FAILED (.+?)(?: - (.*))?$", re.M)


def classify(m: Mutant, rc, out: str, seconds: float) -> Result:
    tail = "\n".join(out.strip().splitlines()[-40:])
    if rc is None:
        return Result(m, "ERROR", seconds, rc, message="timeout", log_tail=tail)
    if rc == 0:
        return Result(m, "SURVIVED", seconds, rc)
    fails = FAILED.findall(out)
    if rc == 1 and fails:
        node, msg = fails[0]
        return Result(m, "CAUGHT", seconds, rc, first_failure=node, message=(msg or "").strip()[:300])
    why = {1: "exit 1 without a failing test (errors only)", 2: "interrupted / collection error",
           3: "internal error", 4: "usage error", 5: "no tests collected"}.get(rc, f"exit {rc}")
    return Result(m, "ERROR", seconds, rc, message=why, log_tail=tail)


def run_mutant(m: Mutant, snap: Path, work: Path, timeout: float) -> Result:
    reason = stale_reason(snap, m)
    if reason:
        return Result(m, "STALE", message=reason)
    tree = fresh_copy(snap, work, m.id)
    try:
        path = tree / m.file
        path.write_text(apply(path.read_text(), m))
        rc, out, secs = run_pytest(tree, m.pytest_args(), timeout)
        return classify(m, rc, out, secs)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


# ------------------------------------------------------------------------------ the run

def run(mutants: list[Mutant], jobs: int = 1, timeout: float = 600.0, baseline: bool = True,
        log=print, rev: str | None = None) -> dict:
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="hla-mutants-"))
    try:
        install_plugin(work)
        snap = snapshot(ROOT, work / "snapshot", rev)
        if rev is not None:  # name the commit itself: HEAD moves
            sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout.strip()
            rev = rev if rev == sha else f"{rev} = {sha}"
        log(f"snapshot of {'commit ' + rev if rev else 'the working tree'} in {snap}")
        info = {"baseline": None, "imports": None, "rev": rev}
        stale = {m.id: stale_reason(snap, m) for m in mutants}
        for mid, why in stale.items():
            if why:
                log(f"STALE {mid}: {why}")
        live = [m for m in mutants if not stale[m.id]]
        if baseline and live:
            info["imports"] = verify_imports(snap)
            log(f"imports come from the copy: {', '.join(f'{p}' for p in info['imports'])} under {snap}")
            info["baseline"] = run_baseline(live, snap, timeout, jobs, log)
            if not info["baseline"]["passed"]:
                return {"aborted": True, **info, "results": [], "wall_seconds": time.monotonic() - t_start}
        results: list[Result] = []
        lock = threading.Lock()
        n = len(mutants)

        def one(i_m):
            i, m = i_m
            r = run_mutant(m, snap, work, timeout)
            with lock:
                results.append(r)
                where = f"  {r.first_failure}" if r.first_failure else (f"  ({r.message})" if r.message else "")
                log(f"[{len(results):>2}/{n}] {r.outcome:<8} {r.seconds:7.1f}s  {m.id} ({m.area}){where}")
            return r

        if jobs > 1:
            with futures.ThreadPoolExecutor(jobs) as ex:
                list(ex.map(one, enumerate(mutants)))
        else:
            for item in enumerate(mutants):
                one(item)
        order = {m.id: i for i, m in enumerate(mutants)}
        results.sort(key=lambda r: order[r.mutant.id])
        return {"aborted": False, **info, "results": results, "wall_seconds": time.monotonic() - t_start}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_baseline(mutants: list[Mutant], snap: Path, timeout: float, jobs: int, log) -> dict:
    """Collect every mutant's selection on the un-mutated snapshot, run their union once."""
    t0 = time.monotonic()
    selections = list(dict.fromkeys(tuple(m.pytest_args()) for m in mutants))
    nodes: dict[str, None] = {}
    empty = []

    def coll(sel):
        return sel, collect(snap, list(sel), timeout)

    with futures.ThreadPoolExecutor(max(1, jobs)) as ex:
        for sel, ids in ex.map(coll, selections):
            if not ids:
                empty.append(" ".join(sel))
            nodes.update(dict.fromkeys(ids))
    if empty:
        log("selections that collect no test (their mutants will be ERROR): " + "; ".join(empty))
    log(f"baseline: {len(nodes)} tests from {len(selections)} selections on the un-mutated tree ...")
    if not nodes:
        log("baseline: no test collected at all: aborting")
        return {"passed": False, "tests": 0, "selections": len(selections), "seconds": 0.0,
                "summary": "no tests", "empty_selections": empty}
    rc, out, secs = run_pytest(snap, list(nodes), timeout * 3)
    passed = rc == 0
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    log(f"baseline: {'passed' if passed else 'FAILED'} in {secs:.0f} s ({summary})")
    if not passed:
        log("\n".join(out.strip().splitlines()[-60:]))
        log("the un-mutated tree must pass every target first: aborting")
    return {"passed": passed, "tests": len(nodes), "selections": len(selections), "seconds": secs,
            "summary": summary, "empty_selections": empty}
