"""torchrun --nproc_per_node=2 on CPU (gloo) equals one process with the doubled batch; an FSDP-sharded
teacher gives the unsharded teacher's outputs from half its bytes per rank."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kdfast.train.distributed import parameter_bytes, shard_teacher

WORKER = Path(__file__).with_name("ddp_worker.py")
FSDP_WORKER = Path(__file__).with_name("fsdp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_one_then_two_ranks(worker: Path, out: Path) -> None:
    """``worker OUT 8`` in one process, then ``worker OUT 4`` on two torchrun ranks."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(worker), str(out), "8"], check=True, env=env, timeout=300)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={_free_port()}", str(worker), str(out), "4"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_two_ranks_equal_one_process_with_double_batch(tmp_path):
    _run_one_then_two_ranks(WORKER, tmp_path)
    single = torch.load(tmp_path / "w1-rank0.pt", weights_only=True)
    r0 = torch.load(tmp_path / "w2-rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "w2-rank1.pt", weights_only=True)
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # DDP keeps the replicas identical
    for a, b in zip(r0["params"], single["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(r0["loss"]), torch.tensor(single["loss"]), rtol=1e-5, atol=1e-7)
    assert (tmp_path / "run-w2" / "checkpoints" / "latest").is_file()


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """SIGINT reaches rank 1 alone during step 3: both ranks stop after step 3 (a rank that went on
    would wait forever in DDP's all-reduce), rank 0 writes that step's checkpoint, both exit 130."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={_free_port()}", str(WORKER), str(tmp_path), "4", "1"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0  # the ranks exited 130: torchrun reports the run as failed
    stops = [torch.load(tmp_path / f"stop-rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert [s["step"] for s in stops] == [3, 3], (stops, r.stderr[-2000:])
    assert all(s["signum"] == 2 for s in stops)
    assert "exitcode: 130" in r.stderr or "exitcode  : 130" in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "run-w2" / "checkpoints" / "latest").read_text().strip().endswith("3")


def test_sharded_teacher_equals_unsharded_and_trains_the_same_student(tmp_path):
    _run_one_then_two_ranks(FSDP_WORKER, tmp_path)
    single = torch.load(tmp_path / "fsdp-w1-rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"fsdp-w2-rank{r}.pt", weights_only=True) for r in range(2)]
    assert not torch.equal(ranks[0]["ref_logits"], ranks[1]["ref_logits"])  # each rank ran its own inputs
    for res in ranks:
        torch.testing.assert_close(res["logits"], res["ref_logits"], rtol=1e-5, atol=1e-6)
        assert len(res["hidden"]) == len(res["ref_hidden"]) == 4  # embeddings + 3 layers
        for h, ref in zip(res["hidden"], res["ref_hidden"]):
            torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-6)
        # bf16 compute from fp32 shards equals the teacher cast to bf16 whole
        assert res["bf16_logits"].dtype == torch.bfloat16 and res["bf16_shard_dtypes"] == ["torch.float32"]
        torch.testing.assert_close(res["bf16_logits"], res["ref_bf16_logits"], rtol=1.6e-2, atol=1e-2)
        assert res["sharded_modules"] == ["", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"]
        # about half of the (tied-once) bytes each; shards of rows, so not exactly half
        assert abs(res["bytes"] / res["full_bytes"] - 0.5) < 0.02
    assert ranks[0]["bytes"] + ranks[1]["bytes"] == single["full_bytes"] == single["bytes"]
    assert single["sharded_modules"] == []
    for a, b, c in zip(ranks[0]["params"], ranks[1]["params"], single["params"]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ranks[0]["loss"]), torch.tensor(single["loss"]), rtol=1e-5, atol=1e-7)


def test_shard_teacher_in_one_process_freezes_and_returns_the_model():
    teacher = nn.Sequential(nn.Embedding(11, 6), nn.ModuleList([nn.Linear(6, 6)]), nn.Linear(6, 3)).train()
    out = shard_teacher(teacher, "cpu", param_dtype=torch.bfloat16)
    assert out is teacher and not teacher.training
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in teacher.parameters())
    assert parameter_bytes(teacher) == sum(p.numel() * 2 for p in teacher.parameters())


def test_shard_teacher_bad_arguments():
    teacher = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="param_dtype"):
        shard_teacher(teacher, "cpu", param_dtype=torch.int8)
    with pytest.raises(ValueError, match="layers"):
        shard_teacher(teacher, "cpu", layers=[nn.Linear(4, 4)])
    with pytest.raises(ValueError, match="layers"):
        shard_teacher(teacher, "cpu", layers=[teacher])
