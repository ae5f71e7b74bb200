"""A whole TinyBERT general-distillation step from a ModernBERT teacher at long context (B = 1,
L = 2,048): kdfast's recipe step, attention from Q/K, against the step written with
``output_attentions`` maps, in one process on the same teacher, student and batch.

- **kdfast, live teacher**: the ``tinybert`` recipe's own step on a ModernBERT teacher directory
  (:func:`kdfast.bench.e2e.recipe_stage`, run as the e2e suite runs it: zero grads, the stage's
  loss, backward, clipping, the stage's optimizer). Its student is kdfast's TinyBERT-style
  ModernBERT (:func:`kdfast.models.students.tinybert_student`: each student layer takes the
  global / local type of the teacher layer it maps to); teacher and student run on their default
  attention (SDPA), the capture reads the rotated Q/K, and the attention term is
  :func:`kdfast.flash_attention_transfer` (MSE of the scores) on each mapped pair, windowed on the
  local layers: no L x L map is ever stored.
- **hand-written**: teacher and student run eagerly with ``output_attentions=True`` and
  ``output_hidden_states=True``; hidden states through ``nn.Linear`` projections with
  ``MSELoss``, plus TinyBERT's attention MSE on the maps (masked scores, <= -1e2, set to 0 on both
  sides), summed over the layer map. TinyBERT's objective is on the pre-softmax scores, which its
  code takes from a modified attention that returns them; transformers' eager attention returns
  the probabilities, so the models run transformers' eager attention function returning its
  scores instead (:class:`kdfast.bench.e2e_baselines.ScoresModernBert`: the same maps, the same
  cost, a local layer's map holding the mask outside its band). The MSE's mean is taken over the
  attended pairs (a local layer's band; every pair of a global layer, TinyBERT's ``MSELoss``),
  which is kdfast's windowed loss, so the two steps compute the same loss.

Both start from the same weights (the recipe's student and projections, copied before any step)
with the recipe's optimizer, lr and clipping, models in eval mode; the step-0 losses are compared
("yes" within 1e-4 relative in fp32, 2e-2 under bf16 autocast) before any time is. Timing: step 0
and one warm-up step per row, then ``repeat`` rounds running each row once, alternated; best and
median ms. Peak memory: one more step each (:func:`kdfast.bench.timing.peak_memory_bytes`, beyond
parameters, gradients and optimizer state).

Memory cap: before the hand-written step is built, the bytes of the [B, H, L, L] maps it must hold
at once are estimated (:func:`handwritten_map_bytes`); above ``cap_bytes`` (8 GiB, as the
long-context suite's) its row says "out of memory" and it is not run.

Shapes: ``default`` is ModernBERT-base's layer (768 wide, 12 heads x 64, GeGLU 1,152, windows of
128 tokens, a global layer every third) on 6 of its 22 layers, so that a step takes seconds on a
2-core CPU; a 3-layer TinyBERT-4-wide student (312, 12 heads of 26; 3 is the largest divisor of 6
not above TinyBERT-4's 4 layers) maps to teacher layers 2, 4 and 6: local, global, local.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdfast.bench import BenchOptions, Progress, Table, e2e, no_progress
from kdfast.bench import e2e_baselines as hand
from kdfast.bench.long_context import CAP_BYTES, _fmt_ms, _size
from kdfast.bench.timing import Result, by_case

SUITE = "e2e_modernbert"
KDFAST = "kdfast, live teacher"
HANDWRITTEN = e2e.HANDWRITTEN
# teacher configuration (ModernBertConfig fields), student overrides of the tinybert recipe, lengths
SHAPES = {
    "default": dict(teacher=dict(num_hidden_layers=6, hidden_size=768, num_attention_heads=12, intermediate_size=1152,
                                 local_attention=128, global_attn_every_n_layers=3),
                    student={}, lengths=(2048,), cap=CAP_BYTES),
    # quick: the hand-written step's maps fit the cap at 256 and not at 512
    "quick": dict(teacher=dict(num_hidden_layers=3, hidden_size=192, num_attention_heads=12, intermediate_size=384,
                               local_attention=64, global_attn_every_n_layers=3),
                  student={"student.hidden_size": 96, "student.intermediate_size": 384}, lengths=(256, 512),
                  cap=96 << 20),
    # the tests': initializer_range 0.2 so that the attention term weighs in the step-0 loss
    "tiny": dict(teacher=dict(num_hidden_layers=6, hidden_size=48, num_attention_heads=12, intermediate_size=96,
                              local_attention=8, global_attn_every_n_layers=3, initializer_range=0.2),
                 student={"student.hidden_size": 24, "student.intermediate_size": 48}, lengths=(48,),
                 cap=CAP_BYTES),
}


def teacher_dir(out: Path, shape: dict, max_length: int) -> Path:
    """A random ModernBERT masked-LM teacher with the configuration ``shape`` and the embedded
    MiniLM's uncased tokenizer (its pad / cls / sep ids), positions up to ``max_length`` at least."""
    from transformers import AutoTokenizer, ModernBertConfig, ModernBertForMaskedLM

    from kdfast.defaults import minilm_teacher_dir

    tok = AutoTokenizer.from_pretrained(minilm_teacher_dir(), local_files_only=True)
    config = ModernBertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
                              sep_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id,
                              eos_token_id=tok.sep_token_id, max_position_embeddings=max(8192, max_length), **shape)
    torch.manual_seed(0)
    return e2e.save_with_minilm_tokenizer(ModernBertForMaskedLM(config), out)


