"""6b. Guest start with a bridged NIC against the same guest on user-mode NAT (target: at most 1.5x).

In a network namespace made (and removed) here: a bridge, the root tap helper
behind its socket as systemd runs it on a node, and the agent. The tiny guest
is started through the agent with one NIC, each way, and `guest.start`'s
answer timed (QEMU started, its NIC attached; the guest's own boot is the same
either way). A default route in the namespace is all passt (user-mode NAT)
needs; no packet leaves the namespace.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from figures import Section, median_text
from helpers.agent_process import AgentProcess
from helpers.netns import network_namespace
from helpers.tiny_guest import TinyGuest

from appliance.progress import Progress

TITLE = "6b. guest start: a bridged NIC vs user-mode NAT (agent, tiny guest, TCG)"
BRIDGE = "brbench"
TARGET_RATIO = 1.5


def time_starts(agent: AgentProcess, name: str, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        agent.result("guest.start", {"name": name})
        samples.append(time.perf_counter() - started)
        agent.result("guest.kill", {"name": name})
    return samples


def measure_bridged_start(work: Path, progress: Progress, guest: TinyGuest, runs: int) -> Section:
    section = Section("bridged", TITLE)
    directory = work / "bridged"
    directory.mkdir(parents=True, exist_ok=True)
    with network_namespace("bench") as namespace:
        namespace.add_bridge(BRIDGE, "10.78.0.1/24")
        namespace.ip("route", "add", "default", "via", "10.78.0.254", "dev", BRIDGE)
        socket_path = directory / "tap-helper.sock"
        config = directory / "agent.toml"
        config.write_text(f'[network]\nallowed_bridges = ["{BRIDGE}"]\ntap_helper_socket = "{socket_path}"\n')
        namespace.tap_helper(socket_path, config)
        agent = AgentProcess(directory / "state", config=config, wrapper=namespace.exec_prefix())
        try:
            agent.import_image("tiny-vmlinuz", guest.kernel.read_bytes())
            agent.import_image("tiny-initrd", guest.initrd.read_bytes())
            boot = {"kernel_image": "tiny-vmlinuz", "initrd_image": "tiny-initrd", "cmdline": guest.cmdline}
            for name, nic in (("nat", {"user": True}), ("bridged", {"bridge": BRIDGE})):
                agent.result("guest.create", {"name": name, "memory_mib": 128, "kernel_boot": boot, "nics": [nic]})
            with progress.step(f"guest.start with user-mode NAT and with a bridged NIC, {runs} runs each"):
                time_starts(agent, "nat", 1)  # warm: page cache, the first passt and helper starts
                nat = time_starts(agent, "nat", runs)
                bridged = time_starts(agent, "bridged", runs)
        finally:
            agent.kill_running_guests()
            agent.kill()
    ratio = statistics.median(bridged) / statistics.median(nat)
    section.add("guest.start, user-mode NAT (passt)", median_text(nat))
    section.add("guest.start, bridged NIC (tap from the root helper)", median_text(bridged))
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    section.add("ratio bridged / NAT", f"{ratio:.2f}x", f"target <= {TARGET_RATIO}x: {verdict}")
    section.data = {"nat": nat, "bridged": bridged, "ratio": ratio, "target": TARGET_RATIO}
    return section
