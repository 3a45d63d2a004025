"""Drivers for generated reference modules: backends, loops, normalization, state.

A generated module (hla_core/generated/<op>.py, or one built in memory by
`Derivation.reference`) supplies only what the derivation produced: for the
numerator and denominator, the streaming update, the readout, the combine ⊕,
and each summary's index pattern. The loops over tokens and chunks, the
backend (float64 or mpmath) and the checks live here, once.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from fractions import Fraction

import mpmath
import numpy as np

from . import validation as V


# ---------------------------------------------------------------------------
# Backends: numpy float64, or numpy object arrays of mpmath numbers.

class Backend:
    def __init__(self, name: str, dps: int = 50):
        self.name, self.dps = name, dps

    @property
    def exact(self) -> bool:
        return self.name in ("mpmath", "exact")

    def array(self, x):
        x = np.asarray(x)
        if self.name == "exact":   # rational object arrays (the engine's exact checks)
            return x.astype(object)
        if self.exact:
            return np.vectorize(lambda e: mpmath.mpf(e) if not isinstance(e, mpmath.mpf) else e,
                                otypes=[object])(x) if x.size else x.astype(object)
        return x.astype(np.float64)

    def scalar(self, x):
        if self.name == "exact":
            return x
        if self.exact:
            if hasattr(x, "numerator") and hasattr(x, "denominator") and not isinstance(x, float):
                return mpmath.mpf(x.numerator) / x.denominator
            return mpmath.mpf(x)
        return float(x)

    def zeros(self, shape):
        if self.name == "exact":
            return np.zeros(shape, dtype=int).astype(object)
        z = np.zeros(shape)
        return self.array(z) if self.exact else z

    def ones(self, shape):
        if self.name == "exact":
            return np.ones(shape, dtype=int).astype(object)
        o = np.ones(shape)
        return self.array(o) if self.exact else o

    def context(self):
        return mpmath.workdps(self.dps) if self.exact else contextlib.nullcontext()


# ---------------------------------------------------------------------------
# Index-pattern sums evaluated directly (quadratic form, local chunk summaries).

@dataclass(frozen=True)
class Spec:
    """A summary's pattern: slots ((in, out, var) or None for a hole), relations
    ((a, op, b) with vars as ints and 'end'), decay ((var, c), ...)."""
    slots: tuple
    rels: tuple
    decay: tuple

    @property
    def nvars(self) -> int:
        return 1 + max(s[2] for s in self.slots if s is not None)

    def chunks(self):
        out, cur = [], []
        for s in self.slots:
            if s is None:
                out.append(cur)
                cur = []
            else:
                cur.append(s)
        out.append(cur)
        return out


def _vec(name, vecs, be):
    if name == "1":
        return be.ones((vecs["q"].shape[0], 1))
    return vecs[name]


def masked_sum(spec: Spec, q, k, v, gamma, be: Backend, per_t: bool, t_vec: str | None = None,
               vecs: dict | None = None):
    """Σ over index tuples of the segment (all of q, k, v) of γ-weighted chains.

    per_t: value at every prefix end t (leading axis T), else only at the end.
    t_vec: contract the leading row with that vector of token t (the output form).
    Holed specs give the dense map with axes (r0, c0, r1, c1, ...).
    """
    vecs = vecs if vecs is not None else {"q": q, "k": k, "v": v}
    n = vecs["q"].shape[0]
    m = spec.nvars
    idx = np.arange(n)
    shape = [n] * (m + 1)

    def axis(j):  # j = -1 for t, else var j
        s = [1] * (m + 1)
        s[j + 1] = n
        return idx.reshape(s)

    tt = axis(-1) if per_t else np.full([1] * (m + 1), n - 1)
    mask = np.ones(shape, dtype=bool)
    for j in range(m):
        mask &= np.broadcast_to(axis(j) <= tt, shape)
    for a, op, b in spec.rels:
        A = tt if a == "end" else axis(a)
        B = tt if b == "end" else axis(b)
        mask &= np.broadcast_to({"<=": A <= B, "<": A < B, "==": A == B}[op], shape)
    expo = np.zeros(shape, dtype=object if be.exact else np.float64)
    for j, c in spec.decay:
        expo = expo + be.scalar(c) * (tt - axis(j))
    if be.exact:
        g = be.scalar(gamma)
        W = np.vectorize(lambda keep, e: exact_pow(g, e) if keep else 0, otypes=[object])(mask, expo)
    else:
        W = np.where(mask, float(gamma) ** expo, 0.0)
    if not per_t:
        W = W[-1]
    letters = iter("abcdefghijklmnopqrsuwxyz")
    vl = [next(letters) for _ in range(m)]
    tl = "t" if per_t else ""
    ops, subs, out = [W], [tl + "".join(vl)], tl
    for n_chunk, chunk in enumerate(spec.chunks()):
        first, last = chunk[0], chunk[-1]
        if t_vec is not None and n_chunk == 0:
            if not per_t:
                raise ValueError("t_vec needs per_t")
            ops.append(_vec(t_vec, vecs, be) @ _vec(first[0], vecs, be).T)
            subs.append("t" + vl[first[2]])
        else:
            r = next(letters)
            ops.append(_vec(first[0], vecs, be))
            subs.append(vl[first[2]] + r)
            out += r
        for a, b in zip(chunk, chunk[1:]):
            ops.append(_vec(a[1], vecs, be) @ _vec(b[0], vecs, be).T)
            subs.append(vl[a[2]] + vl[b[2]])
        c = next(letters)
        ops.append(_vec(last[1], vecs, be))
        subs.append(vl[last[2]] + c)
        out += c
    expr = ",".join(subs) + "->" + out
    if be.exact:
        return np.einsum(expr, *ops)
    return np.einsum(expr, *ops, optimize="greedy")


@dataclass(frozen=True)
class GradSpec:
    """A gradient term's pattern (derivations/gradients.py): vars 0..n-1 with var 0 the
    output token s; `lead` (vector letter at var 0), then chain slots (in, out, var);
    rels (a, op, b) over vars (the old output t is a var like the others); the γ
    exponent is the linear form Σ coef · position over `expo`."""
    lead: str
    slots: tuple
    rels: tuple
    expo: tuple
    nvars: int


def grad_masked_sum(spec: GradSpec, vecs: dict, gamma, be: Backend):
    """Σ over index tuples of γ^{exponent} lead_sᵀ · chain, for every s: shape (T, width).
    `vecs` maps the vector letters (q, k, v, o for the cotangent, 1) to (T, dim) arrays."""
    n = vecs["q"].shape[0]
    m = spec.nvars
    idx = np.arange(n)
    shape = [n] * m

    def axis(j):
        s = [1] * m
        s[j] = n
        return idx.reshape(s)

    mask = np.ones(shape, dtype=bool)
    for a, op, b in spec.rels:
        mask &= np.broadcast_to({"<=": axis(a) <= axis(b), "<": axis(a) < axis(b),
                                 "==": axis(a) == axis(b)}[op], shape)
    if be.exact:
        expo = np.zeros(shape, dtype=object)
        for j, c in spec.expo:
            expo = expo + be.scalar(c) * axis(j)
        g = be.scalar(gamma)
        W = np.vectorize(lambda keep, e: exact_pow(g, e) if keep else 0, otypes=[object])(mask, expo)
    else:
        expo = np.zeros(shape)
        for j, c in spec.expo:
            expo = expo + float(c) * axis(j)
        W = np.where(mask, float(gamma) ** np.where(mask, expo, 0.0), 0.0)
    letters = "abcdefghijklmnopqrsuvwxyz"
    vl = [letters[j] for j in range(m)]
    ops, subs = [W], ["".join(vl)]
    prev_vec, prev_var = spec.lead, 0
    for a_in, a_out, var in spec.slots:
        ops.append(vecs[prev_vec] @ vecs[a_in].T)
        subs.append(vl[prev_var] + vl[var])
        prev_vec, prev_var = a_out, var
    ops.append(vecs[prev_vec])
    subs.append(vl[prev_var] + "Z")
    expr = ",".join(subs) + "->" + vl[0] + "Z"
    if be.exact:
        return np.einsum(expr, *ops)
    return np.einsum(expr, *ops, optimize="greedy")


@dataclass(frozen=True)
class GradStream:
    """A gradient term's streaming form (generated): `prefix` and `suffix` sides, each
    {'state', 'carry', 'factors', 'local', 'specs', 'update', 'combine'} like a forward
    part; the suffix side reads the sequence from T down to 1. At token s the term is
    lead_sᵀ · readout(prefix state of 1..s, suffix state of s+1..T, γ)."""
    lead: str
    prefix: dict
    suffix: dict
    readout: object


@dataclass(frozen=True)
class OutOfReachStream:
    """A gradient term whose two-sided streaming form the engine cannot synthesize."""
    reason: str


def _cotangents(mod, q, k, v, do, g, normalize, eps, be, o_num, o_den):
    """Per part, the cotangent its gradient terms take (quotient rule when normalized)."""
    if not normalize:
        return {"num": do}
    den = o_den + be.scalar(eps)                     # (T, 1)
    return {"num": do / den,                         # ∂o/∂N = 1/(D + ε)
            "den": -np.sum(do * (o_num / den), axis=1, keepdims=True) / den}   # ∂o/∂D


def _vjp(mod, q, k, v, do, g, normalize, eps, be, term_sum, forward):
    """Σ over parts and gradient terms; `term_sum(part, wrt, vecs)` sums one vector's terms."""
    o_num, o_den = forward
    cot = _cotangents(mod, q, k, v, do, g, normalize, eps, be, o_num, o_den)
    parts = {"num": mod.NUM, **({"den": mod.DEN} if normalize else {})}
    out = []
    for wrt, x in (("q", q), ("k", k), ("v", v)):
        acc = be.zeros(x.shape)
        for key, part in parts.items():
            vecs = {"q": q, "k": k, "v": v, "o": cot[key], "1": be.ones((q.shape[0], 1))}
            acc = acc + term_sum(part, wrt, vecs)
        out.append(acc)
    return tuple(out)


