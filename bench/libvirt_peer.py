"""libvirt from Debian's packages as the peer the agent is measured against.

The packages are installed if missing. The daemons run without systemd, as on
these machines (`virtlogd -d`, then `libvirtd -d`); only daemons this bench
started are stopped afterwards, by their pid, errors or not.

libvirtd is measured at its best: where /dev/kvm exists but cannot run guests
(these machines), a libvirtd that sees it finds its QEMU capabilities cache
invalid and probes QEMU again on every API call (a `virsh create` of the tiny
guest took 60 s so). The libvirtd started here runs in a mount namespace of
its own whose /dev has everything but kvm: it probes QEMU once for TCG,
caches that, and answers in milliseconds, as on a machine with working KVM
or none. The section says which state libvirtd was measured in.

For a guest with a bridged NIC, libvirtd must make the tap where the bridge
is: `libvirt_in_namespace` runs a libvirtd of its own (and its virtlogd) in a
network namespace the bench made, with a runtime directory of its own bound
over /run/libvirt (its sockets, pid files and QEMUs' state), /dev/kvm hidden
the same way; virsh reaches it through its socket there.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from helpers.waiting import wait_until

from appliance.agent.accel import QEMU
from appliance.agent.processes import live_pid
from appliance.progress import Progress
from appliance.run import CommandError, run

PACKAGES = ("libvirt-daemon-system", "libvirt-clients", "libvirt-daemon-driver-qemu")
URI = "qemu:///system"
STOP_SECONDS = 15.0


@dataclass(frozen=True)
class Daemon:
    name: str
    pid_file: Path


DAEMONS = (Daemon("virtlogd", Path("/run/virtlogd.pid")), Daemon("libvirtd", Path("/run/libvirtd.pid")))


@dataclass(frozen=True)
class RunningDaemon:
    name: str
    pid: int
    ours: bool
    kvm_hidden: bool = False  # started in a mount namespace without /dev/kvm


KVM = Path("/dev/kvm")


# Run as `sh -c HIDE_KVM sh COMMAND...` in a new mount namespace: a tmpfs /dev with everything the
# real one has (device nodes, links, and its mounts bound again) but kvm, then COMMAND.
HIDE_KVM = """set -e
dev=$(mktemp -d)
mount -t tmpfs -o mode=0755,size=1m appliance-bench-dev "$dev"
cp -a --one-file-system /dev/. "$dev"/
rm -f "$dev/kvm"
for sub in $(findmnt -rn -o TARGET | grep '^/dev/'); do
    mkdir -p "$dev${sub#/dev}"
    mount --bind "$sub" "$dev${sub#/dev}"
done
mount --move "$dev" /dev
exec "$@"
"""


def daemon_argv(name: str) -> tuple[list[str], bool]:
    """How to start a daemon, and whether /dev/kvm is hidden from it (libvirtd only, and only when
    there is one to hide: with none there is nothing to re-probe for).

    Hidden means: its mount namespace has a /dev of its own without kvm (HIDE_KVM), so libvirt finds
    no KVM, as its probe of QEMU finds none, and keeps the capabilities it cached. (Binding
    /dev/null over /dev/kvm does not do: a KVM that opens but does not work keeps the cache invalid;
    and libvirt cannot carry a file bound over /dev/kvm into the /dev it builds for each guest.)
    """
    if name != "libvirtd" or not KVM.exists():
        return [name, "-d"], False
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", HIDE_KVM, "sh", name, "-d"], True


def state_of(daemons: list[RunningDaemon]) -> str:
    """The state libvirtd was measured in, for the section's note."""
    libvirtd = next((daemon for daemon in daemons if daemon.name == "libvirtd"), None)
    if libvirtd is None:
        return "libvirtd not running"
    if not libvirtd.ours:
        return "libvirtd was already running (not started by the bench): whether it sees /dev/kvm is unknown"
    if libvirtd.kvm_hidden:
        return "libvirtd started with /dev/kvm hidden (own mount namespace): QEMU probed once for TCG, then cached"
    return "libvirtd started as is (no /dev/kvm on this host)"


def missing_packages() -> list[str]:
    missing = []
    for package in PACKAGES:
        try:
            status = run(["dpkg-query", "-W", "-f=${Status}", package])
        except CommandError:
            status = ""
        if status != "install ok installed":
            missing.append(package)
    return missing


def ensure_packages(progress: Progress) -> None:
    missing = missing_packages()
    if not missing:
        return
    with progress.step(f"apt-get install {' '.join(missing)}"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-q"], env=env)
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)


def virsh(*args: str, uri: str = URI) -> str:
    return run(["virsh", "-c", uri, *args])


