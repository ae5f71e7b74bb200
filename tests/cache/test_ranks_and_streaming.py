"""A cache built by several processes (torchrun, gloo, CPU) equals the one-process build shard for
shard, each process reading only its own corpus blocks; a build killed mid-way resumes on another
number of processes and still does; corpora stream from Parquet, Arrow and JSON-lines files or
directories, with the builder's memory bounded."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdfast.cache import Manifest, TeacherCache, build_cache
from kdfast.cache.format import RECORD_RE, CacheError
from kdfast.cache.ranks import Ranks
from kdfast.data import iter_packed_rows, iter_padded_rows, iter_texts, load_texts, pack_texts

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--logits", "topk:5", "--hidden", "fp16", "--max-length", "24", "--batch-size", "2", "--rows-per-shard", "4",
        "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _cmd(teacher, data, out, nproc: int, extra=()) -> list[str]:
    cli = ["-m", "kdfast.cli", "cache", "build", "--teacher", str(teacher), "--data", *map(str, data), "--out",
           str(out), *ARGS, *extra]
    if nproc == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", *cli]


def _shards(out):
    m = Manifest.load(out)
    return [(s.file, s.rows, s.tokens, s.sha256) for s in m.shards], m.complete


def _verify_same(out, ref) -> None:
    r = subprocess.run([sys.executable, "-m", "kdfast.cli", "cache", "verify", str(out), "--same-as", str(ref)],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "OK" in r.stdout


@pytest.fixture(scope="module")
def one_process(tiny_teacher, parquet_file, tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref") / "c"
    subprocess.run(_cmd(tiny_teacher, [parquet_file], ref, 1), check=True, env=_env(), timeout=300)
    return ref


def test_two_ranks_equal_one_process(tiny_teacher, parquet_file, one_process, tmp_path):
    out = tmp_path / "two"
    r = subprocess.run(_cmd(tiny_teacher, [parquet_file], out, 2), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ref_shards, done = _shards(one_process)
    assert done and len(ref_shards) == 10  # 37 rows in blocks of 8, 8, 8, 8, 5; 4 per shard
    assert _shards(out) == (ref_shards, True)
    assert not any(RECORD_RE.fullmatch(p.name) for p in out.iterdir())  # every record folded into the manifest
    _verify_same(out, one_process)
    # the masks and values themselves, not only the hashes
    a, b = TeacherCache(str(out)), TeacherCache(str(one_process))
    for i in range(len(a.manifest.shards)):
        rows = torch.arange(a.manifest.shards[i].rows)
        x, y = a.read_rows(i, rows), b.read_rows(i, rows)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_killed_two_rank_build_resumes_on_one_then_three(tiny_teacher, parquet_file, one_process, tmp_path):
    """SIGKILL the torchrun build once a shard is recorded; resume on 1 process; kill a 1-process build
    and resume on 3: every result equals the uninterrupted one-process build."""
    ref_shards, _ = _shards(one_process)
    for kill_n, resume_n in ((2, 1), (1, 3)):
        out = tmp_path / f"killed-{kill_n}-{resume_n}"
        proc = subprocess.Popen(_cmd(tiny_teacher, [parquet_file], out, kill_n), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            names = [p.name for p in out.iterdir()] if out.is_dir() else []
            if sum(bool(RECORD_RE.fullmatch(n)) for n in names) >= 1 or "shard-00002.safetensors" in names:
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank at once
        proc.wait()
        partial, complete = _shards(out)
        assert partial == ref_shards[: len(partial)]  # whatever is listed is complete and right
        r = subprocess.run(_cmd(tiny_teacher, [parquet_file], out, resume_n), env=_env(), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert _shards(out) == (ref_shards, True)
        _verify_same(out, one_process)


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """{RANK: pid} of the torchrun workers under ``launcher_pid`` (from /proc)."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            env = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == launcher_pid:
            for kv in env:
                if kv.startswith(b"RANK="):
                    out[int(kv[5:])] = int(p.name)
    return out


