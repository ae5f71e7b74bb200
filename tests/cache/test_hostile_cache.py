"""The teacher cache under hostile and careless input: ``--out`` owns only what kdfast
wrote, the manifest is a validated schema, a re-hashed shard that breaks an invariant is reported
by ``verify`` and refused by the reader with a CacheError (never a raw RuntimeError /
SafetensorError), a teacher without an MLM head is refused for logits, and the command line
answers every such case with one line and exit 2 (verify: exit 1 for the problems it lists)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from kdfast.cache import CacheDataset, CacheError, Manifest, TeacherCache, build_cache
from kdfast.cache.format import sha256_file
from kdfast.cli import main

BUILD = dict(max_length=16, batch_size=4, rows_per_shard=8, progress=False)  # 37 rows: shards of 8, 8, 8, 8, 5
FOREIGN = {".env": "SECRET=1\n", ".gitignore": "*.pyc\n", "shard-notes.md": "# notes\n",
           ".git/HEAD": "ref: refs/heads/main\n", "shard-00099.safetensors.bak": "mine\n"}


@pytest.fixture(scope="module")
def cache_dir(tiny_teacher, text_file, tmp_path_factory):
    """top-k logits, int8 hidden states of two layers (with scales), Q/K: every field kind."""
    out = tmp_path_factory.mktemp("hostile") / "c"
    build_cache(str(tiny_teacher), [str(text_file)], str(out), logits="topk:3", hidden="int8", layers=[0, 2], qk=True,
                **BUILD)
    return out


@pytest.fixture
def cache_copy(cache_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(cache_dir, out)
    return out


def put_foreign(d: Path) -> None:
    for name, text in FOREIGN.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)


def assert_foreign_intact(d: Path) -> None:
    for name, text in FOREIGN.items():
        assert (d / name).read_text() == text, name


def read_all(cache_dir: Path) -> int:
    cache = TeacherCache(str(cache_dir))
    return sum(b["input_ids"].shape[0] for b in CacheDataset(cache, batch_size=5))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``kdfast`` in this process: an exception escaping main() would be the traceback a user sees."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, pattern: str, want: int = 2) -> None:
    assert code == want, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and pattern in lines[0], err


# ---------------------------------------------------------------- --out: the cache owns only what it wrote

def test_out_dir_with_foreign_files_is_refused_and_left_untouched(tiny_teacher, text_file, tmp_path, capsys):
    out = tmp_path / "project"
    put_foreign(out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, _, err = run_cli(capsys, "cache", "build", "--teacher", str(tiny_teacher), "--data", str(text_file),
                           "--out", str(out), "--max-length", "16", "--no-progress")
    assert_one_line_error(code, err, "neither empty nor a kdfast cache")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert_foreign_intact(out)


def test_out_naming_a_file_is_refused(tiny_teacher, text_file, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    code, _, err = run_cli(capsys, "cache", "build", "--teacher", str(tiny_teacher), "--data", str(text_file),
                           "--out", str(target), "--max-length", "16", "--no-progress")
    assert_one_line_error(code, err, "is not a directory")
    assert target.read_text() == "keep me\n"


def test_resume_keeps_foreign_files_and_removes_only_kdfast_leftovers(cache_dir, tiny_teacher, text_file, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(cache_dir, out)
    full = [(s.file, s.sha256) for s in Manifest.load(out).shards]
    m = Manifest.load(out)
    m.shards, m.complete = m.shards[:2], False  # killed after writing shard 2, before recording it
    m.blocks_done = 0  # the corpus's one block is no longer listed whole
    m.save(out)
    (out / ".part-000000-00003.safetensors.tmp-4242").write_bytes(b"torn")  # killed mid-write
    put_foreign(out)
    (out / "shard-00042.safetensors").mkdir()  # a directory is never removed, whatever its name
    build_cache(str(tiny_teacher), [str(text_file)], str(out), logits="topk:3", hidden="int8", layers=[0, 2],
                qk=True, **BUILD)
    assert [(s.file, s.sha256) for s in Manifest.load(out).shards] == full
    assert not (out / ".part-000000-00003.safetensors.tmp-4242").exists()
    assert (out / "shard-00042.safetensors").is_dir()
    assert_foreign_intact(out)
    assert TeacherCache(str(out)).verify() == []  # foreign files are not problems of the cache


def test_a_refused_build_leaves_nothing_that_blocks_the_next(tiny_encoder_teacher, text_file, tmp_path, capsys):
    out = tmp_path / "new" / "cache"
    code, _, err = run_cli(capsys, "cache", "build", "--teacher", str(tiny_encoder_teacher), "--data", str(text_file),
                           "--out", str(out), "--max-length", "16", "--no-progress")  # default --logits topk:8
    assert_one_line_error(code, err, "has no MLM head")
    assert "--logits none" in err and "cls.predictions" in err
    assert not out.exists()  # refused before the first write
    code, out_text, err = run_cli(capsys, "cache", "build", "--teacher", str(tiny_encoder_teacher), "--data",
                                  str(text_file), "--out", str(out), "--logits", "none", "--max-length", "16",
                                  "--batch-size", "4", "--rows-per-shard", "8", "--no-progress")
    assert code == 0, err
    assert "37 rows" in out_text and TeacherCache(str(out)).verify() == []


def test_a_build_stopped_before_its_first_shard_does_not_block_other_settings(cache_dir, tiny_teacher, text_file,
                                                                              tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    m = Manifest.load(cache_dir)
    m.shards, m.complete = [], False  # what a build killed (or failing) before its first shard leaves
    m.blocks_done = 0  # the corpus's one block is no longer listed whole
    m.save(out)
    (out / ".manifest.json.tmp-77").write_text("{")
    build_cache(str(tiny_teacher), [str(text_file)], str(out), logits="none", hidden="fp16", **BUILD)
    assert TeacherCache(str(out)).verify() == [] and len(TeacherCache(str(out))) == 37
    assert not (out / ".manifest.json.tmp-77").exists()


def test_a_partial_cache_with_an_altered_shard_is_not_resumed(cache_copy, tiny_teacher, text_file, capsys):
    m = Manifest.load(cache_copy)
    m.shards, m.complete = m.shards[:3], False
    m.blocks_done = 0  # the corpus's one block is no longer listed whole
    m.save(cache_copy)
    (cache_copy / "shard-00001.safetensors").write_bytes(b"flipped")
    code, _, err = run_cli(capsys, "cache", "build", "--teacher", str(tiny_teacher), "--data", str(text_file),
                           "--out", str(cache_copy), "--logits", "topk:3", "--hidden", "int8", "--layers", "0,2",
                           "--qk", "--max-length", "16", "--batch-size", "4", "--rows-per-shard", "8", "--no-progress")
    assert_one_line_error(code, err,
                          "shard-00001.safetensors, listed in the partial cache's manifest, is missing or altered")
    assert (cache_copy / "shard-00001.safetensors").read_bytes() == b"flipped"


def test_bad_layers_option_is_one_line(tiny_teacher, text_file, tmp_path, capsys):
    code, _, err = run_cli(capsys, "cache", "build", "--teacher", str(tiny_teacher), "--data", str(text_file),
                           "--out", str(tmp_path / "x"), "--layers", "0,two", "--no-progress")
    assert_one_line_error(code, err, "--layers must be comma-separated integers")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- the manifest is a schema

def _edit(key_path, value):
    def f(raw):
        obj = raw
        for k in key_path[:-1]:
            obj = obj[k]
        obj[key_path[-1]] = value
        return raw
    return f


def _delete(key_path):
    def f(raw):
        obj = raw
        for k in key_path[:-1]:
            obj = obj[k]
        del obj[key_path[-1]]
        return raw
    return f


MANIFEST_MUTATIONS = {
    "json list": (lambda raw: [raw], "the manifest must be an object"),
    "lacks settings": (_delete(["settings"]), "the manifest lacks settings"),
    "lacks a shard's rows": (_delete(["shards", 0, "rows"]), r"shards[0] lacks rows"),
    "complete is the string false": (_edit(["complete"], "false"), "complete must be true or false"),
    "complete is 1": (_edit(["complete"], 1), "complete must be true or false"),
    "rows 10**18": (_edit(["shards", 4, "rows"], 10**18), "shards[4].rows must be an integer in [1, 8]"),
    "rows negative": (_edit(["shards", 4, "rows"], -5), "shards[4].rows must be an integer"),
    "rows a bool": (_edit(["shards", 4, "rows"], True), "shards[4].rows must be an integer"),
    "rows a float": (_edit(["shards", 4, "rows"], 5.0), "shards[4].rows must be an integer"),
    "short shard before the last": (_edit(["shards", 1, "rows"], 7),
                                    "shards[1] holds 7 < rows_per_shard 8 rows but is not the last shard of its block"),
    "shard listed twice": (lambda raw: {**raw, "shards": raw["shards"] + [raw["shards"][0]]},
                           "shards[5].file must be 'shard-00005.safetensors', got 'shard-00000.safetensors'"),
    "shard listed in place of another": (lambda raw: {**raw, "shards": [raw["shards"][0]] * 5},
                                         "shards[1].file must be 'shard-00001.safetensors'"),
    "name ending in a newline": (_edit(["shards", 0, "file"], "shard-00000.safetensors\n"),
                                 "shards[0].file must be 'shard-00000.safetensors'"),
    "name escaping": (_edit(["shards", 0, "file"], "../shard-00000.safetensors"), "shards[0].file must be"),
    "name not a string": (_edit(["shards", 0, "file"], ["shard-00000.safetensors"]), "shards[0].file must be"),
    "tokens beyond rows x max_length": (_edit(["shards", 0, "tokens"], 8 * 16 + 1), "shards[0].tokens must be"),
    "sha256 not hex": (_edit(["shards", 0, "sha256"], "z" * 64), "shards[0].sha256 must be a string matching"),
    "blocks out of order": (_edit(["shards", 0, "block"], 1), "shards[1].block must be an integer in [1, 1]"),
    "block beyond blocks_done": (_edit(["shards", 4, "block"], 2), "shards[4].block must be an integer in [0, 1]"),
    "blocks_done a string": (_edit(["blocks_done"], "1"), "blocks_done must be an integer"),
    "version true": (_edit(["version"], True), "format version True is not supported"),
    "version 1": (_edit(["version"], 1), "format version 1 is not supported"),
    "other format": (_edit(["format"], "safetensors"), "format 'safetensors' is not"),
    "unknown top-level field": (_edit(["extra"], 1), "the manifest has unknown field(s) ['extra']"),
    "settings a list": (_edit(["settings"], []), "settings must be an object"),
    "shards an object": (_edit(["shards"], {}), "shards must be a list"),
    "temperature NaN": (_edit(["settings", "logits", "temperature"], float("nan")),
                        "settings.logits.temperature must be a finite number > 0"),
    "temperature a string": (_edit(["settings", "logits", "temperature"], "2"), "settings.logits.temperature"),
    "vocab_size 0": (_edit(["settings", "teacher", "vocab_size"], 0), "settings.teacher.vocab_size must be"),
    "max_length huge float": (_edit(["settings", "max_length"], 1e400), "settings.max_length must be an integer"),
    "hidden layer beyond the teacher": (_edit(["settings", "hidden", "layers"], [0, 9]),
                                        "settings.hidden.layers entries must be an integer in [0, 2]"),
    "hidden layers repeated": (_edit(["settings", "hidden", "layers"], [0, 0]), "without repeats"),
    "logits mode unknown": (_edit(["settings", "logits", "mode"], "all"), "settings.logits.mode must be"),
    "rows_per_shard not a multiple": (_edit(["settings", "rows_per_shard"], 6), "not a multiple of batch_size"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_MUTATIONS))
def test_malformed_manifest_is_refused_by_name(cache_copy, case):
    mutate, message = MANIFEST_MUTATIONS[case]
    path = cache_copy / "manifest.json"
    path.write_text(json.dumps(mutate(json.loads(path.read_text()))))
    with pytest.raises(CacheError, match="is malformed|is not supported") as e:
        TeacherCache(str(cache_copy), allow_incomplete=True)
    assert message in str(e.value)


@pytest.mark.parametrize("content", [b"[" * 100_000, b"\xff\xfe{}", b"", b'{"format": "kdfast-teacher-cache"'])
def test_unparseable_manifest_is_refused(cache_copy, content):
    (cache_copy / "manifest.json").write_bytes(content)
    with pytest.raises(CacheError, match="is malformed"):
        Manifest.load(cache_copy)


def test_huge_row_count_is_refused_before_any_list_is_built(cache_copy):
    """rows within the schema's bounds but beyond what the shard holds: refused from the shard header."""
    raw = json.loads((cache_copy / "manifest.json").read_text())
    raw["settings"]["rows_per_shard"] = raw["settings"]["batch_size"] * 10**17
    for sh in raw["shards"]:
        sh["rows"] = raw["settings"]["rows_per_shard"]
    (cache_copy / "manifest.json").write_text(json.dumps(raw))
    cache = TeacherCache(str(cache_copy))
    with pytest.raises(CacheError, match=f"shard-00000.safetensors holds 8 rows, the manifest says {4 * 10**17}"):
        CacheDataset(cache, batch_size=4)
    assert any(f"field input_ids is I32 [8, 16], expected I32 [{4 * 10**17}, 16]" in p for p in cache.verify())


