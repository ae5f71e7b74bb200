"""Run by tests/train/test_distributed.py, under torchrun or alone: a tiny BERT teacher sharded by
``shard_teacher`` (unchanged in one process). Writes OUT/fsdp-w<world>-rank<r>.pt with the sharded
teacher's outputs, those of an unsharded copy on the same inputs, the parameter bytes held, and
the student's parameters and losses after a short Distiller run with the teacher giving targets."""

import copy
import sys

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import BertConfig, BertForMaskedLM

import kdfast
from kdfast.train import Distiller, TokenBatches, TrainConfig
from kdfast.train.distributed import init_distributed, parameter_bytes, shard_teacher, wrap_ddp

VOCAB = 97


def main(out: str, batch_size: int) -> None:
    rank, world, device = init_distributed()
    torch.manual_seed(0)  # the same teacher and student on every rank
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32)
    teacher = BertForMaskedLM(config)
    unsharded = copy.deepcopy(teacher).eval()
    unsharded_bf16 = copy.deepcopy(unsharded).to(torch.bfloat16)
    teacher_bf16 = shard_teacher(copy.deepcopy(teacher), device, param_dtype=torch.bfloat16)
    full_bytes = parameter_bytes(teacher)
    teacher = shard_teacher(teacher, device)

    # this rank's own inputs, with padding: the sharded forward must not depend on the other ranks' batch
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, VOCAB, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        got = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        want = unsharded(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got_bf16 = teacher_bf16(input_ids=ids, attention_mask=mask).logits
        want_bf16 = unsharded_bf16(input_ids=ids, attention_mask=mask).logits
    result = {"logits": got.logits, "hidden": list(got.hidden_states),
              "ref_logits": want.logits, "ref_hidden": list(want.hidden_states),
              "bf16_logits": got_bf16, "ref_bf16_logits": want_bf16,
              "bf16_shard_dtypes": sorted({str(p.dtype) for p in teacher_bf16.parameters()}),
              "sharded_modules": sorted(name for name, m in teacher.named_modules() if isinstance(m, FSDPModule)),
              "bytes": parameter_bytes(teacher), "full_bytes": full_bytes}

    student = nn.Sequential(nn.Embedding(VOCAB, 24), nn.Linear(24, 24), nn.GELU(), nn.Linear(24, VOCAB))
    model = wrap_ddp(student, device)
    train_ids = torch.randint(0, VOCAB, (32, 9), generator=torch.Generator().manual_seed(5))
    data = TokenBatches(train_ids, torch.ones_like(train_ids), batch_size=batch_size, seed=1)

    def step_loss(batch):
        with torch.no_grad():
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = kdfast.kd_loss(model(batch["input_ids"]), t, temperature=2.0)
        return loss, {}

    cfg = TrainConfig(steps=4, lr=2e-2, warmup=1, log_every=1, out_dir=f"{out}/fsdp-run-w{world}", progress=False,
                      optimizer="lamb")
    hist = Distiller(model, step_loss, data, cfg).train()
    result.update(params=[p.detach().clone() for p in student.parameters()], loss=[h["loss"] for h in hist])
    torch.save(result, f"{out}/fsdp-w{world}-rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
