"""Teacher activation cache: run the teacher once, distil many times (format: ``format.py``)."""

from kdfast.cache.format import CacheError, Manifest, teacher_weights_sha256, tokenizer_sha256
from kdfast.cache.reader import CacheDataset, Prefetcher, TeacherCache
from kdfast.cache.writer import build_cache, dequantize_int8, quantize_int8

__all__ = ["CacheDataset", "CacheError", "Manifest", "Prefetcher", "TeacherCache", "build_cache",
           "dequantize_int8", "quantize_int8", "teacher_weights_sha256", "tokenizer_sha256"]
