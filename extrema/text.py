"""How a list of names appears in a message: the first few and the count, so a long list stays one line."""

from __future__ import annotations

from collections.abc import Sequence


def summarise(items: Sequence[str], limit: int = 20) -> str:
    """`[a, b, ...] (N)`: the first `limit` items, an ellipsis when there are more, and how many there are."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"
