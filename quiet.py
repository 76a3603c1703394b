"""Scoped silence for third-party loggers and warnings: on while some call needs it, undone when the last one ends.

A library must not change its caller's logging or warnings for the rest of the process. Python 3.11's
`warnings.catch_warnings` is not thread-safe (readers run in threads), so each silence here is shared: the
first user in turns it on, the last one out restores what was there before.
"""

from __future__ import annotations

import logging
import threading
import warnings
from contextlib import contextmanager
from typing import Callable

_lock = threading.Lock()
_active: dict = {}  # key -> [users, undo]


@contextmanager
def _shared(key, apply: Callable[[], Callable[[], None]]):
    with _lock:
        entry = _active.get(key)
        if entry is None:
            entry = _active[key] = [0, apply()]
        entry[0] += 1
    try:
        yield
    finally:
        with _lock:
            entry[0] -= 1
            if entry[0] == 0:
                del _active[key]
                entry[1]()


def quiet_logs(*names: str, level: int = logging.ERROR):
    """Loggers `names` ("" is the root) at `level` or above only, within the block."""
    def apply():
        saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
        for logger, _ in saved:
            logger.setLevel(level)
        return lambda: [logger.setLevel(old) for logger, old in saved]

    return _shared(("logs", names, level), apply)


def detached_logs(name: str):
    """Logger `name`'s records kept from its parents' handlers (and so from the caller's logs), within the block."""
    def apply():
        logger = logging.getLogger(name)
        old, logger.propagate = logger.propagate, False
        return lambda: setattr(logger, "propagate", old)

    return _shared(("detached", name), apply)


def quiet_warnings(module: str):
    """Warnings raised from modules matching the regular expression `module` ignored, within the block."""
    def apply():
        warnings.filterwarnings("ignore", module=module)
        entry = warnings.filters[0]

        def undo():
            if entry in warnings.filters:
                warnings.filters.remove(entry)
                warnings._filters_mutated()  # drop the per-module caches of the filter list

        return undo

    return _shared(("warnings", module), apply)
