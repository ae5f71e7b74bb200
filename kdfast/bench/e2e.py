"""End to end: one whole distillation step (forward, backward, optimizer) of each recipe, run
several ways in one process on the same teacher, student and batch.

Per recipe step (``distilbert``; ``tinybert`` general distillation; ``mobilebert`` progressive
transfer of its last layer, ``mobilebert-pkt``, and its pre-training distillation,
``mobilebert-pretrain``):

- **kdfast, live teacher** and **kdfast, from the cache**: the recipe's own step. The recipe's
  plan (:func:`kdfast.train.recipes.recipe_plan`) is built for real with ``teacher.source`` live
  or cache (the cache is built by the plan, with kdfast's cache writer, in a temporary
  directory), and its stage is taken untrained (DistilBERT's live step twice: KD on every real
  token, its live default, and with ``kd_rows=masked``); the timed step is the training loop's:
  zero grads, the stage's step loss under its autocast setting, backward, gradient clipping, the
  stage's optimizer (:func:`kdfast.train.optim.build_optimizer`). Whatever the recipe's step
  does is what gets measured.
- **hand-written**: the same objective written the way the original scripts and today's users
  write it, on ``transformers`` models with the same weights. DistilBERT: full logits,
  ``log_softmax`` + ``KLDivLoss(batchmean) * T^2`` over the selected rows, ``CrossEntropyLoss``,
  ``CosineEmbeddingLoss`` over the real tokens' last hidden states; once with KD over every real
  token (the live recipe's rows) and once over the masked tokens only (the cache's rows).
  TinyBERT: hidden states through ``nn.Linear`` projections with ``MSELoss``; the pre-softmax
  attention scores q k^T / sqrt(dh) + the additive mask materialised as [B, H, L, L] maps with
  ``MSELoss`` after zeroing the masked entries (what TinyBERT's modified BERT returns;
  ``output_attentions`` would give probabilities, another objective). MobileBERT: feature-map
  transfer on the layer outputs and KL(A_t || A_s) on the ``output_attentions`` maps (eager
  attention; the teacher's head groups merged by averaging log-probabilities, which equals
  averaging scores after the softmax); pre-training distillation with full logits, KD as above
  over the masked tokens plus ``CrossEntropyLoss``.
- **hand-written + torch.compile**: the hand-written forward and loss under ``torch.compile``,
  compiled once in its step 0 (a compile that fails is reported in its row).
- **TextBrewer GeneralDistiller** (TinyBERT, when ``textbrewer`` is importable; it is a peer,
  not a dependency of kdfast): the same matches (hidden MSE through its linear projections,
  initialised to the recipe's, and attention MSE on the same score maps, both with its input
  mask) and the same optimizer; its ``train_on_batch`` then backward and the optimizer step.

Every row uses the recipe's optimizer class, learning rate and clipping; models are in eval
mode (dropout off) so that the step-0 losses compare exactly. The step-0 loss of each row is
compared with its reference row (the hand-written step with the same KD rows) before any speed
is: "yes" within rounding (1e-4 relative in fp32, 2e-2 under bf16 autocast); rows from the
cache read fp16 teacher states and top-k logits, so their difference is shown, not judged.
Timing: one warm-up step per row, then ``repeat`` rounds that run every row once, alternated;
tokens/s from the best and the median round (tokens = real tokens of the batch: the recipes pack
the corpus into full rows and the first batch of full rows is taken, so that the hand-written
objectives, which count padded positions as the original scripts do, equal the recipes'). Peak memory: one more step measured by
:func:`kdfast.bench.timing.peak_memory_bytes`, with gradients and optimizer state already
allocated (grads are zeroed, not freed), so it is the peak beyond parameters, gradients and
optimizer state.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdfast.bench import BenchOptions, Progress, Table, no_progress
from kdfast.bench import e2e_baselines as hand
from kdfast.bench.timing import Result, peak_memory_bytes, time_ms

SUITE = "e2e"
STEPS = ("distilbert", "tinybert", "mobilebert-pkt", "mobilebert-pretrain")
HANDWRITTEN = "hand-written"
# teacher shape, batch x length (TinyBERT also at long_seq), student overrides of the small presets
SHAPES = {
    "default": dict(teacher=dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                                 intermediate_size=3072), batch=8, seq=128, long_seq=512, tinybert={}),
    # quick: 2 teacher layers, one length: the torch.compile rows' compile time grows with the layers
    "quick": dict(teacher=dict(num_hidden_layers=2, hidden_size=192, num_attention_heads=12, intermediate_size=768),
                  batch=4, seq=64, long_seq=None,
                  tinybert={"student.hidden_size": 96, "student.intermediate_size": 384}),
    # initializer_range 0.2: logits spread enough that the KD terms weigh in the step-0 loss
    "tiny": dict(teacher=dict(num_hidden_layers=2, hidden_size=48, num_attention_heads=12, intermediate_size=96,
                              initializer_range=0.2),
                 batch=2, seq=32, long_seq=None,
                 tinybert={"student.hidden_size": 24, "student.intermediate_size": 48}),
}


@dataclass
class _Row:
    """One way of running one recipe step: ``step()`` runs a whole training step and returns the loss."""

    impl: str
    kd_rows: str
    step: Callable[[], torch.Tensor] | None
    ref: str | None = None  # the hand-written row with the same objective (None: this is a reference)
    from_cache: bool = False
    loss0: float | None = None
    times: list[float] = field(default_factory=list)
    peak: int | None = None
    error: str = ""


# ---- the recipe's own step --------------------------------------------------------------------

def recipe_stage(name: str, overrides: dict, stage: int = 1):
    """The ``stage``-th stage (1-based) of the plan that ``kdfast distill --recipe name`` runs
    (:func:`kdfast.train.recipes.recipe_plan`): the recipe's student, step loss, data and train
    config, untrained; and the recipe's settings. Seeded, so that a live and a cached plan start
    from the same student."""
    from kdfast.train.recipes import recipe_config, recipe_plan

    cfg = recipe_config(name, overrides=overrides)
    torch.manual_seed(0)
    plan = recipe_plan(name, cfg)
    if len(plan) < stage:
        raise RuntimeError(f"recipe {name} plans {len(plan)} stages, not {stage}")
    return plan[stage - 1], cfg


def _recipe_row(impl: str, kd_rows: str, stage, batch: dict, device: torch.device, dtype: torch.dtype,
                ref: str, from_cache: bool) -> _Row:
    from kdfast.train.optim import build_optimizer

    # The recipes build on the CPU; parameters move in place, so the optimizer keeps them.
    for m in (stage.model, stage.loss, stage.teacher):
        if m is not None:
            m.to(device).eval()
    batch = {k: v.to(device) for k, v in batch.items()}
    cfg = stage.config
    opt = build_optimizer(stage.parameters(), cfg)  # the optimizer run_plan trains the stage with
    params = [p for g in opt.param_groups for p in g["params"]]

    def step() -> torch.Tensor:  # one step of the training loop, one batch, no accumulation
        opt.zero_grad(set_to_none=False)
        with hand.autocast(device, dtype):
            loss, terms = stage.loss(batch)
        _ = [float(v) for v in terms.values()]  # the trainer reads every term each step (a host sync)
        loss.backward()
        if cfg.max_grad_norm:
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            torch.nn.utils.clip_grads_with_norm_(params, cfg.max_grad_norm, gnorm)
        opt.step()
        return loss.detach()

    return _Row(impl, kd_rows, step, ref=ref, from_cache=from_cache)


# ---- one recipe step, every way -----------------------------------------------------------------

def _teacher_dir(out: Path, shape: dict) -> Path:
    """A random BERT masked-LM teacher of ``shape`` with the embedded MiniLM's uncased tokenizer."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return save_with_minilm_tokenizer(BertForMaskedLM(BertConfig(vocab_size=30522, **shape)), out)


