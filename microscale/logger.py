"""The `microscale` logger: INFO to stderr by default (KV cache size, backends chosen), as serving engines do.
MICROSCALE_LOGGING_LEVEL=WARNING (or DEBUG, ...) changes the level."""

from __future__ import annotations

import logging
import os


def init_logging() -> None:
    logger = logging.getLogger("microscale")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("MICROSCALE_LOGGING_LEVEL", "INFO").upper())
    logger.propagate = False
