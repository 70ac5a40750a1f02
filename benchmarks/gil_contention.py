"""How much a second Python thread that holds the GIL in short bursts (as the server's event loop does) slows
the offline engine: the same workload quiet, then with such a thread running, alternating.

    .venv/bin/python benchmarks/gil_contention.py --repeats 2 --busy-fraction 0.08

The serving gap of issue 5 is measured by benchmarks/serving_throughput.py; this isolates one suspected cause.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from microscale.bench.config import load_config
from microscale.bench.datasets import load_dataset
from microscale.bench.throughput import run_throughput
from microscale.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
BURST_S = 0.00015  # one event-loop wake-up's worth of Python work


def pester(stop: threading.Event, busy_fraction: float, spent: list[float]) -> None:
    """Pure-Python bursts (GIL held) with sleeps between, `busy_fraction` of the wall time in all."""
    pause = BURST_S * (1 - busy_fraction) / busy_fraction
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < BURST_S:
            sum(range(50))
        spent[0] += time.perf_counter() - start
        time.sleep(pause)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "tiny-llama-pycode"))
    p.add_argument("--busy-fraction", type=float, default=0.08)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    data = {"dataset_path": str(REPO / "data" / "pycode-valid.txt"), "input_len": 256, "output_len": 128,
            "range_ratio": 0.5, "num_prompts": 64}
    config = load_config(None, {"engine": {"model_path": args.model, "dtype": "float32", "max_batch_size": 16,
                                           "max_model_len": 1024}, "data": data})
    requests = load_dataset(data["dataset_path"], Tokenizer.from_pretrained(args.model), num_prompts=64,
                            input_len=256, output_len=128, seed=0, range_ratio=0.5).requests
    for _ in range(args.repeats):
        for mode in ("quiet", "pestered"):
            stop, spent = threading.Event(), [0.0]
            thread = threading.Thread(target=pester, args=(stop, args.busy_fraction, spent), daemon=True)
            if mode == "pestered":
                thread.start()
            run = run_throughput(config, requests)
            stop.set()
            print(f"{mode:9s} {run['output_tokens_per_s']:8.1f} tok/s  (the other thread held the GIL {spent[0]:.2f} s "
                  f"of {run['duration_s']:.2f} s)")


if __name__ == "__main__":
    main()
