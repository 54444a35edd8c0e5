from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from appliance.agent.accel import (
    PROBE_BOOT_SECTOR,
    PROBE_MARKER,
    AccelChoice,
    node_accel,
    probe_accel,
    run_probe_guest,
)
from appliance.boot.vm import (
    BootConfig,
    Lan,
    QemuError,
    VmPaths,
    free_local_port,
    lan_mac,
    qemu_argv,
    set_nic_link,
    start_vm,
)


def test_probe_boot_sector_prints_its_marker_under_tcg() -> None:
    """The KVM probe is only as good as its guest: it must really print under QEMU."""
    assert len(PROBE_BOOT_SECTOR) == 512 and PROBE_BOOT_SECTOR.endswith(b"\x55\xaa")
    assert run_probe_guest("tcg", "max", timeout=30).ran


def test_probe_without_kvm_device_chooses_tcg_and_says_why(tmp_path: Path) -> None:
    choice = probe_accel(kvm_device=tmp_path / "no-kvm")
    assert choice.accel == "tcg"
    assert "no-kvm" in choice.reason


def test_a_machine_qemu_emulates_runs_its_guests_under_tcg_without_probing(tmp_path: Path) -> None:
    # Stands in for systemd-detect-virt's answer inside a TCG guest (this host is a KVM guest);
    # the booted node's report shows the real one (test_image.py).
    detect_virt = tmp_path / "systemd-detect-virt"
    detect_virt.write_text("#!/bin/sh\necho qemu\n")
    detect_virt.chmod(0o755)
    kvm = tmp_path / "kvm"
    kvm.touch()
    choice = probe_accel(qemu=str(tmp_path / "no-qemu-here"), kvm_device=kvm, detect_virt=str(detect_virt))
    assert choice.accel == "tcg" and "emulated by QEMU" in choice.reason
    # Any other answer, or no systemd-detect-virt at all, leaves it to the probe.
    detect_virt.write_text("#!/bin/sh\necho kvm\n")
    for detect in (str(detect_virt), str(tmp_path / "missing")):
        choice = probe_accel(qemu=str(tmp_path / "no-qemu-here"), kvm_device=kvm, detect_virt=detect)
        assert choice.accel == "tcg" and "cannot start" in choice.reason


def test_probe_gives_a_definite_answer_on_this_machine() -> None:
    choice = probe_accel()
    assert choice.accel in ("kvm", "tcg") and choice.reason
    assert choice.cpu == ("host" if choice.accel == "kvm" else "max")


def test_node_accel_probes_once_per_boot(tmp_path: Path) -> None:
    boot_id, cache = tmp_path / "boot_id", tmp_path / "state" / "accel-probe.json"
    boot_id.write_text("first-boot\n")
    choice = node_accel("auto", cache, boot_id)
    assert choice == probe_accel()
    # A cached answer is only believed for the boot it was probed in.
    cache.write_text(json.dumps({"boot_id": "first-boot", "accel": "kvm", "reason": "cached"}))
    assert node_accel("auto", cache, boot_id) == AccelChoice("kvm", "cached")
    boot_id.write_text("second-boot\n")
    assert node_accel("auto", cache, boot_id) == choice
    assert json.loads(cache.read_text())["boot_id"] == "second-boot"


def test_node_accel_set_in_config_is_not_probed(tmp_path: Path) -> None:
    assert node_accel("tcg", tmp_path / "cache.json", tmp_path / "no-boot-id").accel == "tcg"
    assert not (tmp_path / "cache.json").exists()


def test_qemu_argv_boots_the_iso_with_ssh_forwarded(tmp_path: Path) -> None:
    config = BootConfig(
        media=tmp_path / "a.iso", accel=AccelChoice("tcg", "test"), ssh_port=2222, memory_mb=1024, cpus=1
    )
    argv = qemu_argv(config, VmPaths(tmp_path / "run"))
    joined = " ".join(argv)
    assert "q35,accel=tcg" in joined and "-cpu max" in joined
    assert f"file={tmp_path / 'a.iso'},media=cdrom" in joined
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in joined
    assert f"file:{tmp_path / 'run' / 'serial.log'}" in joined
    assert "pflash" not in joined


def test_uefi_boot_uses_a_private_copy_of_the_ovmf_variables(tmp_path: Path) -> None:
    paths = VmPaths(tmp_path / "run")
    paths.directory.mkdir()
    config = BootConfig(media=tmp_path / "a.iso", accel=AccelChoice("tcg", "test"), ssh_port=2222, firmware="uefi")
    joined = " ".join(qemu_argv(config, paths))
    assert "if=pflash" in joined and "readonly=on" in joined
    assert (paths.directory / "OVMF_VARS.fd").exists()