def test_a_killed_rank_fails_the_build_and_leaves_it_resumable(tiny_teacher, parquet_file, one_process, tmp_path):
    """SIGKILL one rank (not the launcher) mid-build: the build fails, the cache is not marked
    complete, and the next build finishes it equal to the one-process build."""
    out = tmp_path / "c"
    proc = subprocess.Popen(_cmd(tiny_teacher, [parquet_file], out, 2), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if out.is_dir() and any(p.name.startswith(("shard-", "part-")) for p in out.iterdir()):
            pids = _rank_pids(proc.pid)
            if 1 in pids:
                os.kill(pids[1], signal.SIGKILL)
                killed = True
                break
        time.sleep(0.01)
    assert killed
    assert proc.wait(timeout=300) != 0
    m = Manifest.load(out)
    assert not m.complete
    assert any("incomplete" in p for p in TeacherCache(str(out), allow_incomplete=True).verify())
    r = subprocess.run(_cmd(tiny_teacher, [parquet_file], out, 2), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _shards(out) == (_shards(one_process)[0], True)


# --- streamed corpora ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["parquet", "arrow", "jsonl", "dir"])
def test_streamed_formats_give_the_texts_of_the_text_file(text_file, tmp_path, kind):
    import datasets

    texts = load_texts([str(text_file)])
    ds = datasets.Dataset.from_dict({"body": texts, "n": list(range(len(texts)))})
    half = len(texts) // 2
    if kind == "parquet":
        files = [tmp_path / "a.parquet"]
        ds.to_parquet(str(files[0]))
    elif kind == "arrow":
        files = [tmp_path / "a.arrow"]
        import pyarrow as pa

        with pa.OSFile(str(files[0]), "wb") as sink, pa.ipc.new_stream(sink, ds.data.table.schema) as w:
            w.write_table(ds.data.table)
    elif kind == "jsonl":
        files = [tmp_path / "a.jsonl"]
        files[0].write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    else:
        (tmp_path / "d" / "sub").mkdir(parents=True)
        ds.select(range(half)).to_parquet(str(tmp_path / "d" / "part-0.parquet"))
        ds.select(range(half, len(texts))).to_parquet(str(tmp_path / "d" / "sub" / "part-1.parquet"))
        (tmp_path / "d" / ".hidden.parquet").write_bytes(b"not read")
        files = [tmp_path / "d"]
    from kdfast.data import expand_data_paths

    assert list(iter_texts(expand_data_paths([str(f) for f in files]), "body")) == texts


def test_streamed_rows_equal_the_in_memory_rows(tiny_teacher, text_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    texts = load_texts([str(text_file)])
    for L in (5, 11, 24):
        ids, am = pack_texts(tok, texts, L)
        rows = list(iter_packed_rows(tok, iter(texts), L, chunk=3))
        assert [r for r, _, _ in rows] == list(range(ids.shape[0]))
        assert torch.equal(torch.stack([x for _, x, _ in rows]), ids)
        assert torch.equal(torch.stack([m for _, _, m in rows]), am)
    enc = tok(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    rows = list(iter_padded_rows(tok, iter(texts), 16, want=lambda r: r % 3 != 1, chunk=4))
    for r, x, m in rows:
        if r % 3 == 1:
            assert x is None and m is None
        else:
            assert torch.equal(x, enc["input_ids"][r]) and torch.equal(m, enc["attention_mask"][r])


def test_parquet_directory_builds_the_cache_of_the_text_file(tiny_teacher, text_file, tmp_path):
    import datasets

    texts = load_texts([str(text_file)])
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "pq" / "0.parquet"))  # one row group
    (tmp_path / "pq" / ".notes.parquet").write_bytes(b"not read")
    kw = dict(logits="topk:3", hidden="none", max_length=24, batch_size=4, rows_per_shard=8, progress=False)
    a = build_cache(str(tiny_teacher), [str(text_file)], str(tmp_path / "a"), **kw)
    b = build_cache(str(tiny_teacher), [str(tmp_path / "pq")], str(tmp_path / "b"), **kw)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    with pytest.raises(ValueError, match="text_column 'body' not in"):
        build_cache(str(tiny_teacher), [str(tmp_path / "pq")], str(tmp_path / "c"), text_column="body", **kw)


def test_byte_blocks_give_the_texts_of_datasets(tmp_path):
    """Text and JSON-lines files cut into byte blocks of any size give, block after block, exactly the
    texts ``datasets`` reads from the whole file (a line belongs to the block where it starts)."""
    from kdfast.data import corpus_blocks, iter_block_texts

    g = torch.Generator().manual_seed(7)
    words = ["ab", "c", "déjà", "x y", "  ", "", "zz"]
    ends = ["\n", "\r\n", "\r", "\n\n"]
    pick = lambda n: torch.randint(0, n, (1,), generator=g).item()  # noqa: E731
    lines = [" ".join(words[pick(len(words))] for _ in range(pick(5))) for _ in range(41)]
    txt = tmp_path / "a.txt"
    txt.write_bytes("".join(t + ends[pick(len(ends))] for t in lines).encode() + b"tail")
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "n": i}) + ("\n\n" if i % 5 == 0 else "\n")
                             for i, t in enumerate(lines)))
    for f in (txt, jsonl):
        whole = load_texts([str(f)])
        assert len(whole) > 20
        for block_bytes in (1, 2, 3, 7, 16, 101, 1 << 20):
            blocks = corpus_blocks([f], block_bytes)
            assert len(blocks) == -(-f.stat().st_size // block_bytes)
            assert [t for b in blocks for t in iter_block_texts(b)] == whole, (f, block_bytes)


_UNSEEN = [False]  # True while a simulated rank computes what rank 0 would broadcast to it


class _OneRankOf(Ranks):
    """Rank ``rank`` of ``world_size`` run alone in this process: barriers pass; what rank 0 shares
    is computed here, its reads unseen by the spy on ranks other than 0 (rank 0 broadcasts it)."""

    def barrier(self) -> None:
        pass

    def share(self, fn):
        _UNSEEN[0] = self.rank != 0
        try:
            return fn()
        finally:
            _UNSEEN[0] = False


@pytest.mark.parametrize("packing", [False, True])
def test_each_rank_reads_only_its_own_blocks(tiny_teacher, parquet_file, tmp_path, monkeypatch, packing):
    """Ranks 0 and 1 of 2, run one after the other in this process (rank 0 fails at the end: rank 1's
    blocks are missing), then a 1-process resume: every Parquet row read is counted by row group, and
    no rank reads a row group of another rank's block; the result is the 1-process build."""
    import pyarrow.parquet as pq

    import kdfast.cache.writer as writer

    kw = dict(logits="topk:3", hidden="fp16", max_length=12, batch_size=2, rows_per_shard=4, progress=False,
              packing=packing)
    ref = build_cache(str(tiny_teacher), [str(parquet_file)], str(tmp_path / "ref"), **kw)
    n_groups = pq.ParquetFile(parquet_file).metadata.num_row_groups
    assert n_groups == 5
    reads: list[tuple[object, int]] = []  # (row groups asked for, rows read)
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        groups = kwargs.get("row_groups")
        for batch in iter_batches(self, *args, **kwargs):
            if not _UNSEEN[0]:
                reads.append((tuple(groups) if groups is not None else None, batch.num_rows))
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    out = tmp_path / "two"
    read_by = {}
    for rank in (0, 1):
        reads.clear()
        monkeypatch.setattr(writer, "current_ranks", lambda rank=rank: _OneRankOf(rank, 2))
        if rank == 0:
            with pytest.raises(CacheError, match=r"corpus block\(s\) 1, 3 of 5 were not finished"):
                build_cache(str(tiny_teacher), [str(parquet_file)], str(out), **kw)
        else:
            assert not build_cache(str(tiny_teacher), [str(parquet_file)], str(out), **kw).complete
        read_by[rank] = list(reads)
    for rank, owned in ((0, {0, 2, 4}), (1, {1, 3})):
        groups = {g for gs, _ in read_by[rank] for g in (gs or range(n_groups))}
        assert groups == owned, (rank, read_by[rank])
    total = pq.ParquetFile(parquet_file).metadata.num_rows
    assert sum(n for _, n in read_by[1]) == 16 < total  # blocks 1 and 3 once each: 8 + 8 texts
    reads.clear()
    monkeypatch.setattr(writer, "current_ranks", lambda: Ranks())
    m = build_cache(str(tiny_teacher), [str(parquet_file)], str(out), **kw)
    assert reads == []  # every block was recorded: the resume only lists them
    assert m.complete and [(s.rows, s.tokens, s.sha256, s.block) for s in m.shards] == \
        [(s.rows, s.tokens, s.sha256, s.block) for s in ref.shards]
    assert TeacherCache(str(out)).differences(TeacherCache(str(tmp_path / "ref"))) == []


def test_builder_memory_does_not_grow_with_the_corpus(tiny_teacher, tmp_path):
    """Peak RSS of a build over a 4x larger Parquet corpus stays within a few MiB of the small one's
    (the whole-corpus loader held every text and every tokenised row: 30 MiB more text here; the
    corpus streamed whole through ``datasets`` grew by 24 MiB; read row group by row group, 0)."""
    from kdfast.bench.synthetic import write_parquet_corpus

    script = ("import resource, sys\nfrom kdfast.cache import build_cache\n"
              "build_cache(sys.argv[1], [sys.argv[2]], sys.argv[3], logits='topk:2', hidden='none', max_length=8, "
              "batch_size=512, rows_per_shard=2048, progress=False)\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    peaks = {}
    for n in (4_000, 16_000):
        d = tmp_path / f"pq{n}"
        d.mkdir()
        assert write_parquet_corpus(d, n * 2500, text_bytes=2500, row_group_size=500, seed=n) >= n
        r = subprocess.run([sys.executable, "-c", script, str(tiny_teacher), str(d), str(tmp_path / f"c{n}")],
                           env=_env(), capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        peaks[n] = int(r.stdout.split()[-1]) / 1024  # MiB
    assert peaks[16_000] - peaks[4_000] < 20, peaks
