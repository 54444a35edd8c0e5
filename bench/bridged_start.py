"""6b. Guest start with a bridged NIC against the same guest on user-mode NAT (target: at most 1.5x).

In a network namespace made (and removed) here: a bridge, the root tap helper
behind its socket as systemd runs it on a node, and the agent. The tiny guest
is started through the agent with one NIC, each way, and `guest.start`'s
answer timed (QEMU started, its NIC attached; the guest's own boot is the same
either way). A default route in the namespace is all passt (user-mode NAT)
needs; no packet leaves the namespace (the bridge's uplink is a veth whose
other end is in the namespace too).

The same bridged start under libvirt, for the ratio (unless --skip libvirt):
a libvirtd of the bench's own runs in the namespace (libvirt_peer.py:
libvirt_in_namespace), where it makes the guest's tap on the same bridge, and
`virsh create` of the same guest with `<interface type='bridge'>` is timed
until it returns (QEMU started and running). The starts take turns (NAT,
bridged, libvirt's bridged), so load from elsewhere falls on all alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from figures import Section, median_text, summary
from helpers.agent_process import AgentProcess
from helpers.netns import Namespace, network_namespace
from helpers.tiny_guest import TinyGuest
from libvirt_peer import destroy, domain_xml, ensure_packages, libvirt_in_namespace, state_of, virsh

from appliance.progress import Progress

TITLE = "6b. guest start: a bridged NIC vs user-mode NAT (agent, tiny guest, TCG)"
BRIDGE = "brbench"
TARGET_RATIO = 1.5
DOMAIN = "appliance-bench-bridged"
MEMORY_MIB = 128


def start_once(agent: AgentProcess, name: str) -> float:
    """Seconds guest.start took to answer; the guest is killed afterwards."""
    started = time.perf_counter()
    agent.result("guest.start", {"name": name})
    seconds = time.perf_counter() - started
    agent.result("guest.kill", {"name": name})
    return seconds


class LibvirtBridged:
    """The same guest and bridged NIC, started by the namespace's libvirtd with `virsh create`."""

    def __init__(self, directory: Path, guest: TinyGuest, uri: str, run_dir: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o777)  # libvirt's QEMU runs as libvirt-qemu and writes the console here
        self.xml = directory / f"{DOMAIN}.xml"
        self.xml.write_text(domain_xml(DOMAIN, guest.kernel, guest.initrd, guest.cmdline, MEMORY_MIB, 1,
                                       directory / "console.log", bridge=BRIDGE))  # fmt: skip
        self.uri = uri
        self.run_dir = run_dir
        self.running = False

    def start_once(self) -> float:
        started = time.perf_counter()
        virsh("create", str(self.xml), uri=self.uri)
        seconds = time.perf_counter() - started
        self.running = True
        self.stop()
        return seconds

    def stop(self) -> None:
        if self.running:
            destroy(DOMAIN, self.uri, self.run_dir)
            self.running = False


@contextmanager
def libvirt_bridged(
    namespace: Namespace, directory: Path, guest: TinyGuest, progress: Progress, section: Section
) -> Iterator[LibvirtBridged]:
    ensure_packages(progress)
    with libvirt_in_namespace(namespace.exec_prefix(), directory / "libvirt-run", progress) as libvirt:
        section.data["libvirt_state"] = state_of(libvirt.daemons) + ", in the bench's network namespace"
        side = LibvirtBridged(directory / "libvirt", guest, libvirt.uri, libvirt.run_dir)
        try:
            yield side
        finally:
            side.stop()


def alternate(starts: list[Callable[[], float]], runs: int) -> list[list[float]]:
    """One untimed start each (the page cache, the first passt, tap helper and libvirt starts), then RUNS
    timed ones each, taking turns, so that load from elsewhere on the machine falls on all alike."""
    for start in starts:
        start()
    samples: list[list[float]] = [[] for _ in starts]
    for _ in range(runs):
        for start, taken in zip(starts, samples, strict=True):
            taken.append(start())
    return samples


def measure_bridged_start(
    work: Path, progress: Progress, guest: TinyGuest, runs: int, with_libvirt: bool = True
) -> Section:
    section = Section("bridged", TITLE)
    libvirt: list[float] = []
    directory = work / "bridged"
    directory.mkdir(parents=True, exist_ok=True)
    with network_namespace("bench") as namespace:
        namespace.add_bridge(BRIDGE, "10.78.0.1/24")
        # An uplink port, as a node's br0 has its NIC: a bridge's carrier is its ports', so once a guest's
        # tap has come and gone a bridge with no other port has none, its default route is linkdown and
        # passt finds no usable interface (the NAT starts now take turns with bridged ones).
        namespace.ip("link", "add", "uplink0", "type", "veth", "peer", "name", "uplink0p")
        namespace.ip("link", "set", "uplink0", "master", BRIDGE, "up")
        namespace.ip("link", "set", "uplink0p", "up")
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
                params = {"name": name, "memory_mib": MEMORY_MIB, "kernel_boot": boot, "nics": [nic]}
                agent.result("guest.create", params)
            starts: list[Callable[[], float]] = [lambda: start_once(agent, "nat"), lambda: start_once(agent, "bridged")]
            peers = "user-mode NAT and bridged" + (", and libvirt's bridged start" if with_libvirt else "")
            step = f"guest.start with {peers}: 1 warm-up + {runs} runs each, alternating"
            if with_libvirt:
                with libvirt_bridged(namespace, directory, guest, progress, section) as peer, progress.step(step):
                    nat, bridged, libvirt = alternate([*starts, peer.start_once], runs)
            else:
                with progress.step(step):
                    nat, bridged = alternate(starts, runs)
        finally:
            agent.kill_running_guests()
            agent.kill()
    ratio = statistics.median(bridged) / statistics.median(nat)
    section.add("guest.start, user-mode NAT (passt)", median_text(nat))
    section.add("guest.start, bridged NIC (tap from the root helper)", median_text(bridged))
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    section.add("ratio bridged / NAT", f"{ratio:.2f}x", f"target <= {TARGET_RATIO}x: {verdict}")
    section.data.update({"nat": nat, "bridged": bridged, "ratio": ratio, "target": TARGET_RATIO})
    if with_libvirt:
        section.add("libvirt: virsh create, bridged NIC (libvirt's tap)", median_text(libvirt),
                    "until virsh returned, its own start included")  # fmt: skip
        peer_ratio = statistics.median(libvirt) / statistics.median(bridged)
        section.add("ratio libvirt / agent, bridged", f"{peer_ratio:.2f}x", "median/median, command returned")
        section.data.update({"libvirt": summary(libvirt), "libvirt_ratio": peer_ratio})
        section.reason = section.data["libvirt_state"]
    else:
        section.reason = "libvirt skipped (--skip libvirt)"
    return section
