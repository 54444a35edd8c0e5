"""The guest launcher's side of the tap helper's protocol, and descriptors put where QEMU expects them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.agent import launch
from appliance.agent.nics import LaunchPlan, TapRequest

TAP = TapRequest(fd=3, ifname="vm0123456789n0", bridge="br0", vlan=0, mac="52:54:00:00:00:01")


@pytest.fixture
def helper(tmp_path: Path) -> Iterator[tuple[Path, list[dict[str, object]], list[bytes]]]:
    """A stand-in tap helper on a unix socket: answers each request with `replies[0]`, passing a pipe's
    read end when the reply is not an error; records the requests."""
    path = tmp_path / "helper.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    requests: list[dict[str, object]] = []
    replies: list[bytes] = [b'{"ifname": "vm0123456789n0"}\n']

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            requests.append(json.loads(connection.makefile("rb").readline()))
            if b"error" in replies[0]:
                connection.sendall(replies[0])
                return
            read_end, write_end = os.pipe()
            os.write(write_end, b"through the descriptor")
            socket.send_fds(connection, [replies[0]], [read_end])
            os.close(read_end)
            os.close(write_end)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, requests, replies
    server.close()


def test_a_tap_descriptor_comes_back_over_the_socket(helper: tuple[Path, list[dict[str, object]], list[bytes]]) -> None:
    path, requests, _ = helper
    fd = launch.request_tap(str(path), TAP)
    try:
        assert os.read(fd, 100) == b"through the descriptor"
    finally:
        os.close(fd)
    assert requests == [{"ifname": TAP.ifname, "bridge": "br0", "vlan": 0, "mac": TAP.mac}]


def test_the_helpers_refusal_is_the_launch_error(helper: tuple[Path, list[dict[str, object]], list[bytes]]) -> None:
    path, _, replies = helper
    replies[0] = b'{"error": "bridge \'br9\' is not allowed for guests (allowed: br0)"}\n'
    with pytest.raises(launch.LaunchError, match="tap helper: bridge 'br9' is not allowed"):
        launch.request_tap(str(path), TAP)


def test_no_helper_listening_stops_the_launch_before_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = LaunchPlan(tap_helper_socket=str(tmp_path / "absent.sock"), taps=[TAP])
    marker = tmp_path / "qemu-ran"
    assert launch.main(plan.to_json(), ["--", "touch", str(marker)]) == 1
    assert "launch-guest: cannot reach the tap helper" in capsys.readouterr().err
    assert not marker.exists()


def test_descriptors_land_on_the_numbers_qemu_is_given() -> None:
    pipes = [os.pipe() for _ in range(2)]
    # Targets far from where the pipes happen to be, one of them the other's current number.
    targets = {pipes[1][0]: pipes[0][0], 90: pipes[1][0]}
    try:
        launch.place(dict(targets))
        os.write(pipes[0][1], b"first")
        os.write(pipes[1][1], b"second")
        assert os.read(pipes[1][0], 10) == b"first"
        assert os.read(90, 10) == b"second"
        assert os.get_inheritable(90)
    finally:
        for fd in (pipes[0][1], pipes[1][1], pipes[1][0], 90):
            os.close(fd)


def test_a_guest_arriving_by_migration_waits_for_it_at_its_first_start_only(tmp_path: Path) -> None:
    """The launcher's marker gives QEMU -incoming defer -S once; a restart of the same command (its
    systemd unit's restart policy, after a crash) boots the guest instead."""
    marker, seen = tmp_path / "incoming", tmp_path / "argv"
    marker.touch()
    plan = LaunchPlan(tap_helper_socket=str(tmp_path / "unused.sock"), incoming=str(marker)).to_json()
    stand_in = ["sh", "-c", f'echo "$@" > {seen}', "qemu", "-name", "g"]
    command = [sys.executable, "-m", "appliance.agent", "--config", str(tmp_path / "none.toml"), "launch-guest", plan]
    subprocess.run([*command, "--", *stand_in], check=True)
    assert seen.read_text().split() == ["-name", "g", "-incoming", "defer", "-S"] and not marker.exists()
    subprocess.run([*command, "--", *stand_in], check=True)
    assert seen.read_text().split() == ["-name", "g"]


def test_plans_written_before_migration_launch_as_they_did() -> None:
    old = json.dumps({"tap_helper_socket": "/run/x.sock", "taps": [], "passt": []})
    assert LaunchPlan.from_json(old).incoming == "" and not LaunchPlan.from_json(old)
