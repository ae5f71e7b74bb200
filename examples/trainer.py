"""Distil a teacher into a TinyBERT-shaped student with ``transformers.Trainer`` through
``kdfast.integrations.transformers.DistillationTrainer``.

    python examples/trainer.py --steps 30 --out runs/trainer               # a tiny random teacher
    python examples/trainer.py --teacher path/to/bert --out runs/trainer --report-to tensorboard
    python examples/trainer.py --from-cache --steps 30 --out runs/trainer  # teacher run once, into a cache

The Trainer does what it always does (batching, gradient accumulation, logging to any
``report_to``, checkpoints); DistillationTrainer adds the teacher's forward, reads hidden states
and Q / K with ``kdfast.capture`` under SDPA, computes ``DistillationLoss``, logs each term
(``kd_hidden``, ``kd_attention``) and saves the projections beside the student. With
``--from-cache`` the teacher's hidden states and Q / K of the text are cached once
(``kdfast.cache.build_cache``, in OUT/teacher-cache) and the Trainer reads them from there: the
teacher does not run during training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _toy import TEXT, load_teacher, make_student
from datasets import Dataset
from transformers import DataCollatorWithPadding, TrainingArguments

import kdfast
from kdfast.integrations.transformers import DistillationTrainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--teacher", default=None, help="directory of a BERT-family masked LM and its tokenizer "
                        "(default: a tiny random BERT)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=2, help="per micro-batch")
    parser.add_argument("--accumulation", type=int, default=2, help="gradient accumulation steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--report-to", default="none", help="the Trainer's report_to (tensorboard, wandb, ...)")
    parser.add_argument("--from-cache", action="store_true", help="cache the teacher's hidden states and Q / K "
                        "once (OUT/teacher-cache) and train from the cache")
    parser.add_argument("--out", default="runs/trainer", help="Trainer output_dir; the student goes to OUT/student")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.accumulation < 1:
        parser.error("--steps, --batch-size and --accumulation must be >= 1")

    torch.manual_seed(0)
    teacher, tokenizer = load_teacher(args.teacher)
    student = make_student(teacher)
    criterion = kdfast.DistillationLoss(
        (teacher.config.num_hidden_layers, student.config.num_hidden_layers), {"hidden": 1.0, "attention": 1.0},
        attention="mse", student_hidden_size=student.config.hidden_size,
        teacher_hidden_size=teacher.config.hidden_size, qk_prescaled=False)
    if args.from_cache:  # the cache's rows are the training data
        teacher_or_cache, data = build_teacher_cache(args.teacher, teacher, tokenizer, Path(args.out)), {}
    else:
        teacher_or_cache = teacher
        data = dict(train_dataset=Dataset.from_dict(dict(tokenizer(list(TEXT), truncation=True, max_length=64))),
                    data_collator=DataCollatorWithPadding(tokenizer))

    trainer = DistillationTrainer(
        model=student, teacher=teacher_or_cache, distillation_loss=criterion, processing_class=tokenizer, **data,
        args=TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                               gradient_accumulation_steps=args.accumulation, learning_rate=args.lr,
                               logging_steps=1, save_strategy="no", report_to=args.report_to, disable_tqdm=True,
                               use_cpu=not torch.cuda.is_available(), seed=0))
    trainer.train()
    trainer.save_model(f"{args.out}/student")
    logs = [entry for entry in trainer.state.log_history if "kd_hidden" in entry]
    print(f"loss {logs[0]['loss']:.4f} -> {logs[-1]['loss']:.4f} (kd_hidden {logs[0]['kd_hidden']:.4f} -> "
          f"{logs[-1]['kd_hidden']:.4f}, kd_attention {logs[0]['kd_attention']:.4f} -> "
          f"{logs[-1]['kd_attention']:.4f}); student saved to {args.out}/student")


def build_teacher_cache(teacher_dir: str | None, teacher, tokenizer, out: Path) -> str:
    """OUT/teacher-cache: the teacher's hidden states and Q / K of TEXT (the tiny teacher is saved
    to OUT/teacher first, since a cache is built from a model directory)."""
    from kdfast.cache import build_cache

    if teacher_dir is None:
        teacher_dir = str(out / "teacher")
        teacher.save_pretrained(teacher_dir)
        tokenizer.save_pretrained(teacher_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "text.txt").write_text("\n".join(TEXT) + "\n")
    build_cache(teacher_dir, [str(out / "text.txt")], str(out / "teacher-cache"), logits="none", hidden="fp16",
                qk=True, max_length=64, progress=False)
    return str(out / "teacher-cache")


if __name__ == "__main__":
    main()
