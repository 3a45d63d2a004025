"""HLA2 implementations as a third party would write them (plain torch loops), for the
conformance harness's tests (test_conformance.py). They import nothing of this project.

- hla2_loop: correct (the streaming recurrence KK_t = g KK_{t-1} + k_t k_t^T,
  KK_QV_t = g^2 KK_QV_{t-1} + KK_t q_t v_t^T, o_t = q_t^T KK_QV_t), with normalize,
  initial_state / output_final_state hand-off; hla2_loop_bhtd the same in [B, H, T, d].
- paper_hla2: the decayed masked recurrences of the paper's Section 4.3, o_t = q_t^T (S_t C_t
  - G_t) with G_t = g G_{t-1} + k_t (k_t^T C_{t-1}): right for g = 1, wrong for g < 1
  (docs/paper_claims.md, sec4.3-decay-masked-operator).
- off_by_one_hla2: the inner mask i < j instead of i <= j (a quadratic loop).
- handoff_drops_kk: correct, except that a passed initial_state loses its KK summary.
- plain_hla2: only q, k, v (no options: every option property is not applicable).
- Bad targets: wrong_shape (returns [B, T, H, 1]), bad_signature (one argument),
  raises_always.
"""
import torch


def _start(q, v, initial_state, normalize):
    B, T, H, d = q.shape
    dv = v.shape[-1]
    z = q.new_zeros
    if initial_state is None:
        return z(B, H, d, d), z(B, H, d, dv), (z(B, H, d, 1) if normalize else None)
    kk, kkqv, kkq1 = initial_state
    return kk, kkqv, kkq1


def hla2_loop(q, k, v, gamma=1.0, normalize=False, eps=1e-6, initial_state=None, output_final_state=False):
    kk, kkqv, kkq1 = _start(q, v, initial_state, normalize)
    outs = []
    for t in range(q.shape[1]):
        qt, kt, vt = q[:, t], k[:, t], v[:, t]                       # [B, H, d]
        kk = gamma * kk + kt[..., :, None] * kt[..., None, :]
        sq = torch.einsum("bhij,bhj->bhi", kk, qt)                    # KK_t q_t
        kkqv = gamma ** 2 * kkqv + sq[..., :, None] * vt[..., None, :]
        o = torch.einsum("bhi,bhij->bhj", qt, kkqv)
        if normalize:
            kkq1 = gamma ** 2 * kkq1 + sq[..., :, None]
            o = o / (torch.einsum("bhi,bhij->bhj", qt, kkq1) + eps)
        outs.append(o)
    return torch.stack(outs, 1), ((kk, kkqv, kkq1) if output_final_state else None)


def hla2_loop_bhtd(q, k, v, gamma=1.0, normalize=False, eps=1e-6):
    o, _ = hla2_loop(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), gamma, normalize, eps)
    return o.transpose(1, 2)


def paper_hla2(q, k, v, gamma=1.0, normalize=False, eps=1e-6, initial_state=None, output_final_state=False):
    B, T, H, d = q.shape
    dv = v.shape[-1]
    z = q.new_zeros
    if initial_state is None:
        S, C, m, G, h = z(B, H, d, d), z(B, H, d, dv), z(B, H, d, 1), z(B, H, d, dv), z(B, H, d, 1)
    else:
        S, C, m, G, h = initial_state
    outs = []
    for t in range(T):
        qt, kt, vt = q[:, t], k[:, t], v[:, t]
        kkT = kt[..., :, None] * kt[..., None, :]
        G = gamma * G + kkT @ C            # k_t (k_t^T C_{t-1})
        h = gamma * h + kkT @ m
        S = gamma * S + kkT
        C = gamma * C + qt[..., :, None] * vt[..., None, :]
        m = gamma * m + qt[..., :, None]
        o = torch.einsum("bhi,bhij->bhj", qt, S @ C - G)
        if normalize:
            o = o / (torch.einsum("bhi,bhij->bhj", qt, S @ m - h) + eps)
        outs.append(o)
    return torch.stack(outs, 1), ((S, C, m, G, h) if output_final_state else None)


def off_by_one_hla2(q, k, v, gamma=1.0):
    B, T, H, d = q.shape
    o = q.new_zeros(B, T, H, v.shape[-1])
    for t in range(T):
        for j in range(t + 1):
            for i in range(j):             # the operator sums i <= j
                w = gamma ** ((t - i) + (t - j)) * (q[:, t] * k[:, i]).sum(-1) * (k[:, i] * q[:, j]).sum(-1)
                o[:, t] += w[..., None] * v[:, j]
    return o


def handoff_drops_kk(q, k, v, gamma=1.0, normalize=False, eps=1e-6, initial_state=None, output_final_state=False):
    if initial_state is not None:
        kk, kkqv, kkq1 = initial_state
        initial_state = (torch.zeros_like(kk), kkqv, kkq1)   # the KK summary is lost
    return hla2_loop(q, k, v, gamma, normalize, eps, initial_state, output_final_state)


def plain_hla2(q, k, v):
    return hla2_loop(q, k, v)[0]


def wrong_shape(q, k, v, gamma=1.0):
    return hla2_loop(q, k, v, gamma)[0][..., :1]


def bad_signature(q):
    return q


def raises_always(q, k, v):
    raise RuntimeError("not implemented")
