"""A guest's consoles through a real agent: its serial console attached interactively (the tiny guest's
shell answers), one attach at a time, the log kept meanwhile; its display's VNC server relayed; and a
connection that switched to a relay never read as requests again."""

from __future__ import annotations

import json
import os
import signal

import pytest
from helpers.agent_process import AgentProcess, StartAgent
from helpers.relay import attach, read_to_end, read_until, send_raw
from helpers.tiny_guest import TINY_GUEST_MARKER, TinyGuest, build_tiny_guest
from helpers.waiting import wait_until

from appliance.agent.accel import PROBE_BOOT_SECTOR, PROBE_MARKER

DEADLINE = 120.0
MARKER_DISK = PROBE_BOOT_SECTOR.ljust(1 << 20, b"\0")


@pytest.fixture(scope="module")
def tiny_guest(tmp_path_factory: pytest.TempPathFactory) -> TinyGuest:
    return build_tiny_guest(tmp_path_factory.mktemp("tiny-guest"))


def console_log(agent: AgentProcess, name: str) -> str:
    text: str = agent.result("guest.console", {"name": name})["text"]
    return text


@pytest.mark.slow
def test_a_line_typed_into_the_console_reaches_the_guests_shell_and_one_attach_at_a_time(
    agent: AgentProcess, start_agent: StartAgent, tiny_guest: TinyGuest
) -> None:
    assert "result" in agent.import_image("tiny-vmlinuz", tiny_guest.kernel.read_bytes())
    assert "result" in agent.import_image("tiny-initrd", tiny_guest.initrd.read_bytes())
    boot = {"kernel_image": "tiny-vmlinuz", "initrd_image": "tiny-initrd", "cmdline": tiny_guest.cmdline}
    agent.result("guest.create", {"name": "tiny", "memory_mib": 256, "kernel_boot": boot})
    agent.result("guest.start", {"name": "tiny"})
    wait_until(lambda: TINY_GUEST_MARKER in console_log(agent, "tiny"), DEADLINE, "the tiny guest's marker")

    attached = start_agent()
    reply, early = attach(attached, "guest.console_attach", {"name": "tiny"})
    assert reply["result"] == {"name": "tiny", "attached": "serial"}
    stdout = attached.process.stdout
    assert stdout is not None
    send_raw(attached, b"echo $((6 * 7))-answer\n")
    # The shell's answer, not the echo of what was typed: the line was run.
    read_until(stdout.fileno(), b"42-answer", DEADLINE, early)

    second = start_agent()
    refused, _ = attach(second, "guest.console_attach", {"name": "tiny"})
    assert refused["error"]["data"]["code"] == "console_busy", refused
    assert "one interactive attach at a time" in refused["error"]["message"]
    assert second.process.wait(timeout=30) == 0  # a refused relay ends its connection
    # The log goes on while attached.
    assert "42-answer" in console_log(agent, "tiny")

    assert attached.process.stdin is not None
    attached.process.stdin.close()  # the client leaves: the relay, and its connection, end
    read_to_end(stdout.fileno(), 30)
    assert attached.process.wait(timeout=30) == 0

    again = start_agent()
    reply, early = attach(again, "guest.console_attach", {"name": "tiny"})
    assert "result" in reply, reply
    send_raw(again, b"echo again-$((1 + 1))\n")
    assert again.process.stdout is not None
    read_until(again.process.stdout.fileno(), b"again-2", DEADLINE, early)
    # An attached agent killed outright lets go of the console too.
    os.kill(again.process.pid, signal.SIGKILL)
    again.process.wait(timeout=30)
    last = start_agent()
    assert "result" in attach(last, "guest.console_attach", {"name": "tiny"})[0]
    assert agent.result("guest.kill", {"name": "tiny"})["killed"]
    assert last.process.stdout is not None
    read_to_end(last.process.stdout.fileno(), 30)  # the guest went: the relay ends


def test_the_display_relays_qemus_vnc_server_and_only_for_a_guest_with_a_display(
    agent: AgentProcess, start_agent: StartAgent
) -> None:
    assert "result" in agent.import_image("marker", MARKER_DISK)
    agent.result("guest.create", {"name": "g1", "memory_mib": 32, "disks": [{"base_image": "marker"}], "display": True})
    agent.result("guest.create", {"name": "plain", "memory_mib": 32, "disks": [{"base_image": "marker"}]})
    assert agent.error_code("guest.display_attach", {"name": "g1"}) == "guest_not_running"
    agent = start_agent()  # that refusal ended the connection
    agent.result("guest.start", {"name": "g1"})
    agent.result("guest.start", {"name": "plain"})
    wait_until(lambda: PROBE_MARKER.decode() in console_log(agent, "g1"), 60, "the marker")

    viewer = start_agent()
    reply, early = attach(viewer, "guest.display_attach", {"name": "g1"})
    assert reply["result"] == {"name": "g1", "attached": "display"}
    assert viewer.process.stdout is not None
    greeting = read_until(viewer.process.stdout.fileno(), b"\n", 30, early)
    assert greeting == b"RFB 003.008\n"
    # QEMU's VNC server takes several viewers at once.
    other = start_agent()
    reply, early = attach(other, "guest.display_attach", {"name": "g1"})
    assert other.process.stdout is not None
    assert read_until(other.process.stdout.fileno(), b"\n", 30, early) == b"RFB 003.008\n"

    plain = start_agent()
    refused, _ = attach(plain, "guest.display_attach", {"name": "plain"})
    assert refused["error"]["data"]["code"] == "no_display"
    assert "set display true" in refused["error"]["message"]
    # The plain guest's console is a socket as well as its log.
    assert PROBE_MARKER.decode() in console_log(agent, "plain")


def test_a_refused_relay_request_ends_the_connection_so_what_follows_is_never_a_request(
    start_agent: StartAgent,
) -> None:
    for line in (
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "guest.console_attach", "params": {"name": "nope"}}),
        '{"jsonrpc": "2.0", "id": 1, "method": "guest.console_attach", "params": {"name": ',  # not JSON
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "guest.display_attach", "params": {"bogus": 1}}),
    ):
        agent = start_agent()
        hello = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "agent.hello"})
        # What a client typing too early would send: bytes that look like a request.
        send_raw(agent, line.encode() + b"\n" + hello.encode() + b"\n")
        assert agent.process.stdout is not None
        replies = read_to_end(agent.process.stdout.fileno(), 30).splitlines()
        assert len(replies) == 1 and "error" in json.loads(replies[0]), replies
        assert agent.process.wait(timeout=30) == 0
