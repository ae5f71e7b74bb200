"""The roofline floors of the GPU benchmark rows: the FLOPs each formula counts against PyTorch's FLOP
counter on the eager form of the same case, the band's pairs against a brute-force count, the row
labels of every suite, and the README's table against the code."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from kdfast.bench import roofline as rl

ROOT = Path(__file__).resolve().parent.parent


def _flops(fn, *inputs) -> int:
    leaves = [x.detach().requires_grad_() for x in inputs]
    with FlopCounterMode(display=False) as counter:
        fn(*leaves).backward()
    return counter.get_total_flops()


def test_attention_pairs_count_the_band():
    rng = random.Random()
    for _ in range(20):
        L, w = rng.randint(1, 300), rng.randint(0, 320)
        i = torch.arange(L)
        assert rl.attention_pairs(L, w) == int(((i[:, None] - i[None, :]).abs() <= w).sum()), (L, w)
    assert rl.attention_pairs(37, None) == 37 * 37


def test_matmul_flops_match_pytorchs_counter_on_the_eager_cases():
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    N, d_s, d_t = 37, 13, 29  # hidden MSE through a projection: three GEMMs
    h_s, h_t = torch.randn(N, d_s, generator=g), torch.randn(N, d_t, generator=g)
    w, b = torch.randn(d_t, d_s, generator=g), torch.randn(d_t, generator=g)
    assert _flops(lambda x, ww, bb: F.mse_loss(F.linear(x, ww, bb), h_t), h_s, w, b) == rl.hidden_mse(N, d_s, d_t).flops

    B, H, L, dh_s, dh_t = 2, 3, 19, 8, 12  # attention from Q/K, materialised: same products once each
    q_s, k_s = torch.randn(B, H, L, dh_s, generator=g), torch.randn(B, H, L, dh_s, generator=g)
    q_t, k_t = torch.randn(B, H, L, dh_t, generator=g), torch.randn(B, H, L, dh_t, generator=g)

    def kl(qs, ks):
        s, t = qs @ ks.transpose(-1, -2), (q_t @ k_t.transpose(-1, -2)).detach()
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    assert _flops(kl, q_s, k_s) == rl.attention_qk(B, H, L, dh_s, dh_t, "kl").flops

    n, rows, V = 40, 11, 97  # fused linear KD on the kept rows: both heads, grad_h and grad_W
    hs, ht = torch.randn(rows, d_s, generator=g), torch.randn(rows, d_t, generator=g)
    ws, wt = torch.randn(V, d_s, generator=g), torch.randn(V, d_t, generator=g)

    def flkd(h, ww):
        t = F.linear(ht, wt).detach()
        return F.kl_div(F.log_softmax(F.linear(h, ww), -1), F.log_softmax(t, -1), log_target=True,
                        reduction="batchmean")
    assert _flops(flkd, hs, ws) == rl.fused_linear_kd(n, rows, V, d_s, d_t, "float32").flops


def test_encoder_layer_flops_match_the_counter_on_a_bert_layer():
    from transformers import BertConfig, BertModel

    layers, d, ffn, heads, B, L = 2, 48, 80, 4, 2, 24
    cfg = BertConfig(vocab_size=101, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, attn_implementation="eager")
    model = BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, 101, (B, L))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    assert counter.get_total_flops() == B * L * layers * rl._layer_flops(d, ffn, L)


def test_memory_bound_rows_count_each_tensor_once():
    N, V = 123, 4567
    w = rl.logit_kd(N, V, "bfloat16")
    assert w.bytes == 3 * N * V * 2 and w.bound(rl.GPUS["h100"]) == "memory"
    assert rl.logit_kd(N, V, "bfloat16", producer=True).bytes == 5 * N * V * 2
    h100, h200 = rl.GPUS["h100"], rl.GPUS["h200"]
    assert w.floor_ms(h100) == pytest.approx(1e3 * w.bytes / 3.35e12)
    assert w.floor_ms(h200) < w.floor_ms(h100)  # faster memory, same compute
    big = rl.attention_qk(32, 12, 4096, 64, 64, "kl", "bfloat16")
    assert big.floor_ms(h100) == pytest.approx(1e3 * big.flops / 989e12)


def test_every_row_label_of_the_gpu_check_gets_its_floor():
    for suite, case, impl, extra in rl.README_ROWS:
        w = rl.work_for_row(suite, case, impl, extra)
        assert w is not None and w.bytes > 0 and w.floor_ms(rl.GPUS["h100"]) > 0, case
    win = rl.work_for_row("attention", "KL B=2 H=3 L=4096 dh=64 w=64")
    assert win.flops == rl.work_for_row("attention", "KL B=2 H=3 L=4096 dh=64 window=64").flops
    assert win.flops < rl.work_for_row("attention", "KL B=2 H=3 L=4096 dh=64").flops
    assert rl.work_for_row("attention", "MSE B=2 H=3 L=64 dh=8 bfloat16").flop_unit == "bf16"
    cached = rl.work_for_row("e2e", "distilbert 8x128 teacher 12x768", "kdfast, from the cache", {"kd_rows": "masked"})
    live = rl.work_for_row("e2e", "distilbert 8x128 teacher 12x768", "kdfast, live teacher", {"kd_rows": "masked"})
    assert cached.flops < live.flops  # no teacher forward
    assert rl.work_for_row("kd_loss", "device") is None
    assert rl.work_for_row("e2e", "distilbert 8x128 teacher 3x5") is None  # no such e2e shape


def test_measured_over_floor_on_a_known_gpu_only():
    w = rl.logit_kd(16384, 30522, "bfloat16")
    on = rl.floor_extra(w, 1.8, "NVIDIA H100 80GB HBM3")
    assert on["x_floor"] == round(1.8 / w.floor_ms(rl.GPUS["h100"]), 2) and set(on["floor_ms"]) == {"h100", "h200"}
    assert "x_floor" not in rl.floor_extra(w, 1.8, "cpu") and rl.floor_extra(None, 1.0, "NVIDIA H200") == {}
    assert rl.gpu_for_device("NVIDIA H200") == "h200" and rl.gpu_for_device("NVIDIA H100 PCIe") is None
    row = {"suite": "kd_loss", "case": "N=16384 V=30522 bfloat16", "impl": "kdfast-triton", "ms": 1.8,
           "extra": rl.floor_extra(w, 1.8, "NVIDIA H200")}
    assert f"{1.8 / w.floor_ms(rl.GPUS['h200']):.2f}x (H200 SXM)" in rl.format_floors([row], "NVIDIA H200")


def test_readme_shows_the_floors_the_code_computes():
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    for line in rl.markdown_table().splitlines():
        assert line in readme, line
