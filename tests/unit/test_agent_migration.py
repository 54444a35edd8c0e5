"""What two nodes compare before a running guest moves: QEMU's command lines with what differs between
nodes taken out; and which files of a guest are copied whole."""

from __future__ import annotations

from pathlib import Path

from appliance.agent.migration import comparable_argv, copied_files, first_difference
from appliance.agent.model import CloudInit, Disk, GuestSpec

GUEST_DIR = Path("/var/lib/appliance/guests/web")
IMAGES_DIR = Path("/var/lib/appliance/images")


def argv(guest_dir: Path, images_dir: Path, machine: str = "q35", *extra: str) -> list[str]:
    return [
        "qemu-system-x86_64", "-name", "guest=web", "-machine", f"{machine},accel=tcg", "-cpu", "max",
        "-pidfile", f"{guest_dir}/qemu.pid", "-drive", f"file={guest_dir}/disk0.qcow2,if=none,id=disk0,format=qcow2",
        "-netdev", "tap,id=net0,fd=3,vhost=on", "-kernel", f"{images_dir}/vmlinuz", *extra,
    ]  # fmt: skip


def test_two_nodes_running_the_same_machine_compare_equal() -> None:
    here = comparable_argv(argv(GUEST_DIR, IMAGES_DIR), GUEST_DIR, IMAGES_DIR)
    other_guest, other_images = Path("/srv/state/guests/web"), Path("/srv/state/images")
    # Through the launcher, with the arriving guest's own machine type and -incoming: the same machine.
    launched = ["/usr/bin/appliance-agent", "launch-guest", "{}", "--",
                *argv(other_guest, other_images, "pc-q35-7.2", "-incoming", "defer", "-S")]  # fmt: skip
    there = comparable_argv(launched, other_guest, other_images)
    assert there == here
    assert "{machine},accel=tcg" in here and "-incoming" not in here and "tap,id=net0,fd=3" in here
    assert "file={guest}/disk0.qcow2,if=none,id=disk0,format=qcow2" in here


def test_qemu_started_by_its_full_path_is_the_same_machine() -> None:
    """A guest with no launcher, started by systemd-run (which gives QEMU the full path it found on PATH
    as argv[0]), compares equal to the command line its definition gives, and to one through the launcher."""
    here = comparable_argv(argv(GUEST_DIR, IMAGES_DIR), GUEST_DIR, IMAGES_DIR)
    by_systemd = ["/usr/bin/qemu-system-x86_64", *argv(GUEST_DIR, IMAGES_DIR)[1:]]
    assert comparable_argv(by_systemd, GUEST_DIR, IMAGES_DIR) == here
    assert here[0] == "qemu-system-x86_64"
    # Another program is still another machine.
    other = comparable_argv(["/usr/bin/qemu-system-aarch64", *by_systemd[1:]], GUEST_DIR, IMAGES_DIR)
    assert (
        first_difference(here, other) == "argument 0: '/usr/bin/qemu-system-aarch64' there, 'qemu-system-x86_64' here"
    )
    assert first_difference(here, other, "by its definition", "running").endswith(
        "running, 'qemu-system-x86_64' by its definition"
    )


def test_another_machine_is_told_apart_naming_the_first_difference() -> None:
    here = comparable_argv(argv(GUEST_DIR, IMAGES_DIR), GUEST_DIR, IMAGES_DIR)
    other = comparable_argv(argv(GUEST_DIR, IMAGES_DIR, "q35", "-device", "VGA"), GUEST_DIR, IMAGES_DIR)
    assert other != here
    assert first_difference(here, other) == "17 arguments there, 15 here"
    cpu = [part.replace("max", "host") for part in here]
    assert first_difference(here, cpu) == "argument 6: 'host' there, 'max' here"


def test_a_stopped_guest_copies_its_disks_and_a_running_one_its_seed() -> None:
    spec = GuestSpec(name="web", vcpus=1, memory_mib=64, disks=(Disk(size_gib=1, file="disk0.qcow2"),
                     Disk(base_image="debian", file="disk2.qcow2")), cloud_init=CloudInit(hostname="web"))  # fmt: skip
    assert copied_files(spec, live=False) == ["disk0.qcow2", "disk2.qcow2"]
    (seed,) = copied_files(spec, live=True)
    assert seed.startswith("seed-iid-") and seed.endswith(".vfat")
    assert copied_files(GuestSpec(name="web", vcpus=1, memory_mib=64), live=True) == []
