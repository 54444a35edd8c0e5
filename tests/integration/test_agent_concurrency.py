"""Many operators at once: each SSH session is its own agent process, all on one node's state.

QEMU's QMP socket takes one client at a time; agents queue on the guest's
monitor lock instead of failing, so every session sees the true state and
every operation succeeds or fails for its own reason.
"""

from __future__ import annotations

import threading
from collections import Counter

from helpers.agent_process import AgentProcess, StartAgent

from appliance.agent.accel import PROBE_BOOT_SECTOR

SESSIONS = 32
ROUNDS = 3
GUEST = {"name": "busy", "vcpus": 1, "memory_mib": 32, "disks": [{"base_image": "marker"}]}


def test_32_sessions_listing_while_another_stops_reboots_and_starts_a_guest(
    agent: AgentProcess, start_agent: StartAgent
) -> None:
    assert "result" in agent.import_image("marker", PROBE_BOOT_SECTOR.ljust(1 << 20, b"\0"))
    agent.result("guest.create", GUEST)
    listers = [start_agent() for _ in range(SESSIONS)]
    done = threading.Event()
    seen: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def keep_listing(session: AgentProcess) -> None:
        while not done.is_set():
            reply = session.call("guest.list")
            with lock:
                if "error" in reply:
                    failures.append(f"guest.list: {reply['error']}")
                    return
                seen.update(guest["state"] for guest in reply["result"])

    threads = [threading.Thread(target=keep_listing, args=(session,)) for session in listers]
    for thread in threads:
        thread.start()
    operations = []
    try:
        for _ in range(ROUNDS):
            for method, params in (
                ("guest.start", {"name": "busy"}),
                ("guest.reboot", {"name": "busy"}),
                ("guest.pause", {"name": "busy"}),
                ("guest.resume", {"name": "busy"}),
                ("guest.info", {"name": "busy"}),
                ("guest.stop", {"name": "busy", "timeout": 1}),  # the boot sector ignores ACPI: forced
            ):
                reply = agent.call(method, params)
                operations.append(method)
                if "error" in reply:
                    failures.append(f"{method}: {reply['error']}")
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=120)
    assert failures == []
    assert len(operations) == 6 * ROUNDS
    assert "unknown" not in seen, seen
    assert seen["running"] > 0 and seen["stopped"] > 0, seen
