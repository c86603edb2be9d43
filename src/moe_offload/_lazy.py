"""Names a package exports but imports on first use (PEP 562), so that the CLI's parser and
`--help` start without torch, transformers or the web stack."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, names: dict[str, str]):
    """A module `__getattr__` resolving each of `names` (name -> relative module) on first access.
    The value is then stored on the package, so the lookup happens once."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name], package), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