@pytest.mark.parametrize("case", ["json list", "lacks settings", "complete is the string false", "shard listed twice"])
@pytest.mark.parametrize("command", ["verify", "info"])
def test_cli_on_malformed_manifest_is_one_line_exit_2(cache_copy, capsys, case, command):
    mutate, message = MANIFEST_MUTATIONS[case]
    path = cache_copy / "manifest.json"
    path.write_text(json.dumps(mutate(json.loads(path.read_text()))))
    code, out, err = run_cli(capsys, "cache", command, str(cache_copy))
    assert_one_line_error(code, err, message)
    assert out == ""


def test_cli_on_missing_or_file_cache_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for target in (tmp_path / "absent", tmp_path / "f", tmp_path):
        for command in ("verify", "info"):
            code, _, err = run_cli(capsys, "cache", command, str(target))
            assert_one_line_error(code, err, "is not a kdfast cache")


# ---------------------------------------------------------------- re-hashed shards that break an invariant

def rewrite_shard(cache_dir: Path, index: int, mutate) -> None:
    """Change shard ``index``'s tensors and re-hash it in the manifest, as a hostile editor would."""
    path = cache_dir / f"shard-{index:05d}.safetensors"
    tensors = load_file(str(path))
    mutate(tensors)
    path.write_bytes(safetensors_bytes(tensors))
    raw = json.loads((cache_dir / "manifest.json").read_text())
    raw["shards"][index]["sha256"] = sha256_file(path)
    (cache_dir / "manifest.json").write_text(json.dumps(raw))


