"""The runner: starts a built appliance in QEMU and watches its serial console.

The accelerator comes from appliance.agent.accel's probe (KVM only when a
probe guest really runs under it), and the runner says which and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.agent.accel import QEMU, AccelChoice
from appliance.agent.qemu import (
    QemuFiles,
    base_argv,
    end_process,
    qmp_session,
    request_powerdown,
    running_pid,
    wait_gone,
)
from appliance.agent.qmp import QMPError
from appliance.errors import ApplianceError
from appliance.run import CommandError, run

STOP_SECONDS = 15.0
# NICs a node may have here (boot --nics): a server's two for a bond, or a few more.
MAX_NICS = 4


class QemuError(ApplianceError):
    """QEMU could not be started, died, or the guest never became ready."""


class KernelPanicError(QemuError):
    """The node's kernel panicked before it was ready (its console says so)."""


PANIC_MARKER = b"Kernel panic - not syncing"


def free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def local_port_free(port: int) -> bool:
    """Whether QEMU can listen on 127.0.0.1:PORT (connections lingering in TIME_WAIT do not count, as
    QEMU's own listener reuses the address too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
        return True


@dataclass(frozen=True)
class VmPaths(QemuFiles):
    """Where a running appliance keeps its files: DIR/run/ (QEMU's own, and the boot's)."""

    console_name: str = "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.directory / "qemu.log"

    @property
    def ssh_port_file(self) -> Path:
        return self.directory / "ssh-port"

    @property
    def disk_overlay(self) -> Path:
        """The node's disk: copy-on-write over the built image, which stays pristine."""
        return self.directory / "disk.qcow2"

    @property
    def extra_disk(self) -> Path:
        """A second disk, blank when made (boot --extra-disk): one a node may claim for its state."""
        return self.directory / "extra-disk.qcow2"

    @property
    def disk_build_id(self) -> Path:
        """Which build the overlay was made over (a rebuild replaces its backing file)."""
        return self.directory / "disk.build-id"


# QEMU's socket networking: the frames of every node on one LAN go as UDP datagrams to this multicast
# group (at the LAN's port), sent and joined on the loopback interface alone, so nothing leaves this machine.
LAN_GROUP = "230.0.0.1"
LAN_INTERFACE = "127.0.0.1"


@dataclass(frozen=True)
class Lan:
    """A second NIC on a host network shared by every node booted with the same port (boot --lan)."""

    port: int
    mac: str  # one per node: frames between nodes with the same MAC go nowhere


def lan_mac(run_dir: Path) -> str:
    """The LAN NIC's MAC for the node whose files are in RUN_DIR: the same at every boot of it, as a real
    NIC's is, and another for each directory (QEMU would give every node's second NIC the same one).
    Locally administered and unicast, in QEMU's 52:54 range."""
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).digest()
    return "52:54:" + ":".join(f"{byte:02x}" for byte in digest[:4])


@dataclass(frozen=True)
class BootConfig:
    media: Path  # an ISO; for media_kind "disk" a qcow2 disk; for "pxe" the iPXE script TFTP hands out
    accel: AccelChoice
    ssh_port: int
    memory_mb: int = 2048
    cpus: int = 2
    firmware: str = "bios"  # or "uefi"
    media_kind: str = "iso"  # or "disk", "pxe"
    extra_disk: Path | None = None  # a qcow2 attached after the boot media, never booted from
    seed: Path | None = None  # a raw volume attached read-only after it: a cidata or config-2 volume
    # A hardware watchdog, as servers have: systemd on the node keeps it, and a hung node resets.
    watchdog: bool = True
    lan: Lan | None = None  # a second NIC, after the first (the node's first wired NIC stays the SSH one)
    # NICs on the one user-mode network (more than one: a bond's ports, each with a link to cut).
    nics: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.nics <= MAX_NICS:
            raise QemuError(f"a node here has 1 to {MAX_NICS} NICs, not {self.nics}")


def make_qcow2(image: Path, size_bytes: int, what: str, backing_raw: Path | None = None) -> None:
    """A new qcow2 of SIZE_BYTES in place of any old one; over BACKING_RAW when given, named relative to
    IMAGE's directory, so a copy of the build directory boots its own image and not the original's."""
    image.parent.mkdir(parents=True, exist_ok=True)
    image.unlink(missing_ok=True)
    backing = ["-b", relative_backing(backing_raw, image), "-F", "raw"] if backing_raw else []
    try:
        run(["qemu-img", "create", "-q", "-f", "qcow2", *backing, str(image), str(size_bytes)])
    except CommandError as error:
        raise QemuError(f"cannot make the {what} {image}: {error.output_tail}") from error


def relative_backing(backing: Path, overlay: Path) -> str:
    """BACKING as qemu-img reads a relative backing name: from the overlay's directory."""
    return os.path.relpath(backing.resolve(), overlay.parent.resolve())


@dataclass(frozen=True)
class Backing:
    written: str  # as the overlay names it
    path: Path  # where that is, from the overlay's directory


