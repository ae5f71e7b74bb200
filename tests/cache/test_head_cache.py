"""Exact logits from the cache (``logits="head"``): the teacher's head input at every token and its
output projection once rebuild the teacher's full logits; ``fused_linear_kd_loss`` from them equals
the live loss with the head input rounded to the storage dtype (loss and every gradient)."""

import pytest
import torch

import kdfast
from kdfast.cache import CacheDataset, CacheError, TeacherCache, build_cache
from kdfast.cache.head import capture_head_input, head_projection

BUILD = dict(max_length=24, batch_size=4, rows_per_shard=8, progress=False, hidden="none")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module", params=["fp16", "bf16", "int8"])
def head_cache(request, tiny_teacher, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("head") / request.param
    build_cache(str(tiny_teacher), [str(text_file)], str(out), logits=f"head:{request.param}", **BUILD)
    return request.param, TeacherCache(str(out))


def _teacher(tiny_teacher):
    from transformers import BertForMaskedLM

    return BertForMaskedLM.from_pretrained(tiny_teacher).eval()


def _head_input(teacher, batch):
    """The teacher's head input over the batch, run in the build's batches of 4 rows (same numerics)."""
    parts = []
    with torch.no_grad():
        for i in range(0, batch["input_ids"].shape[0], BUILD["batch_size"]):
            ids, am = batch["input_ids"][i:i + 4], batch["attention_mask"][i:i + 4]
            parts.append(teacher.cls.predictions.transform(teacher.bert(input_ids=ids, attention_mask=am)[0]))
    return torch.cat(parts)


def test_head_cache_rebuilds_the_teachers_logits(head_cache, tiny_teacher):
    dtype, cache = head_cache
    assert cache.verify() == []
    teacher = _teacher(tiny_teacher)
    weight, bias = cache.head_projection()
    assert torch.equal(weight, teacher.cls.predictions.decoder.weight)
    assert torch.equal(bias, teacher.cls.predictions.decoder.bias)
    batch = next(iter(CacheDataset(cache, 8)))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "head_input"}
    with torch.no_grad():
        live = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    h = _head_input(teacher, batch)
    real = batch["attention_mask"].bool()
    if dtype == "int8":
        from kdfast.cache import dequantize_int8, quantize_int8

        expect = dequantize_int8(*quantize_int8(h), torch.float16)
    else:
        expect = h.to(DTYPES[dtype])
    assert torch.equal(batch["head_input"][real], expect[real])
    rebuilt = batch["head_input"].float() @ weight.t() + bias
    err = (rebuilt - live.logits)[real].abs().max() / live.logits[real].abs().max()
    assert err < {"fp16": 2e-3, "bf16": 2e-2, "int8": 4e-2}[dtype], err


def test_fused_kd_from_the_head_cache_equals_the_live_step_on_rounded_input(head_cache, tiny_teacher):
    """Loss and gradients (student hidden, weight, bias) of fused_linear_kd_loss from the cache equal
    the live computation fed the teacher's head input rounded to the cache's dtype: KD on every real
    token + MLM on the masked ones, and KD on the masked tokens alone."""
    dtype, cache = head_cache
    if dtype != "fp16":
        return  # the bar is stated for fp16 storage; the other dtypes' rounding is checked above
    teacher = _teacher(tiny_teacher)
    weight, bias = cache.head_projection()
    batch = next(iter(CacheDataset(cache, 8)))
    h = _head_input(teacher, batch)
    torch.manual_seed(0)
    V, d_s = weight.shape[0], 24
    h_s = torch.randn(*batch["input_ids"].shape, d_s)
    w_s, b_s = torch.randn(V, d_s) * 0.2, torch.randn(V) * 0.1
    real = batch["attention_mask"].bool()
    labels = batch["labels"]
    for rows, kd_rows in ((real, "all"), (labels != -100, "masked")):
        results = []
        for t_hidden in (batch["head_input"][rows].float(), h[rows].half().float()):
            hs, ws, bs = (x.clone().requires_grad_() for x in (h_s[rows], w_s, b_s))
            loss = kdfast.fused_linear_kd_loss(hs, ws, t_hidden, weight, student_bias=bs, teacher_bias=bias,
                                               labels=labels[rows], temperature=2.0, alpha_kd=5.0, alpha_mlm=2.0,
                                               kd_rows=kd_rows)
            loss.backward()
            results.append((loss.detach(), hs.grad, ws.grad, bs.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_head_projection_of_other_heads():
    """DistilBERT, RoBERTa and MobileBERT heads split as logits = head_input W^T + b."""
    from transformers import (
        DistilBertConfig,
        DistilBertForMaskedLM,
        MobileBertConfig,
        MobileBertForMaskedLM,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    torch.manual_seed(0)
    models = [
        DistilBertForMaskedLM(DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, hidden_dim=48)),
        RobertaForMaskedLM(RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=48)),
        MobileBertForMaskedLM(MobileBertConfig(vocab_size=50, hidden_size=32, embedding_size=16,
                                               num_hidden_layers=1, num_attention_heads=4, intermediate_size=32,
                                               intra_bottleneck_size=16, true_hidden_size=16)),
    ]
    ids = torch.randint(5, 50, (2, 7))
    for model in models:
        model.eval()
        weight, bias = head_projection(model)
        with capture_head_input(model) as held, torch.no_grad():
            logits = model(input_ids=ids).logits
        rebuilt = held.value @ weight.t() + (0 if bias is None else bias)
        torch.testing.assert_close(rebuilt, logits, rtol=1e-5, atol=1e-5)


def test_head_cache_refusals(head_cache, tiny_teacher, tiny_encoder_teacher, text_file, tmp_path):
    dtype, cache = head_cache
    with pytest.raises(ValueError, match="logits must be"):
        build_cache(str(tiny_teacher), [str(text_file)], str(tmp_path / "x"), logits="head:fp8", **BUILD)
    with pytest.raises(ValueError):
        build_cache(str(tiny_encoder_teacher), [str(text_file)], str(tmp_path / "y"), logits="head", **BUILD)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    if dtype == "fp16":  # an altered head file is named, by the reader and by verify
        import shutil

        copy = tmp_path / "copy"
        shutil.copytree(cache.dir, copy)
        raw = bytearray((copy / "head.safetensors").read_bytes())
        raw[-3] ^= 0x40
        (copy / "head.safetensors").write_bytes(bytes(raw))
        with pytest.raises(CacheError, match="head.safetensors: sha256"):
            TeacherCache(str(copy)).head_projection()
        assert any("head.safetensors" in p for p in TeacherCache(str(copy)).verify())


def test_info_prints_bytes_per_token_for_each_logits_mode(head_cache, capsys):
    from kdfast.cli import main

    dtype, cache = head_cache
    info = cache.info()
    modes = info["logits_bytes_per_token"]
    assert set(modes) == {"none", "topk:8", "sampled:8", "head:fp16", "head:bf16", "head:int8"}
    assert modes["head:int8"] < modes["head:fp16"] and modes["none"] == 0
    assert main(["cache", "info", str(cache.dir)]) == 0
    out = capsys.readouterr().out
    assert f"head:{dtype}" in out and "topk:8" in out and "*" in out