def _set(name, index, value):
    def f(t):
        t[name][index] = value
    return f


def _first_masked(t):
    return tuple((t["labels"] != -100).nonzero()[0].tolist())


def _unmask_first(t):
    t["labels"][_first_masked(t)] = -100


SHARD_MUTATIONS = {
    "offset beyond the sparse rows": (_set("logit_offsets", 3, 10**6), "logit_offsets"),
    "offsets decreasing": (lambda t: t["logit_offsets"].__setitem__(2, t["logit_offsets"][3] + 1), "logit_offsets"),
    "negative first offset": (_set("logit_offsets", 0, -1), "logit_offsets"),
    "offsets ending early": (lambda t: t["logit_offsets"].__setitem__(-1, t["logit_offsets"][-1] - 1), "logit_offsets"),
    "labels disagree with offsets": (_unmask_first, "disagree with the masked labels"),
    "top-k id beyond the vocabulary": (_set("topk_ids", (0, 0), 10**6), "topk_ids holds a value outside"),
    "negative top-k id": (_set("topk_ids", (1, 2), -3), "topk_ids holds a value outside"),
    "input id beyond the vocabulary": (_set("input_ids", (0, 0), 10**6), "input_ids holds a value outside"),
    "label neither -100 nor a token": (lambda t: t["labels"].__setitem__(_first_masked(t), -7),
                                       "labels (besides -100) holds a value outside"),
    "attention mask of 2": (_set("attention_mask", (0, 0), 2), "attention_mask"),
    "NaN query": (_set("q_1", (2, 3, 4), float("nan")), "q_1 holds NaN or Inf"),
    "Inf key": (_set("k_2", (0, 0, 0), float("inf")), "k_2 holds NaN or Inf"),
    "NaN int8 scale": (_set("hidden_0_scale", (1, 1), float("nan")), "hidden_0_scale holds a negative or non-finite"),
    "negative int8 scale": (_set("hidden_2_scale", (1, 1), -1.0), "hidden_2_scale holds a negative or non-finite"),
    "Inf top-k lse": (_set("topk_lse", 0, float("inf")), "topk_lse holds NaN or Inf"),
    "NaN top-k value": (_set("topk_values", (0, 1), float("nan")), "topk_values holds NaN or Inf"),
    "field missing": (lambda t: t.pop("q_1"), "field q_1 missing"),
    "field added": (lambda t: t.__setitem__("hidden_1", t["hidden_0"].clone()), "field hidden_1 is not part"),
    "int8 hidden without its scale": (lambda t: t.pop("hidden_2_scale"), "field hidden_2_scale missing"),
    "input_ids as float": (lambda t: t.__setitem__("input_ids", t["input_ids"].float()), "field input_ids is F32"),
    "hidden of another width": (lambda t: t.__setitem__("hidden_0", torch.cat([t["hidden_0"]] * 2, -1)),
                                "field hidden_0 is I8 [8, 16, 64]"),
    "fewer rows than listed": (lambda t: [t.__setitem__(n, v[:7] if n != "logit_offsets" else v[:8])
                                         for n, v in list(t.items()) if not n.startswith("topk")],
                               "field input_ids is I32 [7, 16]"),
    "top-k of another k": (lambda t: t.__setitem__("topk_ids", t["topk_ids"][:, :2].contiguous()),
                           "field topk_ids is I32"),
}


