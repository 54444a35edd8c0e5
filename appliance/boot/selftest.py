"""`appliance selftest DIR`: the whole system, checked on a user's own build, step by step.

Boots the build in QEMU, and over SSH with the operator key: takes the host
report, pushes a tiny guest image, creates and starts an autostart guest
inside the node (nested) and waits for its console marker, reconnects (a new
agent) and finds the guest still running, then — from a disk, whose data
partition keeps state — shuts the node down, boots it again, and finds the
guest running again with its definition and the node with the same host key.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from appliance.agent.accel import PROBE_BOOT_SECTOR, PROBE_MARKER
from appliance.boot.boot import DEFAULT_DISK_GIB, GIB, BootRequest, BootResult, boot
from appliance.boot.vm import VmPaths, stop_recorded_vm
from appliance.errors import ApplianceError
from appliance.manifest import ArtifactKind, Manifest
from appliance.nodes.client import Node, NodeAddress
from appliance.progress import Progress

GUEST = "selftest"
IMAGE = "selftest-marker"
# A boot sector that prints PROBE_MARKER: boots in well under a second even nested under TCG.
# SeaBIOS does not boot a one-sector disk; a megabyte it does.
GUEST_IMAGE = PROBE_BOOT_SECTOR.ljust(1 << 20, b"\0")
SHUTDOWN_SECONDS = 180.0


class SelftestError(ApplianceError):
    """A step of the selftest failed; the message names the step and what was seen."""


@dataclass(frozen=True)
class SelftestOptions:
    out_dir: Path
    key: Path | None  # None: the keys ssh would use (appliance.nodes.keys)
    media: str  # "disk", "iso" or "auto" (the disk when the build has one)
    boot_timeout: float
    guest_timeout: float


@dataclass(frozen=True)
class Report:
    """The selftest's steps, printed (with their seconds) by Progress; a failure inside a step
    becomes a SelftestError that names it."""

    progress: Progress

    @property
    def steps(self) -> list[tuple[str, float]]:
        return self.progress.finished

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        try:
            with self.progress.step(name):
                yield
        except SelftestError:
            raise
        except Exception as error:
            raise SelftestError(f"{name}: {error}") from error


def choose_media(options: SelftestOptions) -> str:
    if options.media != "auto":
        return options.media
    return "disk" if Manifest.load(options.out_dir).artifacts_of(ArtifactKind.DISK_RAW) else "iso"


def boot_node(options: SelftestOptions, media: str, fresh: bool, say: TextIO) -> BootResult:
    request = BootRequest(
        out_dir=options.out_dir,
        wait=True,
        timeout=options.boot_timeout,
        accel="auto",
        firmware="bios",
        memory_mb=2048,
        cpus=2,
        media=media,
        fresh_disk=fresh,
    )
    return boot(request, say)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    raise SelftestError(f"{what}: not seen within {timeout:.0f}s")


def guest_state(node: Node) -> dict[str, Any]:
    info: dict[str, Any] = node.call("guest.info", {"name": GUEST}, idempotent=True)
    return info


def marker_shown(node: Node) -> bool:
    text = str(node.call("guest.console", {"name": GUEST}, idempotent=True)["text"])
    return PROBE_MARKER.decode() in text


def check_data_partition(host: dict[str, Any]) -> None:
    """Booted from the disk: state on the data partition, grown from its 64 MiB to fill the disk."""
    if host.get("state_storage") != "persistent":
        raise SelftestError(f"the node keeps its state in {host.get('state_storage')}, not on its data partition")
    grown_at_least = DEFAULT_DISK_GIB * GIB // 2
    if int(host["storage_total_bytes"]) < grown_at_least:
        raise SelftestError(
            f"the data partition holds {int(host['storage_total_bytes']) / GIB:.2f} GiB of the "
            f"{DEFAULT_DISK_GIB} GiB disk: it was not grown at boot"
        )


def selftest(options: SelftestOptions, say: TextIO) -> Report:
    report = Report(Progress(say, interactive=False))
    media = choose_media(options)
    paths = VmPaths(options.out_dir / "run")
    # A fresh known_hosts per run: the node's key is checked across its reboot, not against older builds.
    with tempfile.TemporaryDirectory(prefix="appliance-selftest-") as scratch_name:
        scratch = Path(scratch_name)
        known_hosts = scratch / "known_hosts"
        image = scratch / f"{IMAGE}.img"
        image.write_bytes(GUEST_IMAGE)
        try:
            run_steps(options, media, report, known_hosts, image, say)
        finally:
            stop_recorded_vm(paths)
    return report


def run_steps(
    options: SelftestOptions, media: str, report: Report, known_hosts: Path, image: Path, say: TextIO
) -> None:
    with report.step(f"boot the {media} image in QEMU to the ready marker"):
        booted = boot_node(options, media, fresh=True, say=say)
    address = NodeAddress("127.0.0.1", booted.ssh_port, "appliance")
    with (
        report.step("connect over SSH with the operator key and take the host report"),
        connected(address, options, known_hosts) as node,
    ):
        host = node.call("host.report", idempotent=True)
        fingerprint = node.host_key_fingerprint()
        if media == "disk":
            check_data_partition(host)
        say.write(
            f"  {host['hostname']} build {host['build_id']}, accelerator {host['accelerator']}, "
            f"guests run as {host.get('guest_supervisor', 'processes')}, state in {host.get('state_storage')} "
            f"{host.get('state_device') or ''} ({int(host['storage_total_bytes']) / GIB:.1f} GiB), "
            f"host key {fingerprint}\n"
        )
    with connected(address, options, known_hosts) as node:
        with report.step("push a tiny guest image"):
            node.push_image(image, IMAGE)
        with report.step("create and start an autostart guest inside the node, and see its console marker"):
            definition = {"name": GUEST, "memory_mib": 32, "disks": [{"base_image": IMAGE}], "autostart": True,
                          "restart": "on-failure"}  # fmt: skip
            # The definition as the node keeps it: the same, field for field, after the reboot.
            created = node.call("guest.create", definition)
            started = node.call("guest.start", {"name": GUEST})
            wait_for(lambda: marker_shown(node), options.guest_timeout, "the guest's console marker")
    with (
        report.step("connect again (a new agent) and find the guest running, re-adopted"),
        connected(address, options, known_hosts) as node,
    ):
        info = guest_state(node)
        if info["state"] != "running" or info["pid"] != started["pid"]:
            raise SelftestError(f"guest is {info['state']} with pid {info['pid']}, was pid {started['pid']}")
    if media != "disk":
        say.write("- reboot: skipped (booted from the ISO, whose state lives in RAM; the disk image keeps it)\n")
        return
    with report.step("shut the node down (ACPI) and boot it again from the same disk"):
        stop_recorded_vm(VmPaths(options.out_dir / "run"), shutdown_timeout=SHUTDOWN_SECONDS)
        booted = boot_node(options, media, fresh=False, say=say)
    address = NodeAddress("127.0.0.1", booted.ssh_port, "appliance")
    # The same known_hosts: a changed host key fails the connection.
    with (
        report.step("find the same host key and the autostart guest running with its definition"),
        connected(address, options, known_hosts) as node,
    ):
        if node.host_key_fingerprint() != fingerprint:
            raise SelftestError(f"host key changed across the reboot (was {fingerprint})")
        wait_for(lambda: guest_state(node)["state"] == "running", options.guest_timeout, "the autostart guest")
        kept = guest_state(node)["definition"]
        if kept != created:
            raise SelftestError(f"guest definition changed across the reboot: {created} before, {kept} after")
        wait_for(lambda: marker_shown(node), options.guest_timeout, "the guest's console marker after the reboot")


@contextmanager
def connected(address: NodeAddress, options: SelftestOptions, known_hosts: Path) -> Iterator[Node]:
    node = Node(address, options.key, known_hosts=known_hosts, timeout=120)
    node.connect()
    try:
        yield node
    finally:
        node.close()