def vjp_quadratic(mod, q, k, v, do, g, normalize, eps, be: Backend):
    """(dq, dk, dv) from the derived gradient terms, each summed over all index tuples."""
    o_num = masked_sum(mod.NUM["top"], q, k, v, g, be, per_t=True, t_vec=mod.T_VEC)
    o_den = masked_sum(mod.DEN["top"], q, k, v, g, be, per_t=True, t_vec=mod.T_VEC) if normalize else None

    def term_sum(part, wrt, vecs):
        acc = be.zeros(vecs[wrt].shape)
        for spec in part["grads"][wrt]:
            acc = acc + grad_masked_sum(spec, vecs, g, be)
        return acc
    return _vjp(mod, q, k, v, do, g, normalize, eps, be, term_sum, (o_num, o_den))


def _side_states_recurrent(side, vecs, g, be, dims, order):
    """The side's streaming state after each token, visiting tokens in `order`."""
    state = {n: be.zeros(s) for n, s in _resolve(side["state"], **dims).items()}
    out = {}
    for s in order:
        state = side["update"](state, token_factors(side["factors"], vecs, s, be), g)
        out[s] = state
    return out, {n: be.zeros(s) for n, s in _resolve(side["state"], **dims).items()}


def _side_states_chunked(side, vecs, g, be, dims, chunk_size, reverse):
    """The side's state after each token by an exclusive scan over chunks with ⊕ and local
    inclusion (as the forward chunked form); `reverse` reads the sequence from T down."""
    T = vecs["q"].shape[0]
    if reverse:
        vecs = {n: x[::-1] for n, x in vecs.items()}
    carry = {n: be.zeros(s) for n, s in _resolve(side["carry"], **dims).items()}
    out = {}
    for lo in range(0, T, chunk_size):
        hi = min(T, lo + chunk_size)
        n = hi - lo
        local = {name: masked_sum(side["specs"][name], None, None, None, g, be, per_t=True,
                                  vecs={x: y[lo:hi] for x, y in vecs.items()}) for name in side["local"]}
        rho = np.array([g ** (j + 1) for j in range(n)], dtype=object if be.exact else np.float64)
        inclusive = side["combine"](carry, local, rho.reshape(n, 1, 1))
        for j in range(n):
            out[(T - 1 - (lo + j)) if reverse else lo + j] = {name: val[j] for name, val in inclusive.items()}
        carry = side["combine"](carry, {name: val[-1] for name, val in local.items()}, g ** n)
    return out, {n: be.zeros(s) for n, s in _resolve(side["carry"], **dims).items()}


