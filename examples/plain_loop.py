"""Distil a teacher into a TinyBERT-shaped student in a plain PyTorch loop with kdfast's losses.

    python examples/plain_loop.py --steps 30 --out runs/plain-loop          # a tiny random teacher
    python examples/plain_loop.py --teacher path/to/bert --out runs/plain-loop

Hidden states and (unscaled) Q / K come out of both models with ``kdfast.capture`` while they run
on their default SDPA attention; ``DistillationLoss`` sums TinyBERT's projected hidden MSE and its
attention-score MSE from Q / K (no L x L map). The learned projections are trained with the
student and saved beside it, not inside it.
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
from _toy import TEXT, load_teacher, make_student
from safetensors.torch import save_file

import kdfast


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--teacher", default=None, help="directory of a BERT-family masked LM and its tokenizer "
                        "(default: a tiny random BERT)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default="runs/plain-loop", help="where the student and projections go")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1")

    torch.manual_seed(0)
    teacher, tokenizer = load_teacher(args.teacher)
    student = make_student(teacher)
    n_t, n_s = teacher.config.num_hidden_layers, student.config.num_hidden_layers
    criterion = kdfast.DistillationLoss(
        (n_t, n_s), {"hidden": 1.0, "attention": 1.0}, attention="mse",
        student_hidden_size=student.config.hidden_size, teacher_hidden_size=teacher.config.hidden_size,
        qk_prescaled=False)  # kdfast.capture's queries are unscaled
    optimizer = torch.optim.AdamW([*student.parameters(), *criterion.parameters()], lr=args.lr)

    texts = itertools.cycle(TEXT)
    first = last = None
    for step in range(1, args.steps + 1):
        batch = tokenizer([next(texts) for _ in range(args.batch_size)], padding=True, truncation=True,
                          max_length=64, return_tensors="pt")
        with torch.no_grad(), kdfast.capture(teacher, qk=True) as t:
            teacher(**batch)
        with kdfast.capture(student, qk=True) as s:
            student(**batch)
        loss, terms = criterion({"hidden_states": s.hidden_states, "q": s.q, "k": s.k},
                                {"hidden_states": t.hidden_states, "q": t.q, "k": t.k}, batch["attention_mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last = float(loss.detach())
        first = last if first is None else first
        print(f"step {step}: loss {last:.4f} " + " ".join(f"{k} {float(v):.4f}" for k, v in terms.items()))

    student.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    save_file({k: v.contiguous() for k, v in criterion.state_dict().items()},
              os.path.join(args.out, "kd_projections.safetensors"))
    print(f"loss {first:.4f} -> {last:.4f}; student saved to {args.out}")


if __name__ == "__main__":
    main()
