"""Backward of the LA chains: every HLA kernel is a torch.autograd op.

One stage of a chain (kernels/gla.py: Stage) is N = LA(q, a, b; g) with a the stage's key,
b its value (token vectors or earlier stages' outputs), g = gamma^power:

    N_t = sum_{j <= t} g^(t-j) (q_t . a_j) b_j      (+ g^(t+1) q_t^T X0, X0 the initial carry)

Its VJP for a cotangent dN is again three LAs, one forward and two backward in time
(VJP_RULES below; derived by hand, checked against the engine's gradient terms by
property_tests/test_kernels_backward.py, symbolically for every T, and numerically):

    dq_t = sum_{j <= t} g^(t-j) (dN_t . b_j) a_j   = LA(dN, b, a)_t         forward
    da_j = sum_{t >= j} g^(t-j) (b_j . dN_t) q_t   = LA~(b, dN, q)_j        reversed
    db_j = sum_{t >= j} g^(t-j) (a_j . q_t) dN_t   = LA~(a, q, dN)_j        reversed

LA~ is the LA kernel reading every sequence from its last token (REV: no flipped copies,
cu_seqlens too). The chain's backward runs its stages in reverse order; a stage's key or
value that is an earlier stage's output passes its cotangent on to that stage (the key
stage of HLA2 / HLA3 has key = value = k, so both its a- and b-cotangents land on k).
Carries: the initial carry X0 enters the forward rule as its initial carry (transposed:
that rule's carry is sum b a^T); a cotangent dXf on the final carry enters the reversed
rules as theirs, one decay ahead (SHIFT: X_final holds the last token with g^0); and the
reversed rule with key q and value dN ends on sum_t g^t q_t dN_t^T, so
dX0 = g (that carry) = sum_t g^(t+1) q_t dN_t^T + g^L dXf.

Normalized operators: every stage with a side carry also runs its v -> 1 channel, a
scalar per token (kernels/gla.py); in the backward dN comes with the side cotangent dD,
and b with the side value b1 (1 for v, the previous stage's side output after it). The
three rules act on the extended vectors [dN, dD], [b, b1]: rules 1 and 2 take the scalar
pair as a query/key side channel (QS), rule 3 as a value side channel whose output is b1's
cotangent. The dividing stage o = N / (D + eps) starts them with the quotient rule
dN = do / (D + eps), dD = -(do . o) / (D + eps).

Memory kept for the backward, per token and head: the intermediate stage outputs (kt: d,
vt: dv in the stage-output format, bf16 for bf16 inputs; vt1: one fp32 with normalize)
and, normalized, the denominator D (one fp32); q, k, v, o are the caller's tensors
(q * scale is kept when scale != 1). Nothing d x d per token or per chunk. The backward
writes each intermediate stage's cotangent once, in the stage-output format (bf16 for bf16
inputs: what its LAs round it to anyway), a gradient written by one rule directly in the
input dtype, and accumulates a gradient written by several rules (dq: one per stage; dk of
a key stage) in an fp32 buffer that its last rule reads and converts (chain_backward).
Two launches that would share such a buffer are fused where they apply: a stage's key and
value rules (kernels/backward_pair.py) and two stages' query rules (backward_query.py),
which add their terms in registers; in HLA2's backward (unnormalized, no initial-state
gradient) dq and dk then need no buffer.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from . import cp
from ._common import _is_real
from .backward_pair import reversed_pair
from .backward_query import query_pair
from .gla import as_carries, forward_chain, setup_chain


class Rule(NamedTuple):
    """One LA of a stage's VJP: target += LA(query, key, value; g), in time order or
    reversed. Roles: "q" the token query, "a" the stage's key, "b" its value, "dN" the
    cotangent of the stage's output; target "q", "a" or "b"."""
    target: str
    query: str
    key: str
    value: str
    reverse: bool


VJP_RULES = (Rule("q", query="dN", key="b", value="a", reverse=False),
             Rule("a", query="b", key="dN", value="q", reverse=True),
             Rule("b", query="a", key="q", value="dN", reverse=True))