def save_with_minilm_tokenizer(model, out: Path) -> Path:
    """``model.save_pretrained(out)`` with the embedded MiniLM's uncased WordPiece tokenizer (30,522
    tokens) saved beside it: a teacher directory the recipes read. Returns ``out``."""
    from kdfast.defaults import minilm_teacher_dir

    tok = minilm_teacher_dir()
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tok / name).exists():
            shutil.copy(tok / name, out / name)
    return out


def _corpus(path: Path, n_texts: int, seq: int) -> Path:
    """``n_texts`` texts of consecutive pydoc paragraphs, each long enough to fill a ``seq``-token row."""
    from kdfast.defaults import pydoc_paragraphs, write_corpus

    paragraphs, texts, current = pydoc_paragraphs(), [], []
    for p in paragraphs:
        current.append(p)
        if sum(len(c) for c in current) > 8 * seq:  # ~4-5 characters per token: > 1.5 rows
            texts.append(" ".join(current))
            current = []
            if len(texts) == n_texts:
                break
    if len(texts) < n_texts:
        raise ValueError(f"the embedded corpus fills only {len(texts)} rows of {seq} tokens, not {n_texts}")
    return write_corpus(path, texts)


def _head_bytes(stage) -> str:
    """'N B/token': what the head cache behind ``stage`` stores per real token for its logits."""
    cache = stage.data.ds.cache
    mode = "head:" + cache.settings["logits"]["dtype"]
    return f"{cache.info()['logits_bytes_per_token'][mode]:.0f} B/token"


