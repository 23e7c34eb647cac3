"""Progress reporting that degrades to plain log lines without a terminal (CI, nohup, files)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from absl import logging

T = TypeVar("T")


def interactive() -> bool:
    """True when a live progress bar makes sense: a terminal on stderr and not under CI."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return False
    return sys.stderr.isatty()


def progress(items: Iterable[T], total: int | None = None, desc: str = "", log_every: int = 0) -> Iterator[T]:
    """Iterate with a tqdm bar on a terminal, else a log line every ``log_every`` items (default: ~10 lines)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if interactive():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, dynamic_ncols=True)
        return
    every = log_every or max(1, (total or 10) // 10)
    start = time.perf_counter()
    count = 0
    for count, item in enumerate(items, start=1):
        yield item
        if count % every == 0 or count == total:
            elapsed = time.perf_counter() - start
            rate = count / elapsed if elapsed > 0 else float("inf")
            eta = f", ETA {(total - count) / rate:.0f}s" if total and rate > 0 else ""
            of = f"/{total}" if total else ""
            logging.info("%s %d%s (%.2f it/s%s)", desc, count, of, rate, eta)
