"""kdfast inside ``transformers`` code: :func:`capture` (the same as :func:`kdfast.capture`) to read
hidden states, unscaled queries / keys and pre-softmax scores out of a stock BERT, RoBERTa,
DistilBERT or MobileBERT running on SDPA attention."""

from __future__ import annotations

from kdfast.capture import SUPPORTED_MODELS, Captured, capture

__all__ = ["Captured", "SUPPORTED_MODELS", "capture"]