def vjp_streaming(mod, q, k, v, do, g, normalize, eps, chunk_size, be: Backend, chunked: bool,
                  initial_state=None, dstate=None):
    """(dq, dk, dv) from the gradient terms' streaming forms: each term's prefix states
    (forward in time) and suffix states (backward in time) met at every token. With
    `initial_state` and/or `dstate` (validated dicts), the hand-off part E is added
    (`handoff_vjp`) and, with `initial_state`, its gradient is returned fourth."""
    T, d, dv = q.shape[0], q.shape[1], v.shape[1]
    S0 = None if initial_state is None else {n: be.array(a) for n, a in initial_state.items()}
    dS = None if dstate is None else {n: be.array(a) for n, a in dstate.items()}
    forward = (_recurrent_part(mod, "NUM", q, k, v, g, be, S0),
               _recurrent_part(mod, "DEN", q, k, v, g, be, S0) if normalize else None)

    def term_sum(part, wrt, vecs):
        dims = dict(d=d, dv=dv, do=vecs["o"].shape[1])
        acc = be.zeros(vecs[wrt].shape)
        for gs in part["grad_streams"][wrt]:
            if isinstance(gs, OutOfReachStream):
                raise NotImplementedError(f"form: a gradient term of this operator has no streaming "
                                          f"form ({gs.reason}); use form='quadratic'")
            if chunked:
                pre, _ = _side_states_chunked(gs.prefix, vecs, g, be, dims, chunk_size, reverse=False)
                suf, empty = _side_states_chunked(gs.suffix, vecs, g, be, dims, chunk_size, reverse=True)
            else:
                pre, _ = _side_states_recurrent(gs.prefix, vecs, g, be, dims, range(T))
                suf, empty = _side_states_recurrent(gs.suffix, vecs, g, be, dims, range(T - 1, -1, -1))
            rows = [vecs[gs.lead][s] @ gs.readout(pre[s], suf.get(s + 1, empty), g) for s in range(T)]
            acc = acc + np.stack(rows)
        return acc
    grads = _vjp(mod, q, k, v, do, g, normalize, eps, be, term_sum, forward)
    if S0 is None and dS is None:
        return grads
    cot = _cotangents(mod, q, k, v, do, g, normalize, eps, be, *forward)
    extra, dS0 = handoff_vjp(mod, q, k, v, cot, g, normalize, be, S0, dS, chunk_size, chunked)
    grads = tuple(x + extra[n] for x, n in zip(grads, "qkv"))
    return grads if S0 is None else grads + (dS0,)


