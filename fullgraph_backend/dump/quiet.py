"""The third-party noise a dump causes, silenced while dumping, and nothing else.

depyf warns that it is debugging each time a dump starts, Dynamo warns that its profile cache
is off (a dump turns caches off on purpose), and Inductor logs a warning naming each trace
folder it writes (``graph.json`` records the folder already). Other warnings and log records,
ours and real errors included, pass as usual.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

# (message regex matched from the start, category) of the warnings a dump triggers
_WARNINGS = [
    (r".*You are trying to debug `torch\.compile`", UserWarning),  # depyf.prepare_debug prefixes its file name
    (r"dynamo_pgo force disabled by torch\.compiler\.config\.force_disable_caches", UserWarning),
]
INDUCTOR_TRACE_LOGGER = "torch._inductor.debug"


class _DropTraceNotices(logging.Filter):
    """Drops Inductor's ``<graph> debug trace: <folder>`` records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "debug trace" not in str(record.msg)


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Inside the block, drop the warnings and log records this module lists."""
    logger = logging.getLogger(INDUCTOR_TRACE_LOGGER)
    notices = _DropTraceNotices()
    with warnings.catch_warnings():
        for message, category in _WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        logger.addFilter(notices)
        try:
            yield
        finally:
            logger.removeFilter(notices)
