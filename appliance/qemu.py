"""The runner: starts a built appliance in QEMU and watches its serial console.

KVM is used when a probe guest really runs under it (an openable /dev/kvm is
not enough: some hosts accept the ioctls and then fail to run a vCPU);
otherwise TCG, and the runner says which and why.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.agent.processes import live_pid
from appliance.run import CommandError, run

QEMU = "qemu-system-x86_64"
PROBE_MARKER = b"KVMOK"
PROBE_SECONDS = 5.0
STOP_SECONDS = 15.0

# A 512-byte boot sector that writes PROBE_MARKER to COM1 and halts:
#   xor ax,ax; mov ds,ax; cld; mov dx,0x3f8; mov si,msg
#   next: lodsb; test al,al; jz done; out dx,al; jmp next
#   done: cli; hlt; jmp $-1
PROBE_CODE = bytes.fromhex("31c08ed8fcbaf803be177cac84c07403eeebf8faf4ebfd") + PROBE_MARKER + b"\r\n\0"
PROBE_BOOT_SECTOR = PROBE_CODE.ljust(510, b"\0") + b"\x55\xaa"


class QemuError(Exception):
    """QEMU could not be started, died, or the guest never became ready."""


@dataclass(frozen=True)
class AccelChoice:
    accel: str
    reason: str

    @property
    def cpu(self) -> str:
        return "host" if self.accel == "kvm" else "max"


@dataclass(frozen=True)
class ProbeResult:
    ran: bool
    detail: str


def run_probe_guest(accel: str, cpu: str, timeout: float, qemu: str = QEMU) -> ProbeResult:
    """Boot PROBE_BOOT_SECTOR under `accel` and say whether it printed its marker in time."""
    with tempfile.TemporaryDirectory(prefix="appliance-probe-") as tmp:
        disk, serial = Path(tmp) / "probe.img", Path(tmp) / "serial.log"
        disk.write_bytes(PROBE_BOOT_SECTOR)
        argv = [qemu, "-accel", accel, "-cpu", cpu, "-m", "16", "-nodefaults", "-display", "none", "-no-reboot",
                "-drive", f"file={disk},format=raw,if=floppy", "-serial", f"file:{serial}"]  # fmt: skip
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except OSError as error:
            raise QemuError(f"cannot start {qemu}: {error.strerror} (run `make deps`)") from error
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and process.poll() is None:
                if serial.exists() and PROBE_MARKER in serial.read_bytes():
                    return ProbeResult(True, f"a probe guest ran under {accel}")
                time.sleep(0.05)
        finally:
            process.kill()
            _, stderr = process.communicate()
        lines = stderr.decode(errors="replace").strip().splitlines()
        return ProbeResult(False, lines[0] if lines else f"no output from the probe guest within {timeout:.0f}s")


def probe_accel(qemu: str = QEMU, kvm_device: Path = Path("/dev/kvm")) -> AccelChoice:
    """KVM if a probe guest prints its marker under it within a few seconds, else TCG."""
    if not os.access(kvm_device, os.R_OK | os.W_OK):
        return AccelChoice("tcg", f"{kvm_device} is missing or not accessible")
    probe = run_probe_guest("kvm", "host", PROBE_SECONDS, qemu)
    if probe.ran:
        return AccelChoice("kvm", probe.detail)
    return AccelChoice("tcg", f"KVM cannot run guests here ({probe.detail})")


def free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class VmPaths:
    """Where a running appliance keeps its files: DIR/run/."""

    run_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def serial_log(self) -> Path:
        return self.run_dir / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.run_dir / "qemu.log"

    @property
    def ssh_port_file(self) -> Path:
        return self.run_dir / "ssh-port"

    @property
    def disk_overlay(self) -> Path:
        """The node's disk: copy-on-write over the built image, which stays pristine."""
        return self.run_dir / "disk.qcow2"

    @property
    def disk_build_id(self) -> Path:
        """Which build the overlay was made over (a rebuild replaces its backing file)."""
        return self.run_dir / "disk.build-id"


