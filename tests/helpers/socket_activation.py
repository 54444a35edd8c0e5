"""systemd's `Accept=yes` socket activation, for tests: one process per connection, the connection on stdin."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def socket_activated(path: Path, argv: Sequence[str], env: dict[str, str] | None = None) -> Iterator[list[int]]:
    """Listen on PATH and run ARGV for each connection (as systemd runs a NAME@.service); yields the
    list of the exit codes of the runs finished so far."""
    path.parent.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    codes: list[int] = []
    running: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()

    def serve() -> None:
        # Polled, and the listener closed only after this thread ended: a thread still in accept() when
        # its listener is closed could take the next test's listener, given the same descriptor number.
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.settimeout(None)
            with connection:
                process = subprocess.Popen(
                    list(argv), stdin=connection.fileno(), env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL
                )
            running.append(process)
            threading.Thread(target=lambda p=process: codes.append(p.wait()), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield codes
    finally:
        stop.set()
        thread.join()
        listener.close()
        for process in running:
            if process.poll() is None:
                process.kill()
            process.wait()
