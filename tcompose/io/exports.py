"""Lazy re-exports for a package's ``__init__``: ``from tcompose.io import ShardedWriter`` imports
``tcompose.io.datasets`` only when the name is first asked for, so importing a light module of the package (the
CLI reads ``tcompose.io.errors`` and ``tcompose.models.defaults``) never pulls in torch or pyarrow."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for ``package`` re-exporting ``exports`` (submodule -> its public names)."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(where)
