"""Locks between the agent processes of one node (one per SSH connection, plus systemd's ExecStop).

flock(2) on a file: held until the holder closes it or dies, so a killed
agent never leaves a lock behind. Waiting has a deadline: a holder that
takes too long makes the waiter fail with a reason instead of hanging.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

POLL_SECONDS = 0.02


class LockTimeout(Exception):
    """The lock was held by another process past the deadline."""


@contextmanager
def held(path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive lock on `path` (made if missing) for the block; LockTimeout after `timeout` s."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"{path} held by another process for over {timeout:.0f}s") from None
                time.sleep(POLL_SECONDS)
        yield
    finally:
        os.close(descriptor)