@pytest.mark.parametrize("case", sorted(SHARD_MUTATIONS))
def test_rehashed_shard_breaking_an_invariant_fails_verify_and_the_reader_names_it(cache_copy, case):
    mutate, message = SHARD_MUTATIONS[case]
    rewrite_shard(cache_copy, 1, mutate)
    problems = TeacherCache(str(cache_copy)).verify()
    assert any(p.startswith("shard-00001.safetensors: ") and message in p for p in problems), problems
    with pytest.raises(CacheError, match="shard-00001.safetensors"):
        read_all(cache_copy)


def test_token_count_lie_fails_verify(cache_copy, capsys):
    raw = json.loads((cache_copy / "manifest.json").read_text())
    raw["shards"][2]["tokens"] -= 1
    (cache_copy / "manifest.json").write_text(json.dumps(raw))
    code, out, err = run_cli(capsys, "cache", "verify", str(cache_copy))
    assert code == 1 and "PROBLEM shard-00002.safetensors: " in out and "tokens in the manifest" in out, out + err


def test_sound_cache_passes_and_reads_every_row(cache_dir, capsys):
    assert TeacherCache(str(cache_dir)).verify() == []
    assert read_all(cache_dir) == 37
    code, out, _ = run_cli(capsys, "cache", "verify", str(cache_dir))
    assert code == 0 and "OK" in out


