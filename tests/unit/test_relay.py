"""The operator's side of a console: the terminal in raw mode and back, the escape key, the relay's ends."""

from __future__ import annotations

import os
import pty
import socket
import termios
from collections.abc import Iterator
from typing import Any, cast

import pytest

from appliance.nodes.client import Relay
from appliance.nodes.relay import console_session, pump, raw_terminal


@pytest.fixture
def terminal() -> Iterator[int]:
    master, slave = pty.openpty()
    yield slave
    os.close(slave)
    os.close(master)


def test_the_terminal_is_raw_while_attached_and_as_it_was_after_even_on_an_error(terminal: int) -> None:
    before = termios.tcgetattr(terminal)
    with pytest.raises(RuntimeError), raw_terminal(terminal):
        raw = termios.tcgetattr(terminal)
        assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG)  # Ctrl-C is the guest's
        raise RuntimeError("the connection broke")
    assert termios.tcgetattr(terminal) == before


def test_sigterm_while_attached_restores_the_terminal_too(terminal: int) -> None:
    before = termios.tcgetattr(terminal)
    with pytest.raises(SystemExit) as ended, raw_terminal(terminal):
        os.kill(os.getpid(), 15)
    assert ended.value.code == 128 + 15 and termios.tcgetattr(terminal) == before


def session(early: bytes = b"") -> tuple[Relay, socket.socket, int, int, int, int]:
    """A console session's ends: the relay (a socket pair stands in for the SSH channel), the node's side
    of it, and the ends of pipes standing in for the terminal's input and output."""
    ours, node = socket.socketpair()
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    return Relay(cast(Any, ours), {}, early), node, stdin_read, stdin_write, stdout_read, stdout_write


def test_keys_go_to_the_console_until_the_escape_key_and_its_output_comes_back() -> None:
    relay, node, stdin_read, stdin_write, stdout_read, stdout_write = session(early=b"login: ")
    node.sendall(b"hello\r\n")
    os.write(stdin_write, b"ls\r\x03more\x1dignored")
    assert console_session(relay, stdin_read, stdout_write) == "escape"
    assert node.recv(100) == b"ls\r\x03more"  # what came before Ctrl-], Ctrl-C included
    assert os.read(stdout_read, 100) == b"login: hello\r\n"
    assert node.recv(100) == b""  # the session closed its channel


def test_the_session_ends_when_the_console_closes_or_input_ends() -> None:
    relay, node, stdin_read, _, _, stdout_write = session()
    node.close()
    assert console_session(relay, stdin_read, stdout_write) == "closed"
    relay, node, stdin_read, stdin_write, _, stdout_write = session()
    os.close(stdin_write)
    assert console_session(relay, stdin_read, stdout_write) == "end of input"


def test_a_display_relay_moves_bytes_both_ways_and_closes_both_ends() -> None:
    viewer, ours = socket.socketpair()
    channel, agent = socket.socketpair()
    agent.sendall(b"RFB 003.008\n")
    viewer.sendall(b"RFB 003.008\n")
    viewer.shutdown(socket.SHUT_WR)
    pump(ours, channel)
    assert viewer.recv(100) == b"RFB 003.008\n" and agent.recv(100) == b"RFB 003.008\n"
    assert agent.recv(100) == b""
