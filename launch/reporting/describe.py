"""`python -m launch config --describe PREFIX`: every config key under PREFIX with its value, type and meaning.

The meaning is the docstring written under each dataclass field (the project's one place for it), read from
the source, so the help never drifts from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from typing import Any


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the docstring under it} of a dataclass."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                if isinstance(following.value.value, str):
                    docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def describe(config: Any, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, value, meaning) of every leaf of a config dataclass whose key starts with `prefix`."""
    rows: list[tuple[str, str, Any, str]] = []

    def walk(obj: Any, path: str) -> None:
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            key = f"{path}{f.name}"
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            elif key.startswith(prefix) or prefix.startswith(key + "."):
                rows.append((key, str(f.type), value, docs.get(f.name, "")))

    walk(config, "")
    return [row for row in rows if row[0].startswith(prefix)]
