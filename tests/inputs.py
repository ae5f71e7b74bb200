"""Inputs the loss tests share (fresh random, never zeros, with ignored and masked rows), and the float64
references built from them; one home, so that no test module imports another."""

from __future__ import annotations

import torch

import kdfast
from tests.reference import (
    attention_kl_reference,
    attention_mse_reference,
    attention_scores_reference,
    kd_loss_reference,
    teacher_heads_reference,
)

# --- logit rows ----------------------------------------------------------------------------------

def logit_inputs(N, V, dtype, *, scale=4.0, masked=True, lead=None):
    """Fresh random logits (never zeros), labels with ignored rows, a mask with zero rows."""
    s = (torch.randn(N, V, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(N, V, dtype=torch.float64) * scale + 0.5 * s.double()).to(dtype)
    labels = torch.randint(0, V, (N,))
    mask = torch.ones(N, dtype=torch.bool)
    if masked and N > 3:
        labels[torch.randperm(N)[: N // 5]] = -100
        mask[torch.randperm(N)[: N // 6]] = False
    if lead is not None:
        s, t = s.reshape(*lead, V), t.reshape(*lead, V)
        labels, mask = labels.reshape(lead), mask.reshape(lead)
    return s, t, labels, mask


def reference_loss_and_grad(s, t, grad_scale=1.0, **kw):
    sd = s.detach().double().requires_grad_()
    loss = kd_loss_reference(sd, t.double(), **kw)
    (loss.sum() * grad_scale).backward()
    return loss.detach(), sd.grad


def sparse_teacher_inputs(N, V, K, form, T, dtype=torch.float32, *, masked=True, scale=4.0, lead=None):
    """Student logits, the teacher sparsified in the stored form, labels and mask with uncounted rows."""
    s = (torch.randn(N, V, dtype=torch.float64) * scale).to(dtype)
    t = torch.randn(N, V, dtype=torch.float64) * scale + 0.5 * s.double()
    if form == "sampled":
        ids, vals = kdfast.sparsify_teacher_logits(t, K, mode="sampled", temperature=T)
        extra = {"mode": "sampled"}
    else:
        ids, vals, lse = kdfast.sparsify_teacher_logits(t, K, temperature=T)
        extra = {"mode": "topk", "teacher_logsumexp": lse} if form == "topk_lse" else {"mode": "topk"}
    labels = torch.randint(0, V, (N,))
    mask = torch.ones(N, dtype=torch.bool)
    if masked and N > 3:
        labels[torch.randperm(N)[: N // 5]] = -100
        mask[torch.randperm(N)[: N // 6]] = False
    if lead is not None:
        s, ids, vals, labels, mask = (x.reshape(*lead, *x.shape[1:]) for x in (s, ids, vals, labels, mask))
        if "teacher_logsumexp" in extra:
            extra["teacher_logsumexp"] = extra["teacher_logsumexp"].reshape(lead)
    return s, ids, vals, labels, mask, extra


# --- LM-head inputs (fused_linear_kd_loss) --------------------------------------------------------

V = 97
D_S, D_T = 24, 40
LEAD = (3, 7)  # 21 tokens


def lm_head_inputs(dtype, *, bias=True, lead=LEAD, d_s=D_S, d_t=D_T, vocab=V, mask_frac=0.4):
    """Student/teacher hidden states and heads (teacher fp32), labels with ignored rows, a mask."""
    n = 1
    for x in lead:
        n *= x
    h_s = torch.randn(*lead, d_s, dtype=torch.float64).to(dtype)
    w_s = (torch.randn(vocab, d_s, dtype=torch.float64) * d_s**-0.5 * 3).to(dtype)
    b_s = (torch.randn(vocab, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    h_t = torch.randn(*lead, d_t)
    w_t = torch.randn(vocab, d_t) * d_t**-0.5 * 3
    b_t = torch.randn(vocab) * 0.5 if bias else None
    labels = torch.randint(0, vocab, (n,))
    labels[torch.randperm(n)[: int(n * mask_frac)]] = -100
    mask = torch.ones(n, dtype=torch.bool)
    mask[torch.randperm(n)[: n // 7]] = False
    return h_s, w_s, b_s, h_t, w_t, b_t, labels.reshape(lead), mask.reshape(lead)


def dense_logits(h, w, b):
    out = h.double() @ w.double().t()
    return out if b is None else out + b.double()


# --- attention ---------------------------------------------------------------------------------

REFS = {"kl": attention_kl_reference, "mse": attention_mse_reference}


def make_scores(B, H, L, dtype, mask=None, fill=None):
    """Correlated student / teacher scores; the additive mask (``fill``, default finfo.min) applied to both."""
    t = torch.randn(B, H, L, L, dtype=torch.float64) * 3
    s = 0.6 * t + torch.randn(B, H, L, L, dtype=torch.float64) * 2
    if mask is not None:
        fill = torch.finfo(dtype).min if fill is None else fill
        add = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, fill)[:, None, None, :]
        s, t = s + add, t + add
    return s.to(dtype).clamp_min(torch.finfo(dtype).min), t.to(dtype).clamp_min(torch.finfo(dtype).min)


def make_qk(B, H_s, H_t, L, ds, dt):
    """Student Q / K correlated with the mean of each teacher group (or with its teacher head)."""
    q_t = torch.randn(B, H_t, L, dt, dtype=torch.float64)
    k_t = torch.randn(B, H_t, L, dt, dtype=torch.float64)
    proj = torch.randn(dt, ds, dtype=torch.float64) / dt**0.5
    q_base = teacher_heads_reference(q_t @ proj, H_s)   # per-head mean / repeat works on any [B, H, ...]
    k_base = teacher_heads_reference(k_t @ proj, H_s)
    q_s = q_base + 0.5 * torch.randn(B, H_s, L, ds, dtype=torch.float64)
    k_s = k_base + 0.5 * torch.randn(B, H_s, L, ds, dtype=torch.float64)
    return tuple(x.float() for x in (q_s, k_s, q_t, k_t))


def additive(scores, mask):
    """The additive key mask of eager attention: finfo.min of the scores' dtype at padded keys."""
    return scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)


def grouped_reference(q_s, k_s, q_t, k_t, mask, loss, scale_s, scale_t):
    """Float64: the teacher's scores per head, averaged (or repeated) explicitly, then the map loss."""
    q = q_s.detach().double().requires_grad_()
    k = k_s.detach().double().requires_grad_()
    s = attention_scores_reference(q, k, scale_s, mask)
    t = additive(teacher_heads_reference(attention_scores_reference(q_t, k_t, scale_t), q_s.shape[1]), mask)
    value = REFS[loss](s, t, mask)
    value.backward()
    return value.detach(), q.grad, k.grad