def overlay_backing(overlay: Path) -> Backing | None:
    """The backing file OVERLAY names (None for none), read by qemu-img without opening it."""
    try:
        info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(overlay)]))
    except (CommandError, ValueError) as error:
        raise QemuError(f"cannot read the disk overlay {overlay}: {error}") from error
    written = info.get("backing-filename")
    if not written:
        return None
    return Backing(str(written), (overlay.parent / str(written)).resolve())


def rebase_relative(overlay: Path, backing: Path) -> None:
    """Name BACKING relative to OVERLAY in its header (the data is untouched: it is the same file)."""
    try:
        run(["qemu-img", "rebase", "-u", "-F", "raw", "-b", relative_backing(backing, overlay), str(overlay)])
    except CommandError as error:
        raise QemuError(f"cannot rename the backing file of {overlay}: {error.output_tail}") from error


def make_disk_overlay(backing: Path, overlay: Path, size_bytes: int) -> None:
    """A qcow2 over BACKING (raw), SIZE_BYTES large: the guest writes into it, never into the image."""
    make_qcow2(overlay, size_bytes, "disk overlay", backing_raw=backing)


def make_blank_disk(disk: Path, size_bytes: int) -> None:
    """An empty qcow2 of SIZE_BYTES: a disk with nothing on it, as a new server's is."""
    make_qcow2(disk, size_bytes, "blank disk")


def find_ovmf() -> tuple[Path, Path]:
    for code, variables in (
        ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
        ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ):
        if Path(code).exists() and Path(variables).exists():
            return Path(code), Path(variables)
    raise QemuError("UEFI firmware (OVMF) not found; install the ovmf package (`make deps`)")


def qemu_argv(config: BootConfig, paths: VmPaths) -> list[str]:
    argv = [
        *base_argv("appliance", config.accel, config.memory_mb, config.cpus, paths),
        *media_argv(config),
        *network_argv(config),
        *lan_argv(config),
        "-device",
        "virtio-rng-pci",
    ]
    if config.watchdog:
        argv += ["-device", "i6300esb"]
    if config.firmware == "uefi":
        code, variables = find_ovmf()
        own_vars = paths.directory / "OVMF_VARS.fd"
        shutil.copyfile(variables, own_vars)
        argv += [
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={own_vars}",
        ]
    return argv


def media_argv(config: BootConfig) -> list[str]:
    return boot_media_argv(config) + extra_disk_argv(config) + seed_argv(config)


def seed_argv(config: BootConfig) -> list[str]:
    if config.seed is None:
        return []
    return [
        "-drive",
        f"file={config.seed},format=raw,if=none,id=seed,readonly=on",
        "-device",
        "virtio-blk-pci,drive=seed",
    ]


def extra_disk_argv(config: BootConfig) -> list[str]:
    if config.extra_disk is None:
        return []
    return [
        "-drive",
        f"file={config.extra_disk},format=qcow2,if=none,id=disk1,discard=unmap",
        "-device",
        "virtio-blk-pci,drive=disk1",
    ]


def boot_media_argv(config: BootConfig) -> list[str]:
    if config.media_kind == "disk":
        # virtio-blk, as most servers' disks are not IDE; bootindex makes it the
        # first choice of SeaBIOS and OVMF alike.
        return [
            "-drive",
            f"file={config.media},format=qcow2,if=none,id=disk0,discard=unmap",
            "-device",
            "virtio-blk-pci,drive=disk0,bootindex=0",
        ]
    if config.media_kind == "pxe":
        return []
    return ["-drive", f"file={config.media},media=cdrom,readonly=on,if=ide", "-boot", "d"]


def nic_id(index: int) -> str:
    """The QEMU device id of the node's NIC INDEX (from 0), as QMP's set_link names it."""
    return f"nic{index}"


def nic_mac(index: int) -> str:
    """The MAC of the node's NIC INDEX when it has several: QEMU's own default MACs, written out
    so that a port the node reports (by its permanent MAC) names its QEMU device."""
    return f"52:54:00:12:34:{0x56 + index:02x}"


def network_argv(config: BootConfig) -> list[str]:
    netdev = f"user,id=net0,hostfwd=tcp:127.0.0.1:{config.ssh_port}-:22"
    if config.media_kind == "pxe":
        # QEMU's own DHCP and TFTP hand the NIC's iPXE the chain script, as a
        # site's DHCP/TFTP would; the rest comes over HTTP from the host.
        netdev += f",tftp={config.media.parent},bootfile={config.media.name}"
    if config.nics == 1:
        return ["-netdev", netdev, "-device", nic_device(config, "net0", 0)]
    # Several NICs on one LAN: each on a port of QEMU's hub, whose uplink is the one user-mode
    # network (its DHCP and SSH forward). A hub repeats every frame to every other port, as a
    # switch does until it learns; a port's link is cut alone (set_link on its NIC's id).
    argv = ["-netdev", netdev, "-netdev", "hubport,id=hub0-uplink,hubid=0,netdev=net0"]
    for index in range(config.nics):
        port = f"hub0-port{index}"
        argv += ["-netdev", f"hubport,id={port},hubid=0", "-device", nic_device(config, port, index)]
    return argv