SIDE_OF = {"dN": "dD", "b": "b1"}  # the roles with a scalar v -> 1 partner (normalized)
B_SPACE = ("b", "dN")              # roles in the value space (a rule's carry is key x value)


def _autocast(q, k, v):
    """Inside torch.autocast the kernels compute in the autocast dtype, like a matmul:
    float32 / float16 / bfloat16 inputs are cast to it (float64 is left alone), the output
    and the final state's dtypes follow, and autograd casts the gradients back to the
    inputs' dtypes."""
    if not isinstance(q, torch.Tensor) or not torch.is_autocast_enabled(q.device.type):
        return q, k, v
    dt = torch.get_autocast_dtype(q.device.type)
    cast = (lambda x: x.to(dt) if isinstance(x, torch.Tensor)  # noqa: E731
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16) else x)
    return cast(q), cast(k), cast(v)


def check_scale(scale) -> float:
    if not _is_real(scale):
        raise TypeError(f"scale must be a real number (Python or numpy scalar), got {scale!r} "
                        f"({type(scale).__name__})")
    s = float(scale)
    if not math.isfinite(s):
        raise ValueError(f"scale must be finite, got {s!r}")
    return s


class _Config(NamedTuple):
    chain: tuple
    state_cls: type
    mode: str
    gamma: object
    scale: float
    normalize: bool
    eps: float
    chunk_size: int
    output_final_state: bool
    cu_seqlens: object
    check_finite: bool
    knobs: dict
    state: object       # the initial state with its tensor fields taken out (None placeholders)
    state_idx: tuple    # positions of the tensor fields passed to apply
    cp_group: object    # torch.distributed group splitting the sequence (kernels/cp.py) or None


class ChainFunction(torch.autograd.Function):
    """(o, *final-state fields) = the chain's forward; backward: chain_backward."""

    @staticmethod
    def forward(ctx, cfg: _Config, q, k, v, *fields):
        state = cfg.state
        if cfg.state_idx:
            vals = list(state)
            for i, x in zip(cfg.state_idx, fields):
                vals[i] = x
            state = type(state)(*vals)
        with torch.autocast(q.device.type, enabled=False):
            with cp.failures_relayed(cfg.cp_group, q):  # the other ranks wait for this one's header
                p, st, fin, la = setup_chain(cfg.chain, cfg.state_cls, cfg.mode, q, k, v, cfg.gamma, cfg.normalize,
                                             cfg.eps, cfg.chunk_size, state, cfg.output_final_state,
                                             cfg.cu_seqlens, cfg.check_finite, **cfg.knobs)
            if cfg.cp_group is not None:
                need = ctx.needs_input_grad
                la.cp = cp.setup(cfg.cp_group, cp.chain_id(cfg.chain), p, q, normalize=cfg.normalize, eps=cfg.eps,
                                 scale=cfg.scale, chunk_size=cfg.chunk_size,
                                 output_final_state=cfg.output_final_state, has_init=bool(cfg.state_idx),
                                 init_grad=any(need[4:]), needs=need[1] + 2 * need[2] + 4 * need[3],
                                 fusions=int(PAIR) + 2 * int(QUERY_PAIR))
            if cfg.scale != 1.0:
                p["q"] = (p["q"] * cfg.scale).contiguous()
            o, out = forward_chain(cfg.chain, la, p, st, fin, cfg.normalize, cfg.eps, keep_side=True)
        o_last = out.pop(cfg.chain[-1].state)
        out["D"] = o_last[1]  # the dividing stage's denominator (normalized), else None
        # Every tensor the backward reads goes through save_for_backward: autograd then
        # raises if one is changed in place before the backward (else its gradients would be
        # silently wrong), and saved-tensor hooks (torch.autograd.graph.save_on_cpu,
        # checkpointing) see them all. la.p is p: it keeps only placeholders until then.
        tensors = []
        ctx.held = _pack(dict(p=dict(p), st=st, out=out), tensors, {})
        ctx.save_for_backward(o, *tensors)
        p.update(ctx.held["p"])
        ctx.cfg, ctx.la = cfg, la
        ctx.field_dtypes = [x.dtype for x in fields]
        ctx.set_materialize_grads(False)
        fin = fin._asdict() if fin is not None else {}
        ctx.fin_names = tuple(n for n, x in fin.items() if x is not None)
        return (o,) + tuple(fin[n] for n in ctx.fin_names)

    @staticmethod
    def backward(ctx, do, *dfin):
        cfg = ctx.cfg
        need = dict(q=ctx.needs_input_grad[1], k=ctx.needs_input_grad[2], v=ctx.needs_input_grad[3],
                    init=any(ctx.needs_input_grad[4:]))
        o, *tensors = ctx.saved_tensors  # autograd's in-place check happens here
        held = _unpack(ctx.held, tensors)
        p = ctx.la.p
        p.update(held["p"])
        st, out = held["st"], held["out"]
        out[cfg.chain[-1].state] = (o, out.pop("D"))
        out["o"] = o
        with torch.autocast(p["q"].device.type, enabled=False):
            dq, dk, dv, dinit = chain_backward(cfg.chain, ctx.la, p, st, out, cfg.normalize, cfg.eps,
                                               do, as_carries(cfg.chain, dict(zip(ctx.fin_names, dfin))), need)
        dinit = as_carries(cfg.chain, dinit)
        dt = p["k"].dtype
        grads = [None,
                 (dq if cfg.scale == 1.0 else dq * cfg.scale).to(dt) if need["q"] and dq is not None else None,
                 dk.to(dt) if need["k"] and dk is not None else None,
                 dv.to(dt) if need["v"] and dv is not None else None]
        names = cfg.state_cls._fields
        for i, fdt in zip(cfg.state_idx, ctx.field_dtypes):
            g = dinit.get(names[i])
            grads.append(g.to(fdt) if g is not None else None)
        if torch.is_grad_enabled():  # create_graph=True: these gradients are not differentiable
            marked = _FirstOrderOnly.apply(*[g.detach().requires_grad_(True) if g is not None else None
                                             for g in grads[1:]])
            return (None,) + tuple(marked)
        return tuple(grads)


