"""The ``kdfast`` command.

    kdfast bench [--quick] [--device cpu|cuda] ...   time and memory tables against eager PyTorch
    kdfast demo                                       short distillation on embedded defaults (README's main job)
    kdfast cache build|verify|info ...                 teacher activation cache
    kdfast distill --recipe distilbert|tinybert|mobilebert [--config FILE.yaml] [--set key=value ...]
    kdfast backends                                   which kernel backends are usable here
    kdfast --version                                  the installed version

Every option's help names its default; numbers are checked by the parser (a bad one is a usage
error, exit 2, before any work); ``--no-progress`` also silences transformers' and datasets' bars.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _parse_tokens(text: str) -> tuple[int, int]:
    try:
        b, n = text.lower().split("x")
        b, n = int(b), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens expects BATCHxLENGTH, e.g. 32x128, got {text!r}") from None
    if b < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"--tokens expects BATCH >= 1 and LENGTH >= 1, got {text!r}")
    return b, n


def _parse_size(text: str) -> tuple[int, int]:
    try:
        n, v = text.lower().split("x")
        n, v = int(n), int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size expects ROWSxVOCAB, e.g. 1024x30522, got {text!r}") from None
    if n < 1 or v < 2:  # one class has no distribution to distil
        raise argparse.ArgumentTypeError(f"--size expects ROWS >= 1 and VOCAB >= 2, got {text!r}")
    return n, v


def _int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """argparse ``type``: an int in [minimum, maximum], checked at parse time so that a bad value is
    a usage error (exit 2) before any work, with kdfast's own range check and wording."""
    from kdfast.train.distiller import check_int

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        try:
            return check_int("value", value, minimum, maximum)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).replace("value must", "must", 1)) from None

    parse.__name__ = "int"  # argparse names the type in its "invalid int value" message
    return parse


