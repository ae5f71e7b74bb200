"""One way to get teacher outputs: the live and cached teacher sources give what kdfast.capture
gives on the teacher (unscaled Q/K, one convention), the cache still stores the raw projections
of format version 1, and the recipes feed exactly those outputs to their losses."""

import pytest
import torch
from safetensors.torch import load_file

import kdfast
from kdfast.cache import CacheDataset, TeacherCache, build_cache
from kdfast.train.teacher import CachedTeacher, LiveTeacher, capture_outputs


def load_mlm(directory, **kwargs):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(directory, local_files_only=True, **kwargs).eval()


def captured_teacher(model, inputs):
    with torch.no_grad(), kdfast.capture(model, qk=True) as cap:
        model(**inputs)
    return cap


def test_live_and_cached_teacher_equal_kdfast_capture(tiny, tmp_path):
    build_cache(str(tiny / "teacher"), [str(tiny / "train.txt")], str(tmp_path / "c"), logits="topk:4", hidden="fp16",
                layers=[0, 2, 4], qk=True, max_length=16, batch_size=4, rows_per_shard=8, progress=False)
    cache = TeacherCache(str(tmp_path / "c"))
    batch = next(iter(CacheDataset(cache, 6)))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    assert bool((inputs["attention_mask"] == 0).any())  # padding: the masks matter
    teacher = load_mlm(tiny / "teacher")
    ref = captured_teacher(teacher, inputs)

    live_source = LiveTeacher(teacher.bert, qk=True)
    # a module holding the teacher: .to(device) on the modules a step loss holds moves it (kdfast bench e2e)
    assert [id(p) for p in live_source.parameters()] == [id(p) for p in teacher.bert.parameters()]
    live = live_source(batch)
    cached = CachedTeacher.for_cache(cache)(batch)
    assert live.logits is None and live.sparse_logits is None  # the encoder alone: no vocabulary projection
    assert cached.sparse_logits == (batch["topk_ids"], batch["topk_values"], batch["topk_lse"])
    assert len(live.hidden_states) == len(cached.hidden_states) == 5
    assert cached.hidden_states[1] is None and cached.hidden_states[3] is None
    for l in range(5):
        torch.testing.assert_close(live.hidden_states[l], ref.hidden_states[l], rtol=1e-6, atol=1e-6)
        if l in (0, 2, 4):
            assert cached.hidden_states[l].dtype == torch.float16  # as stored: the losses cast
            torch.testing.assert_close(cached.hidden_states[l].float(), ref.hidden_states[l], atol=5e-3, rtol=5e-3)
    for name in ("q", "k"):
        assert len(getattr(live, name)) == len(getattr(cached, name)) == 4
        for mine_live, mine_cached, want in zip(getattr(live, name), getattr(cached, name), getattr(ref, name)):
            assert mine_live.shape == mine_cached.shape == want.shape == (6, 4, 16, 8)
            torch.testing.assert_close(mine_live, want, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(mine_cached.float(), want, atol=5e-3, rtol=5e-3)

    # the one convention: unscaled, softmax(q k^T / sqrt(d_head)) over real keys is the attention
    eager = load_mlm(tiny / "teacher", attn_implementation="eager")
    with torch.no_grad():
        att = eager(**inputs, output_attentions=True).attentions
    real_key = inputs["attention_mask"][:, None, None, :].bool()
    for q, k, a in zip(cached.q, cached.k, att):
        q, k = q.float(), k.float()
        probs = torch.softmax((q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~real_key, float("-inf")), -1)
        torch.testing.assert_close(probs, a, atol=2e-3, rtol=2e-3)


def test_cache_stores_the_raw_projections_of_format_version_1(tiny, tmp_path):
    """What the writer stores is what it stored before kdfast.capture replaced its hooks: each
    layer's query / key Linear output [N, L, H * d_head], unscaled, in fp16, bit for bit; so a
    cache built before reads back to the same Q/K, and an interrupted one resumes over it."""
    build_cache(str(tiny / "teacher"), [str(tiny / "train.txt")], str(tmp_path / "c"), logits="none", hidden="fp16",
                layers=[0], qk=True, max_length=16, batch_size=4, rows_per_shard=8, progress=False)
    cache = TeacherCache(str(tmp_path / "c"))
    assert cache.manifest.version == 2  # version 2 changed how shards are listed, not what a shard holds
    shard = load_file(str(tmp_path / "c" / cache.manifest.shards[0].file))
    teacher = load_mlm(tiny / "teacher")
    for start in (0, 4):  # the writer's two batches of the first shard
        rows = slice(start, start + 4)
        ids, mask = shard["input_ids"][rows].long(), shard["attention_mask"][rows].long()
        with torch.no_grad():
            hidden = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            for l, layer in enumerate(teacher.bert.encoder.layer, start=1):
                attn = layer.attention.self
                assert torch.equal(shard[f"q_{l}"][rows], attn.query(hidden[l - 1]).half())
                assert torch.equal(shard[f"k_{l}"][rows], attn.key(hidden[l - 1]).half())


def test_cache_build_refuses_a_teacher_capture_cannot_read_before_writing(tiny, tmp_path, monkeypatch):
    from kdfast.cache import writer

    class Unsupported(torch.nn.Module):
        def forward(self, **kwargs):
            raise AssertionError("never run")

    monkeypatch.setattr(writer, "_load_teacher", lambda path, mode: Unsupported())
    with pytest.raises(ValueError, match="model: kdfast.capture does not support Unsupported"):
        build_cache(str(tiny / "teacher"), [str(tiny / "train.txt")], str(tmp_path / "c"), logits="none",
                    hidden="fp16", qk=True, max_length=16, batch_size=4, rows_per_shard=8, progress=False)
    assert not (tmp_path / "c").exists()


def test_sources_refuse_bad_arguments_naming_them():
    with pytest.raises(ValueError, match="teacher: kdfast.capture does not support Linear"):
        LiveTeacher(torch.nn.Linear(2, 2), qk=True)
    with pytest.raises(ValueError, match="teacher must be a torch.nn.Module"):
        LiveTeacher("bert")
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        CachedTeacher(0)
    with pytest.raises(ValueError, match=r"batch q_1 is 8 wide: num_heads \(3\) must divide it"):
        CachedTeacher(1, 3)({"q_1": torch.randn(2, 3, 8), "k_1": torch.randn(2, 3, 8)})
    assert CachedTeacher(1)({"q_1": torch.randn(2, 3, 8), "k_1": torch.randn(2, 3, 8)}).q is None


def test_capture_outputs_keep_the_students_graph(tiny):
    student = load_mlm(tiny / "teacher").train()
    ids = torch.randint(5, 65, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    out = capture_outputs(student.bert, {"input_ids": ids, "attention_mask": mask}, qk=True)
    loss = sum(q.square().mean() for q in out.q) + out.hidden_states[-1].square().mean()
    loss.backward()
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad.abs().max() > 0


# ---- the recipes feed the sources' outputs, equal to kdfast.capture's, to their losses -----------

SMALL = {"tinybert": ["student.hidden_size=16", "student.intermediate_size=32", "student.num_attention_heads=4",
                      "student.num_hidden_layers=2"],
         "mobilebert": ["student.embedding_size=16", "student.intermediate_size=16",
                        "student.num_feedforward_networks=2", "student.num_attention_heads=2", "pretrain.steps=0"]}


@pytest.mark.parametrize("source", ["live", "cache"])
@pytest.mark.parametrize("recipe", ["tinybert", "mobilebert"])
def test_recipe_teacher_qk_equal_kdfast_capture(tiny, tmp_path, monkeypatch, recipe, source):
    from kdfast.train import teacher as teacher_mod
    from kdfast.train.recipes import recipe_config, run_recipe

    given, seen = [], []
    for cls in (teacher_mod.LiveTeacher, teacher_mod.CachedTeacher):
        def spy(self, batch, inputs=None, real=cls.__call__):
            out = real(self, batch, inputs)
            given.append((dict(inputs if inputs is not None else batch), out))
            return out
        monkeypatch.setattr(cls, "__call__", spy)
    real_forward = kdfast.DistillationLoss.forward

    def loss_spy(self, student_outputs, teacher_outputs, attention_mask=None):
        seen.append(teacher_outputs)
        return real_forward(self, student_outputs, teacher_outputs, attention_mask)

    monkeypatch.setattr(kdfast.DistillationLoss, "forward", loss_spy)
    cfg = recipe_config(recipe, None, ["data.max_length=16", "train.batch_size=4", "train.eval_every=0",
                                       "data.max_texts=12", "progress=false", f"teacher.source={source}",
                                       *SMALL[recipe]],
                        {"teacher.dir": str(tiny / "teacher"), "data.files": [str(tiny / "train.txt")],
                         {"tinybert": "steps", "mobilebert": "pkt.steps_per_layer"}[recipe]: 1,
                         "out_dir": str(tmp_path / "run")})
    run_recipe(recipe, cfg)

    assert len(seen) == {"tinybert": 1, "mobilebert": 4}[recipe]  # one step per stage
    assert len(given) == len(seen) and all(out is fed for (_, out), fed in zip(given, seen))  # nothing else
    teacher = load_mlm(tiny / "teacher")
    tol = dict(atol=5e-3, rtol=5e-3) if source == "cache" else dict(atol=1e-6, rtol=1e-6)
    for inputs, out in given:
        ref = captured_teacher(teacher, {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]})
        assert len(out.q) == len(out.k) == 4
        for mine, want in zip(out.q + out.k, ref.q + ref.k):
            torch.testing.assert_close(mine.float(), want, **tol)