def handwritten_map_bytes(teacher_config, student_config, batch: int, length: int, itemsize: int) -> int:
    """The least the hand-written step holds at once in [B, H, L, L] maps of ``itemsize`` bytes:
    every teacher layer's scores (``output_attentions`` returns them all; they live until the loss
    is computed) and, per student layer (each is mapped), its scores and its probabilities (both in
    the graph for backward) and the loss's two zeroed copies:

        bytes = B L^2 itemsize (N_t H_t + 4 N_s H_s)"""
    maps = (teacher_config.num_hidden_layers * teacher_config.num_attention_heads
            + 4 * student_config.num_hidden_layers * student_config.num_attention_heads)
    return batch * length * length * itemsize * maps


def _rows(tdir: Path, corpus: Path, tmp: Path, sh: dict, batch_size: int, length: int, device: torch.device,
          dtype: torch.dtype, cap_bytes: int) -> tuple[list, dict]:
    """The kdfast row and the hand-written row (or its out-of-memory row) of one length, and what the
    report says about them: the pairs' windows and the hand-written maps' estimate."""
    from transformers import AutoConfig, AutoModel

    from kdfast.models import uniform_layer_map
    from kdfast.models.modernbert import attention_windows

    overrides = {"out_dir": str(tmp), "progress": False, "teacher.dir": str(tdir), "data.files": [str(corpus)],
                 "data.held_out_every": 0, "data.max_length": length, "train.batch_size": batch_size, "steps": 1,
                 "teacher.source": "live", **sh["student"]}
    stage, cfg = e2e.recipe_stage("tinybert", overrides)
    full = next((b for b in stage.data.batches(0) if bool(b["attention_mask"].all())), None)
    if full is None:
        raise RuntimeError(f"{SUITE}: no batch of {batch_size} full rows of {length} tokens in the corpus")
    batch = {k: full[k] for k in ("input_ids", "attention_mask")}
    initial = copy.deepcopy(stage.model).eval()  # before any step: the hand-written row starts here
    tconf = AutoConfig.from_pretrained(tdir, local_files_only=True)
    layer_map = uniform_layer_map(tconf.num_hidden_layers, initial.config.num_hidden_layers)
    s_windows = attention_windows(initial.config)  # the recipe's loss checked they are the teacher's
    info = {"layer_map": layer_map, "windows": {m: s_windows[m - 1] for m in layer_map if m >= 1},
            "student": initial.config, "teacher": tconf}
    rows = [e2e._recipe_row(KDFAST, "-", stage, batch, device, dtype, HANDWRITTEN, False)]
    itemsize = 2 if dtype == torch.bfloat16 else 4
    estimate = handwritten_map_bytes(tconf, initial.config, batch_size, length, itemsize)
    info["estimate_bytes"] = estimate
    if estimate > cap_bytes:
        rows.append(e2e._Row(HANDWRITTEN, "-", None, error=f"out of memory: needs at least {_size(estimate)} of "
                                                            f"[B, H, L, L] maps, over the {_size(cap_bytes)} cap"))
        return rows, info
    dev_batch = {k: v.to(device) for k, v in batch.items()}
    teacher = AutoModel.from_pretrained(tdir, local_files_only=True).to(device).eval().requires_grad_(False)
    teacher = hand.ScoresModernBert(teacher)
    student = hand.ScoresModernBert(copy.deepcopy(initial.model).to(device))
    projs = copy.deepcopy(stage.loss.criterion.projections).to(device)
    loss_fn = hand.tinybert_loss(student, teacher, projs, layer_map, dev_batch, cfg, mean_over="kept")
    step = hand.plain_step(loss_fn, list(student.parameters()) + list(projs.parameters()), stage, device, dtype)
    rows.append(e2e._Row(HANDWRITTEN, "-", step))
    return rows, info


