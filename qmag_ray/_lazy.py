"""Public names of a package resolved on first use (PEP 562 module ``__getattr__``).

A package lists ``{name: module}`` and sets ``__getattr__ = lazy_exports(__name__, names)``:
importing the package then imports none of those modules (nor Ray, torch or MLflow behind
them); ``from package import name`` imports the one module that defines ``name``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package`` for ``names`` (public name -> its module)."""
    table = dict(names)

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(table[name]), name)

    return __getattr__
