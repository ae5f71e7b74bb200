"""Per-rank parameter bytes and forward time of a BERT-base MLM teacher sharded by ``shard_teacher``
against the same teacher unsharded, in the same process:

    torchrun --nproc_per_node=2 benchmarks/fsdp_teacher.py [--batch 4] [--length 128] [--repeat 3]
"""

import argparse
import copy

import torch
from transformers import BertConfig, BertForMaskedLM

from kdfast.bench.timing import time_ms
from kdfast.train.distributed import init_distributed, parameter_bytes, shard_teacher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rank, world, device = init_distributed()
    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig())
    whole = copy.deepcopy(teacher).eval().requires_grad_(False).to(device)
    sharded = shard_teacher(teacher, device)
    ids = torch.randint(0, 30522, (args.batch, args.length), device=device)

    def forward(model):
        def run():
            with torch.no_grad():
                return model(input_ids=ids).logits
        return run

    ms_whole = time_ms(forward(whole), device, warmup=1, repeat=args.repeat)
    ms_sharded = time_ms(forward(sharded), device, warmup=1, repeat=args.repeat)
    full, local = parameter_bytes(whole), parameter_bytes(sharded)
    print(f"rank {rank}/{world}: parameter bytes {local / 2**20:.1f} MiB sharded vs {full / 2**20:.1f} MiB whole "
          f"({full / local:.2f}x less); forward b={args.batch} L={args.length}: {ms_sharded:.0f} ms sharded vs "
          f"{ms_whole:.0f} ms whole ({ms_whole / ms_sharded:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
