"""Guest lifecycle through a real agent, real SQLite, real qemu-img and real QEMU (TCG).

The guest is a boot sector that prints a marker on its serial port: it boots
in well under a second even under TCG. It reaches the node's image store the
way operators' images do, streamed through image.import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.agent_process import AgentProcess, StartAgent
from helpers.waiting import wait_until

from appliance.agent.accel import PROBE_BOOT_SECTOR, PROBE_MARKER

DEADLINE = 60.0


# A disk of one sector does not boot under SeaBIOS; a megabyte does.
MARKER_GUEST_DISK = PROBE_BOOT_SECTOR.ljust(1 << 20, b"\0")


@pytest.fixture
def agent(agent: AgentProcess) -> AgentProcess:
    """The shared agent, with the marker guest's disk in its image store."""
    assert "result" in agent.import_image("marker-guest", MARKER_GUEST_DISK)
    return agent


GUEST = {"name": "g1", "vcpus": 1, "memory_mib": 32, "disks": [{"base_image": "marker-guest"}]}


def test_create_start_console_stop_delete(agent: AgentProcess, state_dir: Path) -> None:
    created = agent.result("guest.create", GUEST)
    assert created["name"] == "g1"
    assert (state_dir / "guests" / "g1" / "disk0.qcow2").exists()
    assert agent.result("guest.list") == [{"name": "g1", "state": "stopped", "pid": None, "vcpus": 1, "memory_mib": 32}]

    started = agent.result("guest.start", {"name": "g1"})
    assert started["pid"] > 0
    wait_until(
        lambda: PROBE_MARKER.decode() in agent.result("guest.console", {"name": "g1"})["text"], DEADLINE, "the marker"
    )
    info = agent.result("guest.info", {"name": "g1"})
    assert info["state"] == "running" and info["pid"] == started["pid"] and info["cpu_seconds"] >= 0

    assert agent.error_code("guest.start", {"name": "g1"}) == "guest_running"
    assert agent.error_code("guest.delete", {"name": "g1"}) == "guest_running"

    # The boot sector ignores ACPI, so the deadline passes and the stop is forced.
    assert agent.result("guest.stop", {"name": "g1", "timeout": 1}) == {"name": "g1", "forced": True}
    assert agent.result("guest.info", {"name": "g1"})["state"] == "stopped"
    assert agent.result("guest.delete", {"name": "g1", "remove_disks": True})["deleted"] is True
    assert agent.result("guest.list") == []
    assert not (state_dir / "guests" / "g1").exists()


def test_pause_and_resume(agent: AgentProcess) -> None:
    agent.result("guest.create", GUEST)
    agent.result("guest.start", {"name": "g1"})
    assert agent.result("guest.pause", {"name": "g1"})["state"] == "paused"
    assert agent.result("guest.resume", {"name": "g1"})["state"] == "running"


def test_a_new_agent_adopts_the_running_guest(agent: AgentProcess, start_agent: StartAgent) -> None:
    first = agent
    first.result("guest.create", GUEST)
    pid = first.result("guest.start", {"name": "g1"})["pid"]
    first.kill()
    second = start_agent()
    assert second.result("guest.info", {"name": "g1"})["pid"] == pid
    assert second.result("guest.list")[0]["state"] == "running"
    assert second.result("guest.kill", {"name": "g1"}) == {"name": "g1", "killed": True}


def test_failed_create_leaves_no_row_and_no_disk(agent: AgentProcess, state_dir: Path) -> None:
    bad = {**GUEST, "disks": [{"size_gib": 1}, {"base_image": "no-such-image"}]}
    assert agent.error_code("guest.create", bad) == "image_not_found"
    assert agent.result("guest.list") == []
    assert not (state_dir / "guests" / "g1").exists()


def test_deleting_without_remove_disks_keeps_them_aside(agent: AgentProcess, state_dir: Path) -> None:
    agent.result("guest.create", GUEST)
    kept = Path(agent.result("guest.delete", {"name": "g1"})["disks_kept_in"])
    assert (kept / "disk0.qcow2").exists()
    agent.result("guest.create", GUEST)


def test_racing_creates_of_one_name_one_wins(state_dir: Path) -> None:
    params = {"name": "race", "memory_mib": 32, "disks": [{"size_gib": 1}]}
    request = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "guest.create", "params": params}).encode() + b"\n"
    command = [sys.executable, "-m", "appliance.agent", "--state-dir", str(state_dir), "serve"]
    racers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(4)]
    replies = [racer.communicate(request, timeout=60)[0].decode() for racer in racers]
    assert sum('"result"' in reply for reply in replies) == 1, replies
    assert sum('"guest_exists"' in reply for reply in replies) == 3, replies