def _recurrent_part(mod, which, q, k, v, g, be, initial_state=None):
    """One part's unnormalized readout (N or D) by the serial recurrence (from the part's
    entries of `initial_state` when given)."""
    part = getattr(mod, which)
    state = {n: be.zeros(s) if initial_state is None else initial_state[n]
             for n, s in state_shapes(part, q.shape[1], v.shape[1]).items()}
    tv = {"q": q, "k": k}[mod.T_VEC]
    out = []
    for t in range(q.shape[0]):
        state = part["update"](state, token_factors(part["factors"], {"q": q, "k": k, "v": v}, t, be), g)
        out.append(tv[t] @ part["readout"](state))
    return np.stack(out)


def vjp(mod, q, k, v, do, *, form="quadratic", gamma=1.0, normalize=False, eps=1e-6,
        chunk_size=16, backend="numpy", dps=50, initial_state=None, dstate=None):
    """(dq, dk, dv) of Σ_t do_t · o_t + Σ_name ⟨dstate[name], final_state[name]⟩ for a
    generated reference module, the forward starting from `initial_state` (a state dict as
    `evaluate(..., return_state=True)` returns; None: the empty prefix). With
    `initial_state`, a fourth element: {name: gradient} of the same shapes. Single head.
    The quadratic form starts from the empty prefix and returns no hand-off: it refuses
    both (use form='recurrent' or 'chunked')."""
    V.check_options(normalize, eps, chunk_size, form, backend, dps)
    q, k, v = V.check_qkv(q, k, v)
    do = V.check_cotangent(do, (q.shape[0], v.shape[1]))
    V.check_gamma(gamma, mod.HAS_DECAY)
    if form == "quadratic":
        if initial_state is not None:
            raise ValueError("initial_state: the quadratic form starts from the empty prefix; "
                             "use form='recurrent' or form='chunked' to continue a state")
        if dstate is not None:
            raise ValueError("dstate: the quadratic VJP has no state hand-off; "
                             "use form='recurrent' or form='chunked' for a final-state cotangent")
    shapes = _merge_shapes(mod, normalize, q.shape[1], v.shape[1],
                           "carry" if form == "chunked" else "state")
    if initial_state is not None:
        initial_state = V.check_state(initial_state, shapes, "initial_state")
    if dstate is not None:
        dstate = V.check_state(dstate, shapes, "dstate")
    be = Backend(backend, dps)
    with be.context():
        arr = [be.array(x) for x in (q, k, v, do)]
        if form == "quadratic":
            return vjp_quadratic(mod, *arr, be.scalar(gamma), normalize, eps, be)
        return vjp_streaming(mod, *arr, be.scalar(gamma), normalize, eps, chunk_size, be,
                             chunked=form == "chunked", initial_state=initial_state, dstate=dstate)


