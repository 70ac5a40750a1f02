"""Where microscale keeps what it builds or measures once per machine (compiled graphs, CPU kernels, device
peaks): the user's cache ($XDG_CACHE_HOME, by default ~/.cache), which survives reboots, unlike /tmp."""

from __future__ import annotations

import os
from pathlib import Path


def microscale_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "microscale"