def test_fuzzed_shards_pass_verify_only_if_they_read(cache_dir, tmp_path):
    """Random byte changes anywhere in a shard, re-hashed: verify OK implies every row reads; any
    reader failure is a CacheError naming the shard. Both outcomes must occur (the fuzz bites)."""
    g = torch.Generator().manual_seed(12)
    outcomes = {"verified": 0, "refused": 0}
    for trial in range(24):
        d = tmp_path / f"f{trial}"
        shutil.copytree(cache_dir, d)
        index = int(torch.randint(0, 5, (1,), generator=g))
        path = d / f"shard-{index:05d}.safetensors"
        data = bytearray(path.read_bytes())
        header = 8 + int.from_bytes(data[:8], "little")
        # mostly the tensor data, sometimes the JSON header
        lo, hi = (8, header) if trial % 6 == 0 else (header, len(data))
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            pos = int(torch.randint(lo, hi, (1,), generator=g))
            data[pos] = int(torch.randint(0, 256, (1,), generator=g))
        path.write_bytes(bytes(data))
        raw = json.loads((d / "manifest.json").read_text())
        raw["shards"][index]["sha256"] = sha256_file(path)
        (d / "manifest.json").write_text(json.dumps(raw))
        try:
            problems = TeacherCache(str(d)).verify()
        except CacheError:  # cannot be: the manifest is sound
            raise
        if not problems:
            assert read_all(d) == 37
            outcomes["verified"] += 1
        else:
            assert all(p.startswith(f"shard-{index:05d}.safetensors") for p in problems), problems
            with pytest.raises(CacheError, match=f"shard-{index:05d}.safetensors"):
                read_all(d)
            outcomes["refused"] += 1
        shutil.rmtree(d)
    assert outcomes["verified"] > 0 and outcomes["refused"] > 0, outcomes