def _recipe_rows(step_name: str, tdir: Path, corpus: Path, tmp: Path, shape: dict, batch_size: int, seq: int,
                 device: torch.device, dtype: torch.dtype, compile_baseline: bool,
                 use_textbrewer: bool) -> tuple[list[_Row], int]:
    """Every row of one recipe step, and the number of real tokens in its batch."""
    from transformers import AutoModel, AutoModelForMaskedLM

    name = step_name.split("-")[0]
    base = {"out_dir": None, "progress": False, "teacher.dir": str(tdir), "data.files": [str(corpus)],
            "data.held_out_every": 0, "data.max_length": seq, "train.batch_size": batch_size}
    stage = 1
    if name != "mobilebert":
        base["steps"] = 1
    if name == "tinybert":
        base.update(shape["tinybert"])
    if step_name == "mobilebert-pkt":  # the last layer's stage: the whole student runs, its last layer trains
        base.update({"pkt.steps_per_layer": 1, "pretrain.steps": 0})
        stage = shape["teacher"]["num_hidden_layers"]
    elif step_name == "mobilebert-pretrain":
        base.update({"pkt.steps_per_layer": 0, "pretrain.steps": 1})
    runs = {}
    # DistilBERT's live step twice: KD on every real token (the recipe's live default) and on the
    # masked tokens (its kd_rows=masked), so that each has a like-for-like hand-written reference
    sources = {"cache": {}, "live": {}, **({"live-masked": {"kd_rows": "masked"},
                                            "cache-head": {"teacher.logits": "head"}} if name == "distilbert" else {})}
    for run_name, extra in sources.items():
        overrides = {**base, "out_dir": str(tmp / f"{step_name}-{run_name}"),
                     "teacher.source": run_name.split("-")[0], **extra}
        runs[run_name] = recipe_stage(name, overrides, stage)
    (live, cfg), (cached, _) = runs["live"], runs["cache"]
    # one batch for every row: the cache's (its masked inputs and labels; the live step uses them as
    # given), a full one: with padding, the hand-written objectives (which count padded positions, as
    # the original scripts do) would differ from the recipe's
    cache_batch = next((b for b in cached.data.batches(0) if bool(b["attention_mask"].all())), None)
    if cache_batch is None:
        raise RuntimeError(f"{step_name}: no batch of {batch_size} full rows of {seq} tokens in the corpus")
    batch = {k: cache_batch[k] for k in ("input_ids", "attention_mask", "labels") if k in cache_batch}
    dev_batch = {k: v.to(device) for k, v in batch.items()}
    initial = copy.deepcopy(live.model).eval()  # before any step: the hand-written rows start here

    rows = []
    if name == "distilbert":
        rows += [_recipe_row("kdfast, live teacher", "all real tokens", live, batch, device, dtype,
                             HANDWRITTEN, False),
                 _recipe_row("kdfast, live teacher, masked KD", "masked", runs["live-masked"][0], batch, device,
                             dtype, f"{HANDWRITTEN}, masked KD", False),
                 _recipe_row("kdfast, from the cache", f"masked (top-{cfg.teacher.topk})", cached, cache_batch,
                             device, dtype, f"{HANDWRITTEN}, masked KD", True)]
        # the head cache holds the same rows, masks and batch order (same seed): the same batch, exact logits
        head_stage = runs["cache-head"][0]
        position = next(i for i, b in enumerate(cached.data.batches(0)) if bool(b["attention_mask"].all()))
        head_batch = next(b for i, b in enumerate(head_stage.data.batches(0)) if i == position)
        if not torch.equal(head_batch["input_ids"], cache_batch["input_ids"]):
            raise RuntimeError(f"{step_name}: the head cache's batch is not the top-k cache's")
        rows.append(_recipe_row("kdfast, from a head cache", f"all real tokens (exact, {_head_bytes(head_stage)})",
                                head_stage, head_batch, device, dtype, HANDWRITTEN, True))
        teacher = AutoModelForMaskedLM.from_pretrained(tdir, local_files_only=True).to(device).eval()
        teacher.requires_grad_(False)
        for impl, masked, compiled in ((HANDWRITTEN, False, False), (f"{HANDWRITTEN}, masked KD", True, False),
                                       (f"{HANDWRITTEN} + torch.compile", False, True)):
            if compiled and not compile_baseline:
                continue
            student = copy.deepcopy(initial).to(device)
            step = hand.plain_step(hand.distilbert_loss(student, teacher, dev_batch, cfg, masked),
                                   list(student.parameters()), live, device, dtype, compile_=compiled)
            rows.append(_Row(impl, "masked" if masked else "all real tokens", step,
                             ref=HANDWRITTEN if compiled else None))
    elif name == "tinybert":
        from kdfast.models import uniform_layer_map

        layer_map = uniform_layer_map(shape["teacher"]["num_hidden_layers"], live.model.config.num_hidden_layers)
        rows += [_recipe_row("kdfast, live teacher", "-", live, batch, device, dtype, HANDWRITTEN, False),
                 _recipe_row("kdfast, from the cache", "-", cached, cache_batch, device, dtype, HANDWRITTEN, True)]
        teacher = hand.ScoresBert(AutoModel.from_pretrained(tdir, local_files_only=True).to(device).eval())
        teacher.requires_grad_(False)
        projections = live.loss.criterion.projections
        variants = [(HANDWRITTEN, False, False), (f"{HANDWRITTEN} + torch.compile", True, False),
                    ("TextBrewer GeneralDistiller", False, True)]
        for impl, compiled, brewer in variants:
            if (compiled and not compile_baseline) or (brewer and not use_textbrewer):
                continue
            student = hand.ScoresBert(copy.deepcopy(initial.bert).to(device))
            projs = copy.deepcopy(projections).to(device)
            if brewer:
                try:
                    import textbrewer  # noqa: F401
                except ImportError:
                    rows.append(_Row(impl, "-", None, ref=HANDWRITTEN,
                                     error="not installed (pip install --no-deps textbrewer tensorboardX protobuf)"))
                    continue
                step = hand.textbrewer_tinybert_step(student, teacher, projs, layer_map, dev_batch, cfg, live,
                                                     device, dtype, tmp)
            else:
                step = hand.plain_step(hand.tinybert_loss(student, teacher, projs, layer_map, dev_batch, cfg),
                                       list(student.parameters()) + list(projs.parameters()), live, device, dtype,
                                       compile_=compiled)
            rows.append(_Row(impl, "-", step, ref=HANDWRITTEN if impl != HANDWRITTEN else None))
    else:
        from kdfast.train.recipes.mobilebert import pkt_groups

        pkt = step_name == "mobilebert-pkt"
        kd_rows = "-" if pkt else "masked"
        rows += [_recipe_row("kdfast, live teacher", kd_rows, live, batch, device, dtype, HANDWRITTEN, False),
                 _recipe_row("kdfast, from the cache", kd_rows if pkt else f"masked (top-{cfg.teacher.topk})",
                             cached, cache_batch, device, dtype, HANDWRITTEN, True)]
        if pkt:
            teacher = AutoModel.from_pretrained(tdir, local_files_only=True, attn_implementation="eager")
        else:
            teacher = AutoModelForMaskedLM.from_pretrained(tdir, local_files_only=True)
        teacher = teacher.to(device).eval().requires_grad_(False)
        layer = shape["teacher"]["num_hidden_layers"]
        for impl, compiled in ((HANDWRITTEN, False), (f"{HANDWRITTEN} + torch.compile", True)):
            if compiled and not compile_baseline:
                continue
            student = initial.to_transformers().to(device).eval()
            if pkt:
                student.set_attn_implementation("eager")
                groups = pkt_groups(student, layer, cfg.pkt.lower_lr_scale)
                params = [p for g in groups for p in g["params"]]
                loss_fn = hand.mobilebert_pkt_loss(student, teacher, layer, dev_batch, cfg.pkt)
            else:
                params = list(student.parameters())
                loss_fn = hand.mobilebert_pretrain_loss(student, teacher, dev_batch, cfg.pretrain)
            rows.append(_Row(impl, kd_rows, hand.plain_step(loss_fn, params, live, device, dtype, compile_=compiled),
                             ref=HANDWRITTEN if compiled else None))
    return rows, int(batch["attention_mask"].sum())


