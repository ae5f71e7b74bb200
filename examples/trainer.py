"""Distil a teacher into a TinyBERT-shaped student with ``transformers.Trainer`` through
``kdfast.integrations.transformers.DistillationTrainer``.

    python examples/trainer.py --steps 30 --out runs/trainer               # a tiny random teacher
    python examples/trainer.py --teacher path/to/bert --out runs/trainer --report-to tensorboard

The Trainer does what it always does (batching, gradient accumulation, logging to any
``report_to``, checkpoints); DistillationTrainer adds the teacher's forward, reads hidden states
and Q / K with ``kdfast.capture`` under SDPA, computes ``DistillationLoss``, logs each term
(``kd_hidden``, ``kd_attention``) and saves the projections beside the student.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding, TrainingArguments

import kdfast
from _toy import TEXT, load_teacher, make_student
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
    data = Dataset.from_dict(dict(tokenizer(list(TEXT), truncation=True, max_length=64)))

    trainer = DistillationTrainer(
        model=student, teacher=teacher, distillation_loss=criterion, train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
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


if __name__ == "__main__":
    main()