# ---------------------------------------------------------------- torn shards, closed pipes

def test_torn_shard_info_is_one_line_and_reader_names_it(cache_copy, capsys):
    shard = cache_copy / "shard-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:5])
    code, out, err = run_cli(capsys, "cache", "info", str(cache_copy))
    assert_one_line_error(code, err, "shard-00003.safetensors: unreadable safetensors")
    code, out, err = run_cli(capsys, "cache", "verify", str(cache_copy))
    assert code == 1 and "PROBLEM shard-00003.safetensors: sha256" in out
    with pytest.raises(CacheError, match="shard-00003.safetensors"):
        read_all(cache_copy)


def test_listed_shard_replaced_by_a_directory(cache_copy, capsys):
    shard = cache_copy / "shard-00000.safetensors"
    shard.unlink()
    shard.mkdir()
    code, out, err = run_cli(capsys, "cache", "verify", str(cache_copy))
    assert code == 1 and "PROBLEM shard-00000.safetensors: missing" in out, out + err
    code, out, err = run_cli(capsys, "cache", "info", str(cache_copy))
    assert_one_line_error(code, err, "shard-00000.safetensors is listed in the manifest but missing")


def test_closed_stdout_pipe_is_not_a_traceback(cache_dir):
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `| head` does once it has its lines
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-m", "kdfast.cli", "cache", "info", "--json", str(cache_dir)],
                       stdout=write_end, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    os.close(write_end)
    assert r.returncode == 141 and r.stderr == "", r.stderr


# ---------------------------------------------------------------- arguments, a full disk

@pytest.mark.parametrize("bad, match", [
    (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number > 0"),
    (dict(temperature="2"), "temperature must be a finite number > 0"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(mlm_probability=1.5), "mlm_probability must be a number in"),
    (dict(mlm_probability=float("nan")), "mlm_probability must be a number in"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=True), "seed must be an integer"),
    (dict(seed=2**40), r"seed must be an integer in \[0, 2\*\*32\)"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(batch_size=2.0), "batch_size must be an integer >= 1"),
    (dict(rows_per_shard=6), r"rows_per_shard \(6\) must be a multiple of batch_size \(4\)"),
    (dict(max_length=1), "max_length must be an integer >= 2"),
    (dict(layers=["0"]), "layers must be a list of integers"),
    (dict(layers=[0, 7]), r"layers must lie in \[0, 2\]"),
    (dict(logits="topk:0"), "logits must be"),
    (dict(hidden="fp8"), "hidden must be one of"),
])
def test_bad_build_arguments_name_the_argument_and_write_nothing(tiny_teacher, text_file, tmp_path, bad, match):
    kw = {**BUILD, **bad}
    with pytest.raises(ValueError, match=match):
        build_cache(str(tiny_teacher), [str(text_file)], str(tmp_path / "out"), **kw)
    assert not (tmp_path / "out").exists()


