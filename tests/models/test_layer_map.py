import pytest

from kdfast.losses.layer_map import uniform_layer_map


@pytest.mark.parametrize("n_teacher,n_student,expected", [
    (12, 4, {0: 0, 1: 3, 2: 6, 3: 9, 4: 12}),
    (12, 6, {0: 0, 1: 2, 2: 4, 3: 6, 4: 8, 5: 10, 6: 12}),
    (24, 24, {m: m for m in range(25)}),
    (12, 1, {0: 0, 1: 12}),
])
def test_uniform_map(n_teacher, n_student, expected):
    got = uniform_layer_map(n_teacher, n_student)
    assert got == expected
    # TinyBERT's g(m) = m * N / M over output_hidden_states indices, embeddings first, last layer to last layer
    assert all(t == m * n_teacher / n_student for m, t in got.items())
    assert got[0] == 0 and got[n_student] == n_teacher


@pytest.mark.parametrize("n_teacher,n_student,match", [
    (12, 5, "divisible"), (4, 12, "n_student"), (0, 4, "n_teacher"), (12, 0, "n_student"),
    (12.0, 4, "n_teacher"), (12, True, "n_student"), ("12", 4, "n_teacher"),
])
def test_uniform_map_validation(n_teacher, n_student, match):
    with pytest.raises(ValueError, match=match):
        uniform_layer_map(n_teacher, n_student)


def test_map_indexes_real_hidden_states():
    import torch
    from transformers import BertConfig, BertModel

    cfg = dict(vocab_size=30, hidden_size=8, num_attention_heads=2, intermediate_size=8, max_position_embeddings=8)
    teacher = BertModel(BertConfig(num_hidden_layers=6, **cfg)).eval()
    student = BertModel(BertConfig(num_hidden_layers=3, **cfg)).eval()
    ids = torch.randint(0, 30, (1, 5))
    with torch.no_grad():
        t = teacher(ids, output_hidden_states=True).hidden_states
        s = student(ids, output_hidden_states=True).hidden_states
    lmap = uniform_layer_map(len(t) - 1, len(s) - 1)
    assert max(lmap) == len(s) - 1 and max(lmap.values()) == len(t) - 1
    torch.testing.assert_close(t[lmap[len(s) - 1]], teacher(ids).last_hidden_state)
