"""`distilbert` recipe step: the former full-logits step against the fused LM-head step, in one process.

    python benchmarks/recipe_fused_step.py [--layers 6 --hidden 384 --heads 12] [--batch-size 8]
        [--max-length 128] [--steps 3] [--repeat 3] [--kd-rows all masked] [--head-only]

One whole training step each (forward, backward, AdamW step), on the same random-weight
BertForMaskedLM teacher (default the 6 x 384 all-MiniLM-L6-v2 shape with BERT's 30522-token
vocabulary), the same DistilBERT student (every other teacher layer) and the same masked batch
(random tokens, per-row lengths between half and all of ``--max-length``, 15% of the real tokens
masked), L = 5 KD(T=2) + 2 MLM + 1 cosine:

- ``full logits`` (the recipe before the fast path): both models' [B, L, V] logits, then
  ``kdfast.kd_loss`` over the KD rows, ``F.cross_entropy`` over the masked tokens,
  ``kdfast.cosine_loss``;
- ``fused``: ``kdfast.train.recipes.distilbert.make_step_loss`` (the recipe's step: transform on
  the counted tokens, decoder projections + KD + MLM in ``kdfast.fused_linear_kd_loss``).

Both sides count the same KD rows (``--kd-rows``: every real token, or the masked ones). The step-0
losses are printed and must agree before any speed is compared. Modes alternate ``--repeat``
times (``--steps`` timed steps each, after one warm-up step); prints best-of and median tokens/s
(real tokens per second) per mode, their ratios, and the load average (the machine is shared).

``--head-only``: instead, the LM-head terms alone for ``kd_rows=all`` (forward + backward of
``fused_linear_kd_loss`` on the batch's real tokens, the heads' projections, KD T=2 and MLM),
one call (KD on every row, MLM on the labelled ones: ``kd_rows="all"``) against the
two calls it replaced (labelled rows KD + MLM, the other rows KD, KD weights scaled by row share),
alternating; the two losses must agree first.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F


def build(args):
    from transformers import BertConfig, BertForMaskedLM

    from kdfast.models import distilbert_from_teacher
    from kdfast.train.recipes.distilbert import every_other_layer

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                     max_position_embeddings=max(512, args.max_length))
    teacher = BertForMaskedLM(cfg).eval().requires_grad_(False)
    student = distilbert_from_teacher(teacher, layers=every_other_layer(args.layers))
    g = torch.Generator().manual_seed(1)
    B, L = args.batch_size, args.max_length
    ids = torch.randint(1000, args.vocab, (B, L), generator=g)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    am = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ids = ids * am
    chosen = (torch.rand(B, L, generator=g) < 0.15) & am.bool()
    chosen[:, 0] = False
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    ids = torch.where(chosen, torch.full_like(ids, 103), ids)  # [MASK]
    return teacher, student, ids, am, labels


def full_logits_step(cfg, student, teacher, ids, am, labels, kd_rows):
    """The recipe's step before the fast path (full logits of both models)."""
    import kdfast

    def step_loss(batch):
        s = student(input_ids=ids, attention_mask=am, output_hidden_states=True)
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True)
        rows = am if kd_rows == "all" else labels != -100
        kd = kdfast.kd_loss(s.logits, t.logits, temperature=cfg.temperature, mask=rows)
        mlm = F.cross_entropy(s.logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)
        cos = kdfast.cosine_loss(s.hidden_states[-1], t.hidden_states[-1], am)
        return cfg.alpha_kd * kd + cfg.alpha_mlm * mlm + cfg.alpha_cos * cos, {}

    return step_loss


