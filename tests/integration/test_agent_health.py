"""The trial boot's health check: each check against the real thing it checks (a real agent process, a
listening socket, shell commands), and the deadline."""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.agent import health
from appliance.agent.health import CheckResult, wait_healthy


def agent_argv(state_dir: Path) -> list[str]:
    return [sys.executable, "-m", "appliance.agent", "--config", "/nonexistent", "--state-dir", str(state_dir), "serve"]


def test_the_agent_check_asks_a_real_agent(tmp_path: Path) -> None:
    agent, guests = health.agent_and_guests(agent_argv(tmp_path / "state"))
    assert agent == CheckResult("agent", True, "protocol 1")
    assert guests.ok


def test_an_agent_that_does_not_start_fails_the_check(tmp_path: Path) -> None:
    agent, guests = health.agent_and_guests([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert not agent.ok and "answered 0 of 2" in agent.detail
    assert not guests.ok


@pytest.fixture
def listener() -> Iterator[tuple[int, list[bytes]]]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    banner: list[bytes] = [b"SSH-2.0-OpenSSH_9.9\r\n"]

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                connection.sendall(banner[0])

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1], banner
    server.close()


def test_sshd_is_listening_when_something_on_the_port_speaks_ssh(listener: tuple[int, list[bytes]]) -> None:
    port, banner = listener
    assert health.sshd_listening(port).ok
    banner[0] = b"HTTP/1.1 400\r\n"
    said = health.sshd_listening(port)
    assert not said.ok and "not SSH" in said.detail
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    free = closed.getsockname()[1]
    closed.close()
    assert not health.sshd_listening(free).ok


def test_operator_checks_pass_on_exit_zero_and_say_why_not(tmp_path: Path) -> None:
    assert health.operator_check("true").ok
    failed = health.operator_check("echo no bridge >&2; exit 4")
    assert (
        not failed.ok and failed.detail == "exit 4: no bridge" and failed.name == "check `echo no bridge >&2; exit 4`"
    )
    marker = tmp_path / "storage"
    assert not health.data_partition(marker).ok
    marker.write_text("persistent\n")
    assert health.data_partition(marker).ok


def test_checks_are_repeated_until_they_pass_or_the_deadline() -> None:
    now = [0.0]
    rounds: list[int] = []

    def clock() -> float:
        return now[0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    def checks() -> list[CheckResult]:
        rounds.append(1)
        return [CheckResult("sshd", len(rounds) >= 3, "not yet")]

    said: list[str] = []
    verdict = wait_healthy(checks, 60, said.append, clock, sleep)
    assert verdict.healthy and len(rounds) == 3 and verdict.seconds == pytest.approx(6.0)
    assert said == ["not healthy yet after 0s: sshd"]

    def never() -> list[CheckResult]:
        return [CheckResult("check `false`", False, "exit 1")]

    verdict = wait_healthy(never, 10, lambda line: None, clock, sleep)
    assert not verdict.healthy and verdict.reason == "check `false`: exit 1" and verdict.seconds >= 10