def stop_pid(pid: int, name: str) -> None:
    """SIGTERM, then SIGKILL if it is still there after STOP_SECONDS."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_SECONDS
    while time.monotonic() < deadline:
        if gone(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def gone(pid: int) -> bool:
    """No such process, or a zombie (a daemon's parent here is not always one that reaps)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


@contextmanager
def libvirt_daemons(progress: Progress) -> Iterator[list[RunningDaemon]]:
    """virtlogd and libvirtd running; the ones started here are stopped on the way out."""
    running: list[RunningDaemon] = []
    try:
        for daemon in DAEMONS:
            pid = live_pid(daemon.pid_file, daemon.name)
            if pid is not None:
                progress.note(f"{daemon.name} already running (pid {pid}): used, and left running")
                running.append(RunningDaemon(daemon.name, pid, ours=False))
                continue
            argv, hidden = daemon_argv(daemon.name)
            run(argv)
            pid = wait_until(lambda daemon=daemon: live_pid(daemon.pid_file, daemon.name), 30, f"{daemon.name} pid")
            progress.note(f"started {daemon.name} (pid {pid})" + (", /dev/kvm hidden from it" if hidden else ""))
            running.append(RunningDaemon(daemon.name, pid, ours=True, kvm_hidden=hidden))
        wait_until(answers, 60, "libvirtd to answer virsh")
        yield running
    finally:
        for daemon in reversed(running):
            if daemon.ours:
                stop_pid(daemon.pid, daemon.name)
                progress.note(f"stopped {daemon.name} (pid {daemon.pid})")


def answers(uri: str = URI) -> bool:
    try:
        virsh("version", uri=uri)
    except CommandError:
        return False
    return True


# Run inside the namespace's own mount namespace (after HIDE_KVM, where /dev/kvm exists) as
# `sh -c IN_NAMESPACE sh RUN_DIR`: RUN_DIR becomes /run/libvirt for these two daemons alone.
IN_NAMESPACE = """set -e
mount --bind "$1" /run/libvirt
virtlogd -d -p /run/libvirt/virtlogd.pid
exec libvirtd -d -p /run/libvirt/libvirtd.pid
"""


@dataclass(frozen=True)
class PrivateLibvirt:
    """A libvirtd of the bench's own in a network namespace: its URI (through its own socket),
    its runtime directory, and its daemons."""

    uri: str
    run_dir: Path
    daemons: list[RunningDaemon]


@contextmanager
def libvirt_in_namespace(exec_prefix: list[str], run_dir: Path, progress: Progress) -> Iterator[PrivateLibvirt]:
    """virtlogd and libvirtd started in the network namespace EXEC_PREFIX enters, with RUN_DIR as
    their /run/libvirt; both stopped by their pid on the way out, whatever happened."""
    run_dir.mkdir(parents=True, exist_ok=True)
    hidden = KVM.exists()
    inner = ["sh", "-c", IN_NAMESPACE, "sh", str(run_dir)]
    if hidden:
        inner = ["sh", "-c", HIDE_KVM, "sh", *inner]
    argv = [*exec_prefix, "unshare", "--mount", "--propagation", "private", "--", *inner]
    daemons: list[RunningDaemon] = []
    try:
        run(argv)
        for name in ("virtlogd", "libvirtd"):
            pid_file = run_dir / f"{name}.pid"
            pid = wait_until(lambda pid_file=pid_file, name=name: live_pid(pid_file, name), 30, f"{name} pid")
            daemons.append(RunningDaemon(name, pid, ours=True, kvm_hidden=hidden and name == "libvirtd"))
        progress.note("started " + ", ".join(f"{daemon.name} (pid {daemon.pid})" for daemon in daemons)
                      + f" in the namespace, runtime directory {run_dir}")  # fmt: skip
        uri = f"{URI}?socket={run_dir / 'libvirt-sock'}"
        wait_until(lambda: answers(uri), 60, "the namespace's libvirtd to answer virsh")
        yield PrivateLibvirt(uri, run_dir, daemons)
    finally:
        # By their pid files too: a daemon that started before a later step failed is not in the list.
        for name in ("libvirtd", "virtlogd"):
            pid = live_pid(run_dir / f"{name}.pid", name)
            if pid is not None:
                stop_pid(pid, name)
                progress.note(f"stopped the namespace's {name} (pid {pid})")


def domain_xml(
    name: str, kernel: Path, initrd: Path, cmdline: str, memory_mib: int, vcpus: int, serial: Path, bridge: str = ""
) -> str:
    """The agent's tiny guest as libvirt would run it: TCG, q35, the same CPU model, a balloon, serial to a file;
    with BRIDGE, a virtio NIC on it with no option ROM, as the agent's bridged NIC (libvirt makes the tap)."""
    nic = (
        f"<interface type='bridge'><source bridge='{escape(bridge)}'/><model type='virtio'/><rom enabled='no'/>"
        "</interface>"
        if bridge
        else ""
    )
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>{escape(QEMU_PATH)}</emulator>
    <serial type='file'><source path='{escape(str(serial))}'/><target port='0'/></serial>
    {nic}
    <memballoon model='virtio'/>
  </devices>
</domain>
"""


QEMU_PATH = shutil.which(QEMU) or f"/usr/bin/{QEMU}"


RUN_DIR = Path("/run/libvirt")


def domain_pid(name: str, run_dir: Path = RUN_DIR) -> int | None:
    """The QEMU libvirt runs for a domain, from libvirt's own pid file."""
    return live_pid(run_dir / "qemu" / f"{name}.pid", QEMU)


def destroy(name: str, uri: str = URI, run_dir: Path = RUN_DIR) -> None:
    """Pull the plug on a transient domain; it is gone from libvirt afterwards."""
    try:
        virsh("destroy", name, uri=uri)
    except CommandError:
        pid = domain_pid(name, run_dir)
        if pid is not None:
            stop_pid(pid, "qemu")
