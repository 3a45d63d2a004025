"""Input checks for the reference API: every error names the argument and what was expected."""
from __future__ import annotations

import math
import numbers

import mpmath
import numpy as np

FORMS = ("quadratic", "recurrent", "chunked")
BACKENDS = ("numpy", "mpmath")


def _as_matrix(name: str, x) -> np.ndarray:
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name}: expected a 2-D array of real numbers (T, dim), got {type(x).__name__}")
    arr = np.asarray(x) if not hasattr(x, "detach") else x.detach().cpu().numpy()
    if arr.dtype == object:
        try:
            arr = np.array([[float(e) for e in row] for row in arr], dtype=np.float64) \
                if arr.ndim == 2 else arr
        except (TypeError, ValueError):
            raise TypeError(f"{name}: entries must be real numbers") from None
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array of shape (T, dim) for one head, "
                         f"got {arr.ndim} dimension(s) with shape {tuple(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name}: expected real floating or integer entries, got dtype {arr.dtype}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: sequence length T must be ≥ 1, got T = 0")
    if arr.shape[1] == 0:
        raise ValueError(f"{name}: feature dimension must be ≥ 1, got shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name}: non-finite value {arr[tuple(bad)]} at index {tuple(int(b) for b in bad)}")
    return arr.astype(np.float64)


def check_qkv(q, k, v):
    q, k, v = _as_matrix("q", q), _as_matrix("k", k), _as_matrix("v", v)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k: length T = {k.shape[0]} does not match q's T = {q.shape[0]}")
    if v.shape[0] != q.shape[0]:
        raise ValueError(f"v: length T = {v.shape[0]} does not match q's T = {q.shape[0]}")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k: head size d = {k.shape[1]} does not match q's d = {q.shape[1]}")
    return q, k, v


def check_gamma(gamma, has_decay: bool) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"gamma: expected a real number in (0, 1], got {type(gamma).__name__}")
    g = float(gamma)
    if not math.isfinite(g) or not (0.0 < g <= 1.0):
        raise ValueError(f"gamma: expected a value in (0, 1], got {gamma!r}")
    if g != 1.0 and not has_decay:
        raise ValueError(f"gamma: this operator has no decay term, so gamma must be 1, got {gamma!r}")
    return gamma


def check_options(normalize, eps, chunk_size, form=None, backend=None, dps=None):
    if not isinstance(normalize, (bool, np.bool_)):
        raise TypeError(f"normalize: expected True or False, got {normalize!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(float(eps)) \
            or float(eps) <= 0:
        raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an integer ≥ 1, got {chunk_size!r}")
    if form is not None and form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if dps is not None and (isinstance(dps, bool) or not isinstance(dps, numbers.Integral) or dps < 15):
        raise ValueError(f"dps: expected an integer ≥ 15 (decimal digits for mpmath), got {dps!r}")


def check_state(state, shapes: dict, name: str = "initial_state") -> dict:
    """State dict: exactly the expected keys, shapes, finite values."""
    if not isinstance(state, dict):
        raise TypeError(f"{name}: expected a dict of arrays with keys {sorted(shapes)}, "
                        f"got {type(state).__name__}")
    missing = sorted(set(shapes) - set(state))
    extra = sorted(set(state) - set(shapes))
    if missing or extra:
        raise ValueError(f"{name}: expected keys {sorted(shapes)}; missing {missing}, unexpected {extra}")
    out = {}
    for key, shape in shapes.items():
        arr = np.asarray(state[key])
        if arr.shape != tuple(shape):
            raise ValueError(f"{name}[{key!r}]: expected shape {tuple(shape)}, got {arr.shape}")
        if arr.dtype == object:   # mpmath (or rational) entries, as the mpmath backend returns
            try:
                finite = all(mpmath.isfinite(e) if isinstance(e, mpmath.mpf) else math.isfinite(float(e))
                             for e in arr.ravel())
            except (TypeError, ValueError):
                raise ValueError(f"{name}[{key!r}]: entries must be real numbers") from None
        else:
            finite = bool(np.all(np.isfinite(arr)))
        if not finite:
            raise ValueError(f"{name}[{key!r}]: contains non-finite values")
        out[key] = arr
    return out


def check_cotangent(do, shape: tuple):
    """The output cotangent: a finite (T, dv) array, the output's shape."""
    arr = _as_matrix("do", do)
    if arr.shape != tuple(shape):
        raise ValueError(f"do: expected the output's shape (T, dv) = {tuple(shape)}, got {arr.shape}")
    return arr
