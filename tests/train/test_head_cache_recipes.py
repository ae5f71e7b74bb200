"""The recipes from an exact-logits cache (``teacher.logits=head``): a DistilBERT step from the
cache's head input equals the live step whose teacher head input is rounded to the cache's dtype
(loss and every gradient within 1e-4 relative, fp16), with KD on every real token and on the masked
tokens; ``kd_rows`` auto is ``all`` from such a cache; the CLI runs DistilBERT and MobileBERT on it."""

import json

import pytest
import torch
from torch import nn

from kdfast.models import distilbert_from_teacher
from kdfast.train.recipes import common, distilbert, recipe_config
from tests.train.recipe_batches import bert_teacher, masked_batch, perturb


def run_step(step_loss, model, batch):
    model.zero_grad(set_to_none=True)
    loss, terms = step_loss(batch)
    loss.backward()
    return loss.detach(), terms, {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                  if p.grad is not None}


def run_cli(tiny, recipe, out, *extra):
    from kdfast.cli import main

    return main(["distill", "--recipe", recipe, "--teacher", str(tiny / "teacher"), "--data", str(tiny / "train.txt"),
                 "--out", str(out), "--no-progress", "--steps", "2", "--set", "data.max_length=16",
                 "--set", "train.batch_size=4", "--set", "train.eval_every=0", "--set", "train.log_every=1", *extra])


class RoundTo(nn.Module):
    """The wrapped module's output rounded to ``dtype`` and back (what the cache stores)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x):
        y = self.inner(x)
        return y.to(self.dtype).to(y.dtype)


@pytest.mark.parametrize("kd_rows", ["all", "masked"])
def test_distilbert_step_from_head_cache_equals_live_step_on_rounded_head_input(kd_rows):
    teacher = bert_teacher()
    student = perturb(distilbert_from_teacher(teacher, layers=[0, 3]).eval())
    ids, am, labels = masked_batch()
    live_cfg = recipe_config("distilbert", None, [f"kd_rows={kd_rows}"])
    cache_cfg = recipe_config("distilbert", None, ["teacher.source=cache", "teacher.logits=head", f"kd_rows={kd_rows}"])
    pred = teacher.cls.predictions
    with torch.no_grad():
        out = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True)
        head_input = pred.transform(out.hidden_states[-1]).half()
    # the cache's batch: masked inputs, labels, the head input (fp16) and the last hidden state
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels, "head_input": head_input,
             "hidden_4": out.hidden_states[-1]}
    head = common.LMHead(nn.Identity(), pred.decoder.weight.detach(), pred.decoder.bias.detach())
    cached = run_step(distilbert.make_step_loss(cache_cfg, student, None, n_teacher_layers=4, cached_head=head),
                      student, batch)
    pred.transform = RoundTo(pred.transform, torch.float16)  # the live teacher, its head input rounded
    live = run_step(distilbert.make_step_loss(live_cfg, student, teacher, masker=lambda i, m: (ids, labels),
                                              n_teacher_layers=4), student, {"input_ids": ids, "attention_mask": am})
    torch.testing.assert_close(cached[0], live[0], rtol=1e-4, atol=0)
    assert cached[2].keys() == live[2].keys() and len(live[2]) > 10
    for name in live[2]:
        scale = float(live[2][name].abs().max())
        torch.testing.assert_close(cached[2][name], live[2][name], rtol=1e-4, atol=1e-4 * scale, msg=name)
    # and the rounding is what the test is about: unrounded, the live step differs from the cached one
    pred.transform = pred.transform.inner
    exact = run_step(distilbert.make_step_loss(live_cfg, student, teacher, masker=lambda i, m: (ids, labels),
                                               n_teacher_layers=4), student, {"input_ids": ids, "attention_mask": am})
    assert float(exact[0]) != float(live[0])


def test_kd_rows_auto_is_all_from_a_head_cache_and_all_is_accepted():
    assert common.resolve_kd_rows("auto", True, exact=True) == "all"
    assert common.resolve_kd_rows("all", True, exact=True) == "all"
    assert common.resolve_kd_rows("auto", True) == "masked"
    recipe_config("distilbert", None, ["teacher.source=cache", "teacher.logits=head", "kd_rows=all"])
    recipe_config("mobilebert", None, ["teacher.source=cache", "teacher.logits=head:int8", "pretrain.kd_rows=all"])
    with pytest.raises(ValueError, match="logits must be"):
        recipe_config("distilbert", None, ["teacher.logits=head:fp8"])


@pytest.mark.parametrize("recipe, extra", [("distilbert", ()), ("mobilebert", ("--set", "pkt.steps_per_layer=0",
                                                                               "--set", "pretrain.steps=2"))])
def test_cli_distils_from_a_head_cache(tiny, tmp_path, recipe, extra):
    out = tmp_path / recipe
    assert run_cli(tiny, recipe, out, "--set", "teacher.source=cache", "--set", "teacher.logits=head", *extra) == 0
    report = json.loads((out / "report.json").read_text())
    backends = report["stages"][-1]["backends"]
    assert backends["kd_mlm"]["loss"] == "fused_linear_kd_loss"  # the dense teacher, as live
    if recipe == "distilbert":
        assert report["kd_rows"] == "all"
    manifest = json.loads((out / "teacher-cache" / "train" / "manifest.json").read_text())
    assert manifest["settings"]["logits"]["mode"] == "head" and manifest["head"]["file"] == "head.safetensors"
