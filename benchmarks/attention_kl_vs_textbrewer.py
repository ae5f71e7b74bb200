"""Attention KL on given [B, H, L, L] score maps: kdfast against TextBrewer and eager PyTorch, same process.

    python benchmarks/attention_kl_vs_textbrewer.py [--shape 8 12 128 128] [--repeat 15] [--threads N]

Forward + backward of one attention-transfer term on materialised pre-softmax maps (MobileBERT AT,
MiniLM), fp32 on the CPU, with BERT's additive mask (-1e4 at padded keys) in both maps and the
[B, L] token mask given (a quarter of the tokens padded in half the batch):

- ``kdfast``: ``kdfast.attention_kl_loss(s, t, mask)`` (``auto``: the C++ kernel when built), the
  KL over the valid keys of each real query row, mean over those rows;
- ``textbrewer``: ``textbrewer.losses.att_ce_loss(s, t, mask)``, the soft cross-entropy
  -sum_j A_t,j log A_s,j over the same rows. It differs from the KL by the teacher's entropy, a
  constant with respect to the student: its gradient is the same (A_s - A_t) / rows, and the script
  checks that it is, so both do the same work;
- ``eager KL``: the KL as people write it (log_softmax of both maps, p_t (log p_t - log p_s),
  mean over the real query rows);
- ``kd_loss on copies``: what attention_kl_loss did before it had its own op (both maps copied with
  finfo.min at padded keys, then the logit-KD kernel through ``kdfast.kd_loss`` at T = 1).

The implementations are timed alternately, round after round (the shared machine's load moves
between runs, so consecutive repeats of one and then the other would compare different loads);
best-of and median of each and their ratios to kdfast are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import kdfast


def eager_kl(s, t, mask):
    """KL(softmax(t) || softmax(s)) per real query row (scores hold the additive mask), mean over rows."""
    log_s = F.log_softmax(s, -1)
    with torch.no_grad():
        log_t = F.log_softmax(t, -1)
    rows = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, H, L]
    return rows[mask[:, None, :].expand_as(rows)].mean()


def kd_loss_on_copies(s, t, mask):
    """attention_kl_loss before the attention_kl_maps op: masked copies of both maps, then kd_loss."""
    B, H, L, _ = s.shape
    keys = mask[:, None, None, :]
    fill = torch.finfo(s.dtype).min
    return kdfast.kd_loss(s.masked_fill(~keys, fill), t.masked_fill(~keys, fill), temperature=1.0,
                          mask=mask[:, None, :].expand(B, H, L))


def make_inputs(B, H, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[B // 2:, L - L // 4:] = False
    add = torch.zeros(B, L).masked_fill(~mask, -1e4)[:, None, None, :]
    t = torch.randn(B, H, L, L, generator=g) * 3
    s = 0.6 * t + torch.randn(B, H, L, L, generator=g) * 2
    return s + add, t + add, mask


def grad_of(fn, s, t, mask):
    x = s.detach().requires_grad_()
    loss = fn(x, t, mask)
    loss.backward()
    return loss.detach(), x.grad


def main() -> None:
    from textbrewer.losses import att_ce_loss

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=4, default=[8, 12, 128, 128], metavar=("B", "H", "L", "L2"))
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, H, L, L2 = args.shape
    if L2 != L:
        raise SystemExit("--shape: the maps must be square (B H L L)")
    s, t, mask = make_inputs(B, H, L)
    impls = {
        "kdfast": lambda x, tt, m: kdfast.attention_kl_loss(x, tt, m),
        "textbrewer": att_ce_loss,
        "eager KL": eager_kl,
        "kd_loss on copies": kd_loss_on_copies,
    }

    # same work: the three gradients agree; the losses differ by the teacher's mean entropy only
    results = {name: grad_of(fn, s, t, mask) for name, fn in impls.items()}
    ref_loss, ref_grad = results["kdfast"]
    for name, (loss, grad) in results.items():
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-9, msg=lambda m: f"{name} gradient: {m}")
    log_t = F.log_softmax(t.double(), -1)
    rows = -(log_t.exp() * log_t).sum(-1)
    entropy = rows[mask[:, None, :].expand_as(rows)].mean()
    tb_gap = float(results["textbrewer"][0]) - float(ref_loss)
    assert abs(tb_gap - float(entropy)) <= 1e-4 * float(entropy), (tb_gap, float(entropy))

    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(args.repeat):
        for name, fn in impls.items():  # alternated: each round times every implementation once
            x = s.detach().requires_grad_()
            t0 = time.perf_counter()
            fn(x, t, mask).backward()
            times[name].append(time.perf_counter() - t0)

    backend = kdfast.ops.registry.resolve("attention_kl_maps", "auto", s.device, s.dtype)
    print(f"attention KL on given maps, forward + backward, fp32 CPU, [B, H, L, L] = [{B}, {H}, {L}, {L}], "
          f"token mask + additive -1e4 mask; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; kdfast backend {backend!r}; "
          f"{args.repeat} alternated rounds")
    print(f"same work: gradients agree (rtol 1e-4); textbrewer's loss - kdfast's = {tb_gap:.6f}, "
          f"the teacher's mean entropy {float(entropy):.6f}")
    best = {n: min(v) * 1e3 for n, v in times.items()}
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    print(f"{'impl':<18} {'best ms':>9} {'median ms':>10} {'kdfast speed-up (best)':>23} {'(median)':>9}")
    for name in impls:
        print(f"{name:<18} {best[name]:9.2f} {med[name]:10.2f} {best[name] / best['kdfast']:22.2f}x "
              f"{med[name] / med['kdfast']:8.2f}x")


if __name__ == "__main__":
    main()
