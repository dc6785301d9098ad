"""Timing sections for the benchmarks: wrap a function or a method for a while and add up its time."""

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Section:
    """Accumulates the time spent in, and the number of calls to, functions or methods patched for a while."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def patched(self, target: Any, attribute: str, label: str) -> Iterator[None]:
        original = getattr(target, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1

        setattr(target, attribute, timed)
        try:
            yield
        finally:
            setattr(target, attribute, original)
