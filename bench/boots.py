"""3-4. Boot the build in QEMU and time it: to SSH-ready and to agent-ready; then the node's memory, and
round-trips to its agent (for section 5).

The same runner `appliance boot --wait` uses (appliance.boot.vm.start_vm); agent-ready is the same
measure it prints as `ready after` (QEMU start to APPLIANCE-READY on the serial console). SSH-ready
is QEMU start to the first SSH connection whose agent answered agent.hello, tried every half second
from a thread while the console is watched.
"""

from __future__ import annotations

import io
import logging
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from figures import Section, mebibytes, median_text, summary
from round_trips import RoundTrips, connect_first_samples, open_channel_samples

from appliance.agent.accel import AccelChoice
from appliance.boot.boot import BootRequest, prepare_disk
from appliance.boot.vm import BootConfig, QemuError, RunningVm, VmPaths, free_local_port, start_vm
from appliance.build.render import READY_MARKER
from appliance.manifest import ArtifactKind, Manifest
from appliance.nodes.client import Node, NodeAddress, NodeError
from appliance.progress import Progress

MEMORY_MB = 2048
CPUS = 2
SSH_POLL_SECONDS = 0.5
TITLE_BOOT = "3. boot: QEMU start -> SSH-ready (connect + agent.hello) and -> agent-ready (APPLIANCE-READY)"
TITLE_MEMORY = "4. memory on the booted node (host.report)"


@dataclass(frozen=True)
class BootSample:
    media: str
    ssh_ready: float
    agent_ready: float
    memory_used_bytes: int
    agent_rss_bytes: int | None


class SshWatcher(threading.Thread):
    """Tries SSH + agent.hello until it answers; `seconds` is then the time since QEMU started."""

    def __init__(self, address: NodeAddress, key: Path, known_hosts: Path, vm: RunningVm) -> None:
        super().__init__(daemon=True)
        self.address, self.key, self.known_hosts, self.vm = address, key, known_hosts, vm
        self.seconds: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        # Until sshd listens, QEMU's port forward drops each connection: paramiko's transport thread
        # logs every such attempt as an error of its own. Expected here; the outcome is what counts.
        logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)
        while not self.stop.is_set() and self.vm.process.poll() is None:
            try:
                with Node(self.address, self.key, self.known_hosts, timeout=10) as node:
                    node.call("agent.hello")
                self.seconds = time.monotonic() - self.vm.started
                return
            except NodeError:
                self.stop.wait(SSH_POLL_SECONDS)


def boot_medium(build_dir: Path, media: str, accel: AccelChoice, timeout: float) -> Path:
    manifest = Manifest.load(build_dir)
    if media != "disk":
        return manifest.artifact(ArtifactKind.ISO)
    request = BootRequest(build_dir, True, timeout, accel.accel, "bios", MEMORY_MB, CPUS, media="disk", fresh_disk=True)
    return prepare_disk(request, manifest, VmPaths(build_dir / "run"), io.StringIO())


def boot_once(
    build_dir: Path, media: str, accel: AccelChoice, key: Path, work: Path, timeout: float, trips: RoundTrips,
    counts: tuple[int, int],
) -> BootSample:  # fmt: skip
    user = Manifest.load(build_dir).ssh_user
    config = BootConfig(
        media=boot_medium(build_dir, media, accel, timeout), accel=accel, ssh_port=free_local_port(),
        memory_mb=MEMORY_MB, cpus=CPUS, media_kind=media,
    )  # fmt: skip
    address = NodeAddress("127.0.0.1", config.ssh_port, user)
    known_hosts = work / f"known_hosts-boot-{media}"
    known_hosts.unlink(missing_ok=True)  # a fresh node makes a fresh host key
    vm = start_vm(config, VmPaths(build_dir / "run"))
    watcher = SshWatcher(address, key, known_hosts, vm)
    try:
        watcher.start()
        agent_ready = vm.wait_for_console(READY_MARKER, timeout)
        watcher.join(max(1.0, timeout - (time.monotonic() - vm.started)))
        if watcher.seconds is None:
            raise QemuError(f"no SSH answer from the node within {timeout:.0f}s of QEMU starting")
        with Node(address, key, known_hosts, timeout=60) as node:
            report: dict[str, Any] = node.call("host.report")
            trips.open_channel += open_channel_samples(node.call, counts[0])
        trips.connect_first += connect_first_samples(lambda: Node(address, key, known_hosts, timeout=60), counts[1])
    finally:
        watcher.stop.set()
        vm.stop()
    rss = report.get("agent_rss_bytes")
    return BootSample(
        media=media,
        ssh_ready=watcher.seconds,
        agent_ready=agent_ready,
        memory_used_bytes=int(report["memory_total_bytes"]) - int(report["memory_available_bytes"]),
        agent_rss_bytes=int(rss) if rss is not None else None,
    )


def has_disk(build_dir: Path) -> bool:
    return bool(Manifest.load(build_dir).artifacts_of(ArtifactKind.DISK_RAW))


def measure_boots(
    build_dir: Path, key: Path, accel: AccelChoice, work: Path, progress: Progress, runs: int, timeout: float,
    counts: tuple[int, int],
) -> tuple[Section, Section, RoundTrips]:  # fmt: skip
    boot = Section("boot", TITLE_BOOT)
    memory = Section("memory", TITLE_MEMORY)
    trips = RoundTrips(f"SSH, the booted node (QEMU {accel.accel}, user-net port forward)")
    media_list = ["iso", "disk"] if has_disk(build_dir) else ["iso"]
    if "disk" not in media_list:
        boot.reason = memory.reason = "the build has no NAME.raw: ISO media only"
    samples: list[BootSample] = []
    for media in media_list:
        for run in range(runs):
            with progress.step(f"boot {media} ({run + 1} of {runs}), {accel.accel}, {MEMORY_MB} MB, {CPUS} vCPUs"):
                sample = boot_once(build_dir, media, accel, key, work, timeout, trips, counts)
            progress.note(f"SSH-ready {sample.ssh_ready:.1f}s, agent-ready {sample.agent_ready:.1f}s")
            samples.append(sample)
    for media in media_list:
        add_media_rows(boot, memory, media, [sample for sample in samples if sample.media == media])
    boot.data["accel"] = {"accel": accel.accel, "reason": accel.reason}
    boot.data["guest"] = {"memory_mb": MEMORY_MB, "cpus": CPUS}
    return boot, memory, trips


def add_media_rows(boot: Section, memory: Section, media: str, samples: list[BootSample]) -> None:
    ssh = [sample.ssh_ready for sample in samples]
    ready = [sample.agent_ready for sample in samples]
    boot.add(f"{media}: QEMU start -> SSH-ready", median_text(ssh), "first SSH connect + agent.hello")
    boot.add(f"{media}: QEMU start -> agent-ready", median_text(ready), "APPLIANCE-READY (`boot --wait`)")
    boot.data[media] = {"ssh_ready": summary(ssh), "agent_ready": summary(ready)}
    used = [sample.memory_used_bytes for sample in samples]
    memory.add(f"{media}: in use after boot", mebibytes(statistics.median(used)), "MemTotal - MemAvailable, median")
    rss = [sample.agent_rss_bytes for sample in samples if sample.agent_rss_bytes is not None]
    if rss:
        memory.add(f"{media}: agent RSS while serving", mebibytes(statistics.median(rss)), "VmRSS of the agent")
    else:
        memory.add(f"{media}: agent RSS while serving", "n/a", "this build's agent predates agent_rss_bytes")
    memory.data[media] = {"memory_used_bytes": used, "agent_rss_bytes": rss}
