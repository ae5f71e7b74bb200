"""The ``kdfast`` command.

    kdfast bench [--quick] [--device cpu|cuda] ...   time and memory tables against eager PyTorch
    kdfast backends                                   which kernel backends are usable here
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import asdict

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _parse_size(text: str) -> tuple[int, int]:
    try:
        n, v = text.lower().split("x")
        return int(n), int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size expects ROWSxVOCAB, e.g. 1024x30522, got {text!r}") from None


SUITES = ("kd_loss", "models")


def cmd_bench(args: argparse.Namespace) -> int:
    from kdfast.bench import kd_loss as kd_bench
    from kdfast.benchmarking import format_table

    if args.suites is None:
        args.suites = ["kd_loss"] if args.quick or args.sizes else list(SUITES)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("kdfast bench: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    if args.sizes:
        sizes = args.sizes
    elif device.type == "cuda":
        sizes = [(16384, 30522)] if args.quick else [(4096, 30522), (16384, 30522)]
    else:
        sizes = [(1024, 30522)] if args.quick else [(256, 30522), (1024, 30522)]
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16"] if device.type == "cuda" else ["fp32"]))]
    print(f"kdfast bench on {_device_name(device)}; torch {torch.__version__}; "
          f"repeat={args.repeat}; ratios are eager time / impl time and eager peak / impl peak", flush=True)
    results = []
    if "kd_loss" in args.suites:
        results += kd_bench.run(device, sizes, dtypes, repeat=args.repeat, compile_baseline=not args.no_compile)
        print(format_table(results), flush=True)
    if "models" in args.suites:
        from kdfast.bench import models as models_bench

        model_results = models_bench.run(device, repeat=args.repeat)
        print()
        print(format_table(model_results, baseline="MobileBERT (transformers)"), flush=True)
        results += model_results
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": _device_name(device), "torch": torch.__version__,
                       "results": [asdict(r) for r in results]}, f, indent=2)
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    import kdfast

    for name, st in kdfast.backends().items():
        print(f"{name:<7} {'yes' if st.available else 'no ':<4} {st.reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kdfast", description="Compiled-kernel knowledge distillation for BERT models")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time and peak memory of kdfast kernels against eager PyTorch and others")
    b.add_argument("--quick", action="store_true", help="one size per suite (the README's main job)")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    b.add_argument("--size", dest="sizes", type=_parse_size, action="append", help="ROWSxVOCAB, repeatable")
    b.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable; default fp32 (CPU), bf16 (GPU)")
    b.add_argument("--repeat", type=int, default=5, help="timed repetitions (median reported)")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    b.add_argument("--json", help="also write the results to this JSON file")
    b.add_argument("--suites", nargs="+", choices=SUITES, default=None,
                   help=f"which suites to run (default: all; --quick: kd_loss); choices {SUITES}")
    b.set_defaults(func=cmd_bench)
    k = sub.add_parser("backends", help="which kernel backends are built and usable here")
    k.set_defaults(func=cmd_backends)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
