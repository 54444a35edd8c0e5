"""`appliance boot`: start a built appliance in QEMU, show or await its console.

From the ISO, or from the disk image: then the node's disk is a copy-on-write
overlay in DIR/run/ over NAME.raw, kept from boot to boot like a real disk
(the data partition and SSH host key survive) until the build changes or
--fresh-disk asks for a new one. The overlay names NAME.raw relative to
itself, so a copied build directory boots its own image; an overlay over
another directory's image is replaced. --extra-disk adds a second disk,
blank when made, for a node that claims one ([storage] claim_blank_disk);
--nics 2 gives the node two NICs on the same network, for a bond of both.
SSH is forwarded from the port of the last boot of the directory while it is
free (--ssh-port picks one), so known_hosts keeps one entry for the node.
--lan PORT adds a second NIC on a network shared by every node booted with
the same port (QEMU's socket networking over loopback multicast), with a MAC
of the directory's own.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from appliance.agent.accel import AccelChoice, probe_accel
from appliance.boot.vm import (
    BootConfig,
    KernelPanicError,
    Lan,
    QemuError,
    RunningVm,
    VmPaths,
    free_local_port,
    lan_mac,
    local_port_free,
    make_blank_disk,
    make_disk_overlay,
    nic_id,
    nic_mac,
    overlay_backing,
    rebase_relative,
    recorded_vm,
    start_vm,
)
from appliance.build.render import READY_MARKER
from appliance.deploy.pxe_server import PxeServer, read_pxe_set, start_pxe_server
from appliance.manifest import ArtifactKind, Manifest

GIB = 1 << 30
DEFAULT_DISK_GIB = 8


@dataclass(frozen=True)
class BootRequest:
    out_dir: Path
    wait: bool
    timeout: float
    accel: str  # "auto", "kvm" or "tcg"
    firmware: str
    memory_mb: int
    cpus: int
    media: str = "iso"  # or "disk", "pxe"
    disk_gib: int = DEFAULT_DISK_GIB  # size of a new disk overlay; the node grows its data partition into it
    fresh_disk: bool = False
    extra_disk_gib: int = 0  # 0: none; else a second disk, blank when made, kept like the first
    ssh_port: int | None = None  # None: the last boot's (DIR/run/ssh-port) if free, else any free one
    seed: Path | None = None  # a volume attached read-only: the provisioner's cidata or config-2
    nics: int = 1  # NICs on the one user-mode network: 2 for a bond of two ports
    lan_port: int | None = None  # a second NIC on the host network of this port, shared with other nodes


@dataclass(frozen=True)
class BootResult:
    ssh_port: int
    accel: AccelChoice
    seconds_to_ready: float
    paths: VmPaths
    pid: int


def prepare_disk(request: BootRequest, manifest: Manifest, paths: VmPaths, say: TextIO) -> Path:
    """The node's disk: the overlay from an earlier boot of this build, or a new one."""
    raw = manifest.artifact(ArtifactKind.DISK_RAW)
    build_id = manifest.build_id
    overlay = paths.disk_overlay
    try:
        made_over = paths.disk_build_id.read_text().strip()
    except OSError:
        made_over = ""
    if overlay.exists() and not request.fresh_disk:
        if made_over != build_id:
            # Its backing file was replaced by a newer build: the overlay no longer fits it.
            say.write(f"disk: {overlay} was made over build {made_over or '(unknown)'}; making a new one\n")
        elif kept_overlay(overlay, raw, say):
            say.write(f"disk: {overlay} from an earlier boot, with its data (--fresh-disk starts over)\n")
            return overlay
    size = max(request.disk_gib * GIB, raw.stat().st_size)
    make_disk_overlay(raw, overlay, size)
    paths.disk_build_id.write_text(build_id + "\n")
    say.write(f"disk: new {size / GIB:.1f} GiB overlay {overlay} over {raw.name}\n")
    return overlay


