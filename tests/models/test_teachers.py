"""The teacher architecture check: every accepted encoder (base or masked-LM, model, config or
directory) gives its name; anything else is refused in one line naming the accepted ones, from the
directory's config.json alone."""

import json

import pytest
import transformers

from kdfast.models.teachers import TEACHER_ARCHITECTURES, check_teacher_architecture

TINY = dict(vocab_size=40, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
CASES = {
    "BERT": ("BertConfig", ("BertModel", "BertForMaskedLM"), dict(TINY, hidden_size=8)),
    "RoBERTa": ("RobertaConfig", ("RobertaModel", "RobertaForMaskedLM"), dict(TINY, hidden_size=8, pad_token_id=1)),
    "XLM-RoBERTa": ("XLMRobertaConfig", ("XLMRobertaModel", "XLMRobertaForMaskedLM"),
                    dict(TINY, hidden_size=8, pad_token_id=1)),
    "ELECTRA": ("ElectraConfig", ("ElectraModel", "ElectraForMaskedLM"), dict(TINY, hidden_size=8, embedding_size=4)),
    "DistilBERT": ("DistilBertConfig", ("DistilBertModel", "DistilBertForMaskedLM"),
                   dict(vocab_size=40, n_layers=1, n_heads=2, dim=8, hidden_dim=8)),
    "MobileBERT": ("MobileBertConfig", ("MobileBertModel", "MobileBertForMaskedLM"),
                   dict(TINY, hidden_size=8, embedding_size=4, intra_bottleneck_size=4, true_hidden_size=4,
                        num_feedforward_networks=1)),
    "ModernBERT": ("ModernBertConfig", ("ModernBertModel", "ModernBertForMaskedLM"),
                   dict(TINY, hidden_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                        sep_token_id=2)),
}


def test_every_accepted_architecture_is_named_and_listed():
    assert sorted(TEACHER_ARCHITECTURES.values()) == sorted(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_accepted_teachers_as_model_config_and_directory(name, tmp_path):
    config_cls, model_classes, kwargs = CASES[name]
    config = getattr(transformers, config_cls)(**kwargs)
    assert check_teacher_architecture(config) == name
    for cls in model_classes:
        model = getattr(transformers, cls)(config)
        assert check_teacher_architecture(model) == name
    model.save_pretrained(tmp_path)
    assert check_teacher_architecture(tmp_path) == name
    assert check_teacher_architecture(str(tmp_path)) == name


def test_kdfast_mobilebert_is_a_mobilebert_teacher():
    from kdfast.models import KDMobileBertForMaskedLM, mobilebert_config

    model = KDMobileBertForMaskedLM(mobilebert_config("mobilebert-tiny", num_hidden_layers=1, vocab_size=40))
    assert check_teacher_architecture(model) == "MobileBERT"


def test_deberta_v2_and_others_are_refused_in_one_line_from_config_json_alone(tmp_path):
    from transformers import DebertaV2Config, DebertaV2Model

    config = DebertaV2Config(**TINY, hidden_size=8)
    for source in (config, DebertaV2Model(config)):
        with pytest.raises(ValueError) as err:
            check_teacher_architecture(source, "teacher.dir")
        message = str(err.value)
        assert "\n" not in message and message.startswith("teacher.dir: ") and "deberta-v2" in message
        for accepted in TEACHER_ARCHITECTURES.values():
            assert accepted in message
    # a directory: only its config.json is read (no weights, no tokenizer are needed)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deberta-v2"}))
    with pytest.raises(ValueError, match=r"^teacher: .* is a deberta-v2 model; kdfast distils from BERT, RoBERTa"):
        check_teacher_architecture(tmp_path)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ValueError, match="model without a model_type"):
        check_teacher_architecture(tmp_path)
    with pytest.raises(ValueError, match="not a local model directory"):
        check_teacher_architecture(tmp_path / "absent")
