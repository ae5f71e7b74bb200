"""The tiny random-weight BertForMaskedLM teacher of the tests (its one home is kdfast.bench.synthetic)."""

from kdfast.bench.synthetic import SPECIAL, save_tiny_bert_teacher  # noqa: F401
