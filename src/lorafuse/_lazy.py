"""lorafuse's imports on first use, one thread at a time.

`import lorafuse` imports the operations and the data model when they are first used (lorafuse/__init__'s
PEP 562 `__getattr__`, the format registry's `_loaded`). Two threads making their first calls at once would
otherwise import the same circular packages (lorafuse.model <-> lorafuse.model.lycoris, lorafuse.formats, ...)
from different ends: CPython then hands one of them a partially initialized module ("cannot import name ...
(most likely due to a circular import)"), or a registry still being filled. Under one lock, the second thread
waits until the first has imported everything, then finds it complete.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

# Reentrant: a module imported under the lock may itself import lazily (the registry filled while
# lorafuse.ops.api is imported) in the same thread.
LOCK = threading.RLock()


def import_module(name: str) -> ModuleType:
    """importlib.import_module(name) under LOCK: the module whole, never one another thread is still running."""
    with LOCK:
        return importlib.import_module(name)
