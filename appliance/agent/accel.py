"""Which accelerator QEMU guests get: KVM only when a probe guest really runs under it.

An openable /dev/kvm that answers the KVM API is not enough: some hosts (this
project's own CI, a PVM host) accept the ioctls and then abort or hang the
first real vCPU. So the probe boots a 512-byte guest that prints a marker on
its serial port, under KVM, with a deadline. The runner on the operator's
machine and the agent on the node share this module.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

QEMU = "qemu-system-x86_64"
PROBE_MARKER = b"KVMOK"
PROBE_SECONDS = 5.0
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
DETECT_VIRT = "systemd-detect-virt"

# A 512-byte boot sector that writes PROBE_MARKER to COM1 and halts:
#   xor ax,ax; mov ds,ax; cld; mov dx,0x3f8; mov si,msg
#   next: lodsb; test al,al; jz done; out dx,al; jmp next
#   done: cli; hlt; jmp $-1
PRINT_CODE = bytes.fromhex("31c08ed8fcbaf803be177cac84c07403eeebf8faf4ebfd")


def boot_sector_printing(message: bytes) -> bytes:
    """A boot sector that writes `message` (no NUL in it, at most 486 bytes) to COM1 and halts."""
    return (PRINT_CODE + message + b"\0").ljust(510, b"\0") + b"\x55\xaa"


PROBE_BOOT_SECTOR = boot_sector_printing(PROBE_MARKER + b"\r\n")


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
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
            return ProbeResult(False, f"cannot start {qemu}: {error.strerror}")
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


def emulated_by_qemu(detect_virt: str = DETECT_VIRT) -> bool:
    """Whether this machine is a QEMU guest without KVM under it (TCG).

    systemd-detect-virt says "kvm" for a KVM guest and "qemu" for one QEMU
    emulates. There, /dev/kvm sits on emulated SVM: running a guest on it is
    slow, and the probe once panicked a booted node's kernel ("corrupted stack
    end detected inside scheduler") under this project's CI.
    """
    try:
        result = subprocess.run([detect_virt, "--vm"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.stdout.strip() == "qemu"


KVM_DEVICE = Path("/dev/kvm")


def kvm_unreachable(kvm_device: Path = KVM_DEVICE) -> AccelChoice | None:
    """TCG, and why, when /dev/kvm cannot be opened at all (checked afresh: it costs nothing)."""
    if not os.access(kvm_device, os.R_OK | os.W_OK):
        return AccelChoice("tcg", f"{kvm_device} is missing or not accessible")
    return None


def probe_accel(qemu: str = QEMU, kvm_device: Path = KVM_DEVICE, detect_virt: str = DETECT_VIRT) -> AccelChoice:
    """KVM if a probe guest prints its marker under it within a few seconds, else TCG."""
    unreachable = kvm_unreachable(kvm_device)
    if unreachable:
        return unreachable
    if emulated_by_qemu(detect_virt):
        return AccelChoice("tcg", "this machine is itself emulated by QEMU (TCG): its KVM would be emulated too")
    probe = run_probe_guest("kvm", "host", PROBE_SECONDS, qemu)
    if probe.ran:
        return AccelChoice("kvm", probe.detail)
    return AccelChoice("tcg", f"KVM cannot run guests here ({probe.detail})")


def node_accel(setting: str, cache: Path, boot_id_path: Path = BOOT_ID, kvm_device: Path = KVM_DEVICE) -> AccelChoice:
    """The agent's accelerator: as configured, or ("auto") probed once per boot.

    Every SSH connection runs its own agent, so the probe's answer is kept in
    `cache` with the boot id it holds for; a reboot (or a new kernel) probes again.
    """
    if setting in ("kvm", "tcg"):
        return AccelChoice(setting, "set in the agent config")
    # Not kept: early in a boot /dev/kvm may not be there yet, or not yet the kvm group's
    # (the module loading, udev not done); a later connection must look again.
    unreachable = kvm_unreachable(kvm_device)
    if unreachable:
        return unreachable
    boot_id = boot_id_path.read_text().strip()
    try:
        cached = json.loads(cache.read_text())
        if cached.get("boot_id") == boot_id:
            return AccelChoice(str(cached["accel"]), str(cached["reason"]))
    except (OSError, ValueError, KeyError):
        pass
    choice = probe_accel()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        staged = cache.with_name(f".{cache.name}.{os.getpid()}")
        staged.write_text(json.dumps({"boot_id": boot_id, **asdict(choice)}))
        staged.replace(cache)
    except OSError:
        pass  # Not kept: the next connection probes again, nothing worse.
    return choice