# ---------------------------------------------------------------------------
# State hand-off gradients (initial_state, dstate): reverse mode through generated code.
#
# With an initial state S0 the forward is the ⊕-combination of S0 (a prefix segment) with
# the summaries of tokens 1..t, and each state entry is a polynomial in S0's entries and
# the token factors (the generated `update`, `readout` and ⊕ are sums of products of
# them). Split every value exactly as x = P + Z, where P collects the monomials that hold
# at least one entry of S0 and Z the rest (the value from an empty prefix; the split is
# closed under +, scalar ·, @ and einsum). The loss is then
#     Σ_t do_t · Z-part of o_t                       — the derived gradient terms above
#   + Σ_t do_t · P-part of o_t + ⟨dstate, S_T⟩       — E, the hand-off part
# (per part N, D with the quotient-rule cotangents when normalized). E's gradient, with
# respect to q, k, v and S0, comes from one reverse-mode pass over the generated per-token
# `update` and `readout`, run on P/Z pairs: nothing is written per operator, any Pattern
# the engine derives works, and no term of the derived gradient is recomputed or
# subtracted. The chunked form takes its checkpoints (the pairs at chunk starts) from the
# generated ⊕ over chunk totals, then runs the reverse pass chunk by chunk from the last,
# each chunk handing the cotangent of its starting pair to the chunk before it (the
# paper's reverse scan with checkpointing).

class _Tape:
    def __init__(self):
        self.nodes = []


class _Node:
    """A value on the tape with its parents and each parent's pullback."""
    __slots__ = ("val", "parents")

    def __init__(self, tape, val, parents=()):
        self.val, self.parents = val, parents
        tape.nodes.append(self)


def _n_add(tape, a, b):
    if a is None or b is None:
        return b if a is None else a
    return _Node(tape, a.val + b.val, ((a, lambda c: c), (b, lambda c: c)))


def _n_scale(tape, s, a):
    return None if a is None else _Node(tape, s * a.val, ((a, lambda c: s * c),))


def _n_einsum(tape, expr, ops):
    """einsum of nodes and constant arrays; the pullback to operand i is the einsum of the
    output cotangent with the other operands (every index of an operand is in the output or
    in another operand, as in R.apply / R.chain / R.outer and matmul)."""
    if any(o is None for o in ops):
        return None
    ins, out = expr.split("->")
    subs = ins.split(",")
    vals = [o.val if isinstance(o, _Node) else o for o in ops]
    parents = []
    for i, o in enumerate(ops):
        if isinstance(o, _Node):
            rest = [j for j in range(len(ops)) if j != i]
            pull = ",".join([out] + [subs[j] for j in rest]) + "->" + subs[i]
            parents.append((o, lambda c, pull=pull, rest=rest: np.einsum(pull, c, *(vals[j] for j in rest))))
    return _Node(tape, np.einsum(expr, *vals), tuple(parents))


class _Split:
    """x = P + Z (see above): P, Z nodes on one tape, or None for an exact zero."""
    __array_ufunc__ = None

    def __init__(self, tape, P, Z):
        self.tape, self.P, self.Z = tape, P, Z

    def __add__(self, o):
        t = self.tape
        return _Split(t, _n_add(t, self.P, o.P), _n_add(t, self.Z, o.Z))

    def __neg__(self):
        return -1 * self

    def __sub__(self, o):
        return self + (-1 * o)

    def __mul__(self, s):
        if isinstance(s, _Split):
            raise TypeError("state hand-off: a product of two summaries is written with @")
        return _Split(self.tape, _n_scale(self.tape, s, self.P), _n_scale(self.tape, s, self.Z))

    __rmul__ = __mul__

    def __radd__(self, o):
        if isinstance(o, (int, float)) and o == 0:
            return self
        return NotImplemented

    def __matmul__(self, o):
        return _split_einsum("ab,bc->ac", [self, o])

    def __rmatmul__(self, o):
        return _split_einsum("ab,bc->ac", [o, self])


def _split_einsum(expr, ops):
    """einsum of _Split operands (and constants), expanded multilinearly into P and Z."""
    tape = next(o.tape for o in ops if isinstance(o, _Split))
    pos = [i for i, o in enumerate(ops) if isinstance(o, _Split)]
    P = Z = None
    for choice in range(1 << len(pos)):
        args = list(ops)
        for b, i in enumerate(pos):
            args[i] = ops[i].P if choice >> b & 1 else ops[i].Z
        if choice:
            P = _n_add(tape, P, _n_einsum(tape, expr, args))
        else:
            Z = _n_einsum(tape, expr, args)
    return _Split(tape, P, Z)


def _einsum(expr, *ops):
    """np.einsum, or its P/Z expansion when generated code runs on _Split values."""
    if any(isinstance(o, _Split) for o in ops):
        return _split_einsum(expr, list(ops))
    return np.einsum(expr, *ops)


