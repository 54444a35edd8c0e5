"""A busy node is not a dead one: timeouts over the whole handshake, retries of refused or dropped
connections, and never a traceback; through the CLI, against listeners and a real sshd on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.cli import run_cli
from helpers.keys import make_key
from helpers.listeners import Listener
from helpers.sshd import Sshd, free_port

from appliance.nodes.client import CONNECT_TRIES


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_key(tmp_path_factory.mktemp("network-keys"))


def report(port: int, key: Path, home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("node", "report", f"root@127.0.0.1:{port}", "--key", str(key),
                   "--known-hosts", str(home / "known_hosts"), *extra, home=home)  # fmt: skip


def clean(result: subprocess.CompletedProcess[str]) -> bool:
    return "Traceback" not in result.stderr + result.stdout


def test_a_silent_node_is_a_clean_timeout_within_the_timeout(key: Path, tmp_path: Path) -> None:
    with Listener("silent") as listener:
        started = time.monotonic()
        result = report(listener.port, key, tmp_path, "--timeout", "2", "--json")
        took = time.monotonic() - started
    assert result.returncode == 1 and clean(result)
    assert f"127.0.0.1:{listener.port} accepted the connection but sent no SSH banner within 2s" in result.stderr
    assert json.loads(result.stdout)["error"]["code"] == "timeout"
    # Python's start and one try: a timeout is not retried (a busy node would take three times as long).
    assert took < 2 + 8 and listener.accepted == 1


def test_a_node_that_stalls_after_its_banner_times_out_too(key: Path, tmp_path: Path) -> None:
    with Listener("banner") as listener:
        result = report(listener.port, key, tmp_path, "--timeout", "2")
    assert result.returncode == 1 and clean(result)
    assert "accepted the connection but finished no SSH key exchange within 2s" in result.stderr


def test_a_dead_port_is_cannot_reach_after_the_retries(key: Path, tmp_path: Path) -> None:
    result = report(free_port(), key, tmp_path)
    assert result.returncode == 1 and clean(result)
    assert f"after {CONNECT_TRIES} tries: connection refused" in result.stderr and "cannot reach" in result.stderr


def test_a_node_that_drops_connections_is_tried_again_then_called_failed(key: Path, tmp_path: Path) -> None:
    with Listener("close") as listener:
        result = report(listener.port, key, tmp_path, "--json")
    assert result.returncode == 1 and clean(result)
    assert listener.accepted == CONNECT_TRIES
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "connection_failed"
    assert f"after {CONNECT_TRIES} tries" in error["message"] and "closed before the SSH handshake" in error["message"]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory, key: Path) -> Iterator[Sshd]:
    directory = tmp_path_factory.mktemp("busy-sshd")
    # One connection at a time may be in its handshake: the next is dropped, as a busy node's are.
    server = Sshd(directory, key.with_suffix(".pub").read_text().strip(), directory / "state", "MaxStartups 1\n")
    server.start()
    yield server
    server.stop()


def test_a_node_dropping_the_first_connections_is_reached_on_a_retry(sshd: Sshd, key: Path, tmp_path: Path) -> None:
    with Listener("forward", close_first=CONNECT_TRIES - 1, forward_to=sshd.port) as proxy:
        result = report(proxy.port, key, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "memory_total_bytes" in result.stdout and proxy.accepted == CONNECT_TRIES


def test_an_sshd_past_max_startups_is_retried_and_then_reached(sshd: Sshd, key: Path, tmp_path: Path) -> None:
    # A connection that never finishes its handshake holds sshd's one startup slot.
    holder = socket.create_connection(("127.0.0.1", sshd.port))
    try:
        assert holder.recv(256).startswith(b"SSH-2.0-")
        busy = report(sshd.port, key, tmp_path)
    finally:
        holder.close()
    assert busy.returncode == 1 and clean(busy)
    assert f"after {CONNECT_TRIES} tries" in busy.stderr and "MaxStartups" in busy.stderr
    assert report(sshd.port, key, tmp_path).returncode == 0