def _failed(row: _Row, ex: Exception) -> None:
    """The row reports why it stopped (e.g. torch.compile without a working compiler) and is not run again."""
    row.error = f"failed: {type(ex).__name__}: {' '.join(str(ex).split())[:100]}"
    row.step = None


def _measure(rows: list[_Row], device: torch.device, repeat: int, memory: bool, say: Progress) -> None:
    """Step 0 (its loss) and one warm-up step per row (a compiled row compiles in step 0), then
    ``repeat`` alternated rounds, then peak memory. A row that fails reports why in its row."""
    for r in rows:  # step 0 of each row: every row starts from the same weights
        if r.step is None:
            say(f"  {r.impl}: not run: {r.error}")
            continue
        say(f"  {r.impl}: step 0 and a warm-up step{' (compiles)' if 'compile' in r.impl else ''}")
        t0 = time.perf_counter()
        try:
            r.loss0 = float(r.step())
            r.step()
        except Exception as ex:
            _failed(r, ex)
        say(f"  {r.impl}: {'failed' if r.error else 'ready'} after {time.perf_counter() - t0:.0f} s")
    for i in range(repeat):
        say(f"  round {i + 1}/{repeat}: every row once")
        for r in rows:
            if r.step is not None:
                try:
                    r.times.append(time_ms(r.step, device, warmup=0, repeat=1))
                except Exception as ex:  # e.g. a recompilation that fails
                    _failed(r, ex)
    if memory:
        say("  peak memory: one more step per row")
    for r in rows if memory else ():
        if r.step is not None:
            try:
                r.peak = peak_memory_bytes(r.step, device)
            except Exception as ex:
                _failed(r, ex)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' load reports (the teacher's unused MLM head, a pooler it never had) off."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def run(device: torch.device, *, quick: bool = False, shape: str | None = None, batch: int | None = None,
        seq: int | None = None, long_seq: int | None = None, dtype: torch.dtype = torch.float32, repeat: int = 3,
        steps: tuple[str, ...] = STEPS, compile_baseline: bool = True, use_textbrewer: bool = True,
        memory: bool = True, progress: Progress | None = None) -> list[Result]:
    """Every recipe step of ``steps`` run every way (see the module docstring), as Results: ``ms``
    the best round, ``peak_bytes`` the peak beyond parameters, gradients and optimizer state, and
    ``extra`` with tokens/s (best, median), the KD rows, the step-0 loss and its agreement with
    the reference row. ``shape``: ``default`` (BERT-base teacher, 8 x 128, TinyBERT also at 512),
    ``quick`` (``quick=True``; a 2 x 192 teacher, 4 x 64) or ``tiny`` (the tests'); ``batch``,
    ``seq``, ``long_seq`` override it (e.g. 32 x 512 on a GPU, with ``dtype=torch.bfloat16``
    for bf16 autocast, as the Distiller runs there)."""
    shape_name = shape or ("quick" if quick else "default")
    if shape_name not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape_name!r}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16 (autocast), got {dtype}")
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise ValueError(f"steps must be among {STEPS}, got {sorted(unknown)}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    sh = SHAPES[shape_name]
    batch = batch or sh["batch"]
    seq = seq or sh["seq"]
    long_seq = long_seq if long_seq is not None else sh["long_seq"]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    say = progress or no_progress
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="kdfast-e2e-bench-") as tmp, _quiet_transformers():
        tmp = Path(tmp)
        t = sh["teacher"]
        tdir = _teacher_dir(tmp / "teacher", {**t, "max_position_embeddings": max(512, seq, long_seq or 0)})
        plan = [(s, seq) for s in steps]
        if "tinybert" in steps and long_seq and long_seq != seq:
            plan.insert(plan.index(("tinybert", seq)) + 1, ("tinybert", long_seq))
        for i, (step_name, length) in enumerate(plan):
            t0 = time.perf_counter()
            say(f"{SUITE}: {step_name} {batch}x{length} ({i + 1}/{len(plan)}): the recipe's live and cached steps, "
                f"the hand-written ones")
            # 2 x batch + 1 texts of more than 1.5 rows each: at least two full batches of packed rows
            corpus = _corpus(tmp / f"corpus-{length}.txt", 2 * batch + 1, length)
            rows, tokens = _recipe_rows(step_name, tdir, corpus, tmp / f"{step_name}-{length}", sh, batch, length,
                                        device, dtype, compile_baseline, use_textbrewer)
            _measure(rows, device, repeat, memory, say)
            fill = "" if tokens == batch * length else f" {100 * tokens / (batch * length):.0f}% full"
            case = (f"{step_name} {batch}x{length}{fill} teacher {t['num_hidden_layers']}x{t['hidden_size']}"
                    f"{' bf16' if dtype == torch.bfloat16 else ''}")
            by_impl = {r.impl: r for r in rows}
            for r in rows:
                res = Result(SUITE, case, r.impl, min(r.times) if r.times else None, r.peak, note=r.error)
                ref = by_impl.get(r.ref) if r.ref else None
                match = "reference" if r.ref is None else "-"
                if ref is not None and r.loss0 is not None and ref.loss0 is not None:
                    rel = abs(r.loss0 - ref.loss0) / max(abs(ref.loss0), 1e-12)
                    if r.from_cache:
                        match = f"cache, not judged ({rel:.1e})"
                    else:
                        match = f"{'yes' if rel <= tol else 'NO'} ({rel:.1e})"
                res.extra = {"kd_rows": r.kd_rows, "ref": r.ref or "", "loss0": r.loss0, "loss_match": match,
                             "tokens": tokens,
                             "tok_s_best": tokens / (min(r.times) / 1e3) if r.times else None,
                             "tok_s_median": tokens / (statistics.median(r.times) / 1e3) if r.times else None}
                results.append(res)
            del rows, by_impl
            say(f"{SUITE}: {case} measured in {time.perf_counter() - t0:.0f} s")
    return results


