"""Processes known by a pid file, checked against /proc before anyone signals them."""

from __future__ import annotations

from pathlib import Path


def live_pid(pid_file: Path, *must_contain: str) -> int | None:
    """The pid in `pid_file` if that process is alive and its command line holds every
    string in `must_contain` (a stale pid file may name a process that reused the pid)."""
    try:
        pid = int(pid_file.read_text().strip())
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if all(text.encode() in command_line for text in must_contain):
        return pid
    return None
