"""Students of every accepted teacher family: DistilBERT-style layer copies of RoBERTa, XLM-RoBERTa,
ELECTRA, DistilBERT and ModernBERT teachers compute what the copied teacher layers compute (ModernBERT
keeping each copied layer's global / local type, window and rotary settings), TinyBERT-style narrow
students in the teacher's form, all reloading with AutoModelForMaskedLM.from_pretrained; and
kdfast.models.count on them against their state dicts and torch's FLOP counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraForPreTraining,
    ModernBertConfig,
    ModernBertForMaskedLM,
    ModernBertModel,
    RobertaConfig,
    RobertaForMaskedLM,
    XLMRobertaConfig,
    XLMRobertaModel,
)

from kdfast.models import count, distilbert_from_teacher, uniform_layer_map
from kdfast.models.counting import band_pairs
from kdfast.models.modernbert import attention_windows
from kdfast.models.students import tinybert_student

VOCAB = 53
BERTLIKE = dict(vocab_size=VOCAB, hidden_size=18, num_hidden_layers=6, num_attention_heads=3, intermediate_size=23,
                max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)


def modernbert_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=20, num_hidden_layers=6, num_attention_heads=5, intermediate_size=13,
                max_position_embeddings=64, local_attention=6, global_attn_every_n_layers=3, initializer_range=0.2,
                global_rope_theta=500.0, local_rope_theta=50.0, **SPECIAL)
    return ModernBertConfig(**{**base, **kw})


TEACHERS = {
    "roberta": lambda: RobertaForMaskedLM(RobertaConfig(**BERTLIKE, pad_token_id=1)),
    "xlm-roberta-base-model": lambda: XLMRobertaModel(XLMRobertaConfig(**BERTLIKE, pad_token_id=1)),
    "electra-generator": lambda: ElectraForMaskedLM(ElectraConfig(**BERTLIKE, embedding_size=10)),
    "electra-discriminator": lambda: ElectraForPreTraining(ElectraConfig(**BERTLIKE, embedding_size=18)),
    "distilbert": lambda: DistilBertForMaskedLM(DistilBertConfig(vocab_size=VOCAB, dim=18, n_layers=6, n_heads=3,
                                                                 hidden_dim=23, max_position_embeddings=40,
                                                                 dropout=0.0, attention_dropout=0.0)),
    "modernbert": lambda: ModernBertForMaskedLM(modernbert_config()),
    "modernbert-base-model": lambda: ModernBertModel(modernbert_config(global_attn_every_n_layers=2)),
}


def inputs(pad_id):
    ids = torch.randint(3, VOCAB, (2, 17))
    ids[ids == pad_id] = 3
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    ids[1, 12:] = pad_id
    return ids, mask


def hidden(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("name", list(TEACHERS))
def test_distilbert_style_student_of_each_family(name, tmp_path, randomize):
    torch.manual_seed(0)
    teacher = TEACHERS[name]().eval()
    layers = (0, 2, 5)
    student = distilbert_from_teacher(teacher, layers=layers).eval()
    assert student.config.model_type == teacher.config.model_type and "ForMaskedLM" in type(student).__name__
    pad = student.config.pad_token_id or 0
    ids, mask = inputs(pad)
    real = mask.bool()
    h_t, h_s = hidden(teacher, ids, mask), hidden(student, ids, mask)
    modern = teacher.config.model_type == "modernbert"
    if modern:
        types = teacher.config.layer_types
        assert student.config.layer_types == [types[i] for i in layers]
        assert attention_windows(student) == tuple(attention_windows(teacher)[i] for i in layers)
        assert student.config.rope_parameters == teacher.config.rope_parameters
    # embeddings and the first copied layer (teacher layer 0) are the teacher's
    torch.testing.assert_close(h_s[0][real], h_t[0][real])
    torch.testing.assert_close(h_s[1][real], h_t[1][real])
    # keeping every layer reproduces the teacher's last hidden state exactly (ModernBERT: with its windows)
    full = distilbert_from_teacher(teacher, layers=range(6)).eval()
    torch.testing.assert_close(hidden(full, ids, mask)[-1][real], h_t[-1][real])
    # it reloads as it was
    student.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(student)
    if modern:
        assert loaded.config.layer_types == student.config.layer_types
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, student(ids, attention_mask=mask).logits)


def test_a_modernbert_student_layer_computes_its_teacher_layer_every_other_layer():
    """Teacher layer 2 is local and layer 3 global (every 3rd): copied as student layers 1 and 2 of
    (0, 2, 3), each keeps its type, so given the teacher's input it gives the teacher's output."""
    torch.manual_seed(1)
    teacher = ModernBertForMaskedLM(modernbert_config()).eval()
    student = distilbert_from_teacher(teacher, layers=(0, 2, 3)).eval()
    assert student.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    ids, mask = inputs(0)
    h_t = hidden(teacher, ids, mask)
    # run the student on a row where layer 2's input is the teacher's: hook its input
    for s_layer, t_layer in ((1, 2), (2, 3)):
        seen = {}

        def swap(module, args, kwargs, t_layer=t_layer):
            kwargs = dict(kwargs)
            return (h_t[t_layer],) + tuple(args[1:]), kwargs

        handle = student.model.layers[s_layer].register_forward_pre_hook(swap, with_kwargs=True)
        out = student.model.layers[s_layer].register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
        try:
            with torch.no_grad():
                student(ids, attention_mask=mask)
        finally:
            handle.remove()
            out.remove()
        real = mask.bool()
        torch.testing.assert_close(seen["out"][real], h_t[t_layer + 1][real] if t_layer + 1 < 6 else None)


def test_modernbert_student_layers_must_start_at_the_first():
    teacher = ModernBertForMaskedLM(modernbert_config())
    with pytest.raises(ValueError, match="layers must start at 0 for a ModernBERT teacher"):
        distilbert_from_teacher(teacher, layers=(1, 3))


@pytest.mark.parametrize("every", [1, 2, 3])
def test_tinybert_student_of_a_modernbert_teacher(every, tmp_path):
    tcfg = modernbert_config(global_attn_every_n_layers=every)
    student = tinybert_student(tcfg, hidden_size=12, num_attention_heads=3, intermediate_size=7, num_hidden_layers=3)
    assert isinstance(student, ModernBertForMaskedLM)
    c = student.config
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size, c.num_hidden_layers) == (12, 3, 7, 3)
    assert (c.vocab_size, c.local_attention, c.pad_token_id, c.sep_token_id) == (VOCAB, 6, 0, 2)
    assert c.rope_parameters == tcfg.rope_parameters
    # each attention pair of the uniform map compares the same band
    t_windows, s_windows = attention_windows(tcfg), attention_windows(c)
    for m, g in uniform_layer_map(6, 3).items():
        if m:
            assert s_windows[m - 1] == t_windows[g - 1]
    student.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert type(loaded) is ModernBertForMaskedLM and loaded.config.layer_types == c.layer_types
    with pytest.raises(ValueError, match="must be even"):
        tinybert_student(tcfg, hidden_size=15, num_attention_heads=5, num_hidden_layers=3)
    with pytest.raises(ValueError, match="must divide the teacher's 6"):
        tinybert_student(tcfg, hidden_size=12, num_attention_heads=3, num_hidden_layers=4)


@pytest.mark.parametrize("name", ["roberta", "distilbert", "electra-generator"])
def test_tinybert_student_of_other_teachers_is_a_bert(name):
    from transformers import BertForMaskedLM

    tcfg = TEACHERS[name]().config
    student = tinybert_student(tcfg, hidden_size=12, num_attention_heads=3, intermediate_size=7, num_hidden_layers=2)
    assert isinstance(student, BertForMaskedLM) and student.config.vocab_size == VOCAB
    assert student.config.type_vocab_size == getattr(tcfg, "type_vocab_size", 1)


def state_dict_params(model, exclude_prefixes=()):
    seen, total = set(), 0
    for name, p in model.state_dict(keep_vars=True).items():
        if isinstance(p, torch.nn.Parameter) and id(p) not in seen and not name.startswith(exclude_prefixes):
            seen.add(id(p))
            total += p.numel()
    return total


@pytest.mark.parametrize("name", list(TEACHERS))
def test_count_params_equal_the_state_dict(name):
    model = TEACHERS[name]()
    got = count(model)
    base = model.base_model
    assert got["params"] == state_dict_params(base)
    assert got["params"] + got["params_head"] == state_dict_params(model)
    assert count(model.config)["params"] == sum(p.numel() for p in type(base)(model.config).parameters())


def measured(model, ids):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    return counter.get_total_flops()


@pytest.mark.parametrize("seq_len", [5, 16, 29])
@pytest.mark.parametrize("every", [1, 2, 3])
def test_modernbert_flops_count_the_band_of_local_layers(seq_len, every):
    """Eager attention multiplies the full L x L matrices (the FLOP counter's number, equal to
    flops_linear + flops_attention_dense); a local layer needs only its band's pairs, which are
    those eager's mask lets through."""
    cfg = modernbert_config(global_attn_every_n_layers=every, local_attention=7)
    model = ModernBertModel(cfg).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(3, VOCAB, (1, seq_len))
    got = count(model, seq_len=seq_len)
    assert got["flops_linear"] + got["flops_attention_dense"] == measured(model, ids)
    d = cfg.hidden_size
    windows = attention_windows(cfg)
    assert got["flops_attention"] == sum(4 * band_pairs(seq_len, w) * d for w in windows)
    # band_pairs is the number of (query, key) pairs eager's sliding-window mask allows
    seen = []
    layer = next(i for i, w in enumerate(windows) if w is not None) if any(windows) else None
    if layer is not None:
        handle = model.layers[layer].attn.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["attention_mask"]), with_kwargs=True)
        with torch.no_grad():
            model(ids, attention_mask=torch.ones_like(ids))
        handle.remove()
        allowed = int((seen[0][0, 0] == 0).sum())
        assert allowed == band_pairs(seq_len, windows[layer]) == seq_len * seq_len - int((seen[0][0, 0] < 0).sum())
        if seq_len > 7:
            assert got["flops_attention"] < got["flops_attention_dense"]