def _backward(tape, seeds):
    """Reverse sweep: {id(node): cotangent} for every node the seeds reach."""
    grads = {}

    def acc(node, c):
        k = id(node)
        grads[k] = grads[k] + c if k in grads else c
    for node, c in seeds:
        if node is not None:
            acc(node, c)
    for node in reversed(tape.nodes):
        c = grads.get(id(node))
        if c is not None:
            for parent, pull in node.parents:
                acc(parent, pull(c))
    return grads


def _check_stream_is_carry(mod, normalize):
    for _, part in _parts(mod, normalize):
        if list(part["state"]) != list(part["carry"]):
            raise NotImplementedError("state hand-off: this operator's chunk carry differs from its "
                                      "streaming state; its hand-off gradients are not supported")


def _handoff_segment(mod, normalize, vecs, cot, start, end_cot, g, be, lo, hi):
    """Reverse pass over tokens lo..hi-1 from `start` ({name: (P, Z)} values, None = 0).
    `end_cot` {name: (dP, dZ)} is the cotangent of the state after token hi-1. Returns
    (E's gradient rows for q, k, v over lo..hi-1, {name: (dP, dZ)} of `start`)."""
    tape = _Tape()
    leaf = lambda x: None if x is None else _Node(tape, x)
    first = {n: _Split(tape, leaf(P), leaf(Z)) for n, (P, Z) in start.items()}
    rows = {x: [_Node(tape, vecs[x][t][None, :]) for t in range(lo, hi)] for x in "qkv"}
    one = _Node(tape, be.ones((1, 1)))
    parts = _parts(mod, normalize)
    state, seeds = first, []
    for j, t in enumerate(range(lo, hi)):
        row = lambda x: one if x == "1" else rows[x][j]
        new = {}
        for key, part in parts:
            F = {f: _Split(tape, None, _n_einsum(tape, "ia,ib->ab", [row(f[0]), row(f[1])]))
                 for f in part["factors"]}
            new.update(part["update"](state, F, g))
        state = new
        for key, part in parts:
            o = _Split(tape, None, rows[mod.T_VEC][j]) @ part["readout"](state)
            seeds.append((o.P, cot[key][t][None, :]))
    for n, s in state.items():
        dP, dZ = end_cot.get(n, (None, None))
        if dP is not None:
            seeds.append((s.P, dP))
        if dZ is not None:
            seeds.append((s.Z, dZ))
    grads = _backward(tape, seeds)
    pick = lambda node: None if node is None else grads.get(id(node))
    out = {x: np.stack([pick(r)[0] if pick(r) is not None else be.zeros(r.val.shape[1]) for r in rows[x]])
           for x in "qkv"}
    return out, {n: (pick(s.P), pick(s.Z)) for n, s in first.items()}


def _checkpoints(mod, normalize, q, k, v, g, be, chunk_size, start):
    """The (P, Z) carry at every chunk start: the generated ⊕ of the carry with each
    chunk's total summaries (as the forward chunked form)."""
    T = q.shape[0]
    out = [start]
    carry = start
    for lo in range(0, T - chunk_size, chunk_size):
        hi = min(T, lo + chunk_size)
        tape = _Tape()
        leaf = lambda x: None if x is None else _Node(tape, x)
        A = {n: _Split(tape, leaf(P), leaf(Z)) for n, (P, Z) in carry.items()}
        nxt = {}
        for _, part in _parts(mod, normalize):
            B = {n: _Split(tape, None, _Node(tape, masked_sum(part["specs"][n], q[lo:hi], k[lo:hi], v[lo:hi],
                                                              g, be, per_t=False)))
                 for n in part["local"]}
            nxt.update(part["combine"](A, B, g ** (hi - lo)))
        carry = {n: (None if s.P is None else s.P.val, None if s.Z is None else s.Z.val) for n, s in nxt.items()}
        out.append(carry)
    return out


