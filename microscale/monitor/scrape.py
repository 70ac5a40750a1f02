"""Reading a server's /metrics: one Snapshot per poll, and what two snapshots say about the time between them
(counter rates, histogram quantiles from bucket deltas, as Prometheus' rate() and histogram_quantile() do)."""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]


class ServerUnreachable(Exception):
    """/metrics could not be fetched or read."""


@dataclass
class Snapshot:
    time: float  # time.monotonic() of the poll
    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)  # sample name -> labels -> value

    def value(self, name: str, **labels: str) -> float | None:
        """The sum over the series of `name` that carry `labels` (None: the server reports none)."""
        wanted = set(labels.items())
        matching = [v for key, v in self.samples.get(name, {}).items() if wanted <= set(key)]
        return sum(matching) if matching else None

    def buckets(self, histogram: str) -> dict[float, float]:
        """Upper bound -> cumulative count of a histogram's buckets."""
        series = self.samples.get(f"{histogram}_bucket", {})
        return {float(dict(key)["le"]): v for key, v in series.items()}


def parse(text: str, at: float) -> Snapshot:
    snapshot = Snapshot(at)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            snapshot.samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return snapshot


def fetch(server: str, timeout: float = 5.0) -> Snapshot:
    url = f"{server.rstrip('/')}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
        return parse(text, time.monotonic())
    except urllib.error.HTTPError as e:
        raise ServerUnreachable(f"{url} answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ServerUnreachable(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None
    except ValueError as e:  # a malformed URL, or a body that is not Prometheus text
        raise ServerUnreachable(f"cannot read {url}: {e}") from None


def delta(newer: Snapshot, older: Snapshot, name: str, **labels: str) -> float | None:
    """How much a counter grew (a restarted server's counters start again from 0)."""
    now = newer.value(name, **labels)
    if now is None:
        return None
    before = older.value(name, **labels) or 0.0
    return now - before if now >= before else now


def rate(newer: Snapshot, older: Snapshot, name: str, **labels: str) -> float | None:
    grown = delta(newer, older, name, **labels)
    elapsed = newer.time - older.time
    return None if grown is None or elapsed <= 0 else grown / elapsed


def quantiles(newer: Snapshot, older: Snapshot, histogram: str, qs: tuple[float, ...]) -> list[float | None]:
    """Quantiles of the observations made between two snapshots, interpolated linearly inside a bucket
    (None when there were none)."""
    now, before = newer.buckets(histogram), older.buckets(histogram)
    counts = sorted((le, count - before.get(le, 0.0)) for le, count in now.items())
    if not counts or counts[-1][1] <= 0:
        return [None] * len(qs)
    total = counts[-1][1]
    return [_quantile(counts, q * total) for q in qs]


def _quantile(counts: list[tuple[float, float]], rank: float) -> float:
    lower, below = 0.0, 0.0
    for le, count in counts:
        if count >= rank:
            if math.isinf(le):
                return lower  # past the last finite bucket: its bound is the best estimate
            return lower + (le - lower) * (rank - below) / (count - below) if count > below else le
        lower, below = le, count
    return lower
