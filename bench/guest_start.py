"""6. Guest start latency: the tiny guest (tests/tiny_guest.py) through the agent, and the same guest by libvirt.

Both sides run the same kernel, initrd, command line, memory and vCPUs under
TCG, with the serial console going to a file the bench watches for the
guest's marker. Runs alternate between the two (agent, libvirt, agent, ...)
so that load from elsewhere on the machine falls on both alike; one untimed
warm-up start each comes first.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from figures import Section, mebibytes, median_text, summary
from helpers.agent_process import AgentProcess
from helpers.tiny_guest import TINY_GUEST_MARKER, TinyGuest, build_tiny_guest
from libvirt_peer import RunningDaemon, destroy, domain_xml, ensure_packages, libvirt_daemons, state_of, virsh

from appliance.agent.host import read_rss
from appliance.progress import Progress

GUEST = "tiny"
DOMAIN = "appliance-bench-tiny"
MEMORY_MIB = 256
VCPUS = 1
MARKER_TIMEOUT = 300.0
# Seen while writing this bench (strace of libvirtd): on a fresh install here every libvirt API call
# re-probed QEMU until a capabilities cache had been written (it was, once libvirtd ran with /dev/kvm hidden).
SLOW_VIRSH_SECONDS = 1.0
LIBVIRT_NOTE = (
    "`virsh version` took over 1 s: libvirtd is re-probing QEMU's capabilities (2 QEMU launches) on every "
    "API call, as seen on a fresh install here (/dev/kvm exists but KVM cannot run guests, and no valid "
    "capabilities cache in /var/cache/libvirt/qemu); these libvirt figures are this host's, not libvirt's best"
)
TITLE = "6. guest start: the tiny guest through the agent vs the same guest by libvirt (TCG, this host)"


@dataclass
class StartSamples:
    """Seconds from asking to start: until the command returned, and until the guest's marker."""

    returned: list[float] = field(default_factory=list)
    marker: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"returned": summary(self.returned), "marker": summary(self.marker)}


def wait_for_marker(console: Path, started: float) -> float:
    wanted = TINY_GUEST_MARKER.encode()
    deadline = started + MARKER_TIMEOUT
    while time.perf_counter() < deadline:
        try:
            if wanted in console.read_bytes():
                return time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.01)
    raise TimeoutError(f"no {TINY_GUEST_MARKER} in {console} after {MARKER_TIMEOUT:.0f}s")


class AgentSide:
    """An agent on pipes (like tests/agent_process.py) with the tiny guest imported and defined."""

    def __init__(self, work: Path, guest: TinyGuest) -> None:
        self.agent = AgentProcess(work / "agent" / "state", accel="tcg")
        self.agent.import_image("tiny-vmlinuz", guest.kernel.read_bytes())
        self.agent.import_image("tiny-initrd", guest.initrd.read_bytes())
        kernel_boot = {"kernel_image": "tiny-vmlinuz", "initrd_image": "tiny-initrd", "cmdline": guest.cmdline}
        params = {"name": GUEST, "vcpus": VCPUS, "memory_mib": MEMORY_MIB, "kernel_boot": kernel_boot}
        self.agent.result("guest.create", params)
        self.console = Path(self.agent.result("guest.info", {"name": GUEST})["console_log"])

    def start_once(self, samples: StartSamples | None) -> None:
        started = time.perf_counter()
        self.agent.result("guest.start", {"name": GUEST})
        returned = time.perf_counter() - started
        marker = wait_for_marker(self.console, started)
        self.agent.result("guest.kill", {"name": GUEST})
        if samples is not None:
            samples.returned.append(returned)
            samples.marker.append(marker)

    def rss(self) -> int:
        return read_rss(Path(f"/proc/{self.agent.process.pid}/status"))

    def close(self) -> None:
        if self.agent.process.poll() is None:
            if self.agent.result("guest.info", {"name": GUEST})["state"] != "stopped":
                self.agent.call("guest.kill", {"name": GUEST})
            self.agent.kill()


class LibvirtSide:
    def __init__(self, work: Path, guest: TinyGuest) -> None:
        directory = work / "libvirt"
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o777)  # libvirt's QEMU runs as libvirt-qemu and writes the console here
        self.console = directory / "console.log"
        self.xml = directory / f"{DOMAIN}.xml"
        self.xml.write_text(
            domain_xml(DOMAIN, guest.kernel, guest.initrd, guest.cmdline, MEMORY_MIB, VCPUS, self.console)
        )
        self.running = False

    def start_once(self, samples: StartSamples | None) -> None:
        self.console.unlink(missing_ok=True)
        started = time.perf_counter()
        virsh("create", str(self.xml))
        self.running = True
        returned = time.perf_counter() - started
        marker = wait_for_marker(self.console, started)
        self.stop()
        if samples is not None:
            samples.returned.append(returned)
            samples.marker.append(marker)

    def stop(self) -> None:
        if self.running:
            destroy(DOMAIN)
            self.running = False


