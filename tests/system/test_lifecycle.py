"""The node's life, nested in QEMU (slow): A/B upgrades with automatic rollback, install from the ISO, first boot.

Upgrades (one disk node, booted once from the session's disk image, build A):
  A -> B (another host name) with an autostart guest: refused while it runs,
  then --stop-guests --reboot --wait: B runs, blessed, with the host key, the
  guest's definition (running again) and the image kept; B again is a no-op;
  -> P (a kernel that panics) comes back on B by itself; -> A again (the guest
  deleted first), with the marker file its operator check fails on (never
  healthy), comes back on B by itself; host.report says rolled back and why
  each time; a rollback by hand to that failed slot is refused.
Install and first boot (one ISO node, build B): a cidata volume gives the host
name, a key and a static address; `node install` writes the blank disk; the
disk alone boots the same node (host key, an image pushed before, the host
name from the provisioner).
Each step's seconds and the bytes sent are printed (pytest -s) as the figures
the issue asks for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers.keys import make_key
from helpers.lifecycle_builds import LifecycleBuilds, build_variants
from helpers.waiting import wait_until
from system.conftest import UNHEALTHY_MARKER, UNHEALTHY_TIMEOUT, own_copy, spec_text_for_tests

from appliance.agent.accel import PROBE_BOOT_SECTOR, AccelChoice
from appliance.boot.vm import BootConfig, VmPaths, start_vm
from appliance.build.render import READY_MARKER
from appliance.manifest import ArtifactKind, Manifest
from appliance.nodes.client import Node, NodeAddress

pytestmark = pytest.mark.slow
BOOT_TIMEOUT = 900
WAIT = "900"
FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="module")
def builds(operator_key: Path, tmp_path_factory: pytest.TempPathFactory) -> LifecycleBuilds:
    test_spec = spec_text_for_tests(Path(f"{operator_key}.pub").read_text().strip())
    made = build_variants(test_spec, operator_key, tmp_path_factory.mktemp("lifecycle-builds"))
    FIGURES["build_seconds"] = {name: round(seconds) for name, seconds in made.seconds.items()}
    return made


def appliance(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True,
                          check=False, timeout=timeout)  # fmt: skip


@dataclass
class Booted:
    """A node in QEMU from a build directory of its own, reached with KEY."""

    out_dir: Path
    key: Path
    known_hosts: Path
    port: int = 0
    console_mark: int = 0
    said: list[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return f"appliance@127.0.0.1:{self.port}"

    @property
    def console_log(self) -> Path:
        return self.out_dir / "run" / "serial.log"

    def console(self) -> str:
        return self.console_log.read_bytes().decode(errors="replace")

    def mark(self) -> None:
        """From here on, console() since() sees what comes next (a reboot keeps the same log)."""
        self.console_mark = len(self.console_log.read_bytes())

    def since(self) -> str:
        return self.console_log.read_bytes()[self.console_mark :].decode(errors="replace")

    def node(self, key: Path | None = None) -> Node:
        return Node(NodeAddress("127.0.0.1", self.port, "appliance"), key or self.key, self.known_hosts, timeout=120)

    def report(self) -> dict[str, Any]:
        with self.node() as node:
            report: dict[str, Any] = node.call("host.report", idempotent=True)
        return report

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return appliance(*args, "--key", str(self.key), "--known-hosts", str(self.known_hosts))

    def breakglass(self, command: str) -> str:
        done = subprocess.run(
            ["ssh", "-i", str(self.key), "-p", str(self.port), "-o", "BatchMode=yes", "-o",
             "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "breakglass@127.0.0.1", command],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return done.stdout


def boot(out_dir: Path, *options: str) -> tuple[int, float]:
    started = time.monotonic()
    done = appliance("boot", str(out_dir), "--wait", "--timeout", str(BOOT_TIMEOUT), *options)
    assert done.returncode == 0, done.stdout + done.stderr
    return int((out_dir / "run" / "ssh-port").read_text()), time.monotonic() - started


@pytest.fixture(scope="module", autouse=True)
def figures() -> Iterator[None]:
    """The seconds of each step and the bytes sent, printed at the end (pytest -s shows them)."""
    yield
    print("\nlifecycle figures:", json.dumps(FIGURES, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def disk_node(built_appliance: Path, operator_key: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    """Build A booted from its disk image, in a directory of its own."""
    base = tmp_path_factory.mktemp("upgrade-node")
    out_dir = own_copy(built_appliance, base / "a", (ArtifactKind.DISK_RAW,))
    node = Booted(out_dir, operator_key, base / "known_hosts")
    node.port, seconds = boot(out_dir, "--media", "disk")
    FIGURES["boot_disk_a_seconds"] = round(seconds)
    try:
        yield node
    finally:
        appliance("stop", str(out_dir))


GUEST = {"name": "keeper", "memory_mib": 32, "disks": [{"base_image": "marker"}], "autostart": True,
         "restart": "on-failure"}  # fmt: skip


def test_an_upgrade_is_refused_while_guests_run_and_nothing_is_written(
    disk_node: Booted, builds: LifecycleBuilds, tmp_path: Path
) -> None:
    image = tmp_path / "marker.img"
    image.write_bytes(PROBE_BOOT_SECTOR.ljust(1 << 20, b"\0"))
    with disk_node.node() as node:
        node.push_image(image, "marker")
        node.call("guest.create", GUEST)
        node.call("guest.start", {"name": "keeper"})
    refused = disk_node.cli("upgrade", disk_node.host, str(builds.b), "--reboot")
    assert refused.returncode == 1 and "guests_running" in refused.stderr and "keeper" in refused.stderr
    slots = disk_node.report()["slots"]
    assert slots["last_upgrade"] is None and slots["slots"]["b"]["state"] == "empty"


def test_an_upgrade_to_b_reboots_into_b_keeping_the_host_key_guests_and_images(
    disk_node: Booted, builds: LifecycleBuilds
) -> None:
    with disk_node.node() as node:
        fingerprint = node.host_key_fingerprint()
        before = node.call("host.report")
    disk_node.mark()
    started = time.monotonic()
    # The marker guest ignores ACPI: forced off after a few seconds.
    done = disk_node.cli("upgrade", disk_node.host, str(builds.b), "--stop-guests", "--timeout-stop", "5", "--reboot",
                         "--wait", "--wait-timeout", WAIT, "--json")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    outcome = json.loads(done.stdout)
    FIGURES["upgrade_a_to_b"] = {"seconds": outcome["seconds"], "sent_bytes": outcome["sent_bytes"],
                                 "wall_seconds": round(time.monotonic() - started)}  # fmt: skip
    assert outcome["result"] == "blessed" and outcome["stopped_guests"] == ["keeper"] and outcome["slot"] == "b"
    # What B's live set has that A's slot has not: B differs from A in its configuration only (the host name),
    # so its root image and kernel are A's (the build cache) and taken from slot A; the initrd, whose first
    # layer is the node's configuration, is all that goes.
    b = Manifest.load(builds.b)
    a_files = {artifact.sha256 for artifact in Manifest.load(disk_node.out_dir).artifacts}
    live = (".squashfs", ".vmlinuz", ".initrd")
    new = [artifact for artifact in b.artifacts if artifact.file.endswith(live) and artifact.sha256 not in a_files]
    assert [artifact.file for artifact in new] == ["appliance.initrd"]
    assert outcome["sent_bytes"] == new[0].size_bytes
    report = disk_node.report()
    assert report["build_id"] == b.build_id != before["build_id"]
    assert report["hostname"] == "appliance-b" and before["hostname"] == "appliance"
    slots = report["slots"]
    assert slots["booted"] == "b" and slots["default"] == "b" and slots["slots"]["a"]["build_id"] == before["build_id"]
    assert slots["last_upgrade"]["result"] == "blessed" and {"write", "boot", "health", "bless"} <= set(
        slots["last_upgrade"]["seconds"]
    )
    console = disk_node.since()
    assert "trial boot of slot b" in console and "root slot b on" in console and "is the default now" in console
    with disk_node.node() as node:
        assert node.host_key_fingerprint() == fingerprint
        assert [image["name"] for image in node.call("image.list")] == ["marker"]
        info = wait_until(
            lambda: (found := node.call("guest.info", {"name": "keeper"}))["state"] == "running" and found,
            300, "the autostart guest to run again on B",
        )  # fmt: skip
        kept = {key: info["definition"][key] for key in ("memory_mib", "autostart")}
        assert kept == {"memory_mib": 32, "autostart": True}


def test_the_same_build_twice_is_a_noop(disk_node: Booted, builds: LifecycleBuilds) -> None:
    started = time.monotonic()
    done = disk_node.cli("upgrade", disk_node.host, str(builds.b), "--reboot", "--wait")
    assert done.returncode == 0 and "nothing to do" in done.stdout, done.stdout + done.stderr
    FIGURES["noop_seconds"] = round(time.monotonic() - started, 1)
    assert disk_node.report()["uptime_seconds"] > FIGURES["noop_seconds"]


def rolled_back(disk_node: Booted, build: Path, figure: str) -> dict[str, Any]:
    """Upgrade to BUILD with --reboot --wait: the node must come back on B by itself."""
    running = disk_node.report()["build_id"]
    disk_node.mark()
    started = time.monotonic()
    done = disk_node.cli("upgrade", disk_node.host, str(build), "--stop-guests", "--timeout-stop", "5", "--reboot",
                         "--wait", "--wait-timeout", WAIT)  # fmt: skip
    assert done.returncode == 1 and "rolled back" in done.stderr, done.stdout + done.stderr
    report = disk_node.report()
    assert report["build_id"] == running
    last = report["slots"]["last_upgrade"]
    assert last["result"] == "rolled_back" and last["build_id"] == Manifest.load(build).build_id
    assert report["slots"]["default"] == report["slots"]["booted"] == "b"
    FIGURES[figure] = {"wall_seconds": round(time.monotonic() - started), "node_seconds": last["seconds"]}
    return dict(last)


def test_a_kernel_that_panics_comes_back_on_b_by_itself(disk_node: Booted, builds: LifecycleBuilds) -> None:
    last = rolled_back(disk_node, builds.p, "rollback_after_panic")
    assert "did not reach its health check" in last["reason"]
    console = disk_node.since()
    assert "trial boot of slot a" in console and "Kernel panic" in console
    assert console.index("Kernel panic") < console.rindex("root slot b on")


def test_a_build_that_never_gets_healthy_comes_back_on_b_and_says_why(disk_node: Booted, built_appliance: Path) -> None:
    # The keeper guest has done its part (kept across A -> B). It ignores ACPI, so the reboot the failed
    # trial makes by itself would give it the minute a guest has to power down at a host's shutdown.
    with disk_node.node() as node:
        node.call("guest.delete", {"name": "keeper", "force": True, "remove_disks": True})
    # Build A's operator check fails while the marker is on the data partition.
    disk_node.breakglass(f"sudo touch {UNHEALTHY_MARKER}")
    last = rolled_back(disk_node, built_appliance, "rollback_after_failed_health")
    check = f"check `test ! -e {UNHEALTHY_MARKER}`"
    assert check in last["reason"] and f"not healthy within {UNHEALTHY_TIMEOUT}s" in last["reason"]
    console = disk_node.since()
    assert check in console and "rebooting to slot b" in console
    # Slot a holds the build that failed: there is nothing to roll back to by hand.
    refused = disk_node.cli("rollback", disk_node.host)
    assert refused.returncode == 1 and "no_rollback" in refused.stderr


def cidata(path: Path, key: Path) -> Path:
    """A NoCloud volume as a provisioner makes one: host name, an operator key, a static address."""
    files = {
        "meta-data": "instance-id: iid-lifecycle-1\nlocal-hostname: provisioned-node\n",
        "user-data": f"#cloud-config\nssh_authorized_keys:\n  - {key.with_suffix('.pub').read_text().strip()}\n"
        "runcmd:\n  - [touch, /tmp/never]\n",
        "network-config": 'version: 2\nethernets:\n  nic0:\n    match:\n      macaddress: "52:54:00:12:34:56"\n'
        "    addresses: [10.0.2.15/24]\n    gateway4: 10.0.2.2\n    nameservers:\n      addresses: [10.0.2.3]\n",
    }
    subprocess.run(["mkfs.vfat", "-C", "-n", "CIDATA", str(path), "1024"], check=True, capture_output=True)
    for name, text in files.items():
        source = path.with_name(name)
        source.write_text(text)
        subprocess.run(["mcopy", "-i", str(path), str(source), f"::/{name}"], check=True,
                       env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})  # fmt: skip
    return path


@pytest.fixture(scope="module")
def iso_node(builds: LifecycleBuilds, operator_key: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    """Build B booted from its ISO with a blank disk and a cidata volume."""
    base = tmp_path_factory.mktemp("install-node")
    out_dir = own_copy(builds.b, base / "b", (ArtifactKind.ISO,))
    seed_key = make_key(base, "provisioned")
    node = Booted(out_dir, operator_key, base / "known_hosts")
    node.port, seconds = boot(out_dir, "--extra-disk", "4", "--seed", str(cidata(base / "cidata.img", seed_key)))
    FIGURES["boot_iso_b_seconds"] = round(seconds)
    node.said.append(str(seed_key))
    try:
        yield node
    finally:
        appliance("stop", str(out_dir))


def test_the_iso_node_takes_host_name_key_and_static_address_from_a_cidata_volume(iso_node: Booted) -> None:
    seed_key = Path(iso_node.said[0])
    with iso_node.node(seed_key) as node:  # the provisioner's key, not one the image was built with
        report = node.call("host.report")
    assert report["hostname"] == "provisioned-node"
    first = report["firstboot"]
    assert first["source"].startswith("NoCloud volume /dev/vd") and first["keys"] == 1
    assert first["network"] == ["nic0 (52:54:00:12:34:56): 10.0.2.15/24"]
    assert first["unsupported"] == ["user-data.runcmd"]
    assert "first boot: not supported, ignored: user-data.runcmd" in iso_node.console()
    addresses = json.loads(iso_node.breakglass("ip -j -4 address show"))
    static = [info for link in addresses for info in link["addr_info"] if info["local"] == "10.0.2.15"]
    # Static, not a DHCP lease: no dynamic flag, a lifetime of forever.
    assert static and not static[0].get("dynamic") and static[0]["valid_life_time"] == 4294967295, static
    assert report["slots"]["installed"] is False and "install" in report["slots"]["reason"]


def test_node_install_writes_the_blank_disk_and_the_disk_alone_boots_the_same_node(
    iso_node: Booted, tmp_path: Path
) -> None:
    image = tmp_path / "kept.img"
    image.write_bytes(b"state written before the install" * 1000)
    with iso_node.node() as node:
        fingerprint = node.host_key_fingerprint()
        node.push_image(image, "kept")
        disks = {disk["disk"]: disk for disk in node.call("node.disks")}
    assert disks["/dev/vda"]["blank"] is True, disks
    refused = iso_node.cli("node", "install", iso_node.host, "--disk", "/dev/vdb")
    assert refused.returncode == 1 and "disk_refused" in refused.stderr  # the cidata volume: read-only
    started = time.monotonic()
    done = iso_node.cli("node", "install", iso_node.host, "--disk", "/dev/vda")
    assert done.returncode == 0, done.stdout + done.stderr
    FIGURES["install_seconds"] = round(time.monotonic() - started)
    for step in ("partition /dev/vda", "write the boot loader", "write slot A", "write the data partition"):
        assert step in done.stderr, done.stderr
    again = iso_node.cli("node", "install", iso_node.host, "--disk", "/dev/vda")
    assert again.returncode == 1 and "has partitions" in again.stderr and "--wipe" in again.stderr
    appliance("stop", str(iso_node.out_dir))
    # The installed disk alone, as the server boots once the ISO is taken out.
    disk = iso_node.out_dir / "run" / "extra-disk.qcow2"
    paths = VmPaths(tmp_path / "run")
    config = BootConfig(media=disk, accel=AccelChoice("tcg", "as the other boots of this test"),
                        ssh_port=iso_node.port, media_kind="disk")  # fmt: skip
    vm = start_vm(config, paths)
    try:
        FIGURES["boot_installed_disk_seconds"] = round(vm.wait_for_console(READY_MARKER, BOOT_TIMEOUT))
        with iso_node.node() as node:
            assert node.host_key_fingerprint() == fingerprint
            report = node.call("host.report")
            assert [entry["name"] for entry in node.call("image.list")] == ["kept"]
        assert report["state_storage"] == "persistent" and report["state_device"] == "/dev/vda5"
        assert report["slots"]["booted"] == "a" and report["slots"]["slots"]["a"]["state"] == "good"
        assert report["hostname"] == "provisioned-node"
        assert "kept on the data partition" in report["firstboot"]["source"]
        console = paths.console_log.read_text(errors="replace")
        assert "root slot a on" in console
    finally:
        vm.stop()