def head_only(args) -> None:
    """One fused call against the former two for KD on every real token + MLM on the masked ones."""
    from kdfast import fused_linear_kd_loss

    teacher, student, ids, am, labels = build(args)
    real = am.reshape(-1).bool()
    lab = labels.reshape(-1)[real]
    masked = lab != -100
    g = torch.Generator().manual_seed(2)
    n, d_s = int(real.sum()), student.config.hidden_size
    h_s = torch.randn(n, d_s, generator=g)
    h_t = torch.randn(n, args.hidden, generator=g)
    w_s = student.get_output_embeddings().weight.detach().clone()
    b_s = student.get_output_embeddings().bias.detach().clone()
    w_t, b_t = teacher.get_output_embeddings().weight, teacher.get_output_embeddings().bias
    T, a_kd, a_mlm = 2.0, 5.0, 2.0

    def run(one_call):
        hs, ws, bs = (x.clone().requires_grad_() for x in (h_s, w_s, b_s))
        kw = dict(student_bias=bs, teacher_bias=b_t, temperature=T)
        if one_call:
            loss = fused_linear_kd_loss(hs, ws, h_t, w_t, labels=lab, alpha_kd=a_kd, alpha_mlm=a_mlm,
                                        kd_rows="all", **kw)
        else:  # the former recipe: disjoint rows, KD weights scaled by each part's share
            rest = ~masked
            n_m, n_r = int(masked.sum()), int(rest.sum())
            loss = (fused_linear_kd_loss(hs[masked], ws, h_t[masked], w_t, labels=lab[masked],
                                         alpha_kd=a_kd * n_m / n, alpha_mlm=a_mlm, **kw)
                    + fused_linear_kd_loss(hs[rest], ws, h_t[rest], w_t, alpha_kd=a_kd * n_r / n, **kw))
        loss.backward()
        return float(loss.detach())

    modes = {"two calls": False, "one call": True}
    first = {name: run(one) for name, one in modes.items()}
    rel = abs(first["one call"] - first["two calls"]) / abs(first["two calls"])
    print(f"head only, kd_rows=all: {n} real rows ({int(masked.sum())} masked), d_s {d_s}, d_t {args.hidden}, "
          f"V = {args.vocab}; loss two calls {first['two calls']:.6f}, one call {first['one call']:.6f} "
          f"(relative difference {rel:.1e}); load average at start {os.getloadavg()}")
    if rel > 1e-5:
        raise SystemExit("one call and two calls disagree: no speed compared")
    times = {name: [] for name in modes}
    for _ in range(args.repeat):
        for name, one in modes.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                run(one)
                times[name].append(time.perf_counter() - t0)
    for name, t in times.items():
        print(f"  {name:<10} best {min(t):.3f} s  median {statistics.median(t):.3f} s  ({len(t)} runs)")
    print(f"  one call / two calls speed-up: {min(times['two calls']) / min(times['one call']):.2f}x (best-of), "
          f"{statistics.median(times['two calls']) / statistics.median(times['one call']):.2f}x (median); "
          f"load average now {os.getloadavg()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kd-rows", nargs="+", choices=["all", "masked"], default=["all", "masked"])
    ap.add_argument("--head-only", action="store_true",
                    help="time the LM-head terms alone: one fused call against the former two (kd_rows=all)")
    args = ap.parse_args()
    if args.head_only:
        head_only(args)
        return

    from kdfast.train.recipes import distilbert, recipe_config

    teacher, base_student, ids, am, labels = build(args)
    tokens = int(am.sum())
    print(f"teacher {args.layers} x {args.hidden}, V = {args.vocab}; student {base_student.config.num_hidden_layers} "
          f"layers; batch {args.batch_size} x {args.max_length}, {tokens} real tokens, "
          f"{int((labels != -100).sum())} masked; torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}; load average at start {os.getloadavg()}")
    for kd_rows in args.kd_rows:
        cfg = recipe_config("distilbert", None, [f"kd_rows={kd_rows}"])
        modes = {}
        for name in ("full logits", "fused"):
            student = copy.deepcopy(base_student)
            if name == "fused":
                step_loss = distilbert.make_step_loss(cfg, student, teacher, masker=lambda i, m: (ids, labels),
                                                      n_teacher_layers=args.layers)
            else:
                step_loss = full_logits_step(cfg, student, teacher, ids, am, labels, kd_rows)
            opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
            modes[name] = (student, step_loss, opt, [])
        batch = {"input_ids": ids, "attention_mask": am}
        step0 = {}
        for name, (student, step_loss, opt, _) in modes.items():  # step 0: the losses must agree
            loss, _ = step_loss(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step0[name] = float(loss.detach())
        rel = abs(step0["fused"] - step0["full logits"]) / abs(step0["full logits"])
        print(f"\nkd_rows={kd_rows}: step-0 loss full logits {step0['full logits']:.6f}, fused {step0['fused']:.6f} "
              f"(relative difference {rel:.1e})")
        if rel > 1e-4:
            raise SystemExit("the two steps disagree: not the same objective, no speed compared")
        for _ in range(args.repeat):
            for name, (student, step_loss, opt, times) in modes.items():
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    loss, _ = step_loss(batch)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    times.append(time.perf_counter() - t0)
        rates = {name: [tokens / t for t in m[3]] for name, m in modes.items()}
        for name, r in rates.items():
            print(f"  {name:<12} tokens/s best {max(r):8.0f}  median {statistics.median(r):8.0f}  "
                  f"(step median {statistics.median(modes[name][3]):.3f} s, {len(r)} steps)")
        best = max(rates["fused"]) / max(rates["full logits"])
        med = statistics.median(rates["fused"]) / statistics.median(rates["full logits"])
        print(f"  fused / full logits: {best:.2f}x (best-of), {med:.2f}x (median); load average now "
              f"{os.getloadavg()}")


if __name__ == "__main__":
    main()
