"""The agent's QMP client against a real QEMU (TCG) running a boot-sector guest."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.waiting import wait_until

from appliance.agent.accel import PROBE_BOOT_SECTOR, QEMU
from appliance.agent.qmp import ConnectError, ConnectionLostError, ExecuteError, QMPClient


@pytest.fixture
def monitor(tmp_path: Path) -> Iterator[Path]:
    disk, socket_path = tmp_path / "guest.img", tmp_path / "qmp.sock"
    disk.write_bytes(PROBE_BOOT_SECTOR)
    process = subprocess.Popen(
        [QEMU, "-accel", "tcg", "-m", "16", "-nodefaults", "-display", "none",
         "-drive", f"file={disk},format=raw,if=floppy", "-qmp", f"unix:{socket_path},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_until(lambda: process.poll() is None and socket_path.exists(), 30, "QEMU's QMP socket")
    yield socket_path
    process.kill()
    process.wait()


def test_greeting_and_version(monitor: Path) -> None:
    with QMPClient(monitor) as client:
        assert client.version["qemu"]["major"] >= 7
        assert client.execute("query-status")["running"] is True


def test_stop_and_cont_change_state_and_raise_events(monitor: Path) -> None:
    with QMPClient(monitor) as client:
        client.execute("stop")
        assert client.wait_event("STOP", timeout=10).name == "STOP"
        assert client.execute("query-status")["status"] == "paused"
        client.execute("cont")
        client.wait_event("RESUME", timeout=10)
        assert client.execute("query-status")["status"] == "running"


def test_qemu_errors_are_typed(monitor: Path) -> None:
    with QMPClient(monitor) as client:
        with pytest.raises(ExecuteError) as caught:
            client.execute("no-such-command")
        assert caught.value.error_class == "CommandNotFound"
        assert client.execute("query-status")["running"] is True


def test_quit_ends_the_connection(monitor: Path) -> None:
    with QMPClient(monitor) as client:
        client.execute("quit")
        assert client.wait_event("SHUTDOWN", timeout=10).data["guest"] is False
        with pytest.raises(ConnectionLostError, match=r"closed|failed"):
            client.execute("query-status")


def test_missing_socket_is_a_connect_error(tmp_path: Path) -> None:
    with pytest.raises(ConnectError):
        QMPClient(tmp_path / "none.sock").connect()
