"""Writes the documents of the two tiny lm-eval tasks beside this file from the bundled held-out code
(data/pycode-valid.txt), so that lm-eval runs against `microscale serve models/tiny-llama-pycode` with no download:
pycode_next_word (loglikelihood: a line's last word after the lines before it) and pycode_next_line (generate_until:
the line after a `def` header). Deterministic: the first documents in file order."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE.parents[1] / "data" / "pycode-valid.txt"
CONTEXT_LINES = 8
NUM_DOCS = 50


def main() -> None:
    lines = SOURCE.read_text(encoding="utf-8").splitlines()
    words, headers = [], []
    for i, line in enumerate(lines[CONTEXT_LINES:], CONTEXT_LINES):
        before = "\n".join(lines[i - CONTEXT_LINES:i]) + "\n"
        head, _, last = line.rstrip().rpartition(" ")
        if len(words) < NUM_DOCS and head.strip() and last.isidentifier():
            words.append({"context": before + head, "continuation": " " + last})
        if len(headers) < NUM_DOCS and line.lstrip().startswith("def ") and i + 1 < len(lines) and lines[i + 1].strip():
            headers.append({"context": before + line + "\n", "target": lines[i + 1]})
    for name, docs in (("pycode_next_word", words), ("pycode_next_line", headers)):
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")


if __name__ == "__main__":
    main()