@dataclass(frozen=True)
class BootConfig:
    media: Path  # an ISO, or for media_kind "disk" a qcow2 disk
    accel: AccelChoice
    ssh_port: int
    memory_mb: int = 2048
    cpus: int = 2
    firmware: str = "bios"  # or "uefi"
    media_kind: str = "iso"  # or "disk"


def make_disk_overlay(backing: Path, overlay: Path, size_bytes: int) -> None:
    """A qcow2 over BACKING (raw), SIZE_BYTES large: the guest writes into it, never into the image."""
    overlay.parent.mkdir(parents=True, exist_ok=True)
    overlay.unlink(missing_ok=True)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing.resolve()), "-F", "raw"]
    try:
        run([*argv, str(overlay), str(size_bytes)])
    except CommandError as error:
        raise QemuError(f"cannot make the disk overlay {overlay}: {error.output_tail}") from error


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
        QEMU,
        "-name",
        "appliance",
        "-machine",
        f"q35,accel={config.accel.accel}",
        "-cpu",
        config.accel.cpu,
        "-m",
        str(config.memory_mb),
        "-smp",
        str(config.cpus),
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        f"file:{paths.serial_log}",
        *media_argv(config),
        "-netdev",
        f"user,id=net0,hostfwd=tcp:127.0.0.1:{config.ssh_port}-:22",
        "-device",
        "virtio-net-pci,netdev=net0,romfile=",
        "-device",
        "virtio-rng-pci",
        "-pidfile",
        str(paths.pid_file),
    ]
    if config.firmware == "uefi":
        code, variables = find_ovmf()
        own_vars = paths.run_dir / "OVMF_VARS.fd"
        shutil.copyfile(variables, own_vars)
        argv += [
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={own_vars}",
        ]
    return argv


def media_argv(config: BootConfig) -> list[str]:
    if config.media_kind == "disk":
        # virtio-blk, as most servers' disks are not IDE; bootindex makes it the
        # first choice of SeaBIOS and OVMF alike.
        return [
            "-drive",
            f"file={config.media},format=qcow2,if=none,id=disk0,discard=unmap",
            "-device",
            "virtio-blk-pci,drive=disk0,bootindex=0",
        ]
    return ["-drive", f"file={config.media},media=cdrom,readonly=on,if=ide", "-boot", "d"]


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
            if self.paths.serial_log.exists() and wanted in self.paths.serial_log.read_bytes():
                return time.monotonic() - self.started
            if self.process.poll() is not None:
                raise QemuError(f"QEMU exited with code {self.process.returncode}: {self.qemu_log_tail()}")
            time.sleep(0.1)
        raise QemuError(
            f"no {marker!r} on the serial console after {timeout:.0f}s (console log: {self.paths.serial_log})"
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
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    paths.serial_log.unlink(missing_ok=True)
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
    # Only our QEMU: a stale pid file may name a process that reused the pid.
    return live_pid(paths.pid_file, QEMU, str(paths.pid_file))


def stop_recorded_vm(paths: VmPaths) -> bool:
    """Stop the QEMU recorded in DIR/run/qemu.pid; False when none was running."""
    pid = recorded_vm(paths)
    if pid is None:
        paths.pid_file.unlink(missing_ok=True)
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        paths.pid_file.unlink(missing_ok=True)
        return False
    # Wait for it to go: the next boot of the same disk needs QEMU's lock on it.
    if not wait_gone(pid, STOP_SECONDS):
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid, STOP_SECONDS)
    paths.pid_file.unlink(missing_ok=True)
    return True


def wait_gone(pid: int, timeout: float) -> bool:
    """True once `pid` no longer runs QEMU (gone, a zombie, or the pid reused)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return True
        if QEMU.encode() not in command_line:
            return True
        time.sleep(0.1)
    return False