BAD_GUEST_PARAMS = [
    ({**GUEST, "name": "../etc"}, "invalid_params"),
    ({**GUEST, "name": ".."}, "invalid_params"),
    ({**GUEST, "name": "x" * 64}, "invalid_params"),
    ({**GUEST, "memory_mib": 0}, "invalid_params"),
    ({**GUEST, "memory_mib": True}, "invalid_params"),
    ({**GUEST, "vcpus": -1}, "invalid_params"),
    ({**GUEST, "disks": [{"size_gib": 0}]}, "invalid_params"),
    ({**GUEST, "disks": [{"size_gib": 1, "base_image": "marker-guest"}]}, "invalid_params"),
    ({**GUEST, "disks": [{"base_image": "../../etc/passwd"}]}, "invalid_params"),
    ({**GUEST, "kernel_boot": {"kernel_image": "marker-guest", "cmdline": "a\nb"}}, "invalid_params"),
    ({**GUEST, "restart": "sometimes"}, "invalid_params"),
    ({**GUEST, "colour": "red"}, "invalid_params"),
]


@pytest.mark.parametrize(("params", "code"), BAD_GUEST_PARAMS)
def test_bad_guest_definitions_are_refused_and_the_connection_goes_on(
    agent: AgentProcess, params: dict, code: str, state_dir: Path
) -> None:
    assert agent.error_code("guest.create", params) == code
    assert agent.result("guest.list") == []
    assert not (state_dir / "etc").exists()


@pytest.mark.parametrize("method", ["guest.start", "guest.info", "guest.console", "guest.delete", "guest.pause"])
def test_unknown_guest_is_named(agent: AgentProcess, method: str) -> None:
    assert agent.error_code(method, {"name": "ghost"}) == "guest_not_found"


def dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


def test_a_create_cut_short_by_a_crash_is_repaired_by_the_next_agent(
    agent: AgentProcess, start_agent: StartAgent, state_dir: Path
) -> None:
    agent.kill()
    # A crash after the disk, before the row: the directory alone is left, with its marker.
    half_made = state_dir / "guests" / "g1"
    half_made.mkdir(parents=True)
    (half_made / "disk0.qcow2").write_bytes(b"partial")
    (half_made / f".creating-{dead_pid()}").touch()
    agent = start_agent()
    assert agent.result("guest.list") == []
    assert not half_made.exists()
    assert agent.result("guest.create", GUEST)["name"] == "g1"
    assert not list(half_made.glob(".creating-*"))


def test_a_create_that_committed_before_the_crash_keeps_its_guest(
    agent: AgentProcess, start_agent: StartAgent, state_dir: Path
) -> None:
    agent.result("guest.create", GUEST)
    agent.kill()
    (state_dir / "guests" / "g1" / f".creating-{dead_pid()}").touch()
    again = start_agent()
    assert [guest["name"] for guest in again.result("guest.list")] == ["g1"]
    assert not list((state_dir / "guests" / "g1").glob(".creating-*"))


def test_cpu_limits_are_kept_in_the_definition_and_need_systemd_to_change_live(agent: AgentProcess) -> None:
    agent.result("guest.create", {**GUEST, "vcpus": 2, "cpu_weight": 50})
    assert agent.result("guest.set_cpu", {"name": "g1", "cpu_quota_percent": 150}) == {
        "name": "g1",
        "cpu_weight": 50,
        "cpu_quota_percent": 150,
        "applied_live": False,
    }
    definition = agent.result("guest.info", {"name": "g1"})["definition"]
    assert (definition["cpu_weight"], definition["cpu_quota_percent"]) == (50, 150)
    assert agent.error_code("guest.set_cpu", {"name": "g1", "cpu_quota_percent": 201}) == "invalid_params"
    assert agent.error_code("guest.set_cpu", {"name": "g1", "cpu_weight": 0}) == "invalid_params"
    assert agent.error_code("guest.set_cpu", {"name": "g1", "nice": 5}) == "invalid_params"

    agent.result("guest.start", {"name": "g1"})
    info = agent.result("guest.info", {"name": "g1"})
    # This machine's PID 1 is not systemd: QEMU is the agent's own daemonized child.
    assert info["supervisor"] == "process" and "unit" not in info
    assert agent.error_code("guest.set_cpu", {"name": "g1", "cpu_weight": 200}) == "unsupported"


def test_autostart_starts_only_the_guests_marked_for_it(agent: AgentProcess, state_dir: Path, tmp_path: Path) -> None:
    agent.result("guest.create", {**GUEST, "name": "boots", "autostart": True})
    agent.result("guest.create", {**GUEST, "name": "waits"})
    command = [sys.executable, "-m", "appliance.agent", "--config", str(tmp_path / "none.toml"),
               "--state-dir", str(state_dir), "autostart"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "APPLIANCE_ACCEL": "tcg"})
    assert result.returncode == 0, result.stderr
    assert [started["name"] for started in json.loads(result.stdout)] == ["boots"]
    states = {guest["name"]: guest["state"] for guest in agent.result("guest.list")}
    assert states == {"boots": "running", "waits": "stopped"}