def run(device: torch.device, *, shape: str = "default", batch: int = 1, lengths: tuple[int, ...] | None = None,
        dtype: torch.dtype = torch.float32, repeat: int = 3, cap_bytes: int | None = None, memory: bool = True,
        progress: Progress | None = None) -> list[Result]:
    """The kdfast and hand-written steps (module docstring) at each of ``lengths`` (default the
    shape's: 2,048 for ``default``), as Results: ``ms`` the median round, ``peak_bytes`` the peak
    beyond parameters, gradients and optimizer state, ``extra`` with best_ms, median_ms, the
    step-0 loss and its agreement with the hand-written one, the hand-written maps' estimate and
    the cap; ``note`` "out of memory ..." for a hand-written step over ``cap_bytes`` (default the
    shape's: 8 GiB; 96 MiB for ``quick``). ``shape``: ``default``, ``quick`` or ``tiny`` (the tests');
    ``dtype``: fp32, or bf16 for bf16 autocast."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16 (autocast), got {dtype}")
    sh = SHAPES[shape]
    lengths = tuple(lengths or sh["lengths"])
    cap_bytes = sh["cap"] if cap_bytes is None else cap_bytes
    for name, value in (("batch", batch), ("repeat", repeat), *((f"lengths[{i}]", n) for i, n in enumerate(lengths))):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if cap_bytes < 0:
        raise ValueError(f"cap_bytes must be >= 0, got {cap_bytes}")
    say = progress or no_progress
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    t = sh["teacher"]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="kdfast-e2e-modernbert-") as tmp, e2e._quiet_transformers():
        tmp = Path(tmp)
        tdir = teacher_dir(tmp / "teacher", t, max(lengths))
        for i, length in enumerate(lengths):
            t0 = time.perf_counter()
            case = (f"tinybert {batch}x{length} ModernBERT {t['num_hidden_layers']}x{t['hidden_size']}"
                    f"{' bf16' if dtype == torch.bfloat16 else ''}")
            say(f"{SUITE}: {case} ({i + 1}/{len(lengths)}): the recipe's live step, the hand-written one")
            corpus = e2e._corpus(tmp / f"corpus-{length}.txt", 2 * batch + 1, length)
            rows, info = _rows(tdir, corpus, tmp / f"run-{length}", sh, batch, length, device, dtype, cap_bytes)
            e2e._measure(rows, device, repeat, memory, say)
            ref = next(r for r in rows if r.impl == HANDWRITTEN)
            for r in rows:
                res = Result(SUITE, case, r.impl, statistics.median(r.times) if r.times else None, r.peak,
                             note=r.error)
                match = "reference"
                if r is not ref:
                    match = "-"
                    if r.loss0 is not None and ref.loss0 is not None:
                        rel = abs(r.loss0 - ref.loss0) / max(abs(ref.loss0), 1e-12)
                        match = f"{'yes' if rel <= tol else 'NO'} ({rel:.1e})"
                res.extra = {"best_ms": min(r.times) if r.times else None, "median_ms": res.ms, "loss0": r.loss0,
                             "loss_match": match, "tokens": batch * length, "cap_bytes": cap_bytes,
                             "windows": info["windows"], "layer_map": info["layer_map"],
                             "student": _describe(info["student"]), "teacher": _describe(info["teacher"])}
                if r is ref:
                    res.extra["estimate_bytes"] = info["estimate_bytes"]
                results.append(res)
            say(f"{SUITE}: {case} measured in {time.perf_counter() - t0:.0f} s")
    return results


def _describe(config) -> str:
    """'N layers x d, H heads x dh, GeGLU d_i, layer types (G global, L local), local_attention' of a
    ModernBERT configuration."""
    from kdfast.models.modernbert import attention_windows

    dh = config.hidden_size // config.num_attention_heads
    return (f"{config.num_hidden_layers} layers x {config.hidden_size}, {config.num_attention_heads} heads x {dh}, "
            f"GeGLU {config.intermediate_size}, layer types "
            + "".join("G" if w is None else "L" for w in attention_windows(config))
            + f", local_attention {config.local_attention}")


def report(results: list[Result]) -> str:
    """The table: per case, best and median ms of each step, the hand-written step's time and peak
    over kdfast's (median and best rounds), peak MiB, step-0 loss and its agreement; then the
    models, the layer pairs' windows, the cap and the hand-written maps' estimate."""
    head = (f"{'case':<34} {'impl':<20} {'best ms':>10} {'median ms':>10} {'speed-up':>8} {'(best)':>7} "
            f"{'peak MiB':>9} {'mem x':>6} {'step-0 loss':>12}  loss matches ref  note")
    lines = [head, "-" * len(head)]
    cases = by_case(results)
    for case, rows in cases.items():
        ref = next((r for r in rows if r.impl == HANDWRITTEN), None)
        for r in rows:
            x = r.extra
            speed = best = mem = "-"
            if r is not ref and ref is not None and r.ms and ref.ms:
                speed, best = f"{ref.ms / r.ms:.2f}x", f"{ref.extra['best_ms'] / x['best_ms']:.2f}x"
                if r.peak_bytes and ref.peak_bytes:
                    mem = f"{ref.peak_bytes / r.peak_bytes:.1f}x"
            peak = f"{r.peak_bytes / 2**20:9.0f}" if r.peak_bytes is not None else f"{'-':>9}"
            loss = f"{x['loss0']:.6g}" if x.get("loss0") is not None else "-"
            note = r.note or (f"maps estimated at {_size(x['estimate_bytes'])}" if "estimate_bytes" in x else "")
            lines.append(f"{case:<34} {r.impl:<20} {_fmt_ms(x.get('best_ms'))} {_fmt_ms(x.get('median_ms'))} {speed:>8} "
                         f"{best:>7} {peak} {mem:>6} {loss:>12}  {x.get('loss_match', '-'):<16}  {note}")
    lines.append("speed-up and mem x: the hand-written step's median time (best round in brackets) and peak memory "
                 "over the row's; peak = beyond parameters, gradients and optimizer state")
    for case, rows in cases.items():
        x = rows[0].extra
        pairs = ", ".join(f"{m}:{g} {'global' if x['windows'][m] is None else 'w=' + str(x['windows'][m])}"
                          for m, g in x["layer_map"].items() if m >= 1)
        estimate = next((r.extra["estimate_bytes"] for r in rows if "estimate_bytes" in r.extra), None)
        lines += [f"{case}: teacher {x['teacher']}; student {x['student']}; attention pairs (student:teacher "
                  f"hidden index, band) {pairs}; hand-written maps at least {_size(estimate)} "
                  f"(B L^2 x bytes per score x (teacher layers x heads + 4 x student layers x heads)), "
                  f"cap {_size(x['cap_bytes'])}"]
    return "\n".join(lines)


def run_suite(opts: BenchOptions) -> Table:
    """``kdfast bench --suites e2e_modernbert``: :func:`run` at B = 1, L = 2,048 (``--quick``: the
    quick shape at 256 and 512 under a 96 MiB cap, so the out-of-memory row prints; ``--tokens
    BxL``: that batch and length), with the first of ``opts.dtypes`` (fp32, or bf16 autocast)."""
    batch, lengths = (opts.tokens[0], (opts.tokens[1],)) if opts.tokens else (1, None)
    results = run(opts.device, shape="quick" if opts.quick else "default", batch=batch, lengths=lengths,
                  dtype=opts.dtypes[0], repeat=opts.repeat, progress=opts.progress)
    return Table(results, report(results))
