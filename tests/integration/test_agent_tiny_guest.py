"""A real Linux guest through the agent: a Debian kernel and a busybox initramfs (tiny_guest.py).

Where the boot-sector guest of test_agent_guests.py cannot answer, this one
does: it powers off on ACPI, and its balloon driver gives memory back.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.agent_process import AgentProcess
from helpers.tiny_guest import TINY_GUEST_MARKER, TinyGuest, build_tiny_guest
from helpers.waiting import wait_until

# A Linux boot under TCG, and the first run downloads Debian's kernel package.
pytestmark = pytest.mark.slow

DEADLINE = 120.0
MEMORY_MIB = 256


@pytest.fixture(scope="module")
def tiny_guest(tmp_path_factory: pytest.TempPathFactory) -> TinyGuest:
    return build_tiny_guest(tmp_path_factory.mktemp("tiny-guest"))


@pytest.fixture
def agent(agent: AgentProcess, tiny_guest: TinyGuest) -> AgentProcess:
    """The shared agent, with the tiny guest imported and defined."""
    process = agent
    assert "result" in process.import_image("tiny-vmlinuz", tiny_guest.kernel.read_bytes())
    assert "result" in process.import_image("tiny-initrd", tiny_guest.initrd.read_bytes())
    process.result(
        "guest.create",
        {
            "name": "tiny",
            "vcpus": 1,
            "memory_mib": MEMORY_MIB,
            "kernel_boot": {
                "kernel_image": "tiny-vmlinuz",
                "initrd_image": "tiny-initrd",
                "cmdline": tiny_guest.cmdline,
            },
        },
    )
    return process


def console(agent: AgentProcess) -> str:
    text: str = agent.result("guest.console", {"name": "tiny"})["text"]
    return text


def test_kernel_guest_boots_to_its_marker_and_powers_off_on_acpi(agent: AgentProcess) -> None:
    agent.result("guest.start", {"name": "tiny"})
    wait_until(lambda: TINY_GUEST_MARKER in console(agent), DEADLINE, "the tiny guest's marker")
    assert agent.result("guest.stop", {"name": "tiny", "timeout": 60}) == {"name": "tiny", "forced": False}
    assert "powering off" in console(agent)
    assert agent.result("guest.info", {"name": "tiny"})["state"] == "stopped"
    assert agent.result("guest.delete", {"name": "tiny", "remove_disks": True})["deleted"] is True


def memtotal_lines(agent: AgentProcess) -> list[int]:
    return [int(line.split()[1]) for line in console(agent).splitlines() if line.startswith("memtotal-kib ")]


def test_balloon_takes_memory_back_from_the_guest(agent: AgentProcess) -> None:
    agent.result("guest.start", {"name": "tiny"})
    wait_until(lambda: memtotal_lines(agent), DEADLINE, "the guest's first memory line")
    before_kib = memtotal_lines(agent)[-1]
    assert agent.result("guest.info", {"name": "tiny"})["memory_actual_mib"] == MEMORY_MIB

    agent.result("guest.set_memory", {"name": "tiny", "memory_mib": MEMORY_MIB - 64})
    wait_until(
        lambda: agent.result("guest.info", {"name": "tiny"})["memory_actual_mib"] == MEMORY_MIB - 64,
        DEADLINE,
        "QMP to report the balloon inflated",
    )
    # The guest's own view: its balloon driver took the 64 MiB out of MemTotal.
    wait_until(lambda: memtotal_lines(agent)[-1] <= before_kib - 60 * 1024, DEADLINE, "the guest's MemTotal to drop")

    assert agent.error_code("guest.set_memory", {"name": "tiny", "memory_mib": MEMORY_MIB + 1}) == "invalid_params"


def test_unit_exec_stop_powers_the_guest_down_and_says_how(agent: AgentProcess, tmp_path: Path) -> None:
    """What a guest unit's ExecStop runs; tested here without systemd, as a plain command."""
    agent.result("guest.start", {"name": "tiny"})
    wait_until(lambda: TINY_GUEST_MARKER in console(agent), DEADLINE, "the tiny guest's marker")
    command = [sys.executable, "-m", "appliance.agent", "--config", str(tmp_path / "none.toml"),
               "--state-dir", str(tmp_path / "state"), "powerdown-guest", "tiny"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE)
    assert (result.returncode, result.stdout.strip()) == (0, "clean"), result.stderr
    assert agent.result("guest.info", {"name": "tiny"})["state"] == "stopped"
    assert (tmp_path / "state" / "guests" / "tiny" / "last-stop").read_text().strip() == "clean"
