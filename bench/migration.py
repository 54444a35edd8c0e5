"""9. Live migration: the tiny guest moved between two agents behind two sshds on 127.0.0.1, every byte
relayed through this client (appliance.nodes.migrate), or straight between the nodes over TCP with TLS
(`--direct`), under TCG.

For each memory size (96 and 512 MiB: the tiny guest's kernel does not boot in
64), with and without a 1 GiB disk written full
(so its mirror copies 1 GiB), the guest is started on node A, counts on its
console, and is migrated to B: the total time the client took (checks, the
mirror, the memory, the switch-over, removing the source's copy), QEMU's own
downtime (query-migrate: from the pause to the end), and the switch-over the
client adds after it (the destination taking the guest and resuming it). The
guest's images are on both nodes first, so no image copy is counted.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from figures import MIB, Section, seconds
from helpers.keys import make_key
from helpers.tiny_guest import TinyGuest, build_tiny_guest
from loopback import USER, sshd_endpoints, write_known_hosts

from appliance.nodes.client import Node, NodeAddress
from appliance.nodes.migrate import Endpoint, MigrationOptions, migrate_guest
from appliance.progress import Progress

TITLE = "9. live migration: the tiny guest between two loopback sshds' agents, relayed and direct (TCG)"
# How the bytes go: through the client's SSH connections, or straight from node to node over TLS.
ROUTES = (("relayed", ""), ("direct", "127.0.0.1"))
# 96, not 64: the tiny guest's Debian cloud kernel prints nothing in 64 MiB and panics out of memory
# in 72 (measured here); 96 is the smallest size it counts in.
MEMORIES_MIB = (96, 512)
DISK_GIB = 1
COUNTED_SECONDS = 120.0
# QEMU's default downtime-limit: what a migration aims to stay under.
DOWNTIME_LIMIT_MS = 300


@contextmanager
def two_nodes(work: Path, progress: Progress) -> Iterator[tuple[Endpoint, Endpoint, Path]]:
    """Agents A and B, each behind an sshd on loopback, connected; A's state directory."""
    key = make_key(work, "migration-operator")
    with sshd_endpoints(work / "migration", 2, key.with_suffix(".pub").read_text().strip()) as endpoints:
        known_hosts = write_known_hosts(endpoints, work / "migration" / "known_hosts")

        def connector(port: int) -> Node:
            node = Node(NodeAddress("127.0.0.1", port, USER), key, known_hosts, strict=True, timeout=120)
            node.connect()
            return node

        pair = [
            Endpoint(connector(endpoint.port), lambda port=endpoint.port: connector(port), f"node{index}")
            for index, endpoint in enumerate(endpoints)
        ]
        progress.note("two agents behind two sshds on 127.0.0.1")
        try:
            yield pair[0], pair[1], endpoints[0].directory / "state"
        finally:
            for endpoint in pair:  # a failed run leaves no QEMU behind
                for left in endpoint.call_again("guest.list", {}):
                    if left["state"] != "stopped":
                        endpoint.call("guest.kill", {"name": left["name"]})
                endpoint.close()


def push_everywhere(nodes: tuple[Endpoint, Endpoint], guest: TinyGuest) -> None:
    for endpoint in nodes:
        for path, name in ((guest.kernel, "bench-vmlinuz"), (guest.initrd, "bench-initrd")):
            endpoint.node.push_image(path, name)


def start_guest(source: Endpoint, state: Path, guest: TinyGuest, name: str, memory_mib: int, disk: bool) -> None:
    kernel_boot = {"kernel_image": "bench-vmlinuz", "initrd_image": "bench-initrd",
                   "cmdline": f"{guest.cmdline} tiny.counter"}  # fmt: skip
    params: dict[str, Any] = {"name": name, "vcpus": 1, "memory_mib": memory_mib, "kernel_boot": kernel_boot}
    if disk:
        params["disks"] = [{"size_gib": DISK_GIB}]
    source.call("guest.create", params)
    if disk:  # written full: its mirror has the whole GiB to copy
        image = state / "guests" / name / "disk0.qcow2"
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {DISK_GIB}G", str(image)],
                       check=True, capture_output=True)  # fmt: skip
    source.call("guest.start", {"name": name})
    console = state / "guests" / name / "console.log"
    deadline = time.monotonic() + COUNTED_SECONDS
    while b"tiny-count 3" not in (console.read_bytes() if console.exists() else b""):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not count to 3 within {COUNTED_SECONDS:.0f}s")
        time.sleep(0.1)


def measure_migrations(work: Path, progress: Progress) -> Section:
    section = Section("migration", TITLE)
    with progress.step("build the tiny guest (Debian cloud kernel + busybox initramfs)"):
        guest = build_tiny_guest(work / "migration-guest")
    runs: dict[str, Any] = {}
    with two_nodes(work, progress) as (source, destination, state):
        push_everywhere((source, destination), guest)
        for memory_mib in MEMORIES_MIB:
            for disk in (False, True):
                for route, address in ROUTES:
                    name = f"m{memory_mib}{'-disk' if disk else ''}-{route}"
                    label = f"{memory_mib} MiB" + (f" + {DISK_GIB} GiB disk" if disk else "") + f", {route}"
                    with progress.step(f"migrate the tiny guest, {label}"):
                        start_guest(source, state, guest, name, memory_mib, disk)
                        options = MigrationOptions(direct_address=address)
                        result = migrate_guest(source, destination, name, options, lambda said: None)
                        destination.call("guest.delete", {"name": name, "force": True, "remove_disks": True})
                    runs[name] = result
                    add_rows(section, label, result, disk)
    section.data.update(runs=runs, note="images on both nodes first; direct: TLS over loopback TCP")
    return section


def add_rows(section: Section, label: str, result: dict[str, Any], disk: bool) -> None:
    moved = f"{result['memory_bytes'] / MIB:.0f} MiB of memory"
    if disk:
        moved += f", {result['disk_bytes'] / MIB:.0f} MiB mirrored"
    section.add(f"{label}: total", seconds(result["seconds"]), moved)
    section.add(
        f"{label}: downtime (QEMU)",
        f"{result['downtime_ms']} ms",
        f"+ {result['switchover_ms']} ms switch-over by the client; QEMU's limit {DOWNTIME_LIMIT_MS} ms",
    )