def ratio(peer: list[float], ours: list[float]) -> str:
    return f"{statistics.median(peer) / statistics.median(ours):.2f}x"


def measure_guest_starts(work: Path, progress: Progress, runs: int, with_libvirt: bool) -> Section:
    section = Section("guests", TITLE)
    with progress.step("build the tiny guest (Debian cloud kernel + busybox initramfs)"):
        guest = build_tiny_guest(work / "tiny-guest")
    # Readable by libvirt's QEMU, which runs as another user.
    for path in (work / "tiny-guest", guest.kernel, guest.initrd):
        path.chmod(0o755)
    agent_side = AgentSide(work, guest)
    agent = StartSamples()
    libvirt = StartSamples()
    try:
        if with_libvirt:
            ensure_packages(progress)
            with libvirt_daemons(progress) as daemons:
                libvirt_side = LibvirtSide(work, guest)
                try:
                    virsh_noop = [timed_virsh_version() for _ in range(runs)]
                    alternate(progress, runs, [(agent_side.start_once, agent), (libvirt_side.start_once, libvirt)])
                    daemons_rss = sum(read_rss(Path(f"/proc/{daemon.pid}/status")) for daemon in daemons)
                    section.data["libvirt_version"] = virsh("version").strip().splitlines()
                finally:
                    libvirt_side.stop()
                add_daemon_rows(section, daemons, daemons_rss, virsh_noop)
        else:
            alternate(progress, runs, [(agent_side.start_once, agent)])
        agent_rss = agent_side.rss()
    finally:
        agent_side.close()
    add_rows(section, agent, libvirt if with_libvirt else None, agent_rss)
    section.data.update({"memory_mib": MEMORY_MIB, "vcpus": VCPUS, "accel": "tcg", "cmdline": guest.cmdline})
    section.data["agent"] = agent.to_json()
    if with_libvirt:
        section.data["libvirt"] = libvirt.to_json()
    else:
        section.reason = "libvirt skipped (--skip libvirt)"
    return section


def alternate(progress: Progress, runs: int, sides: list[tuple[Callable[[StartSamples | None], None], Any]]) -> None:
    with progress.step(f"guest starts: 1 warm-up + {runs} runs, {len(sides)} way(s), alternating"):
        for run in range(runs + 1):
            for start_once, samples in sides:
                start_once(samples if run else None)


def timed_virsh_version() -> float:
    started = time.perf_counter()
    virsh("version")
    return time.perf_counter() - started


def add_daemon_rows(section: Section, daemons: list[RunningDaemon], rss: int, noop: list[float]) -> None:
    state = state_of(daemons)
    section.data["libvirt_state"] = state
    section.reason = state
    section.add("virsh version (client start + connect, no guest)", median_text(noop), "what every virsh call pays")
    names = " + ".join(daemon.name for daemon in daemons)
    section.add(f"{names} RSS", mebibytes(rss), "resident all the time")
    section.data["virsh_noop"] = summary(noop)
    if statistics.median(noop) > SLOW_VIRSH_SECONDS:
        section.data["libvirt_note"] = LIBVIRT_NOTE
        section.reason = f"{state}; {LIBVIRT_NOTE}"
    section.data["libvirt_daemons_rss_bytes"] = rss


def add_rows(section: Section, agent: StartSamples, libvirt: StartSamples | None, agent_rss: int) -> None:
    section.add("agent: guest.start returned (open pipe)", median_text(agent.returned))
    section.add("agent: start -> TINY-GUEST-READY", median_text(agent.marker))
    if libvirt is not None:
        section.add("libvirt: virsh create returned", median_text(libvirt.returned))
        section.add("libvirt: virsh create -> TINY-GUEST-READY", median_text(libvirt.marker))
        section.add("ratio libvirt/agent, command returned", ratio(libvirt.returned, agent.returned), "median/median")
        section.add("ratio libvirt/agent, to the marker", ratio(libvirt.marker, agent.marker), "median/median")
    section.add("agent RSS after the starts", mebibytes(agent_rss), "one agent per SSH connection; none when idle")
    section.data["agent_rss_bytes"] = agent_rss
    section.data["note"] = "console polled every 10 ms; virsh times include starting the virsh client"
