"""numba's on-disk cache of our kernels, made stale by a change to any kernel file.

numba keys a cached function by its own file's modification time and size. Our kernels call one
another across files (_decode_jit's stack compiles _layer_jit's layer call into itself), so an
update that changed _layer_jit.py alone would leave the stack's cached machine code running the
old layer: wrong numbers, silently. Here every kernel's cache entry is stamped with all the
`_*_jit.py` files instead. Each of those modules calls install() before its first decorator (numba
picks a function's cache locator when it is decorated).
"""
from __future__ import annotations

import glob
import os

from numba.core import caching

_DIR = os.path.dirname(os.path.abspath(__file__))


def stamp() -> tuple:
    """(name, mtime, size) of every kernel file: what a cache entry must have been compiled from."""
    out = []
    for path in sorted(glob.glob(os.path.join(_DIR, "_*_jit.py"))):
        st = os.stat(path)
        out.append((os.path.basename(path), st.st_mtime, st.st_size))
    return tuple(out)


def _stamped(base: type) -> type:
    """`base` (one of numba's locators) for our kernel files only, stamped with all of them."""

    class Stamped(base):
        moe_offload_stamped = True

        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) != _DIR:
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return stamp()

    Stamped.__name__ = Stamped.__qualname__ = f"Stamped{base.__name__}"
    return Stamped


def install() -> None:
    """Put a stamped copy in front of each of numba's usual locators (a user's NUMBA_CACHE_DIR, the
    package's __pycache__, the user-wide cache: the first that can write wins, as before)."""
    classes = caching.CacheImpl._locator_classes
    if any(getattr(c, "moe_offload_stamped", False) for c in classes):
        return
    # (named with a leading underscore before numba 0.61)
    bases = [c for c in classes if c.__name__.lstrip("_") in _FILE_LOCATORS]
    classes[:0] = [_stamped(c) for c in bases]


_FILE_LOCATORS = ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")
