"""Run by tests/train/test_distributed.py, under torchrun or alone: a tiny distillation whose
final parameters and loss curve are written to OUT/rank<r>.pt. ``worker OUT B SIGNAL_RANK`` sends
SIGINT to that rank alone during step 3 and writes where each rank stopped to OUT/stop-rank<r>.pt."""

import os
import signal
import sys

import torch
from torch import nn

from kdfast.train import Distiller, TokenBatches, TrainConfig
from kdfast.train.distributed import init_distributed, wrap_ddp
from kdfast.train.run_guard import RunInterrupted


def main(out: str, batch_size: int, signal_rank: int | None = None) -> None:
    rank, world, device = init_distributed()
    torch.manual_seed(0)
    student = nn.Sequential(nn.Embedding(60, 16), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
    teacher = nn.Sequential(nn.Embedding(60, 16), nn.Linear(16, 16)).eval()
    model = wrap_ddp(student, device)
    ids = torch.randint(0, 60, (64, 7), generator=torch.Generator().manual_seed(5))
    data = TokenBatches(ids, torch.ones_like(ids), batch_size=batch_size, seed=1)

    steps = []

    def step_loss(batch):
        steps.append(None)
        if rank == signal_rank and len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        with torch.no_grad():
            t = teacher(batch["input_ids"])
        loss = (model(batch["input_ids"]) - t).pow(2).mean()
        return loss, {}

    cfg = TrainConfig(steps=6, lr=5e-2, warmup=1, log_every=1, out_dir=f"{out}/run-w{world}", progress=False)
    distiller = Distiller(model, step_loss, data, cfg)
    if signal_rank is not None:
        try:
            distiller.train()
        except RunInterrupted as e:
            torch.save({"step": distiller.step, "signum": e.signum}, f"{out}/stop-rank{rank}.pt")
            sys.exit(e.exit_code)
        return
    hist = distiller.train()
    torch.save({"params": [p.detach().clone() for p in student.parameters()], "loss": [h["loss"] for h in hist]},
               f"{out}/w{world}-rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