def handoff_vjp(mod, q, k, v, cot, g, normalize, be, S0, dS, chunk_size, chunked):
    """E's gradient (see above): ({'q', 'k', 'v'}: (T, dim) arrays, {name: dS0})."""
    _check_stream_is_carry(mod, normalize)
    T, d, dv = q.shape[0], q.shape[1], v.shape[1]
    shapes = _merge_shapes(mod, normalize, d, dv, "state")
    vecs = {"q": q, "k": k, "v": v}
    start = {n: (None if S0 is None else S0[n], None) for n in shapes}
    end_cot = {} if dS is None else {n: (dS[n], dS[n]) for n in shapes}
    bounds = [(lo, min(T, lo + chunk_size)) for lo in range(0, T, chunk_size)] if chunked else [(0, T)]
    starts = _checkpoints(mod, normalize, q, k, v, g, be, chunk_size, start) if chunked else [start]
    grads = {x: [] for x in "qkv"}
    for (lo, hi), st in reversed(list(zip(bounds, starts))):
        rows, end_cot = _handoff_segment(mod, normalize, vecs, cot, st, end_cot, g, be, lo, hi)
        for x in "qkv":
            grads[x].insert(0, rows[x])
    dS0 = {n: end_cot[n][0] if end_cot[n][0] is not None else be.zeros(s) for n, s in shapes.items()}
    return {x: np.concatenate(r) for x, r in grads.items()}, dS0


def apply(M, fillers, breaks):
    """Fill the holes of a dense map M (axes r0, c0, ..., rh, ch after any batch axes).
    Filler k has 2*breaks[k] + 2 axes (its own open holes); they take the place of hole k."""
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    h = len(fillers)
    m_ax = [next(letters) for _ in range(2 * h + 2)]
    subs, out = ["..." + "".join(m_ax)], [m_ax[0]]
    for k, b in enumerate(breaks):
        inner = [next(letters) for _ in range(2 * b)]
        subs.append("..." + m_ax[2 * k + 1] + "".join(inner) + m_ax[2 * k + 2])
        out += inner
    out.append(m_ax[-1])
    return _einsum(",".join(subs) + "->..." + "".join(out), M, *fillers)


def chain(values, breaks):
    """Product of open values: the last axis of each meets the first axis of the next."""
    out, b_out = values[0], breaks[0]
    for x, b in zip(values[1:], breaks[1:]):
        letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
        la = [next(letters) for _ in range(2 * b_out + 2)]
        lb = [la[-1]] + [next(letters) for _ in range(2 * b + 1)]
        out = _einsum(f"...{''.join(la)},...{''.join(lb)}->...{''.join(la[:-1] + lb[1:])}", out, x)
        b_out += b
    return out


def outer(values, ranks):
    """Outer product of open values with the given non-batch ranks: the hole between
    consecutive values stays open (any leading token axes broadcast)."""
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    subs = ["".join(next(letters) for _ in range(r)) for r in ranks]
    return _einsum(",".join("..." + x for x in subs) + "->..." + "".join(subs), *values)


def eye(n):
    return np.eye(n)


def exact_pow(g, e):
    """g ** e that stays exact where it can: integral exponents of rationals, and γ = 1
    (a rational to a fractional power is irrational: it falls back to float)."""
    if isinstance(e, Fraction) and e.denominator == 1:
        return g ** int(e)
    if g == 1:
        return g
    return g ** e


def frac_pow(x, p: int, q: int):
    """x ** (p / q) for a decay with a fractional coefficient: x is a float, an mpmath
    number or an array of either (per-token ρ); the exponent is formed in x's precision."""
    exact = isinstance(x, mpmath.mpf) or (isinstance(x, np.ndarray) and x.dtype == object)
    return x ** (mpmath.mpf(p) / q if exact else p / q)


def scale(c, x, rank):
    """c * x where c is a scalar or a per-token vector (shape (n, 1, 1)) and x has
    `rank` axes after an optional leading token axis."""
    if np.ndim(c) == 0:
        return c * x
    c = np.reshape(c, (-1,) + (1,) * rank)
    return c * x


def token_factors(names, vecs: dict, t, be):
    """{factor: x_t y_tᵀ} of token t; `vecs` maps the letters (q, k, v, o) to (T, dim)."""
    out = {}
    for f in names:
        a = _vec(f[0], vecs, be)[t]
        b = _vec(f[1], vecs, be)[t]
        out[f] = np.multiply.outer(a, b)
    return out


# ---------------------------------------------------------------------------
# Drivers

def _resolve(shapes: dict, d, dv, do=None) -> dict:
    """{name: ('d', 'dv', ...)} -> {name: (d, dv, ...)}; 'do' is the cotangent's width."""
    dims = {"d": d, "dv": dv, "1": 1, "do": do}
    return {name: tuple(dims[x] for x in shp) for name, shp in shapes.items()}


def state_shapes(part, d, dv) -> dict:
    return _resolve(part["state"], d, dv)


def _parts(mod, normalize):
    return [("num", mod.NUM)] + ([("den", mod.DEN)] if normalize else [])