def test_data_files_as_one_string_is_refused(tiny_teacher, text_file, tmp_path):
    with pytest.raises(ValueError, match="data_files must be a non-empty list of paths"):
        build_cache(str(tiny_teacher), str(text_file), str(tmp_path / "out"), **BUILD)


def test_cli_non_finite_temperature_is_one_line(tiny_teacher, text_file, tmp_path, capsys):
    code, _, err = run_cli(capsys, "cache", "build", "--teacher", str(tiny_teacher), "--data", str(text_file),
                           "--out", str(tmp_path / "o"), "--temperature", "nan", "--no-progress")
    assert_one_line_error(code, err, "temperature must be a finite number > 0")


def test_full_disk_mid_build_is_one_line_leaves_no_temporary_and_resumes(cache_dir, tiny_teacher, text_file, tmp_path,
                                                                         capsys, monkeypatch):
    """fsync failing with ENOSPC on the third shard: exit 2 in one line, no torn temporary, and the
    next build resumes to the same shards as an uninterrupted one."""
    import errno

    out = tmp_path / "c"
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 15:  # two fsyncs per atomic write: manifest, (shard, record, manifest) x 2, then shard 3
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    argv = ["cache", "build", "--teacher", str(tiny_teacher), "--data", str(text_file), "--out", str(out), "--logits",
            "topk:3", "--hidden", "int8", "--layers", "0,2", "--qk", "--max-length", "16", "--batch-size", "4",
            "--rows-per-shard", "8", "--no-progress"]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "No space left on device")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    partial = Manifest.load(out)
    assert not partial.complete and len(partial.shards) == 2
    monkeypatch.setattr(os, "fsync", real_fsync)
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert [(s.file, s.sha256) for s in Manifest.load(out).shards] == \
        [(s.file, s.sha256) for s in Manifest.load(cache_dir).shards]


def test_shard_linked_to_a_file_outside_the_cache_is_refused(cache_copy, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(cache_copy / "shard-00002.safetensors", outside)
    (cache_copy / "shard-00002.safetensors").symlink_to(outside)
    with pytest.raises(CacheError, match="points outside the cache directory"):
        TeacherCache(str(cache_copy))


def test_oversized_manifest_is_refused_unread(cache_copy):
    with open(cache_copy / "manifest.json", "r+b") as f:
        f.truncate((64 << 20) + 1)  # sparse: nothing is written, nothing may be read
    with pytest.raises(CacheError, match="larger than 64 MiB"):
        Manifest.load(cache_copy)


def test_a_second_build_into_a_directory_being_written_is_refused(cache_dir, tiny_teacher, text_file, tmp_path):
    import fcntl

    out = tmp_path / "busy"
    shutil.copytree(cache_dir, out)
    m = Manifest.load(out)
    m.shards, m.complete = m.shards[:1], False
    m.blocks_done = 0  # the corpus's one block is no longer listed whole
    m.save(out)
    fd = os.open(out, os.O_RDONLY)  # what a running build holds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CacheError, match="another kdfast cache build is writing to it"):
            build_cache(str(tiny_teacher), [str(text_file)], str(out), logits="topk:3", hidden="int8", layers=[0, 2],
                        qk=True, **BUILD)
        assert len(Manifest.load(out).shards) == 1 and (out / "shard-00003.safetensors").exists()  # untouched
    finally:
        os.close(fd)
    build_cache(str(tiny_teacher), [str(text_file)], str(out), logits="topk:3", hidden="int8", layers=[0, 2], qk=True,
                **BUILD)  # the lock went with its holder
    assert TeacherCache(str(out)).verify() == []


def test_tokenizer_without_mask_token_is_refused_for_logits(tiny_teacher, text_file, tmp_path):
    from transformers import BertTokenizer

    t = tmp_path / "nomask"
    shutil.copytree(tiny_teacher, t)
    vocab = [w for w, _ in sorted(BertTokenizer.from_pretrained(t).get_vocab().items(), key=lambda x: x[1])
             if w != "[MASK]"]
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (t / name).unlink(missing_ok=True)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, mask_token=None).save_pretrained(t)
    with pytest.raises(ValueError, match=r"has no \[MASK\] token"):
        build_cache(str(t), [str(text_file)], str(tmp_path / "o"), logits="topk:3", **BUILD)
    assert not (tmp_path / "o").exists()