def kept_overlay(overlay: Path, raw: Path, say: TextIO) -> bool:
    """Whether OVERLAY is over this directory's RAW. One over another directory's image (this directory
    was copied from it) would boot that build, and break when it is deleted or rebuilt."""
    try:
        backing = overlay_backing(overlay)
    except QemuError as error:
        say.write(f"disk: {error}; making a new one\n")
        return False
    if backing is None or backing.path != raw.resolve():
        named = backing.path if backing else "no backing file"
        say.write(f"disk: {overlay} is over {named}, not this directory's {raw.name} "
                  "(a copied build directory?); making a new one\n")  # fmt: skip
        return False
    if Path(backing.written).is_absolute():
        # Made before overlays named their image relatively: same file, so only the name changes.
        rebase_relative(overlay, raw)
    return True


def choose_ssh_port(requested: int | None, paths: VmPaths, say: TextIO) -> int:
    """The host port forwarded to the node's SSH: the one asked for; else the last boot's, so the node
    keeps one known_hosts entry and --strict keeps working; else any free one."""
    if requested is not None:
        if not local_port_free(requested):
            raise QemuError(f"--ssh-port {requested}: 127.0.0.1:{requested} is in use")
        return requested
    try:
        last: int | None = int(paths.ssh_port_file.read_text().strip())
    except (OSError, ValueError):
        last = None
    if last is not None and local_port_free(last):
        say.write(f"ssh: port {last}, as at the last boot\n")
        return last
    port = free_local_port()
    if last is not None:
        say.write(f"ssh: port {last} of the last boot is in use; port {port} now "
                  f"(known_hosts sees [127.0.0.1]:{port} as a new host)\n")  # fmt: skip
    return port


def prepare_extra_disk(request: BootRequest, paths: VmPaths, say: TextIO) -> Path | None:
    """The second disk: blank when made, then kept with what the node wrote on it, until --fresh-disk."""
    if not request.extra_disk_gib:
        return None
    disk = paths.extra_disk
    if disk.exists() and not request.fresh_disk:
        say.write(f"extra disk: {disk} from an earlier boot, with its data (--fresh-disk empties it)\n")
        return disk
    make_blank_disk(disk, request.extra_disk_gib * GIB)
    say.write(f"extra disk: new blank {request.extra_disk_gib} GiB {disk}\n")
    return disk


def lan_of(request: BootRequest, paths: VmPaths, say: TextIO) -> Lan | None:
    if request.lan_port is None:
        return None
    lan = Lan(request.lan_port, lan_mac(paths.directory))
    say.write(f"lan: a second NIC ({lan.mac}) on the network of every node booted with --lan {lan.port}\n")
    return lan


# What QEMU's user network calls the host's loopback, seen from the guest.
QEMU_HOST_ADDRESS = "10.0.2.2"


def serve_pxe_to_qemu(out_dir: Path, say: TextIO) -> PxeServer:
    """The build's PXE set over HTTP on 127.0.0.1, at the URL the guest reaches it by."""
    pxe = read_pxe_set(out_dir)
    port = free_local_port()
    server = start_pxe_server(pxe, "127.0.0.1", port, f"http://{QEMU_HOST_ADDRESS}:{port}/", lambda line: None)
    say.write(f"pxe: serving {', '.join(pxe.files)} at {server.base_url} (127.0.0.1:{port})\n")
    return server


def choose_accel(wanted: str) -> AccelChoice:
    if wanted == "tcg":
        return AccelChoice("tcg", "asked for with --accel tcg")
    choice = probe_accel()
    if wanted == "kvm" and choice.accel != "kvm":
        raise QemuError(f"--accel kvm asked for, but {choice.reason}")
    return choice


