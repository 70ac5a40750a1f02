"""JSON Lines input (prompts files, calibration data): one JSON value per non-blank line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


def json_lines(text: str, source: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line; a line that is not JSON is a ValueError naming it."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{number}: not JSON ({e.msg})") from None
