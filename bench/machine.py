"""The machine the figures were taken on, named in every result."""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import asdict, dataclass
from typing import Any

from appliance.agent.accel import QEMU, AccelChoice, probe_accel
from appliance.agent.host import read_cpu_model, read_meminfo
from appliance.run import CommandError, run


@dataclass(frozen=True)
class Machine:
    hostname: str
    cpu_model: str
    cores: int
    memory_bytes: int
    kernel: str
    os: str
    python: str
    qemu_version: str
    accel: str
    accel_reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def qemu_version() -> str:
    try:
        return run([QEMU, "--version"]).splitlines()[0].strip()
    except CommandError as error:
        return f"unknown ({error})"


def os_name() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", "unknown")
    except OSError:
        return "unknown"


def describe_machine() -> tuple[Machine, AccelChoice]:
    """This host, and the accelerator QEMU gets here (KVM only if a probe guest really runs under it)."""
    accel = probe_accel()
    machine = Machine(
        hostname=socket.gethostname(),
        cpu_model=read_cpu_model(),
        cores=os.cpu_count() or 1,
        memory_bytes=read_meminfo().get("MemTotal", 0),
        kernel=os.uname().release,
        os=os_name(),
        python=platform.python_version(),
        qemu_version=qemu_version(),
        accel=accel.accel,
        accel_reason=accel.reason,
    )
    return machine, accel


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]