def boot(request: BootRequest, say: TextIO = sys.stdout) -> BootResult:
    """Boot the ISO or the disk image of the build in DIR. With wait, return once ready and
    leave QEMU running; without, follow the console until Ctrl-C. QEMU is stopped on any
    error or interrupt."""
    manifest = Manifest.load(request.out_dir)
    paths = VmPaths(request.out_dir / "run")
    running = recorded_vm(paths)
    if running is not None:
        # Its console log, pid file and disk are the ones a second boot would take over.
        where = request.out_dir
        raise QemuError(
            f"an appliance is already running from {where} (QEMU pid {running}); `appliance stop {where}` first"
        )
    pxe_server: PxeServer | None = None
    if request.media == "disk":
        media = prepare_disk(request, manifest, paths, say)
    elif request.media == "pxe":
        pxe_server = serve_pxe_to_qemu(request.out_dir, say)
        media = pxe_server.chain_file
    else:
        media = manifest.artifact(ArtifactKind.ISO)
    extra_disk = prepare_extra_disk(request, paths, say)
    user = manifest.ssh_user
    accel = choose_accel(request.accel)
    say.write(f"accelerator: {accel.accel} ({accel.reason})\n")
    config = BootConfig(
        media=media,
        accel=accel,
        ssh_port=choose_ssh_port(request.ssh_port, paths, say),
        memory_mb=request.memory_mb,
        cpus=request.cpus,
        firmware=request.firmware,
        media_kind=request.media,
        extra_disk=extra_disk,
        seed=request.seed,
        nics=request.nics,
        lan=lan_of(request, paths, say),
    )
    if config.nics > 1:
        ids = ", ".join(f"{nic_id(index)} {nic_mac(index)}" for index in range(config.nics))
        say.write(f"network: {config.nics} NICs on one hub ({ids}); QMP set_link on {paths.qmp_socket} cuts one\n")
    if request.seed is not None and not request.seed.is_file():
        raise QemuError(f"--seed {request.seed}: no such file")
    try:
        vm, seconds = start_and_wait(request, config, paths, say, user)
    finally:
        # Once ready the node holds its root in RAM: the server is no longer needed.
        if pxe_server:
            pxe_server.close()
    return BootResult(ssh_port=config.ssh_port, accel=accel, seconds_to_ready=seconds, paths=paths, pid=vm.process.pid)


def start_and_wait(
    request: BootRequest, config: BootConfig, paths: VmPaths, say: TextIO, user: str, retry_panic: bool = True
) -> tuple[RunningVm, float]:
    """Start QEMU and wait for the node (or follow its console). Under TCG a kernel that panics
    early is booted once more: QEMU's emulation of SMP code patching (an int3 left in kernel
    text being patched) panics a correct kernel now and then; the first console is kept."""
    vm = start_vm(config, paths)
    say.write(f"QEMU pid {vm.process.pid}; console log {paths.console_log}\n")
    example = '{"jsonrpc":"2.0","id":1,"method":"host.report"}'
    say.write(f"ask the node's agent: echo '{example}' | ssh -p {config.ssh_port} {user}@127.0.0.1\n")
    say.flush()
    try:
        if not request.wait:
            return vm, follow_console(vm, say)
        return vm, vm.wait_for_console(READY_MARKER, request.timeout)
    except KernelPanicError as error:
        vm.stop()
        if not (retry_panic and config.accel.accel == "tcg"):
            raise
        kept = paths.directory / "serial-panic.log"
        paths.console_log.replace(kept)
        say.write(f"{error} (under TCG); booting once more, that console is in {kept}\n")
        return start_and_wait(request, config, paths, say, user, retry_panic=False)
    except BaseException:
        vm.stop()
        raise


def follow_console(vm: RunningVm, say: TextIO) -> float:
    """Copy the serial console to `say` until QEMU exits (Ctrl-C stops it)."""
    position = 0
    ready_at = 0.0
    marker = READY_MARKER.encode()
    recent = b""
    while vm.process.poll() is None:
        if vm.paths.console_log.exists():
            with vm.paths.console_log.open("rb") as log:
                log.seek(position)
                chunk = log.read()
            position += len(chunk)
            if chunk:
                say.write(chunk.decode(errors="replace"))
                say.flush()
                # Keep the end of the previous chunk: the marker may straddle two reads.
                recent = recent[-len(marker) :] + chunk
                if not ready_at and marker in recent:
                    ready_at = time.monotonic() - vm.started
        time.sleep(0.1)
    return ready_at
