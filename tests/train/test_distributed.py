"""torchrun --nproc_per_node=2 on CPU (gloo) equals one process with the doubled batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process_with_double_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(WORKER), str(tmp_path), "8"], check=True, env=env, timeout=300)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={_free_port()}", str(WORKER), str(tmp_path), "4"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    single = torch.load(tmp_path / "w1-rank0.pt", weights_only=True)
    r0 = torch.load(tmp_path / "w2-rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "w2-rank1.pt", weights_only=True)
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # DDP keeps the replicas identical
    for a, b in zip(r0["params"], single["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(r0["loss"]), torch.tensor(single["loss"]), rtol=1e-5, atol=1e-7)
    assert (tmp_path / "run-w2" / "checkpoints" / "latest").is_file()