def test_max_length_beyond_the_teachers_positions_is_one_line(tiny_teacher, text_file, tmp_path, capsys):
    code, _, err = run_cli(capsys, "cache", "build", "--teacher", str(tiny_teacher), "--data", str(text_file),
                           "--out", str(tmp_path / "o"), "--max-length", "65", "--no-progress")
    assert_one_line_error(code, err, "max_length 65 exceeds the 64 positions of the model")
    assert not (tmp_path / "o").exists()


def test_finite_check_agrees_with_isfinite_on_every_half_bit_pattern():
    """The reader finds NaN / Inf from the exponent bits: exhaustive over fp16 and bf16, random fp32 patterns."""
    from kdfast.cache.reader import _check_finite

    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    g = torch.Generator().manual_seed(5)
    cases = [every.view(torch.float16), every.view(torch.bfloat16),
             torch.randint(-2**31, 2**31, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
             .view(torch.float32)]
    for values in cases:
        for chunk in values.split(509):  # odd-sized pieces, many holding no NaN / Inf
            finite = bool(torch.isfinite(chunk).all())
            try:
                _check_finite(chunk, "x")
                assert finite, chunk
            except CacheError:
                assert not finite


@pytest.mark.parametrize("manifest", [b"not json", b'{"format": "kdfast-teacher-cache", "version": 99}', b"[]"])
def test_out_with_a_foreign_or_future_manifest_is_refused_and_left_untouched(tiny_teacher, text_file, tmp_path,
                                                                             capsys, manifest):
    out = tmp_path / "o"
    put_foreign(out)
    (out / "manifest.json").write_bytes(manifest)
    (out / "shard-00000.safetensors").write_bytes(b"someone else's")
    code, _, err = run_cli(capsys, "cache", "build", "--teacher", str(tiny_teacher), "--data", str(text_file),
                           "--out", str(out), "--max-length", "16", "--no-progress")
    assert_one_line_error(code, err, str(out / "manifest.json"))
    assert (out / "manifest.json").read_bytes() == manifest
    assert (out / "shard-00000.safetensors").read_bytes() == b"someone else's"
    assert_foreign_intact(out)


@pytest.mark.parametrize("data, says", [("missing.txt", "does not exist"), ("a-directory", "holds no data file")])
def test_missing_or_directory_data_is_a_value_error_and_one_cli_line(tiny_teacher, tmp_path, capsys, data, says):
    (tmp_path / "a-directory").mkdir()
    with pytest.raises(ValueError, match=f"data (file|directory) .*{data} {says}"):
        build_cache(str(tiny_teacher), [str(tmp_path / data)], str(tmp_path / "o"), **BUILD)
    code, _, err = run_cli(capsys, "cache", "build", "--teacher", str(tiny_teacher), "--data", str(tmp_path / data),
                           "--out", str(tmp_path / "o"), "--max-length", "16", "--no-progress")
    assert_one_line_error(code, err, says)
    assert not (tmp_path / "o").exists()


def test_teacher_config_the_cache_cannot_hold_is_refused_before_writing(tiny_teacher, text_file, tmp_path):
    t = tmp_path / "odd-teacher"
    shutil.copytree(tiny_teacher, t)
    cfg = json.loads((t / "config.json").read_text())
    cfg["model_type"] = "bert"
    cfg["num_hidden_layers"] = 0  # an encoder without layers: nothing to distil from
    (t / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="settings.teacher.num_hidden_layers must be an integer in"):
        build_cache(str(t), [str(text_file)], str(tmp_path / "o"), layers=[0], **BUILD)
    assert not (tmp_path / "o").exists()
