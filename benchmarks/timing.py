"""Timing shared by the benchmarks (run as scripts: `python benchmarks/<name>.py`)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
  """Median wall time of `repeats` calls of fn (which must block until its result is ready), and
  the last result."""
  times = []
  result = None
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), result
