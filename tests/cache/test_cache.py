"""Teacher cache: contents equal the live teacher, resume after SIGKILL, refusal of bad caches."""

import json
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from kdfast.cache import (
    CacheDataset,
    CacheError,
    Manifest,
    Prefetcher,
    TeacherCache,
    build_cache,
    dequantize_int8,
    quantize_int8,
    teacher_weights_sha256,
)

BUILD = dict(max_length=24, batch_size=4, rows_per_shard=8, progress=False)


@pytest.fixture(scope="module")
def cache_dir(tiny_teacher, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    build_cache(str(tiny_teacher), [str(text_file)], str(out), logits="topk:5", hidden="fp16", qk=True, **BUILD)
    return out


def live_teacher(tiny_teacher):
    from transformers import BertForMaskedLM

    return BertForMaskedLM.from_pretrained(tiny_teacher).eval()


def test_cache_matches_live_teacher(cache_dir, tiny_teacher):
    cache = TeacherCache(str(cache_dir))
    assert cache.verify() == []
    assert len(cache) == 37 and cache.manifest.complete
    teacher = live_teacher(tiny_teacher)
    q_seen = {}
    teacher.bert.encoder.layer[1].attention.self.query.register_forward_hook(lambda m, a, o: q_seen.update(q=o))
    n_rows, n_masked = 0, 0
    for batch in CacheDataset(cache, batch_size=6):
        with torch.no_grad():
            out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=True)
        for l in (0, 1, 2):
            torch.testing.assert_close(batch[f"hidden_{l}"].float(), out.hidden_states[l], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(batch["q_2"].float(), q_seen["q"], rtol=2e-3, atol=2e-3)
        sel = batch["labels"] != -100
        logits = out.logits[sel]
        top = logits.topk(5, dim=-1)
        assert torch.equal(batch["topk_ids"], top.indices)
        torch.testing.assert_close(batch["topk_values"].float(), top.values, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(batch["topk_lse"], torch.logsumexp(logits, -1), rtol=1e-4, atol=1e-4)
        # MLM labels are the original tokens
        assert (batch["labels"][sel] >= 5).all()
        n_rows += batch["input_ids"].shape[0]
        n_masked += int(sel.sum())
    assert n_rows == 37 and n_masked > 0


def test_info_reports_bytes_per_token(cache_dir):
    info = TeacherCache(str(cache_dir)).info()
    assert info["rows"] == 37 and info["tokens"] > 0
    bpt = info["bytes_per_token"]
    # fp16 hidden of width 32 over padded rows: at least 64 bytes per real token
    assert bpt["hidden_1"] >= 64 and bpt["q_1"] >= 64 and bpt["topk_ids"] > 0
    assert abs(sum(bpt.values()) - info["bytes_per_token_total"]) < 0.1


def test_int8_hidden_error_is_small():
    x = torch.randn(64, 24, 384) * torch.rand(64, 24, 1) * 5
    q, s = quantize_int8(x)
    back = dequantize_int8(q, s)
    rel = ((back - x).norm() / x.norm()).item()
    assert q.dtype == torch.int8 and rel < 0.01, rel  # measured about 0.4%: the rounding step / sqrt(12)


def _build_cmd(teacher, data, out):
    return [sys.executable, "-m", "kdfast.cli", "cache", "build", "--teacher", str(teacher), "--data", str(data),
            "--out", str(out), "--logits", "topk:5", "--hidden", "int8", "--max-length", "24", "--batch-size", "2",
            "--rows-per-shard", "2", "--no-progress"]


def _shard_hashes(out):
    m = Manifest.load(out)
    return [(s.file, s.rows, s.sha256) for s in m.shards], m.complete


def test_sigkill_mid_build_then_resume_equals_uninterrupted(tiny_teacher, text_file, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_build_cmd(tiny_teacher, text_file, ref), check=True, capture_output=True)
    ref_hashes, done = _shard_hashes(ref)
    assert done and len(ref_hashes) == 19
    interrupted = 0
    for attempt, kill_after in enumerate((1, 7, 15)):
        out = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen(_build_cmd(tiny_teacher, text_file, out), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 600  # a loaded machine imports torch slowly
        while time.time() < deadline and proc.poll() is None:
            try:
                if len(json.loads((out / "manifest.json").read_text())["shards"]) >= kill_after:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial, complete = _shard_hashes(out)
        assert partial == ref_hashes[: len(partial)]  # whatever was recorded is complete and right
        interrupted += not complete
        if not complete:
            with pytest.raises(CacheError, match="incomplete"):
                TeacherCache(str(out))
        subprocess.run(_build_cmd(tiny_teacher, text_file, out), check=True, capture_output=True)
        assert _shard_hashes(out) == (ref_hashes, True)
        assert TeacherCache(str(out)).verify() == []
    assert interrupted >= 1  # the kills did land mid-build


def test_torn_and_unlisted_files_are_reported_then_cleaned_on_resume(tiny_teacher, text_file, tmp_path):
    out = tmp_path / "c"
    build_cache(str(tiny_teacher), [str(text_file)], str(out), logits="none", hidden="fp16", **BUILD)
    m = Manifest.load(out)
    full = [(s.file, s.sha256) for s in m.shards]
    # simulate a run killed after writing shard 3 but before recording it, and one killed mid-write
    m.shards = m.shards[:2]
    m.blocks_done = 0  # the corpus's one block is no longer listed whole
    m.complete = False
    m.save(out)
    (out / ".part-000000-00002.safetensors.tmp-123").write_bytes(b"torn")
    problems = TeacherCache(str(out), allow_incomplete=True).verify()
    assert any("shard-00002.safetensors: not in the manifest" in p for p in problems)
    assert any(".tmp-123: not in the manifest" in p for p in problems)
    assert any("incomplete" in p for p in problems)
    build_cache(str(tiny_teacher), [str(text_file)], str(out), logits="none", hidden="fp16", **BUILD)
    assert [(s.file, s.sha256) for s in Manifest.load(out).shards] == full
    assert TeacherCache(str(out)).verify() == []


def test_refuses_altered_shard_foreign_teacher_and_escaping_names(cache_dir, tiny_teacher, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(cache_dir, bad)
    shard = bad / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    cache = TeacherCache(str(bad))
    assert any("shard-00001.safetensors: sha256" in p for p in cache.verify())
    with pytest.raises(CacheError, match="torn or altered"):
        cache.read_rows(1, torch.tensor([0]))
    with pytest.raises(CacheError, match="torn or altered"):
        list(Prefetcher(CacheDataset(cache, batch_size=4), pin_memory=False))

    with pytest.raises(CacheError, match="another teacher"):
        TeacherCache(str(cache_dir), expect_teacher_sha256="0" * 64)
    assert TeacherCache(str(cache_dir), expect_teacher_sha256=teacher_weights_sha256(tiny_teacher))
    with pytest.raises(CacheError, match="another tokenizer"):
        TeacherCache(str(cache_dir), expect_tokenizer_sha256="f" * 64)

    evil = tmp_path / "evil"
    shutil.copytree(cache_dir, evil)
    raw = json.loads((evil / "manifest.json").read_text())
    raw["shards"][0]["file"] = "../shard-00000.safetensors"
    (evil / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(CacheError, match=r"shards\[0\]\.file must be 'shard-00000.safetensors'"):
        TeacherCache(str(evil))


def test_resume_with_other_settings_is_refused(cache_dir, tiny_teacher, text_file):
    with pytest.raises(CacheError, match="other settings.*logits"):
        build_cache(str(tiny_teacher), [str(text_file)], str(cache_dir), logits="topk:6", hidden="fp16", qk=True,
                    **BUILD)


def test_ranks_get_disjoint_equal_slices_and_shuffle_is_seeded(cache_dir):
    cache = TeacherCache(str(cache_dir))

    def rows(ds):
        return [tuple(r.tolist()) for b in ds for r in b["input_ids"]]

    r0 = rows(CacheDataset(cache, 4, rank=0, world_size=2, shuffle=True, seed=3))
    r1 = rows(CacheDataset(cache, 4, rank=1, world_size=2, shuffle=True, seed=3))
    assert len(r0) == len(r1) == 37 // 2
    everything = rows(CacheDataset(cache, 4))
    assert not Counter(r0 + r1) - Counter(everything)  # content: a sub-multiset of the cache
    idx0 = set(CacheDataset(cache, 4, rank=0, world_size=2, shuffle=True, seed=3)._my_rows())
    idx1 = set(CacheDataset(cache, 4, rank=1, world_size=2, shuffle=True, seed=3)._my_rows())
    assert not idx0 & idx1 and len(idx0) == len(idx1) == 18  # positions: disjoint, equal
    assert rows(CacheDataset(cache, 4, rank=0, world_size=2, shuffle=True, seed=3)) == r0
    ds = CacheDataset(cache, 4, shuffle=True, seed=3)
    first = rows(ds)
    ds.set_epoch(1)
    assert rows(ds) != first and sorted(rows(ds)) == sorted(first)
    assert [tuple(b["input_ids"].shape) for b in Prefetcher(CacheDataset(cache, 10), pin_memory=False)] == \
        [(10, 24), (10, 24), (10, 24), (7, 24)]


def test_cli_cache_build_verify_info(tiny_teacher, text_file, tmp_path):
    out = tmp_path / "cli"
    cmd = _build_cmd(tiny_teacher, text_file, out)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    v = subprocess.run([sys.executable, "-m", "kdfast.cli", "cache", "verify", str(out)], capture_output=True, text=True)
    assert v.returncode == 0 and "OK" in v.stdout
    i = subprocess.run([sys.executable, "-m", "kdfast.cli", "cache", "info", str(out)], capture_output=True, text=True)
    assert i.returncode == 0 and "bytes per token" in i.stdout and "hidden_1_scale" in i.stdout
    (out / "shard-00000.safetensors").write_bytes(b"x")
    v = subprocess.run([sys.executable, "-m", "kdfast.cli", "cache", "verify", str(out)], capture_output=True, text=True)
    assert v.returncode == 1 and "PROBLEM shard-00000.safetensors: sha256" in v.stdout
    bad = subprocess.run([sys.executable, "-m", "kdfast.cli", "cache", "build", "--teacher", str(tmp_path / "nope"),
                          "--data", str(text_file), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a local model directory" in bad.stderr