def _merge_shapes(mod, normalize, d, dv, which):
    """Shapes of the 'state' (streaming) or 'carry' (chunked) summaries of the used parts."""
    shapes = {}
    for _, part in _parts(mod, normalize):
        shapes.update(_resolve(part[which], d, dv))
    return shapes


def _init(mod, normalize, d, dv, initial_state, be, which):
    shapes = _merge_shapes(mod, normalize, d, dv, which)
    if initial_state is None:
        return {n: be.zeros(s) for n, s in shapes.items()}
    st = V.check_state(initial_state, shapes)
    return {n: be.array(a) for n, a in st.items()}


def _finish(o_num, o_den, eps, be):
    if o_den is None:
        return o_num
    return o_num / (o_den + be.scalar(eps))


def evaluate(mod, q, k, v, *, form="recurrent", gamma=1.0, normalize=False, eps=1e-6,
             chunk_size=16, backend="numpy", dps=50, initial_state=None, return_state=False):
    """Run a generated reference module. Single head: q, k (T, d), v (T, dv)."""
    V.check_options(normalize, eps, chunk_size, form, backend, dps)
    q, k, v = V.check_qkv(q, k, v)
    V.check_gamma(gamma, mod.HAS_DECAY)
    if not isinstance(return_state, (bool, np.bool_)):
        raise TypeError(f"return_state: expected True or False, got {return_state!r}")
    be = Backend(backend, dps)
    with be.context():
        qq, kk, vv = be.array(q), be.array(k), be.array(v)
        g = be.scalar(gamma)
        run = {"quadratic": _quadratic, "recurrent": _recurrent, "chunked": _chunked}[form]
        o, state = run(mod, qq, kk, vv, g, normalize, eps, chunk_size, initial_state, be)
    return (o, state) if return_state else o


def _quadratic(mod, q, k, v, g, normalize, eps, chunk_size, initial_state, be):
    if initial_state is not None:
        raise ValueError("initial_state: the quadratic form starts from the empty prefix; "
                         "use form='recurrent' or form='chunked' to continue a state")
    outs = {}
    state = {}
    for key, part in _parts(mod, normalize):
        outs[key] = masked_sum(part["top"], q, k, v, g, be, per_t=True, t_vec=mod.T_VEC)
        for name in part["state"]:
            state[name] = masked_sum(part["specs"][name], q, k, v, g, be, per_t=False)
    return _finish(outs["num"], outs.get("den"), eps, be), state


def _recurrent(mod, q, k, v, g, normalize, eps, chunk_size, initial_state, be):
    T, d, dv = q.shape[0], q.shape[1], v.shape[1]
    state = _init(mod, normalize, d, dv, initial_state, be, "state")
    parts = _parts(mod, normalize)
    outs = {key: [] for key, _ in parts}
    tv = {"q": q, "k": k}[mod.T_VEC]
    for t in range(T):
        new = {}
        for key, part in parts:
            F = token_factors(part["factors"], {"q": q, "k": k, "v": v}, t, be)
            new.update(part["update"](state, F, g))
        state = new
        for key, part in parts:
            outs[key].append(tv[t] @ part["readout"](state))
    o = _finish(np.stack(outs["num"]), np.stack(outs["den"]) if "den" in outs else None, eps, be)
    return o, state


def _chunked(mod, q, k, v, g, normalize, eps, chunk_size, initial_state, be):
    """Exclusive scan over chunks with ⊕, then local inclusion inside each chunk."""
    T, d, dv = q.shape[0], q.shape[1], v.shape[1]
    carry = _init(mod, normalize, d, dv, initial_state, be, "carry")
    parts = _parts(mod, normalize)
    tv = {"q": q, "k": k}[mod.T_VEC]
    outs = {key: [] for key, _ in parts}
    for lo in range(0, T, chunk_size):
        hi = min(T, lo + chunk_size)
        n = hi - lo
        new_carry = {}
        for key, part in parts:
            local = {name: masked_sum(part["specs"][name], q[lo:hi], k[lo:hi], v[lo:hi], g, be,
                                      per_t=True) for name in part["local"]}
            rho = np.array([g ** (j + 1) for j in range(n)], dtype=object if be.exact else np.float64)
            inclusive = part["combine"](carry, local, rho.reshape(n, 1, 1))
            X = part["readout"](inclusive)
            outs[key].append(np.einsum("ta,tab->tb", tv[lo:hi], X))
            total = {name: val[-1] for name, val in local.items()}
            new_carry.update(part["combine"](carry, total, g ** n))
        carry = new_carry
    o = _finish(np.concatenate(outs["num"]), np.concatenate(outs["den"]) if "den" in outs else None,
                eps, be)
    return o, carry
