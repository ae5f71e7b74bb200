import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from kdfast.models.students import DISTILBERT_LAYERS, distilbert_from_teacher, tinybert, tinybert_config

VOCAB = 60


def teacher_config(**kw):
    return BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=12, num_attention_heads=2,
                      intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kw)


@pytest.fixture
def teacher(randomize):
    return randomize(BertForMaskedLM(teacher_config()), std=0.2).eval()


def test_student_copies_chosen_layers(teacher):
    student = distilbert_from_teacher(teacher)
    assert isinstance(student, BertForMaskedLM)
    assert student.config.num_hidden_layers == 6 and len(student.bert.encoder.layer) == 6
    assert student.config.type_vocab_size == 1
    t_sd = teacher.state_dict()
    for i, t in enumerate(DISTILBERT_LAYERS):
        s_layer = student.bert.encoder.layer[i].state_dict()
        for k, v in s_layer.items():
            torch.testing.assert_close(v, t_sd[f"bert.encoder.layer.{t}.{k}"], rtol=0, atol=0)
    for k in ("word_embeddings.weight", "position_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias"):
        torch.testing.assert_close(student.state_dict()[f"bert.embeddings.{k}"], t_sd[f"bert.embeddings.{k}"])
    tok = student.bert.embeddings.token_type_embeddings.weight
    assert tok.shape == (1, 16)
    torch.testing.assert_close(tok[0], teacher.bert.embeddings.token_type_embeddings.weight[0])
    for k, v in student.cls.state_dict().items():
        torch.testing.assert_close(v, teacher.cls.state_dict()[k])
    assert student.cls.predictions.decoder.weight is student.bert.embeddings.word_embeddings.weight
    # copies, not views: training the student leaves the teacher alone
    with torch.no_grad():
        student.bert.encoder.layer[0].attention.self.query.weight.add_(1.0)
        student.bert.embeddings.word_embeddings.weight.add_(1.0)
    assert not torch.equal(student.bert.encoder.layer[0].attention.self.query.weight,
                           teacher.bert.encoder.layer[0].attention.self.query.weight)
    torch.testing.assert_close(teacher.state_dict()["bert.embeddings.word_embeddings.weight"],
                               t_sd["bert.embeddings.word_embeddings.weight"])


def _inputs():
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def test_student_layers_compute_what_the_teacher_layers_compute(teacher):
    ids, mask = _inputs()
    student = distilbert_from_teacher(teacher, layers=(0, 5, 11)).eval()
    with torch.no_grad():
        t = teacher(ids, attention_mask=mask, output_hidden_states=True)
        s = student(ids, attention_mask=mask, output_hidden_states=True)
    # embeddings (token type 0) and first chosen layer (teacher layer 0) are identical
    torch.testing.assert_close(s.hidden_states[0], t.hidden_states[0])
    torch.testing.assert_close(s.hidden_states[1], t.hidden_states[1])
    # student layer 2 applied to the teacher's input of layer 5 gives the teacher's layer 5 output
    ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    with torch.no_grad():
        out = student.bert.encoder.layer[1](t.hidden_states[5], attention_mask=ext)
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, t.hidden_states[6])
    # keeping every layer reproduces the teacher exactly
    full = distilbert_from_teacher(teacher, layers=range(12)).eval()
    with torch.no_grad():
        torch.testing.assert_close(full(ids, attention_mask=mask).logits, t.logits)


def test_save_and_load_roundtrip(teacher, tmp_path):
    student = distilbert_from_teacher(teacher).eval()
    student.save_pretrained(tmp_path)
    loaded = BertForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 6 and loaded.config.type_vocab_size == 1
    assert loaded.cls.predictions.decoder.weight.data_ptr() == loaded.bert.embeddings.word_embeddings.weight.data_ptr()
    ids, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, student(ids, attention_mask=mask).logits)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_from_bert_model_teacher(randomize):
    base = randomize(BertModel(teacher_config()), std=0.2).eval()
    student = distilbert_from_teacher(base, layers=(1, 3))
    assert student.config.num_hidden_layers == 2
    torch.testing.assert_close(student.bert.encoder.layer[1].output.dense.weight, base.encoder.layer[3].output.dense.weight)
    assert student.cls.predictions.decoder.weight is student.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(student.cls.predictions.decoder.weight, base.embeddings.word_embeddings.weight)
    assert student.cls.predictions.bias.abs().sum() == 0


@pytest.mark.parametrize("layers", [(), (0, 12), (-1, 2), (2, 1), (1, 1), ("a",), (0.5,), (True,), 3])
def test_layers_validation(teacher, layers):
    with pytest.raises(ValueError, match="layers"):
        distilbert_from_teacher(teacher, layers=layers)


def test_rejects_other_models_naming_the_teacher():
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM

    with pytest.raises(ValueError, match="teacher must be a transformers model, got Linear"):
        distilbert_from_teacher(torch.nn.Linear(2, 2))
    deberta = DebertaV2ForMaskedLM(DebertaV2Config(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=8))
    with pytest.raises(ValueError, match="^teacher: DebertaV2ForMaskedLM is a deberta-v2 model; kdfast distils from"):
        distilbert_from_teacher(deberta, layers=(0,))


def test_tinybert_configs():
    c4 = tinybert_config("tinybert-4")
    assert (c4.num_hidden_layers, c4.hidden_size, c4.intermediate_size, c4.num_attention_heads) == (4, 312, 1200, 12)
    c6 = tinybert_config("tinybert-6")
    assert (c6.num_hidden_layers, c6.hidden_size, c6.intermediate_size, c6.num_attention_heads) == (6, 768, 3072, 12)
    assert c4.vocab_size == c6.vocab_size == 30522
    with pytest.raises(ValueError, match="name"):
        tinybert_config("tinybert-3")


def test_tinybert_model_builds_and_runs():
    model = tinybert("tinybert-4", vocab_size=VOCAB, max_position_embeddings=16).eval()
    assert isinstance(model, BertForMaskedLM) and len(model.bert.encoder.layer) == 4
    ids, mask = _inputs()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    assert out.logits.shape == (2, 9, VOCAB) and out.hidden_states[-1].shape == (2, 9, 312)
    with torch.device("meta"):
        big = tinybert("tinybert-6")
    assert big.config.num_hidden_layers == 6 and big.bert.embeddings.word_embeddings.weight.shape == (30522, 768)