def profile(device: torch.device, step: str = "distilbert",
            impls: tuple[str, ...] = ("kdfast, live teacher", HANDWRITTEN), *, shape: str = "default",
            row_limit: int = 25) -> str:
    """Where each row's step time goes: torch.profiler's operator table (by self CPU time) of one
    step of each of ``impls`` of the recipe step ``step`` at ``shape``, each after its step 0 and a
    warm-up step, in one process on the same teacher, student and batch as :func:`run`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    if step not in STEPS or shape not in SHAPES:
        raise ValueError(f"step must be one of {STEPS} and shape one of {sorted(SHAPES)}, got {step!r}, {shape!r}")
    sh = SHAPES[shape]
    tables = []
    with tempfile.TemporaryDirectory(prefix="kdfast-e2e-profile-") as tmp, _quiet_transformers():
        tmp = Path(tmp)
        tdir = _teacher_dir(tmp / "teacher", {**sh["teacher"], "max_position_embeddings": max(512, sh["seq"])})
        corpus = _corpus(tmp / "corpus.txt", 2 * sh["batch"] + 1, sh["seq"])
        rows, tokens = _recipe_rows(step, tdir, corpus, tmp / step, sh, sh["batch"], sh["seq"], device,
                                    torch.float32, compile_baseline=False, use_textbrewer=False)
        missing = set(impls) - {r.impl for r in rows}
        if missing:
            raise ValueError(f"impls: {sorted(missing)} are not rows of {step}; rows: {[r.impl for r in rows]}")
        for r in rows:
            if r.impl not in impls:
                continue
            r.step()
            r.step()
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                r.step()
                ms = (time.perf_counter() - t0) * 1e3
            tables.append(f"== {step} {sh['batch']}x{sh['seq']}: {r.impl}: one step {ms:.0f} ms under the profiler "
                          f"({tokens} tokens)\n"
                          + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit))
    return "\n\n".join(tables)


def _ratio(r: Result, ref: Result, key: str) -> float | None:
    """tokens/s of ``r`` over ``ref``'s for ``key`` (tok_s_best or tok_s_median), None if either is missing."""
    ours, theirs = r.extra.get(key), ref.extra.get(key)
    return ours / theirs if ours and theirs else None


