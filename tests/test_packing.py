"""Packed pretraining rows (kdfast.data.pack_texts): every token of the corpus exactly once, in
order, in full rows (only the last padded); the ``data.packing`` setting; packed teacher caches
(manifest setting, resume refusal, read back); a recipe trained on packed rows."""

import json
import random

import pytest
import torch

from kdfast.data import pack_texts
from tests.tiny_teacher import save_tiny_bert_teacher

WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer, 32-wide BertForMaskedLM teacher (random weights) and a corpus of texts of very
    different lengths, several longer than a row."""

    root = tmp_path_factory.mktemp("packing")
    save_tiny_bert_teacher(root / "teacher", WORDS)
    rng = random.Random(3)
    lines = [" ".join(rng.choices(WORDS, k=rng.choice([1, 2, 5, 9, 20, 37]))) for _ in range(60)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny / "teacher", local_files_only=True)


def random_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 30))) for _ in range(n)]


def check_packed(tok, texts: list[str], ids: torch.Tensor, am: torch.Tensor, max_length: int) -> None:
    """Rows [CLS] body [SEP], full but the last; the bodies joined are d_1 [SEP] d_2 ... [SEP] d_n
    with each d_i tokenised on its own."""
    docs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    stream = [t for i, d in enumerate(docs) for t in ([tok.sep_token_id] if i else []) + d]
    assert ids.shape == am.shape and ids.shape[1] == max_length and ids.dtype == am.dtype == torch.int64
    real = am.sum(1)
    assert bool((am[:-1] == 1).all()), "a row before the last has padding"
    assert 3 <= int(real[-1]) <= max_length and bool((am[-1, :real[-1]] == 1).all())
    assert bool((am[-1, real[-1]:] == 0).all()) and bool((ids[-1, real[-1]:] == tok.pad_token_id).all())
    assert bool((ids[:, 0] == tok.cls_token_id).all())
    assert bool((ids[torch.arange(len(ids)), real - 1] == tok.sep_token_id).all())
    bodies = [t for r in range(len(ids)) for t in ids[r, 1:real[r] - 1].tolist()]
    assert bodies == stream
    assert len(ids) == -(-len(stream) // (max_length - 2))


@pytest.mark.parametrize("max_length", [3, 11, 16, 64])
def test_every_token_appears_once_in_order_and_only_the_last_row_pads(tiny, max_length):
    tok = tokenizer(tiny)
    texts = random_texts(max_length, 23)
    ids, am = pack_texts(tok, texts, max_length)
    check_packed(tok, texts, ids, am, max_length)


def test_a_corpus_that_fills_its_rows_exactly_has_no_padding(tiny):
    tok = tokenizer(tiny)
    # 4 + [SEP] + 3 + [SEP] + 9 = 18 tokens = 2 bodies of 9 (max_length 11)
    texts = [" ".join(WORDS[:4]), " ".join(WORDS[4:7]), " ".join(WORDS[7:16])]
    ids, am = pack_texts(tok, texts, 11)
    assert ids.shape == (2, 11) and bool((am == 1).all())
    check_packed(tok, texts, ids, am, 11)


def test_texts_without_tokens_are_skipped(tiny):
    tok = tokenizer(tiny)
    texts = ["w1 w2", " ", "w3"]
    ids, am = pack_texts(tok, texts, 8)
    assert ids[0, :am[0].sum()].tolist() == [tok.cls_token_id, 6, 7, tok.sep_token_id, 8, tok.sep_token_id]


@pytest.mark.parametrize("texts, max_length, match", [
    (["w1"], 2, "max_length"), (["w1"], True, "max_length"), (["w1"], 8.0, "max_length"),
    ([" ", ""], 8, "texts"), ([], 8, "texts")])
def test_bad_arguments_name_themselves(tiny, texts, max_length, match):
    with pytest.raises(ValueError, match=match):
        pack_texts(tokenizer(tiny), texts, max_length)


def test_packing_setting_is_typed_and_defaults_on_for_the_corpus_recipes():
    from kdfast.train.recipes import CONFIG_DIR, recipe_config

    for recipe in ("distilbert", "mobilebert", "tinybert"):
        assert recipe_config(recipe).data.packing is True
        assert recipe_config(recipe, str(CONFIG_DIR / f"{recipe}.yaml")).data.packing is True
        assert recipe_config(recipe, sets=["data.packing=false"]).data.packing is False
        with pytest.raises(ValueError, match="data.packing must be bool"):
            recipe_config(recipe, sets=["data.packing=1"])


def test_cache_settings_schema_checks_packing(tiny, tmp_path):
    from kdfast.cache import build_cache
    from kdfast.cache.format import CacheError, Manifest, validate_settings

    m = build_cache(str(tiny / "teacher"), [str(tiny / "train.txt")], str(tmp_path / "c"), logits="none",
                    hidden="none", max_length=16, batch_size=4, rows_per_shard=8, progress=False)
    assert m.settings["packing"] is False and Manifest.load(tmp_path / "c").settings == m.settings
    old = {k: v for k, v in m.settings.items() if k != "packing"}  # a cache written before packing existed
    assert validate_settings(old, "old")["packing"] is False
    for bad in ("true", 1, None):
        with pytest.raises(CacheError, match="settings.packing must be true or false"):
            validate_settings({**m.settings, "packing": bad}, "m")
    with pytest.raises(ValueError, match="packing must be True or False"):
        build_cache(str(tiny / "teacher"), [str(tiny / "train.txt")], str(tmp_path / "d"), packing="yes",
                    progress=False)
    assert not (tmp_path / "d").exists()


def test_packed_cache_built_from_the_cli_reads_back_the_packed_rows(tiny, tmp_path, capsys):
    """`kdfast cache build --packing`: the shards hold pack_texts' rows (MLM-masked where labels
    say so), the manifest says packing, the teacher's hidden states match it live; a resume
    without --packing is refused."""
    from transformers import AutoModelForMaskedLM

    from kdfast.cache import CacheDataset, TeacherCache
    from kdfast.cli import main
    from kdfast.data import load_texts

    out = tmp_path / "packed"
    args = ["cache", "build", "--teacher", str(tiny / "teacher"), "--data", str(tiny / "train.txt"), "--out",
            str(out), "--logits", "topk:4", "--layers", "0,2", "--max-length", "16", "--batch-size", "4",
            "--rows-per-shard", "8", "--no-progress"]
    assert main([*args, "--packing"]) == 0
    tok = tokenizer(tiny)
    ids, am = pack_texts(tok, load_texts([str(tiny / "train.txt")]), 16)
    cache = TeacherCache(str(out))
    assert cache.settings["packing"] is True and len(cache) == len(ids)
    assert cache.manifest.tokens == int(am.sum())
    batch = next(iter(CacheDataset(cache, len(ids), drop_last=False)))
    assert torch.equal(batch["attention_mask"].long(), am)
    labels = batch["labels"].long()
    restored = torch.where(labels != -100, labels, batch["input_ids"].long())
    assert torch.equal(restored, ids)
    assert int((labels != -100).sum()) > 0
    teacher = AutoModelForMaskedLM.from_pretrained(tiny / "teacher", local_files_only=True).eval()
    with torch.no_grad():
        live = teacher(input_ids=batch["input_ids"].long(), attention_mask=am, output_hidden_states=True)
    real = am.bool()
    torch.testing.assert_close(batch["hidden_2"].float()[real], live.hidden_states[2][real], atol=5e-3, rtol=5e-3)
    capsys.readouterr()
    assert main(args) == 2  # the other packing value: refused, nothing rewritten
    assert "packing" in capsys.readouterr().err
    assert TeacherCache(str(out)).settings["packing"] is True


@pytest.mark.parametrize("source", ["live", "cache"])
def test_a_recipe_trains_on_packed_rows_and_evaluates_paragraphs(tiny, tmp_path, source):
    from transformers import AutoTokenizer

    from kdfast.cache import TeacherCache
    from kdfast.cli import main
    from kdfast.train.recipes import common
    from kdfast.train.recipes.config import DataSettings

    out = tmp_path / source
    rc = main(["distill", "--recipe", "tinybert", "--teacher", str(tiny / "teacher"), "--data",
               str(tiny / "train.txt"), "--out", str(out), "--no-progress", "--steps", "2",
               "--set", "data.max_length=16", "--set", "train.batch_size=4", "--set", "train.eval_every=2",
               "--set", f"teacher.source={source}", "--set", "student.hidden_size=16",
               "--set", "student.intermediate_size=32", "--set", "student.num_attention_heads=4",
               "--set", "student.num_hidden_layers=1"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["stages"][0]["last"]["step"] == 2 and "eval/loss" in report["stages"][0]["eval"]
    if source == "cache":
        train = TeacherCache(str(out / "teacher-cache" / "train"))
        held = TeacherCache(str(out / "teacher-cache" / "held_out"))
        assert train.settings["packing"] is True and held.settings["packing"] is False
        lines = (tiny / "train.txt").read_text().splitlines()
        assert len(held) == len(lines[::10])  # one row per held-out paragraph (held_out_every 10)
        tok = AutoTokenizer.from_pretrained(tiny / "teacher", local_files_only=True)
        ids, am = common.training_rows(tok, [t for i, t in enumerate(lines) if i % 10],
                                       DataSettings(max_length=16))
        assert len(train) == len(ids) and train.manifest.tokens == int(am.sum())
