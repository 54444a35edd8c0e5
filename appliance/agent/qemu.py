"""QEMU processes, for both sides: the runner that boots a built appliance on the operator's
machine (appliance.boot.vm) and the agent's guests on the node (guests.py).

One place knows the files a QEMU runs with (pid file, QMP socket, serial
console), the part of its command line they share, how to find it running
again from its pid file, ask it to power down, and wait for it to go.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.agent.accel import QEMU, AccelChoice
from appliance.agent.locks import LockTimeout, held
from appliance.agent.processes import live_pid
from appliance.agent.qmp import ConnectError, QMPClient, QMPError

POLL_SECONDS = 0.05
# How long a QMP user waits for the one before it (a command takes milliseconds).
MONITOR_WAIT = 30.0


@dataclass(frozen=True)
class QemuFiles:
    """The files of one QEMU, all in one directory."""

    directory: Path
    console_name: str = "console.log"

    @property
    def pid_file(self) -> Path:
        return self.directory / "qemu.pid"

    @property
    def qmp_socket(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def console_log(self) -> Path:
        """The serial console, written by QEMU to a file."""
        return self.directory / self.console_name

    @property
    def monitor_lock(self) -> Path:
        """Held by whoever talks on the QMP socket, which takes one client at a time."""
        return self.directory / "qmp.lock"


def base_argv(
    name: str, accel: AccelChoice, memory_mib: int, cpus: int, files: QemuFiles, serial_socket: Path | None = None
) -> list[str]:
    """The start of every QEMU command line here: machine, accelerator, size, no default
    devices or display, the console to a file, a pid file and a QMP socket.

    With `serial_socket` the console is also a unix socket one client at a time can attach to
    (QEMU's log of the chardev keeps writing console_log, attached or not; unattached, the
    guest's output is not held up)."""
    if serial_socket is None:
        serial = ["-serial", f"file:{files.console_log}"]
    else:
        serial = ["-chardev", f"socket,id=serial0,path={serial_socket},server=on,wait=off,logfile={files.console_log}",
                  "-serial", "chardev:serial0"]  # fmt: skip
    return [
        QEMU, "-name", name,
        "-machine", f"q35,accel={accel.accel}", "-cpu", accel.cpu,
        "-m", str(memory_mib), "-smp", str(cpus),
        "-nodefaults", "-display", "none",
        *serial,
        "-pidfile", str(files.pid_file),
        "-qmp", f"unix:{files.qmp_socket},server=on,wait=off",
    ]  # fmt: skip


def running_pid(files: QemuFiles) -> int | None:
    """The pid of the QEMU running with these files, if one is (a stale pid file may name a
    process that reused the pid: only a QEMU started with this pid file counts)."""
    return live_pid(files.pid_file, QEMU, str(files.pid_file))


def wait_gone(pid: int, timeout: float) -> bool:
    """True once `pid` no longer runs QEMU (exited, a zombie, or the pid reused) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return True
        # An exiting QEMU loses its command line (its memory) before its files: until it is a zombie it
        # may still hold its pid file's lock, and a start at once would fail on it.
        if QEMU.encode() not in command_line and (command_line or exited(pid)):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)


def exited(pid: int) -> bool:
    """Whether `pid` is gone or a zombie (it has let go of everything it held)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


@contextmanager
def qmp_session(files: QemuFiles, timeout: float = 10.0) -> Iterator[QMPClient]:
    """A connected QMP client, once no other process is talking to this QEMU's monitor.

    QEMU's QMP socket serves one client at a time and refuses (EAGAIN) the
    others: every agent process (one per SSH connection) and every unit's
    ExecStop queue on the monitor lock instead, waiting at most MONITOR_WAIT.
    """
    try:
        with held(files.monitor_lock, MONITOR_WAIT), QMPClient(files.qmp_socket, timeout=timeout) as client:
            yield client
    except LockTimeout as error:
        raise ConnectError(f"the monitor of {files.directory.name} is busy: {error}") from error


def request_powerdown(files: QemuFiles, timeout: float = 10.0) -> bool:
    """Press the ACPI power button through QMP; False when QEMU does not answer."""
    try:
        with qmp_session(files, timeout) as client:
            client.execute("system_powerdown")
    except QMPError:
        return False
    return True


def end_process(pid: int, grace: float) -> None:
    """SIGTERM, then after `grace` seconds SIGKILL; returns once the QEMU is gone (or at most 10 s after)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if grace == 0 and sig == signal.SIGTERM:
            continue
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_gone(pid, wait):
            return
