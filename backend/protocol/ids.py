"""Label Studio's object ids (projects, tasks, annotations) as they arrive on the wire: Django bigints."""

from __future__ import annotations

from typing import TypeGuard


def is_label_studio_id(value: object) -> TypeGuard[int]:
    """A positive 64-bit integer (JSON `true` is not one, though Python counts bool as int)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**63
