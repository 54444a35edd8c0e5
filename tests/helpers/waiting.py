"""Waiting on a condition with a deadline: the tests' one way to wait for something to happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
POLL_SECONDS = 0.02


def wait_until(condition: Callable[[], T], timeout: float, what: str, poll: float = POLL_SECONDS) -> T:
    """The first truthy value of `condition()`, polled every `poll` seconds until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)
