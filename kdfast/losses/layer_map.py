"""Layer maps between teacher and student (the layer_map of :class:`kdfast.DistillationLoss`; also
:func:`kdfast.models.uniform_layer_map`)."""

from __future__ import annotations

__all__ = ["uniform_layer_map"]


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def uniform_layer_map(n_teacher: int, n_student: int) -> dict[int, int]:
    """TinyBERT's uniform strategy ``g(m) = m * n_teacher / n_student``.

    Returns ``{student_index: teacher_index}`` over **hidden-state indices** as in ``output_hidden_states``
    (index 0 is the embedding output, index ``m`` the output of layer ``m``, 1-based), including the
    embedding pair ``0 -> 0``. Example: ``uniform_layer_map(12, 4) == {0: 0, 1: 3, 2: 6, 3: 9, 4: 12}``.

    For attention maps (one per layer, 0-based tuples) use the pairs with ``m >= 1`` shifted down by one:
    student ``attentions[m - 1]`` <-> teacher ``attentions[g(m) - 1]``.

    Raises ``ValueError`` unless both counts are positive ints with ``n_student <= n_teacher`` and
    ``n_teacher`` divisible by ``n_student`` (otherwise ``g`` is not an integer map).
    """
    _check_count("n_teacher", n_teacher)
    _check_count("n_student", n_student)
    if n_student > n_teacher:
        raise ValueError(f"n_student ({n_student}) must be <= n_teacher ({n_teacher})")
    if n_teacher % n_student:
        raise ValueError(f"n_teacher ({n_teacher}) must be divisible by n_student ({n_student}) for a uniform map")
    step = n_teacher // n_student
    return {m: m * step for m in range(n_student + 1)}