def _finite_float(*, positive: bool = False, minimum: float | None = None) -> Callable[[str], float]:
    """argparse ``type``: a finite float (> 0 when ``positive``, >= ``minimum``), checked at parse time."""
    from kdfast.train.distiller import check_finite

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            return check_finite("value", value, minimum, positive=positive)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).replace("value must", "must", 1)) from None

    parse.__name__ = "float"
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the text already says it (``default ...``)
    or the default means "none given" (None, False), which the text must then explain."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def _fail(command: str, error: BaseException) -> int:
    """Bad input, a full disk, a refused checkpoint: one line on stderr, exit status 2, no traceback."""
    print(f"kdfast {command}: error: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
    return 2


def _in_out_dir(command: str, out: str, args: argparse.Namespace, work: Callable[[], int]) -> int:
    """Run ``work`` as the one run of ``out``: refused in one line when another run holds it, or
    when it holds a previous run and neither ``--resume`` (which says where it continues) nor
    ``--overwrite`` (which first removes only what kdfast wrote there) was given (``work`` says
    where a ``--resume`` continues: :func:`_say_resume_point`). SIGINT / SIGTERM
    end the current step, write a checkpoint and exit 128 + the signal with one line."""
    from kdfast.train.run_guard import RunInterrupted, check_no_previous_run, remove_previous_run, run_lock

    try:
        if args.resume and args.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite removes it: give one of them")
        with run_lock(out, "--out"):
            if args.overwrite:
                removed = remove_previous_run(out)
                if removed:
                    print(f"--overwrite: removed the previous run's {len(removed)} files and folders in {out}",
                          flush=True)
            elif not args.resume:
                check_no_previous_run(out)
            return work()
    except RunInterrupted as e:
        print(f"kdfast {command}: {e}", file=sys.stderr)
        return e.exit_code
    except (ValueError, OSError) as e:  # a busy or used --out; bad input from work() is reported there
        return _fail(command, e)


def _say_resume_point(args: argparse.Namespace, out: str) -> None:
    """With ``--resume``: one line saying where the run continues, or that there is nothing to resume."""
    if args.resume:
        from kdfast.train.run_guard import resume_point

        print(resume_point(out), flush=True)


def _check_output_file(flag: str, path: str) -> None:
    """ValueError unless ``path`` can be written as a file: its folder exists and it is no directory
    (checked before a long run, not after it)."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a directory, not a file")
    if not p.parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {p.parent} does not exist")


def _stderr_progress(enabled: bool) -> Callable[[str], None]:
    """``kdfast bench``'s progress reporter: one line per suite stage and row on stderr, prefixed
    with the seconds since the start (stdout keeps only the tables); silent when not ``enabled``."""
    import time

    from kdfast.bench import no_progress

    if not enabled:
        return no_progress
    start = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)

    return say


def cmd_bench(args: argparse.Namespace) -> int:
    from kdfast.bench import SUITES, BenchOptions

    suites = args.suites
    if suites is None:
        suites = ["kd_loss"] if args.quick or args.sizes else list(SUITES)
    if args.json:
        try:
            _check_output_file("--json", args.json)
        except ValueError as e:
            return _fail("bench", e)
    for name in ("e2e", "e2e_modernbert"):
        if name in suites and args.dtype and (len(args.dtype) != 1 or args.dtype[0] not in ("fp32", "bf16")):
            return _fail("bench", ValueError(f"--dtype: the {name} suite runs one of fp32 or bf16 (autocast)"))
    if args.e2e_steps and "e2e" not in suites:
        return _fail("bench", ValueError("--e2e-steps: only the e2e suite runs recipe steps; add --suites e2e"))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("kdfast bench: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    dtypes = tuple(DTYPES[d] for d in (args.dtype or (["bf16"] if device.type == "cuda" else ["fp32"])))
    progress = _stderr_progress(not args.no_progress)
    opts = BenchOptions(device=device, dtypes=dtypes, quick=args.quick, repeat=args.repeat,
                        compile_baseline=not args.no_compile, sizes=tuple(args.sizes) if args.sizes else None,
                        tokens=args.tokens, e2e_steps=tuple(args.e2e_steps) if args.e2e_steps else None,
                        progress=progress)
    print(f"kdfast bench on {_device_name(device)}; torch {torch.__version__}; "
          f"repeat={args.repeat}; ratios are eager time / impl time and eager peak / impl peak", flush=True)
    results = []
    chosen = [name for name in SUITES if name in suites]  # the suites' own order, each once
    for i, name in enumerate(chosen):
        progress(f"suite {name} ({i + 1}/{len(chosen)})")
        table = SUITES[name](opts)
        if i:
            print()
        print(table.text, flush=True)
        results += table.results
    progress("done")
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump({"device": _device_name(device), "torch": torch.__version__,
                           "results": [asdict(r) for r in results]}, f, indent=2)
        except OSError as e:  # a full disk, a folder removed meanwhile
            return _fail("bench", e)
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    import kdfast

    print(kdfast.backends())  # the backends, then the op x backend matrix
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from kdfast.cache import TeacherCache, build_cache
    from kdfast.cache.ranks import current_ranks, init_from_env

    try:
        if args.cache_command == "build":
            try:
                layers = [int(x) for x in args.layers.split(",")] if args.layers else None
            except ValueError:
                raise ValueError(f"--layers must be comma-separated integers, got {args.layers!r}") from None
            joined = init_from_env()  # under torchrun: the ranks split the rows
            try:
                m = build_cache(args.teacher, args.data, args.out, layers=layers, logits=args.logits,
                                hidden=args.hidden, qk=args.qk, max_length=args.max_length,
                                batch_size=args.batch_size, rows_per_shard=args.rows_per_shard,
                                temperature=args.temperature, seed=args.seed, text_column=args.text_column,
                                progress=not args.no_progress, packing=args.packing)
                if current_ranks().rank == 0:
                    print(f"cache {args.out}: {m.rows} rows, {m.tokens} tokens, {len(m.shards)} shards, complete")
            finally:
                if joined:
                    import torch.distributed

                    torch.distributed.destroy_process_group()
            return 0
        cache = TeacherCache(args.cache, allow_incomplete=True)
        if args.cache_command == "verify":
            problems = cache.verify()
            if args.same_as:
                problems += cache.differences(TeacherCache(args.same_as, allow_incomplete=True))
            for p in problems:
                print(f"PROBLEM {p}")
            print(f"{args.cache}: {'OK' if not problems else f'{len(problems)} problem(s)'} "
                  f"({cache.manifest.rows} rows in {len(cache.manifest.shards)} shards)")
            return 0 if not problems else 1
        info = cache.info()
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            t = info["teacher"]
            print(f"cache      {args.cache} ({'complete' if info['complete'] else 'INCOMPLETE'})")
            print(f"teacher    {t['path']} ({t['model_type']}, {t['num_hidden_layers']} layers, "
                  f"sha256 {t['weights_sha256'][:12]}...)")
            print(f"rows       {info['rows']} in {info['shards']} shards; {info['tokens']} tokens; "
                  f"{info['bytes'] / 2**20:.1f} MiB")
            print("bytes per token:")
            for name, b in info["bytes_per_token"].items():
                print(f"  {name:<18} {b:10.2f}")
            print(f"  {'total':<18} {info['bytes_per_token_total']:10.2f}")
            print("logits, bytes per token by mode (this cache's rows; * = this cache's mode, measured):")
            mode = cache.settings["logits"]
            mine = mode["mode"] if mode["mode"] == "none" else (
                f"head:{mode['dtype']}" if mode["mode"] == "head" else f"{mode['mode']}:{mode['k']}")
            for name, b in info["logits_bytes_per_token"].items():
                print(f"  {name:<18} {b:10.2f}{'  *' if name == mine else ''}")
        return 0
    except BrokenPipeError:
        raise  # stdout closed by the reader (`| head`): main() ends quietly
    except (ValueError, OSError) as e:  # CacheError is a ValueError; OSError: unreadable paths, a full disk
        print(f"kdfast cache {args.cache_command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def cmd_demo(args: argparse.Namespace) -> int:
    return _in_out_dir("demo", args.out, args, lambda: _demo(args))


def _demo(args: argparse.Namespace) -> int:
    from kdfast.train.demo import format_report, run_demo
    from kdfast.train.distiller import finished_run

    if args.resume:  # before any work: a finished run is reported, not rebuilt (its report.json stays)
        step = finished_run(args.out, {"steps": args.steps, "batch_size": args.batch_size,
                                       "max_length": args.max_length, "lr": args.lr, "seed": args.seed,
                                       "max_paragraphs": None})
        if step is not None:
            print(f"run in {args.out} already finished at step {step}; nothing to do")
            return 0
    _say_resume_point(args, args.out)
    try:
        report = run_demo(args.out, steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                          lr=args.lr, seed=args.seed, progress=not args.no_progress, resume=args.resume,
                          allow_changed_settings=args.allow_changed_settings)
    except (ValueError, OSError) as e:  # bad input (CacheError, CheckpointError, NonFiniteError), full disk
        return _fail("demo", e)
    print()
    print(format_report(report))
    print(f"wrote {args.out}/report.json, {args.out}/loss.png, {args.out}/metrics.jsonl, {args.out}/student/, "
          f"{args.out}/compressed/")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    import yaml

    from kdfast.train.recipes import config_to_dict, recipe_config, run_recipe
    from kdfast.train.recipes.common import format_report

    flags = {"teacher.dir": args.teacher, "data.files": args.data, "out_dir": args.out, "steps": args.steps,
             "progress": False if args.no_progress else None}
    try:
        cfg = recipe_config(args.recipe, args.config, args.set or (), {k: v for k, v in flags.items() if v is not None})
        print(f"# kdfast distill --recipe {args.recipe}: resolved configuration")
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip(), flush=True)
        if args.print_config:
            return 0
    except (ValueError, OSError) as e:
        return _fail("distill", e)

    def work() -> int:
        try:
            if args.resume:  # before any work: a finished run is reported, not rebuilt (its report.json stays)
                from kdfast.train.distiller import finished_run
                from kdfast.train.recipes.common import run_settings

                step = finished_run(cfg.out_dir, run_settings(cfg))
                if step is not None:
                    print(f"run in {cfg.out_dir} already finished at step {step}; nothing to do")
                    return 0
            _say_resume_point(args, cfg.out_dir)
            report = run_recipe(args.recipe, cfg, resume=args.resume,
                                allow_changed_settings=args.allow_changed_settings)
        except (ValueError, OSError) as e:  # CacheError, CheckpointError, NonFiniteError are ValueErrors; a full disk
            return _fail("distill", e)
        print()
        print(format_report(report))
        return 0

    return _in_out_dir("distill", cfg.out_dir, args, work)


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kdfast.train.glue import get_task

    try:
        task = get_task(args.task)
        for flag, path in (("--model", args.model), ("--data-dir", args.data_dir), ("--teacher", args.teacher)):
            if path is not None and not Path(path).is_dir():
                raise ValueError(f"{flag} {path!r} is not a directory")
        out = args.out or f"runs/eval-{task.name}"
    except (ValueError, OSError) as e:
        return _fail("eval", e)
    return _in_out_dir("eval", out, args, lambda: _eval(args, task, out))


def _eval(args: argparse.Namespace, task, out: str) -> int:
    from pathlib import Path

    _say_resume_point(args, out)
    try:
        common = {k: v for k, v in (("batch_size", args.batch_size), ("max_length", args.max_length),
                                     ("seed", args.seed), ("max_train_examples", args.max_train_examples))
                  if v is not None}
        common["progress"] = not args.no_progress
        common["resume"] = args.resume
        if args.teacher is None:
            from kdfast.train.task import finetune_and_eval

            opts = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None}
            report = finetune_and_eval(args.model, task.name, args.data_dir, out, **common, **opts)
        else:
            from kdfast.train.task import task_distill

            opts = {k: v for k, v in (("prediction_epochs", args.epochs), ("prediction_lr", args.lr),
                                      ("intermediate_epochs", args.intermediate_epochs),
                                      ("intermediate_lr", args.intermediate_lr), ("temperature", args.temperature))
                    if v is not None}
            report = task_distill(args.teacher, args.model, task.name, args.data_dir, out, **common, **opts)
    except (ValueError, OSError) as e:  # CheckpointError, NonFiniteError are ValueErrors; a full disk
        return _fail("eval", e)
    what = "task distillation" if args.teacher else "fine-tuning"
    print(f"{task.name}: {what} on {report['train']['examples']} examples; model saved to {report['model_dir']}")
    from kdfast.train.task import format_eval_table

    print(format_eval_table(report))
    print(f"wrote {Path(out) / 'metrics.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``kdfast`` argument parser: every option's help names its default, and every number is
    range-checked here, so that a bad value is a usage error (exit 2) before any work is done."""
    from kdfast import __version__
    from kdfast.bench import SUITES
    from kdfast.bench.e2e import STEPS as E2E_STEPS
    from kdfast.train.distiller import MAX_SEED, MAX_STEPS

    count, count0 = _int_at_least(1), _int_at_least(0)

    def steps(text: str) -> int:  # >= 1, and at most MAX_STEPS: more is a typo (the schedule would stretch over it)
        value = count(text)
        if value > MAX_STEPS:
            raise argparse.ArgumentTypeError(f"must be <= {MAX_STEPS}, got {value}")
        return value

    steps.__name__ = "int"
    seed = _int_at_least(0, MAX_SEED)
    positive = _finite_float(positive=True)
    fmt = {"formatter_class": _HelpFormatter}
    no_progress_help = "no progress bars: neither kdfast's nor those of transformers and datasets"
    overwrite_help = ("start over: first remove what an earlier run wrote in --out (checkpoints, metrics, report, "
                      "saved models; a teacher cache and files kdfast did not write stay)")
    ap = argparse.ArgumentParser(prog="kdfast", description="Compiled-kernel knowledge distillation for BERT models",
                                 **fmt)
    ap.add_argument("--version", action="version", version=f"kdfast {__version__}", help="print the version and exit")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time and peak memory of kdfast kernels against eager PyTorch and others", **fmt)
    b.add_argument("--quick", action="store_true", help="one size per suite (the README's main job)")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="where to run (default: cuda when available)")
    b.add_argument("--size", dest="sizes", type=_parse_size, action="append",
                   help="kd_loss suite: ROWSxVOCAB, repeatable (default: 256x30522 and 1024x30522 on a CPU, "
                        "4096x30522 and 16384x30522 on a GPU; --quick: the larger)")
    b.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable; default fp32 (CPU), bf16 (GPU)")
    b.add_argument("--repeat", type=count, default=5, help="timed repetitions (median reported)")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    b.add_argument("--tokens", type=_parse_tokens, default=None,
                   help="fused_linear_kd suite: BATCHxLENGTH tokens (default 32x128 on a GPU, 8x128 on a CPU); "
                        "e2e_modernbert suite: its batch and length (default 1x2048)")
    b.add_argument("--json", help="also write the results to this JSON file (default: none)")
    b.add_argument("--suites", nargs="+", choices=tuple(SUITES), default=None,
                   help=f"which suites to run (default: all; --quick: kd_loss); choices {tuple(SUITES)}")
    b.add_argument("--e2e-steps", nargs="+", choices=E2E_STEPS, default=None,
                   help="e2e suite: which recipe steps (default: all; TinyBERT at two lengths, 128 and 512, "
                        "unless --quick)")
    b.add_argument("--no-progress", action="store_true",
                   help="no progress lines on stderr (one per suite and measured row; the tables on stdout "
                        "and --json are the same either way), nor the libraries' bars")
    b.set_defaults(func=cmd_bench)
    c = sub.add_parser("cache", help="build, verify or describe a teacher activation cache", **fmt)
    csub = c.add_subparsers(dest="cache_command", required=True)
    # numbers of cache build: build_cache checks them before any work (one-line "kdfast cache build: error:")
    cb = csub.add_parser("build", help="run the teacher once over local text and store its activations", **fmt)
    cb.add_argument("--teacher", required=True, help="local model directory (save_pretrained layout)")
    cb.add_argument("--data", required=True, nargs="+",
                    help="local files or directories of them (.txt lines, .json/.jsonl/.csv/.parquet/.arrow), "
                         "streamed: memory does not grow with the corpus")
    cb.add_argument("--out", required=True, help="cache directory: new, empty, or a kdfast cache (a partial one is "
                                                 "resumed); nothing kdfast did not write is ever removed")
    cb.add_argument("--layers", help="comma-separated hidden-state indices (0 = embeddings); default all")
    cb.add_argument("--logits", default="topk:8",
                    help="topk:K | sampled:K | head[:fp16|bf16|int8] (exact: the input of the teacher's output "
                         "projection at every token, and the projection once) | none")
    cb.add_argument("--hidden", default="fp16", choices=["fp16", "bf16", "int8", "none"],
                    help="storage of the hidden states")
    cb.add_argument("--qk", action="store_true", help="also store each layer's query and key projections")
    cb.add_argument("--max-length", type=int, default=128, help="tokens per row")
    cb.add_argument("--packing", action="store_true",
                    help="join the texts with [SEP] into full --max-length rows (as MLM pretraining data) "
                         "instead of one padded row per text")
    cb.add_argument("--batch-size", type=int, default=16, help="rows per teacher forward")
    cb.add_argument("--rows-per-shard", type=int, default=256, help="rows per shard file (a multiple of --batch-size)")
    cb.add_argument("--temperature", type=float, default=1.0, help="temperature of the stored top-k lse / sampling")
    cb.add_argument("--seed", type=int, default=0, help="seed of the MLM masking and logit sampling")
    cb.add_argument("--text-column", default="text", help="column of .json/.jsonl/.csv files holding the text")
    cb.add_argument("--no-progress", action="store_true", help=no_progress_help)
    for name, helptext in (("verify", "check every hash, field, row and stray file; exit 0: sound, 1: problems "
                                      "(listed), 2: not a readable kdfast cache (malformed manifest)"),
                           ("info", "rows, tokens, bytes per token by field, teacher; exit 2 on a malformed cache")):
        cp = csub.add_parser(name, help=helptext, description=helptext, **fmt)
        cp.add_argument("cache", help="cache directory")
        if name == "verify":
            cp.add_argument("--same-as", metavar="DIR",
                            help="also check that the cache holds exactly the rows and values of the cache in DIR "
                                 "(e.g. one built by another number of processes); default: no comparison")
        if name == "info":
            cp.add_argument("--json", action="store_true", help="print the description as JSON")
    c.set_defaults(func=cmd_cache)
    d = sub.add_parser("demo", help="distil the embedded MiniLM teacher into 3 layers and into a compressed "
                                       "student on Python's own docs", **fmt)
    d.add_argument("--out", default="runs/demo", help="output directory (cache, checkpoints, student, report)")
    d.add_argument("--steps", type=steps, default=150, help="optimizer steps of each of the two students")
    d.add_argument("--batch-size", type=count, default=16, help="paragraphs per step")
    d.add_argument("--max-length", type=_int_at_least(8), default=128, help="tokens per paragraph")
    d.add_argument("--lr", type=positive, default=1e-4, help="peak learning rate (AdamW, linear warm-up and decay)")
    d.add_argument("--seed", type=seed, default=0, help="seed of the student, data order and masking")
    d.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    d.add_argument("--overwrite", action="store_true", help=overwrite_help)
    d.add_argument("--allow-changed-settings", action="store_true",
                   help="with --resume: accept a checkpoint written with other settings and train on with these")
    d.add_argument("--no-progress", action="store_true", help=no_progress_help)
    d.set_defaults(func=cmd_demo)
    r = sub.add_parser("distill", help="run a distillation recipe (distilbert, tinybert, mobilebert)",
                       description="Run a distillation recipe. Settings: the recipe's paper defaults < --config "
                                   "YAML < --set key=value < the explicit flags below. Example configurations: "
                                   "kdfast/train/recipes/configs/*.yaml.", **fmt)
    r.add_argument("--recipe", required=True, choices=["distilbert", "tinybert", "mobilebert"], help="which recipe")
    r.add_argument("--config", help="YAML file of settings (see --print-config for every key; default: none, the "
                                    "recipe's defaults)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one setting, dotted key, YAML value (e.g. train.lr=1e-4, teacher.source=cache); "
                        "repeatable (default: none)")
    r.add_argument("--teacher", help="local teacher directory (teacher.dir; default: the embedded all-MiniLM-L6-v2)")
    r.add_argument("--data", nargs="+", help="local text files (data.files; default: Python's documentation prose)")
    r.add_argument("--out", help="output directory (out_dir; default: runs/RECIPE)")
    r.add_argument("--steps", type=steps, help="steps of every stage (distilbert/tinybert: steps; mobilebert: "
                                               "pkt.steps_per_layer and pretrain.steps; default: the recipe's or "
                                               "--config's)")
    r.add_argument("--resume", action="store_true", help="continue from the newest checkpoints in the output directory")
    r.add_argument("--overwrite", action="store_true", help=overwrite_help)
    r.add_argument("--allow-changed-settings", action="store_true",
                   help="with --resume: accept checkpoints written with other settings and train on with these "
                        "(otherwise a change is refused, naming the changed keys)")
    r.add_argument("--no-progress", action="store_true", help=no_progress_help)
    r.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    r.set_defaults(func=cmd_distill)
    e = sub.add_parser("eval", help="fine-tune and evaluate on a local GLUE task (task distillation with --teacher)",
                       description="Fine-tune --model on a GLUE task from local files (train + dev by their GLUE "
                                   "names: train.tsv, dev.tsv or dev_matched.tsv + dev_mismatched.tsv; .csv, "
                                   ".json, .jsonl too) and print the task's GLUE metric on dev. With --teacher "
                                   "(a model fine-tuned on the task), run TinyBERT task distillation into --model "
                                   "instead. Tasks: cola sst2 mrpc qqp stsb mnli qnli rte wnli.", **fmt)
    e.add_argument("--task", required=True, help="cola | sst2 | mrpc | qqp | stsb | mnli | qnli | rte | wnli")
    e.add_argument("--model", required=True, help="local model directory (save_pretrained layout, with tokenizer)")
    e.add_argument("--data-dir", required=True, help="directory holding the task's train and dev files")
    e.add_argument("--out", help="output directory (default runs/eval-TASK)")
    e.add_argument("--teacher", help="fine-tuned teacher directory: run task distillation into --model "
                                     "(default: none, plain fine-tuning)")
    e.add_argument("--epochs", type=count0, help="training epochs (with --teacher: prediction-layer epochs); "
                                                 "default 3")
    e.add_argument("--lr", type=positive, help="learning rate (with --teacher: prediction-layer); "
                                               "default 2e-5 / 3e-5")
    e.add_argument("--intermediate-epochs", type=count0,
                   help="with --teacher: intermediate-layer epochs (default 20)")
    e.add_argument("--intermediate-lr", type=positive, help="with --teacher: intermediate-layer lr (default 5e-5)")
    e.add_argument("--temperature", type=positive, help="with --teacher: prediction-layer temperature (default 1)")
    e.add_argument("--batch-size", type=count, help="examples per step (default 32)")
    e.add_argument("--max-length", type=_int_at_least(2), help="tokens per example (default 128; with --teacher 64 "
                                                               "for single sentences, 128 for pairs)")
    e.add_argument("--max-train-examples", type=count, help="use only the first N training examples (default: all)")
    e.add_argument("--seed", type=seed, help="seed of the head, data order and dropout (default 0)")
    e.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints in --out")
    e.add_argument("--overwrite", action="store_true", help=overwrite_help)
    e.add_argument("--no-progress", action="store_true", help=no_progress_help)
    e.set_defaults(func=cmd_eval)
    k = sub.add_parser("backends", help="which kernel backends are built and usable here", **fmt)
    k.set_defaults(func=cmd_backends)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "no_progress", False):  # the libraries' own bars too ("Loading weights", "Map")
            from kdfast.cache.writer import _library_progress_bars

            with _library_progress_bars(enabled=False):
                code = args.func(args)
        else:
            code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which stops after its step instead)
        print(f"kdfast {args.command}: interrupted", file=sys.stderr)
        return 128 + 2
    except BrokenPipeError:  # `kdfast ... | head`: the reader left; stop quietly as SIGPIPE would
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 128 + 13


if __name__ == "__main__":
    sys.exit(main())