def test_qemu_argv_boots_a_disk_from_virtio_first(tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    config = BootConfig(media=disk, accel=AccelChoice("tcg", "test"), ssh_port=2222, media_kind="disk")
    joined = " ".join(qemu_argv(config, VmPaths(tmp_path / "run")))
    assert f"file={disk},format=qcow2,if=none,id=disk0" in joined
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in joined
    assert "media=cdrom" not in joined


def test_qemu_argv_boots_from_the_network_with_qemu_tftp_handing_out_the_script(tmp_path: Path) -> None:
    script = tmp_path / "run" / "pxe" / "boot.ipxe"
    config = BootConfig(media=script, accel=AccelChoice("tcg", "test"), ssh_port=2222, media_kind="pxe")
    argv = qemu_argv(config, VmPaths(tmp_path / "run"))
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev == f"user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,tftp={script.parent},bootfile=boot.ipxe"
    # The NIC keeps QEMU's iPXE ROM (other boots drop it) and is the first boot device.
    assert "virtio-net-pci,netdev=net0,bootindex=0" in argv
    assert not any("media=cdrom" in arg or "virtio-blk" in arg for arg in argv)


def test_two_nics_are_ports_of_one_hub_whose_uplink_is_the_user_network(tmp_path: Path) -> None:
    config = BootConfig(media=tmp_path / "a.iso", accel=AccelChoice("tcg", "test"), ssh_port=2222, nics=2)
    argv = qemu_argv(config, VmPaths(tmp_path / "run"))
    netdevs = [argv[index + 1] for index, arg in enumerate(argv) if arg == "-netdev"]
    assert netdevs == [
        "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22",  # one DHCP server and one SSH forward for both
        "hubport,id=hub0-uplink,hubid=0,netdev=net0",
        "hubport,id=hub0-port0,hubid=0",
        "hubport,id=hub0-port1,hubid=0",
    ]
    assert "virtio-net-pci,netdev=hub0-port0,id=nic0,mac=52:54:00:12:34:56,romfile=" in argv
    assert "virtio-net-pci,netdev=hub0-port1,id=nic1,mac=52:54:00:12:34:57,romfile=" in argv
    pxe = BootConfig(media=tmp_path / "boot.ipxe", accel=config.accel, ssh_port=2222, media_kind="pxe", nics=2)
    argv = qemu_argv(pxe, VmPaths(tmp_path / "run"))
    # The first NIC boots from the network; the second keeps no ROM.
    assert "virtio-net-pci,netdev=hub0-port0,id=nic0,mac=52:54:00:12:34:56,bootindex=0" in argv
    assert "virtio-net-pci,netdev=hub0-port1,id=nic1,mac=52:54:00:12:34:57,romfile=" in argv
    with pytest.raises(QemuError, match="1 to 4 NICs, not 5"):
        BootConfig(media=tmp_path / "a.iso", accel=config.accel, ssh_port=2222, nics=5)


def test_a_running_nodes_nic_has_its_link_cut_and_restored_through_qmp(tmp_path: Path) -> None:
    raw = tmp_path / "marker.raw"
    raw.write_bytes(PROBE_BOOT_SECTOR.ljust(1 << 20, b"\0"))
    disk = tmp_path / "marker.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)], check=True)
    paths = VmPaths(tmp_path / "run")
    config = BootConfig(media=disk, accel=AccelChoice("tcg", "test"), ssh_port=free_local_port(), memory_mb=64,
                        cpus=1, media_kind="disk", watchdog=False, nics=2)  # fmt: skip
    vm = start_vm(config, paths)
    try:
        vm.wait_for_console(PROBE_MARKER.decode(), 60)  # QEMU took the hub and both NICs
        set_nic_link(paths, 1, up=False)
        set_nic_link(paths, 1, up=True)
        with pytest.raises(QemuError, match="cannot set the link of nic2 down"):
            set_nic_link(paths, 2, up=False)
    finally:
        vm.stop()


def test_an_extra_disk_comes_after_the_boot_media_and_is_never_booted(tmp_path: Path) -> None:
    extra = tmp_path / "run" / "extra-disk.qcow2"
    config = BootConfig(media=tmp_path / "a.iso", accel=AccelChoice("tcg", "test"), ssh_port=2222, extra_disk=extra)
    argv = qemu_argv(config, VmPaths(tmp_path / "run"))
    assert argv.index(f"file={tmp_path / 'a.iso'},media=cdrom,readonly=on,if=ide") < argv.index(
        f"file={extra},format=qcow2,if=none,id=disk1,discard=unmap"
    )
    assert "virtio-blk-pci,drive=disk1" in argv


def test_a_lan_nic_comes_after_the_ssh_nic_on_loopback_multicast_with_a_mac_of_the_nodes_own(
    tmp_path: Path,
) -> None:
    mac = lan_mac(tmp_path / "one" / "run")
    assert mac == lan_mac(tmp_path / "one" / "run") != lan_mac(tmp_path / "two" / "run")
    assert re.fullmatch(r"52:54(:[0-9a-f]{2}){4}", mac)
    config = BootConfig(media=tmp_path / "a.iso", accel=AccelChoice("tcg", "test"), ssh_port=2222, lan=Lan(40400, mac))
    argv = qemu_argv(config, VmPaths(tmp_path / "one" / "run"))
    lan = argv.index("socket,id=net1,mcast=230.0.0.1:40400,localaddr=127.0.0.1")
    assert argv[lan - 1] == "-netdev" and argv[lan + 2] == f"virtio-net-pci,netdev=net1,mac={mac},romfile="
    # The first NIC (the SSH one, the node's "first wired" NIC) comes first: its PCI slot is the lower.
    assert argv.index("virtio-net-pci,netdev=net0,romfile=") < lan
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in argv[argv.index("-netdev") + 1]
    assert "net1" not in " ".join(qemu_argv(BootConfig(media=tmp_path / "a.iso", accel=AccelChoice("tcg", "test"),
                                                       ssh_port=2222), VmPaths(tmp_path / "run")))  # fmt: skip


def test_an_unreachable_kvm_device_is_not_kept_for_the_boot(tmp_path: Path) -> None:
    # Early in a boot the kvm module (or udev's group for its device) may not be there yet:
    # that answer must not stick for the whole boot, as a probe's does.
    boot_id, cache = tmp_path / "boot_id", tmp_path / "state" / "accel-probe.json"
    boot_id.write_text("a-boot\n")
    early = node_accel("auto", cache, boot_id, kvm_device=tmp_path / "kvm-not-yet")
    assert early.accel == "tcg" and "missing or not accessible" in early.reason
    assert not cache.exists()