def report(results: list[Result]) -> str:
    """The table: per case and row, tokens/s (best and median round), speed-up (best and median)
    and memory ratio against the row's reference (the hand-written step with the same objective),
    the step-0 loss and whether it matches the reference's; then :func:`bar_lines`."""
    header = (f"{'case':<40} {'impl':<32} {'KD rows':<17} {'tok/s best':>10} {'median':>8} {'speed-up':>8} "
              f"{'median':>7} {'peak MB':>8} {'mem ratio':>9} {'step-0 loss':>12}  loss matches ref")
    lines = [header, "-" * len(header)]
    by_case: dict[str, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault(r.case, {})[r.impl] = r
    for case, rows in by_case.items():
        for r in rows.values():
            x = r.extra
            ref = rows.get(x.get("ref")) if x.get("ref") else None
            best, med = x.get("tok_s_best"), x.get("tok_s_median")
            speed = speed_med = mem = "-"
            if ref is not None:
                speed, speed_med = (f"{v:.2f}x" if v else "-" for v in (_ratio(r, ref, "tok_s_best"),
                                                                        _ratio(r, ref, "tok_s_median")))
                if r.peak_bytes and ref.peak_bytes:
                    mem = f"{ref.peak_bytes / r.peak_bytes:.2f}x"
            loss = f"{x['loss0']:.6g}" if x.get("loss0") is not None else "-"
            peak = f"{r.peak_bytes / 2**20:.0f}" if r.peak_bytes is not None else "-"
            tail = x.get("loss_match", "-") + (f"  [{r.note}]" if r.note else "")
            lines.append(f"{case:<40} {r.impl:<32} {x.get('kd_rows', '-'):<17} "
                         f"{f'{best:.0f}' if best else '-':>10} {f'{med:.0f}' if med else '-':>8} {speed:>8} "
                         f"{speed_med:>7} {peak:>8} {mem:>9} {loss:>12}  {tail}")
    lines.append("speed-up (best round, median round) and mem ratio: against the row's reference (the hand-written "
                 "step with the same KD rows; the rows from the cache against the hand-written live step); "
                 "tokens = real tokens of the batch")
    bars = bar_lines(results)
    return "\n".join(lines + (["", "bars (CPU):", *bars] if bars else []))


# The CPU bars: (recipe step, kdfast row, the row it is compared with, speed-up, memory ratio),
# set for the default shapes (BERT-base-shaped teacher, batch 8; TinyBERT's at L = 512, other
# lengths reported against the same numbers); other shapes are not judged.
BAR_SHAPE = "teacher 12x768"
BARS = (
    ("distilbert", "kdfast, live teacher, masked KD", f"{HANDWRITTEN}, masked KD", 1.25, 3.0),
    ("distilbert", "kdfast, live teacher", HANDWRITTEN, 1.15, 3.0),
    ("distilbert", "kdfast, from the cache", f"{HANDWRITTEN}, masked KD", 2.0, None),
    ("distilbert", "kdfast, from the cache", HANDWRITTEN, 2.0, None),
    ("distilbert", "kdfast, from a head cache", HANDWRITTEN, 2.5, None),
    ("distilbert", "kdfast, from a head cache", "kdfast, live teacher", 1.3, None),
    ("tinybert", "kdfast, live teacher", HANDWRITTEN, 1.2, 3.0),
    ("tinybert", "kdfast, live teacher", "TextBrewer GeneralDistiller", 1.2, 3.0),
    ("tinybert", "kdfast, from the cache", HANDWRITTEN, 3.0, None),
    ("tinybert", "kdfast, from the cache", "TextBrewer GeneralDistiller", 3.0, None),
)


def bar_lines(results: list[Result]) -> list[str]:
    """One line per bar of :data:`BARS` whose rows were measured: the speed-up of tokens/s in the
    best and the median round and the memory ratio, each against its target, "met" or "NOT met"
    (speed judged on the best round, the one least disturbed by other load; the median is shown
    beside it). Nothing is judged if the two rows' step-0 losses disagree, nor at other shapes
    than the bars' (:data:`BAR_SHAPE`, batch 8)."""
    by_case: dict[str, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault(r.case, {})[r.impl] = r
    lines = []
    for step, impl, ref_impl, speed_bar, mem_bar in BARS:
        for case, rows in by_case.items():
            r, ref = rows.get(impl), rows.get(ref_impl)
            if (not case.startswith(step + " 8x") or not case.endswith(BAR_SHAPE) or r is None or ref is None
                    or not r.ms or not ref.ms):
                continue
            at_bar = step != "tinybert" or case.startswith("tinybert 8x512 ")
            where = f"{case}{'' if at_bar else ' (reported; the bar is at L = 512)'}: {impl} vs {ref_impl}:"
            if str(r.extra.get("loss_match", "")).startswith("NO"):
                lines.append(f"{where} not judged, the step-0 losses differ ({r.extra['loss_match']})")
                continue
            best, med = _ratio(r, ref, "tok_s_best"), _ratio(r, ref, "tok_s_median")
            text = (f"{where} speed {best:.2f}x best, {med:.2f}x median "
                    f"(>= {speed_bar}x: {'met' if best >= speed_bar else 'NOT met'})")
            if mem_bar is not None:
                if r.peak_bytes and ref.peak_bytes:
                    mem = ref.peak_bytes / r.peak_bytes
                    text += f"; memory {mem:.2f}x less (>= {mem_bar}x: {'met' if mem >= mem_bar else 'NOT met'})"
                else:
                    text += f"; memory not measured (>= {mem_bar}x: not judged)"
            lines.append(text)
    return lines


def run_suite(opts: BenchOptions) -> Table:
    """``kdfast bench --suites e2e``: :func:`run` on ``opts.e2e_steps`` (default all), with the first
    of ``opts.dtypes`` (fp32, or bf16 autocast), as :func:`report` prints it."""
    results = run(opts.device, quick=opts.quick, dtype=opts.dtypes[0], repeat=opts.repeat,
                  steps=opts.e2e_steps or STEPS, compile_baseline=opts.compile_baseline, progress=opts.progress)
    return Table(results, report(results))