def nic_device(config: BootConfig, netdev: str, index: int) -> str:
    named = "" if config.nics == 1 else f",id={nic_id(index)},mac={nic_mac(index)}"
    if config.media_kind == "pxe" and index == 0:
        return f"virtio-net-pci,netdev={netdev}{named},bootindex=0"
    # No option ROM unless booting from the network: iPXE only slows other boots.
    return f"virtio-net-pci,netdev={netdev}{named},romfile="


def set_nic_link(paths: VmPaths, index: int, up: bool) -> None:
    """Plug or pull the cable of the running node's NIC INDEX (QMP set_link: the node sees its link
    go down or up, and the NIC neither sends nor receives while it is down)."""
    try:
        with qmp_session(paths) as monitor:
            monitor.execute("set_link", {"name": nic_id(index), "up": up})
    except QMPError as error:
        raise QemuError(f"cannot set the link of {nic_id(index)} {'up' if up else 'down'}: {error}") from error


def lan_argv(config: BootConfig) -> list[str]:
    """The LAN NIC: a virtio NIC on QEMU's multicast socket backend, a hub: its frames reach every other
    node on the same port (and its own NIC, as every member of the group gets what is sent to it)."""
    if config.lan is None:
        return []
    netdev = f"socket,id=net1,mcast={LAN_GROUP}:{config.lan.port},localaddr={LAN_INTERFACE}"
    return ["-netdev", netdev, "-device", f"virtio-net-pci,netdev=net1,mac={config.lan.mac},romfile="]


class RunningVm:
    """A QEMU process started by `start_vm`; stop() kills it and reaps it."""

    def __init__(self, process: subprocess.Popen[bytes], paths: VmPaths, config: BootConfig, started: float) -> None:
        self.process = process
        self.paths = paths
        self.config = config
        self.started = started

    def wait_for_console(self, marker: str, timeout: float) -> float:
        """Seconds from QEMU start until `marker` shows on the serial console."""
        deadline = self.started + timeout
        wanted = marker.encode()
        while time.monotonic() < deadline:
            console = self.paths.console_log.read_bytes() if self.paths.console_log.exists() else b""
            if wanted in console:
                return time.monotonic() - self.started
            if PANIC_MARKER in console:
                line = console[console.index(PANIC_MARKER) :].split(b"\n", 1)[0].decode(errors="replace").strip()
                raise KernelPanicError(f"the node's kernel panicked before it was ready: {line}")
            if self.process.poll() is not None:
                raise QemuError(f"QEMU exited with code {self.process.returncode}: {self.qemu_log_tail()}")
            time.sleep(0.1)
        raise QemuError(
            f"no {marker!r} on the serial console after {timeout:.0f}s (console log: {self.paths.console_log})"
        )

    def qemu_log_tail(self) -> str:
        try:
            return " ".join(self.paths.qemu_log.read_text(errors="replace").splitlines()[-5:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.paths.pid_file.unlink(missing_ok=True)


def start_vm(config: BootConfig, paths: VmPaths) -> RunningVm:
    """Start QEMU in its own session so it can outlive this process (boot --wait)."""
    if not config.media.is_file():
        raise QemuError(f"no {config.media_kind} at {config.media} (build one with `appliance build`)")
    paths.directory.mkdir(parents=True, exist_ok=True)
    paths.console_log.unlink(missing_ok=True)
    paths.ssh_port_file.write_text(f"{config.ssh_port}\n")
    argv = qemu_argv(config, paths)
    with paths.qemu_log.open("wb") as qemu_log:
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as error:
            raise QemuError(f"cannot start {QEMU}: {error.strerror} (run `make deps`)") from error
    return RunningVm(process, paths, config, time.monotonic())


def recorded_vm(paths: VmPaths) -> int | None:
    """The pid of the QEMU running from DIR/run, if one is."""
    return running_pid(paths)


def stop_recorded_vm(paths: VmPaths, shutdown_timeout: float = 0.0) -> bool:
    """Stop the QEMU recorded in DIR/run/qemu.pid; False when none was running.

    With a shutdown_timeout the node is first asked to shut down (ACPI power
    button, through QEMU's QMP socket) and given that long; then, or without
    one, QEMU is ended at once: a power cut.
    """
    pid = recorded_vm(paths)
    if pid is None:
        paths.pid_file.unlink(missing_ok=True)
        return False
    if not (shutdown_timeout > 0 and request_powerdown(paths) and wait_gone(pid, shutdown_timeout)):
        # Waited for: the next boot of the same disk needs QEMU's lock on it.
        end_process(pid, STOP_SECONDS)
    paths.pid_file.unlink(missing_ok=True)
    return True
