"""`appliance boot`: start a built appliance in QEMU, show or await its console."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from appliance.agent.accel import AccelChoice, probe_accel
from appliance.pack.manifest import load_manifest
from appliance.qemu import (
    BootConfig,
    QemuError,
    RunningVm,
    VmPaths,
    free_local_port,
    start_vm,
)
from appliance.render import READY_MARKER


@dataclass(frozen=True)
class BootRequest:
    out_dir: Path
    wait: bool
    timeout: float
    accel: str  # "auto", "kvm" or "tcg"
    firmware: str
    memory_mb: int
    cpus: int


@dataclass(frozen=True)
class BootResult:
    ssh_port: int
    accel: AccelChoice
    seconds_to_ready: float
    paths: VmPaths
    pid: int


def read_build(out_dir: Path) -> dict[str, object]:
    try:
        return load_manifest(out_dir)
    except FileNotFoundError as error:
        raise QemuError(
            f"{out_dir} holds no build (no manifest.json); run `appliance build -o {out_dir}` first"
        ) from error


def find_iso(out_dir: Path, manifest: dict[str, object]) -> Path:
    artifacts = manifest.get("artifacts")
    entries = artifacts if isinstance(artifacts, list) else []
    isos = [str(entry["file"]) for entry in entries if str(entry.get("file", "")).endswith(".iso")]
    if not isos:
        raise QemuError(f'the build in {out_dir} has no ISO (add "iso" to outputs in the spec)')
    return out_dir / isos[0]


def choose_accel(wanted: str) -> AccelChoice:
    if wanted == "tcg":
        return AccelChoice("tcg", "asked for with --accel tcg")
    choice = probe_accel()
    if wanted == "kvm" and choice.accel != "kvm":
        raise QemuError(f"--accel kvm asked for, but {choice.reason}")
    return choice


def boot(request: BootRequest, say: TextIO = sys.stdout) -> BootResult:
    """Boot the ISO of the build in DIR. With wait, return once ready and leave QEMU running;
    without, follow the console until Ctrl-C. QEMU is stopped on any error or interrupt."""
    manifest = read_build(request.out_dir)
    iso = find_iso(request.out_dir, manifest)
    user = str(manifest.get("ssh_user", "appliance"))
    accel = choose_accel(request.accel)
    say.write(f"accelerator: {accel.accel} ({accel.reason})\n")
    config = BootConfig(
        iso=iso,
        accel=accel,
        ssh_port=free_local_port(),
        memory_mb=request.memory_mb,
        cpus=request.cpus,
        firmware=request.firmware,
    )
    paths = VmPaths(request.out_dir / "run")
    vm = start_vm(config, paths)
    say.write(f"QEMU pid {vm.process.pid}; console log {paths.serial_log}\n")
    example = '{"jsonrpc":"2.0","id":1,"method":"host.report"}'
    say.write(f"ask the node's agent: echo '{example}' | ssh -p {config.ssh_port} {user}@127.0.0.1\n")
    say.flush()
    try:
        if request.wait:
            seconds = vm.wait_for_console(READY_MARKER, request.timeout)
        else:
            seconds = follow_console(vm, say)
    except BaseException:
        vm.stop()
        raise
    return BootResult(ssh_port=config.ssh_port, accel=accel, seconds_to_ready=seconds, paths=paths, pid=vm.process.pid)


def follow_console(vm: RunningVm, say: TextIO) -> float:
    """Copy the serial console to `say` until QEMU exits (Ctrl-C stops it)."""
    position = 0
    ready_at = 0.0
    marker = READY_MARKER.encode()
    recent = b""
    while vm.process.poll() is None:
        if vm.paths.serial_log.exists():
            with vm.paths.serial_log.open("rb") as log:
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