class _FirstOrderOnly(torch.autograd.Function):
    """The gradients of a ChainFunction under create_graph=True. Its backward launches are
    not differentiable: without this mark the gradients would carry no graph, and a loss
    built on them (a gradient penalty) would silently lose those terms. Differentiating
    them raises instead; a create_graph=True backward that does not is unaffected."""

    @staticmethod
    def forward(ctx, *grads):
        return tuple(g.view_as(g) if g is not None else None for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("the gradients of the HLA kernels (kernels.chunk_* / fused_recurrent_*) are not "
                           "differentiable: no second-order derivative (double backward) is implemented")


class _Slot(NamedTuple):
    """Where a tensor of ChainFunction's saved structure sits in ctx.saved_tensors."""
    i: int


def _pack(x, tensors: list, seen: dict):
    """x (dicts and plain tuples of tensors and other values) with every tensor replaced by
    a _Slot into `tensors`, where it is appended once (seen: id -> slot)."""
    if isinstance(x, torch.Tensor):
        if id(x) not in seen:
            seen[id(x)] = _Slot(len(tensors))
            tensors.append(x)
        return seen[id(x)]
    if isinstance(x, dict):
        return {n: _pack(y, tensors, seen) for n, y in x.items()}
    if type(x) is tuple:
        return tuple(_pack(y, tensors, seen) for y in x)
    return x


def _unpack(x, tensors):
    """The inverse of _pack on the tensors autograd gives back."""
    if isinstance(x, _Slot):
        return tensors[x.i]
    if isinstance(x, dict):
        return {n: _unpack(y, tensors) for n, y in x.items()}
    if type(x) is tuple:
        return tuple(_unpack(y, tensors) for y in x)
    return x


def _plan(chain, need, has_init):
    """The (stage index, rule, target) launches of the backward, in order, skipping rules
    whose target gradient is not wanted (unless the rule also yields an initial-carry
    cotangent that is wanted)."""
    steps = []
    for i in range(len(chain) - 1, -1, -1):
        s = chain[i]
        for r in VJP_RULES:
            tgt = {"q": "q", "a": s.key, "b": s.value}[r.target]
            gives_init = r.reverse and r.key == "q" and r.value == "dN"
            if tgt in ("q", "k", "v") and not need[tgt] and not (gives_init and has_init[s.state]):
                continue
            steps.append((i, r, tgt))
    return steps


# The key and value rules of a stage in one reversed launch (kernels/backward_pair.py)
# where it applies; HLA_BWD_PAIR=0 (or kernels.backward.PAIR = False) keeps two launches.
PAIR = os.environ.get("HLA_BWD_PAIR", "1") != "0"


PAIR_MAX_WIDTH = 64  # a stage with a != b is fused only up to this head size (H100 sweep)

# The query rules of two stages in one forward launch (kernels/backward_query.py) where it
# applies; HLA_BWD_QUERY_PAIR=0 (or kernels.backward.QUERY_PAIR = False) keeps one per stage.
QUERY_PAIR = os.environ.get("HLA_BWD_QUERY_PAIR", "1") != "0"


def _pair_stages(chain, la, steps, normalize, has_init):
    """Stages whose key and value rules run as one fused reversed launch: chunk mode, both
    rules wanted, no side channel, no carry out (initial-state gradient), head sizes above 1
    (kernels/gla.py's D, DV = 1 note). The same on every rank of a context-parallel group
    (each launch exchanges carries): nothing here depends on a rank's own arguments.
    Measured on an H100 (docs/benchmarks.md, bf16, T = 16K): a key stage (a = b = k, one
    output) is faster fused at d = 64 and 128; a stage with a != b (two outputs) is faster
    fused at d = 64 but slower at d = 128 (one program holds the 128 x 128 carry), so such a
    stage is fused only where its key and value widths are at most PAIR_MAX_WIDTH."""
    p = la.p
    if not PAIR or la.mode != "chunk" or min(p["d"], p["dv"]) < 2:
        return set()
    width = {"k": p["d"], "v": p["dv"]}
    for s in chain:
        width[s.state] = width[s.value]
    ok = set()
    for i, s in enumerate(chain):
        if not {"a", "b"} <= {r.target for j, r, _ in steps if j == i}:
            continue
        if s.key != s.value and max(width[s.key], width[s.value]) > PAIR_MAX_WIDTH:
            continue
        if normalize and s.side is not None:
            continue
        if has_init[s.state]:
            continue
        ok.add(i)
    return ok


def _query_pairs(chain, la, steps, normalize):
    """{stage index: partner}: stages whose query rules run together in one forward launch
    (kernels/backward_query.py), taken two by two in the order the plan runs them. A stage
    qualifies in chunk mode without a side channel (normalize); head sizes above 1 as
    _pair_stages. The same on every rank of a context-parallel group: nothing here depends
    on a rank's own arguments (an initial state, on rank 0 only, enters as a carry). The
    first of two waits for the second (its cotangent dN is kept until then)."""
    p = la.p
    if not QUERY_PAIR or la.mode != "chunk" or min(p["d"], p["dv"]) < 2:
        return {}
    ready = [i for i, r, _ in steps if r.target == "q" and not (normalize and chain[i].side is not None)]
    pairs = {}
    for first, second in zip(ready[0::2], ready[1::2]):
        pairs[first], pairs[second] = second, first
    return pairs


def chain_backward(chain, la, p, st, out, normalize, eps, do, dfin, need):
    """(dq, dk, dv, {state field: cotangent of the initial carry}) of one chain call.

    la: the forward's Chain (mode, launch knobs, decays); st: its initial carries; out: the
    stage outputs {name: (tensor, side value)}; do: cotangent of o (or None); dfin:
    {final-state field: cotangent or None}; need: which gradients are wanted.
    Buffers: a target written by one rule gets its final format at once (dq, dk, dv in the
    input dtype; an intermediate stage's cotangent in the stage-output format, which is
    what its LAs round it to anyway); a target written by several rules accumulates in
    fp32 (fp64), and its last rule reads that buffer and writes the final format (ACCUM
    from a separate source). Side-channel cotangents [B, T, H] stay fp32 (fp64).
    """
    sdt, H = p["sdt"], p["H"]
    B, T = p["B"], p["T"]
    final_dtype = {"q": p["k"].dtype, "k": p["k"].dtype, "v": p["k"].dtype}
    has_init = {s.state: need["init"] and st.get(s.state) is not None for s in chain}
    if la.cp is not None:  # every rank plans the launches rank 0 needs (each one exchanges carries)
        has_init = {s.state: la.cp.init_grad for s in chain}
    steps = _plan(chain, need, has_init)
    pair = _pair_stages(chain, la, steps, normalize, has_init)
    qpair = _query_pairs(chain, la, steps, normalize)
    writers = {}
    for i, r, tgt in steps:
        if i in pair and r.target == "b" and chain[i].key == chain[i].value:
            continue  # the key stage's fused launch writes da + db once
        if r.target == "q" and i in qpair and qpair[i] < i:
            continue  # the first of two query rules: written by the second's launch
        writers[tgt] = writers.get(tgt, 0) + 1
    written = dict.fromkeys(writers, 0)

    def place(tgt):
        """(out, acc, out_dtype) of the next write to `tgt` (see the docstring)."""
        written[tgt] += 1
        fdt = final_dtype.get(tgt, la.mid_dtype)
        if writers[tgt] == 1:
            return None, None, fdt
        if written[tgt] < writers[tgt]:
            return cot.get(tgt), cot.get(tgt), sdt
        acc = cot.get(tgt)
        return (acc if fdt == sdt else None), acc, fdt
    cot, dinit = {}, {}
    waiting = None  # the first query rule of a query pair
    producer_side = {s.state: s.side for s in chain}
    n = len(chain)
    prepared = {}
    for i, r, tgt in steps:
        s = chain[i]
        use_side = bool(normalize) and s.side is not None
        a = out[s.key][0]
        b, b1 = out[s.value]
        if i not in prepared:  # the stage's cotangents, once
            if i == n - 1:
                if do is None:
                    dN = dD = None
                elif use_side:  # quotient rule of o = N / (D + eps)
                    den = out[s.state][1] + eps
                    dN = do.to(sdt) / den[..., None]
                    dD = -(dN * out["o"].to(sdt)).sum(-1)
                    dN = dN.to(la.mid_dtype)
                else:
                    dN, dD = do.contiguous(), None
            else:
                dN, dD = cot.pop(s.state, None), (cot.pop(s.side, None) if use_side else None)
            dXf, dX1f = dfin.get(s.state), (dfin.get(s.side) if use_side else None)
            w, d = b.shape[-1], a.shape[-1]
            if dN is None:
                dN = torch.zeros((B, T, H, w), dtype=la.mid_dtype, device=a.device)
            if use_side and dD is None:
                dD = torch.zeros((B, T, H), dtype=sdt, device=a.device)
            if dXf is not None or dX1f is not None:
                if dXf is None:
                    dXf = torch.zeros((p["N"], H, d, w), dtype=sdt, device=a.device)
                if use_side and dX1f is None:
                    dX1f = torch.zeros((p["N"], H, d, 1), dtype=sdt, device=a.device)
            prepared = {i: (dN, dD, dXf, dX1f)}
        dN, dD, dXf, dX1f = prepared[i]
        if r.target == "q" and i in qpair:  # two stages' query rules in one forward launch
            X0 = st.get(s.state)  # the query rule's carry is b x a: X0 transposed
            term = (dN, b, a, s.power, X0.transpose(-1, -2) if X0 is not None else None)
            if qpair[i] < i:
                waiting = term  # the partner comes later in the plan
                continue
            dest, acc, odt = place(tgt)
            cot[tgt] = query_pair(la, [waiting, term], out=dest, acc=acc, out_dtype=odt)
            continue
        if i in pair and r.target != "q":  # the key and value rules in one reversed launch
            if r.target == "b":
                continue  # done with the key rule
            kn = dict(num_warps=la.knobs["num_warps"], num_stages=la.knobs["num_stages"])
            oa, aa, da_t = place(tgt)
            if s.key == s.value:
                cot[tgt], _ = reversed_pair(la, p["q"], a, b, dN, s.power, same=True, out_a=oa, acc_a=aa,
                                            dtype_a=da_t, init=dXf, **kn)
            else:
                ob, ab, db_t = place(s.value)
                cot[tgt], cot[s.value] = reversed_pair(la, p["q"], a, b, dN, s.power, out_a=oa, acc_a=aa,
                                                       dtype_a=da_t, out_b=ob, acc_b=ab, dtype_b=db_t, init=dXf,
                                                       **kn)
            continue
        X0, X10 = st.get(s.state), (st.get(s.side) if use_side else None)
        if not use_side:
            b1 = None
        vals = {"q": p["q"], "a": a, "b": b, "dN": dN}
        sides = {"dN": dD, "b": b1}
        gives_init = r.reverse and r.key == "q" and r.value == "dN"
        qside = side = None
        if use_side:
            assert (r.query in SIDE_OF) == (r.key in SIDE_OF), r
            if r.query in SIDE_OF:
                qside = (sides[r.query], sides[r.key])
            side = sides.get(r.value)
        tgt_side = producer_side.get(tgt) if (side is not None and r.target == "b") else None
        # carries: the rule's carry is key x value; transposed against X (a x b) when its key is in b-space
        tr = r.key in B_SPACE
        X, X1 = (dXf, dX1f) if r.reverse else (X0, X10)
        init, xr = (None, None), None
        if X is not None:
            init = ((X.transpose(-1, -2) if tr else X).contiguous(), None)
            if qside is not None:
                xr = X1.reshape(X1.shape[0], H, -1).contiguous()
            elif side is not None:
                init = (init[0], X1.contiguous())
        final = (None, None)
        if gives_init and has_init[s.state] and X0 is not None:
            final = (torch.empty_like(X0), torch.empty_like(X10) if side is not None else None)
        dest, acc, odt = place(tgt)  # where the output goes (see the docstring)
        o_, o1_ = la(vals[r.query], vals[r.key], vals[r.value], s.power, side=side,
                     side_out=tgt_side is not None, init=init, final=final, reverse=r.reverse,
                     shift=r.reverse, qside=qside, xr_init=xr, out=dest, acc=acc, out_dtype=odt,
                     out1=cot.get(tgt_side) if tgt_side else None)
        cot[tgt] = o_
        if tgt_side is not None:
            cot[tgt_side] = o1_
        if final[0] is not None:
            gp = (p["g_dev"] ** s.power).to(sdt).view(1, H, 1, 1)
            dinit[s.state] = final[0] * gp
            if final[1] is not None:
                dinit[s.side] = final[1] * gp
    return cot.get("q"), cot.get("k"), cot.get("v"), dinit


def chain_apply(chain, state_cls, mode, q, k, v, *, gamma, scale, normalize, eps, chunk_size, initial_state,
                output_final_state, cu_seqlens, check_finite, cp_group=None, **knobs):
    """The public functions' body: (o, final state or None) with the chain's backward
    attached (q, k, v, the initial state's tensors; cotangents on the final state flow back)."""
    cp.check_mode(mode, cp_group)
    with cp.failures_relayed(cp_group, q):
        if isinstance(gamma, torch.Tensor) and gamma.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(
                "gamma requires grad, but the decay is a constant of the HLA kernels (no gradient with "
                "respect to gamma is computed). Pass gamma.detach() or a float")
        scale = check_scale(scale)
        q, k, v = _autocast(q, k, v)
    state, idx, fields = initial_state, (), ()
    if isinstance(initial_state, tuple) and hasattr(initial_state, "_fields"):
        vals = list(initial_state)
        idx = tuple(i for i, x in enumerate(vals) if isinstance(x, torch.Tensor))
        fields = tuple(vals[i] for i in idx)
        state = type(initial_state)(*[None if i in idx else x for i, x in enumerate(vals)])
    cfg = _Config(chain, state_cls, mode, gamma, scale, normalize, eps, chunk_size, output_final_state,
                  cu_seqlens, check_finite, knobs, state, idx, cp_group)
    res = ChainFunction.apply(cfg, q, k, v, *fields)
    o = res[0]
    if not output_final_state:
        return o, None
    it = iter(res[1:])
    opt = set(state_cls._field_defaults)
    fin = state_cls(**{f: (next(it) if (normalize or f not in opt) else None) for f in state_cls._fields})
    return o, fin
