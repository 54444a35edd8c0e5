"""Root slots A and B: what each holds, writing the one not running, and judging a trial boot of it.

Runs as root only: in the lifecycle helper (appliance.agent.lifecycle_helper),
which the agent asks, and in the boot-time check (appliance.agent.trial).

Where the truth lives:
  grubenv (ESP)  appliance_slot   the default slot GRUB boots
                 appliance_trial  a slot armed for one trial boot; GRUB clears it as it takes it
                 appliance_taken  the slot GRUB took a trial of; cleared once the record holds the outcome
  DATA/lifecycle/record.json      what each slot holds and its state, the trial being judged,
                                  and the last upgrade's outcome (for host.report)
  DATA/lifecycle/staging/         an upgrade's files as they arrive, checked one by one

An upgrade: prepare (the target slot is marked `writing`: GRUB never boots it,
since it is neither the default nor armed), stage each file (sha256 checked
against the new build's manifest, resumable), commit (mke2fs -d writes the
slot, the record says `armed`, and last of all grubenv arms the trial). A
power cut at any point leaves the default slot untouched and bootable.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

from appliance.agent.bootdisk import BootDisk, BootDiskError, find_boot_disk
from appliance.agent.disklayout import (
    BOOT_CFG_FILE,
    BUILD_INFO_FILE,
    GRUBENV_SLOT,
    GRUBENV_TRIAL,
    LIVE_DIR,
    LIVE_FILES,
    SLOT_LABELS,
    SLOT_LETTERS,
    LayoutError,
    boot_cfg,
    build_info,
    build_info_text,
    fits_slot,
)
from appliance.agent.errors import AgentError, ErrorCode
from appliance.agent.fat import FatError
from appliance.agent.grubenv import GrubEnv, GrubEnvError
from appliance.agent.lifecycle_config import LifecycleConfig
from appliance.agent.tools import find_program, run_tool

GRUBENV_TAKEN = "appliance_taken"
RECORD_FILE = "record.json"
STAGING_DIR = "staging"
PLAN_FILE = "plan.json"
VERIFIED_FILE = "verified.json"
LOCK_FILE = ".lock"
CHUNK = 1 << 20
SHA256 = re.compile(r"^[0-9a-f]{64}$")
BUILD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}$")
MAX_FILE_BYTES = 1 << 40
# Debian's names for the machines the kernel reports.
DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "i386", "armv7l": "armhf", "ppc64le": "ppc64el"}

# A slot's state: `good` booted and was blessed (or is what the disk was made with); `written`
# holds a build not yet proven; `writing` is being written (never booted); `failed` its trial failed.
GOOD, WRITTEN, WRITING, FAILED, EMPTY = "good", "written", "writing", "failed", "empty"
# The last upgrade's result.
RESULT_WRITING, RESULT_ARMED, RESULT_BLESSED, RESULT_ROLLED_BACK = "writing", "armed", "blessed", "rolled_back"


@dataclass
class SlotInfo:
    state: str = EMPTY
    build_id: str = ""
    name: str = ""
    since: float = 0.0


@dataclass
class Trial:
    slot: str
    build_id: str
    state: str  # "armed" (from commit until it boots), "checking" (the trial boot runs its health check)
    armed_at: float
    checking_at: float = 0.0


@dataclass
class Outcome:
    """The last upgrade (or rollback by hand), as host.report shows it."""

    build_id: str
    slot: str
    from_build_id: str
    result: str
    reason: str = ""
    time: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Record:
    slots: dict[str, SlotInfo] = field(default_factory=lambda: {letter: SlotInfo() for letter in SLOT_LETTERS})
    trial: Trial | None = None
    last: Outcome | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        def build(kind: type[Any], value: Any) -> Any:
            if not isinstance(value, dict):
                return None
            known = {f.name for f in fields(kind)}
            return kind(**{key: item for key, item in value.items() if key in known})

        record = cls()
        for letter, value in (data.get("slots") or {}).items():
            if letter in SLOT_LETTERS and isinstance(value, dict):
                record.slots[letter] = build(SlotInfo, value)
        record.trial = build(Trial, data.get("trial"))
        record.last = build(Outcome, data.get("last"))
        return record


def conflict(message: str) -> AgentError:
    return AgentError(ErrorCode.UPGRADE_CONFLICT, message)


def node_arch() -> str:
    machine = platform.machine()
    return DEBIAN_ARCH.get(machine, machine)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any, mode: int = 0o644) -> None:
    """Written aside, flushed and renamed: a power cut leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.new")
    with partial.open("w") as stream:
        stream.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        stream.flush()
        os.fsync(stream.fileno())
    partial.chmod(mode)
    partial.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@dataclass(frozen=True)
class SlotHost:
    """One node's slots: its config, its boot disk, and the build it runs."""

    config: LifecycleConfig
    disk: BootDisk
    running: dict[str, Any]

    @property
    def running_id(self) -> str:
        return str(self.running.get("build_id", ""))

    @property
    def grubenv(self) -> GrubEnv:
        area = self.disk.area(self.disk.partition("esp"))
        return GrubEnv(area.path, area.offset)

    @property
    def record_path(self) -> Path:
        return self.config.lifecycle_dir / RECORD_FILE

    @property
    def staging(self) -> Path:
        return self.config.lifecycle_dir / STAGING_DIR

    def read_env(self) -> dict[str, str]:
        try:
            return self.grubenv.read()
        except (OSError, FatError, GrubEnvError) as error:
            raise AgentError(ErrorCode.TOOL_FAILED, f"cannot read grubenv on {self.disk.disk}: {error}") from error

    def write_env(self, **changes: str) -> dict[str, str]:
        try:
            return self.grubenv.update(**changes)
        except (OSError, FatError, GrubEnvError) as error:
            raise AgentError(ErrorCode.TOOL_FAILED, f"cannot write grubenv on {self.disk.disk}: {error}") from error

    def default_slot(self, env: dict[str, str]) -> str:
        slot = env.get(GRUBENV_SLOT, "")
        return slot if slot in SLOT_LETTERS else SLOT_LETTERS[0]

    def require_data(self) -> None:
        try:
            storage = self.config.storage_marker.read_text().strip()
        except OSError:
            storage = "unknown"
        if storage != "persistent" or not self.config.data_dir.is_dir():
            raise AgentError(
                ErrorCode.UPGRADE_CONFLICT,
                f"the data partition is not mounted at {self.config.data_dir} (state storage: {storage}): "
                "an upgrade has nowhere to stage its files",
            )

    @contextmanager
    def locked(self) -> Iterator[Record]:
        """The record, under the node's one lifecycle lock; saved by whoever changes it."""
        self.require_data()
        self.config.lifecycle_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with (self.config.lifecycle_dir / LOCK_FILE).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield self.load()

    def load(self) -> Record:
        data = read_json(self.record_path)
        record = Record.from_json(data) if isinstance(data, dict) else Record()
        # What runs is what the disk was made (or last upgraded) with, if the record does not know it.
        booted = record.slots[self.disk.booted]
        if booted.build_id != self.running_id:
            record.slots[self.disk.booted] = SlotInfo(
                GOOD, self.running_id, str(self.running.get("name", "")), time.time()
            )
        return record

    def save(self, record: Record) -> None:
        write_json(self.record_path, record.to_json())
        publish_status(self, record)


def open_host(config: LifecycleConfig) -> SlotHost:
    """This node's slots; refused on a node booted from the ISO or the network."""
    try:
        disk = find_boot_disk(config.boot_disk, config.booted_slot)
    except BootDiskError as error:
        raise AgentError(
            ErrorCode.NOT_INSTALLED, f"this node's boot disk cannot be used for upgrades: {error}"
        ) from error
    if disk is None:
        raise AgentError(
            ErrorCode.NOT_INSTALLED,
            "this node booted from the ISO or the network and has no root slots: install it on a disk first "
            "(appliance node install HOST --disk DEVICE), or flash the disk image",
        )
    running = read_json(config.build_info)
    return SlotHost(config=config, disk=disk, running=running if isinstance(running, dict) else {})


def status(host: SlotHost, record: Record | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The slots as host.report shows them."""
    env = host.read_env() if env is None else env
    record = record or host.load()
    return {
        "disk": str(host.disk.disk),
        "booted": host.disk.booted,
        "default": host.default_slot(env),
        "armed": env.get(GRUBENV_TRIAL, ""),
        "slots": {letter: asdict(info) for letter, info in record.slots.items()},
        "trial": asdict(record.trial) if record.trial else None,
        "last_upgrade": asdict(record.last) if record.last else None,
    }


def publish_status(host: SlotHost, record: Record) -> None:
    """/run/appliance/lifecycle.json, which the agent reads for host.report (it cannot read the ESP)."""
    # The report is a convenience; the record and grubenv are the truth.
    with suppress(OSError, AgentError):
        write_json(host.config.status_file, {"installed": True, **status(host, record)})


def check_build(data: object) -> dict[str, Any]:
    """A build as the client describes it from its manifest: refused field by field."""
    if not isinstance(data, dict):
        raise AgentError(ErrorCode.INVALID_PARAMS, "build must be an object", {"field": "build"})
    known = {"name", "build_id", "arch", "kernel_cmdline", "files"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise AgentError(ErrorCode.INVALID_PARAMS, f"unknown field(s) in build: {', '.join(unknown)}")
    for name in ("name", "build_id", "arch", "kernel_cmdline"):
        if not isinstance(data.get(name), str) or not data[name]:
            raise AgentError(ErrorCode.INVALID_PARAMS, f"build.{name} must be a string", {"field": f"build.{name}"})
    if not BUILD_ID.fullmatch(data["build_id"]):
        raise AgentError(ErrorCode.INVALID_PARAMS, "build.build_id is not a build id", {"field": "build.build_id"})
    try:
        boot_cfg(data["kernel_cmdline"], data["build_id"])
    except LayoutError as error:
        raise AgentError(ErrorCode.INVALID_PARAMS, str(error), {"field": "build.kernel_cmdline"}) from error
    files = data.get("files")
    if not isinstance(files, dict) or set(files) != set(LIVE_FILES):
        raise AgentError(
            ErrorCode.INVALID_PARAMS,
            f"build.files must describe exactly {', '.join(LIVE_FILES)}",
            {"field": "build.files"},
        )
    for file, entry in files.items():
        size = entry.get("size_bytes") if isinstance(entry, dict) else None
        sha256 = entry.get("sha256") if isinstance(entry, dict) else None
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_FILE_BYTES:
            raise AgentError(ErrorCode.INVALID_PARAMS, f"build.files.{file}.size_bytes must be a size in bytes")
        if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
            raise AgentError(ErrorCode.INVALID_PARAMS, f"build.files.{file}.sha256 must be 64 lower-case hex digits")
    return data


def prepare(host: SlotHost, requested: object, refuse_guests: list[str] | None = None) -> dict[str, Any]:
    """Check the new build against this node and make the slot not running ready to receive it.

    Refused before anything is written: another spec name, another architecture,
    a build larger than the slot, a trial still being judged, and REFUSE_GUESTS
    (the agent names the guests that run when the operator did not say to stop
    them). The build that runs already is a no-op; so is the build already
    written and armed.
    """
    build = check_build(requested)
    running_name = str(host.running.get("name", ""))
    if build["name"] != running_name:
        raise AgentError(
            ErrorCode.BUILD_REFUSED, f"the build is of spec {build['name']!r}; this node runs {running_name!r}"
        )
    if build["arch"] != node_arch():
        raise AgentError(ErrorCode.BUILD_REFUSED, f"the build is for {build['arch']}; this node is {node_arch()}")
    if build["build_id"] == host.running_id:
        return {"noop": True, "reason": f"this node runs build {host.running_id} already"}
    host.require_data()
    target = host.disk.other
    content = sum(int(entry["size_bytes"]) for entry in build["files"].values())
    slot_bytes = host.disk.slot(target).size
    if not fits_slot(content, slot_bytes):
        raise AgentError(
            ErrorCode.SLOT_TOO_SMALL,
            f"the build's files take {content / 1e6:.1f} MB; slot {target} ({slot_bytes / 1e6:.0f} MB) holds "
            f"builds of up to {slot_bytes / 1.1 / 1e6:.0f} MB: nothing was written",
        )
    with host.locked() as record:
        env = host.read_env()
        default = host.default_slot(env)
        if host.disk.booted != default:
            raise conflict(
                f"this node runs slot {host.disk.booted} but slot {default} is the default: a trial boot is "
                "being judged (or the slot was chosen by hand); wait for it to end, or roll back"
            )
        slot = record.slots[target]
        if (
            slot.build_id == build["build_id"]
            and slot.state == WRITTEN
            and record.trial
            and record.trial.slot == target
            and env.get(GRUBENV_TRIAL) == target
        ):
            armed = f"build {build['build_id']} is written to slot {target} and armed: reboot to try it"
            return {"noop": True, "armed": True, "slot": target, "reason": armed}
        if refuse_guests:
            raise AgentError(
                ErrorCode.GUESTS_RUNNING,
                f"an upgrade refused while guests run: {', '.join(refuse_guests)}; stop them first "
                "(or give --stop-guests)",
                {"guests": refuse_guests},
            )
        if env.get(GRUBENV_TRIAL):
            host.write_env(**{GRUBENV_TRIAL: ""})
        now = time.time()
        record.trial = None
        record.slots[target] = SlotInfo(WRITING, build["build_id"], build["name"], now)
        record.last = Outcome(build["build_id"], target, host.running_id, RESULT_WRITING, "", now)
        host.save(record)
        verified = keep_staged(host, build)
        verified |= reuse_running(host, build, verified)
    send = [file for file in LIVE_FILES if verified.get(file) != build["files"][file]["sha256"]]
    return {"noop": False, "slot": target, "send": send, "staged": sorted(set(LIVE_FILES) - set(send))}


def keep_staged(host: SlotHost, build: dict[str, Any]) -> dict[str, str]:
    """The staging area for BUILD: what an earlier, cut-off run of the same upgrade left is kept."""
    staging = host.staging
    plan = read_json(staging / PLAN_FILE)
    if not isinstance(plan, dict) or plan.get("build_id") != build["build_id"]:
        shutil.rmtree(staging, ignore_errors=True)
    (staging / "tree" / LIVE_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
    write_json(staging / PLAN_FILE, build, mode=0o600)
    verified = read_json(staging / VERIFIED_FILE)
    return verified if isinstance(verified, dict) else {}


def slot_path(host: SlotHost, letter: str) -> str:
    """A slot's file system as e2fsprogs' tools name it: its device, or a disk file with the offset."""
    area = host.disk.area(host.disk.slot(letter))
    return f"{area.path}?offset={area.offset}" if area.offset else str(area.path)


def reuse_running(host: SlotHost, build: dict[str, Any], verified: dict[str, str]) -> dict[str, str]:
    """Files of BUILD that the running slot holds already (the kernel, from one build to the next of a
    release): copied from it with debugfs and checked, instead of sent again. Best effort."""
    debugfs = find_program("debugfs", "e2fsprogs")
    source = slot_path(host, host.disk.booted)
    done = subprocess.run([debugfs, "-R", f"cat /{LIVE_DIR}/{BUILD_INFO_FILE}", source],
                          capture_output=True, text=True, check=False)  # fmt: skip
    try:
        running = json.loads(done.stdout)["files"]
    except (ValueError, KeyError, TypeError):
        return {}
    reused: dict[str, str] = {}
    for file in LIVE_FILES:
        wanted = build["files"][file]["sha256"]
        if verified.get(file) == wanted or (running.get(file) or {}).get("sha256") != wanted:
            continue
        target = host.staging / "tree" / LIVE_DIR / file
        subprocess.run([debugfs, "-R", f"dump /{LIVE_DIR}/{file} {target}", source], capture_output=True, check=False)
        if target.is_file() and sha256_file(target) == wanted:
            reused[file] = wanted
        else:
            target.unlink(missing_ok=True)
    if reused:
        write_json(host.staging / VERIFIED_FILE, {**verified, **reused}, mode=0o600)
    return reused


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def staged_plan(host: SlotHost) -> dict[str, Any]:
    plan = read_json(host.staging / PLAN_FILE)
    if not isinstance(plan, dict):
        raise conflict("no upgrade is being prepared on this node (upgrade.prepare first)")
    return plan


def stage(host: SlotHost, file: str, size: int, sha256: str, stream: BinaryIO) -> dict[str, Any]:
    """Read exactly SIZE bytes of FILE from STREAM into the staging area, checking its sha256."""
    plan = staged_plan(host)
    wanted = plan["files"].get(file)
    if wanted is None or wanted["size_bytes"] != size or wanted["sha256"] != sha256:
        raise AgentError(ErrorCode.INVALID_PARAMS, f"{file} ({size} bytes, {sha256[:12]}) is not a file of the build")
    free = shutil.disk_usage(host.staging).free
    if free < size:
        raise AgentError(
            ErrorCode.NO_SPACE, f"the data partition has {free / 1e6:.0f} MB free; {file} needs {size / 1e6:.0f} MB"
        )
    target = host.staging / "tree" / LIVE_DIR / file
    partial = target.with_name(f".{file}.partial")
    digest = hashlib.sha256()
    received = 0
    with partial.open("wb") as out:
        while received < size:
            chunk = stream.read(min(CHUNK, size - received))
            if not chunk:
                break
            digest.update(chunk)
            out.write(chunk)
            received += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    if received != size:
        partial.unlink(missing_ok=True)
        raise AgentError(ErrorCode.UPLOAD_INCOMPLETE, f"{file}: the connection ended after {received} of {size} bytes")
    if digest.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise AgentError(ErrorCode.CHECKSUM_MISMATCH, f"{file}: sha256 is {digest.hexdigest()}, not {sha256}")
    partial.replace(target)
    with host.locked():
        verified = read_json(host.staging / VERIFIED_FILE)
        verified = verified if isinstance(verified, dict) else {}
        verified[file] = sha256
        write_json(host.staging / VERIFIED_FILE, verified, mode=0o600)
    return {"file": file, "size_bytes": size, "sha256": sha256}


def commit(host: SlotHost) -> dict[str, Any]:
    """Write the staged build into the slot not running, then arm one trial boot of it."""
    plan = staged_plan(host)
    started = time.monotonic()
    with host.locked() as record:
        target = host.disk.other
        slot = record.slots[target]
        if slot.state != WRITING or slot.build_id != plan["build_id"]:
            raise conflict(f"slot {target} is not being written with build {plan['build_id']}: prepare again")
        verified = read_json(host.staging / VERIFIED_FILE) or {}
        missing = [file for file in LIVE_FILES if verified.get(file) != plan["files"][file]["sha256"]]
        if missing:
            raise conflict(f"not received yet: {', '.join(missing)}")
        tree = host.staging / "tree"
        (tree / LIVE_DIR / BOOT_CFG_FILE).write_text(boot_cfg(plan["kernel_cmdline"], plan["build_id"]))
        files = {
            file: (int(plan["files"][file]["size_bytes"]), str(plan["files"][file]["sha256"])) for file in LIVE_FILES
        }
        info = build_info(plan["name"], plan["build_id"], plan["arch"], plan["kernel_cmdline"], files)
        (tree / LIVE_DIR / BUILD_INFO_FILE).write_text(build_info_text(info))
        area = host.disk.area(host.disk.slot(target))
        format_slot(area.path, area.offset, area.size, SLOT_LABELS[SLOT_LETTERS.index(target)], tree)
        written = time.monotonic() - started
        now = time.time()
        record.slots[target] = SlotInfo(WRITTEN, plan["build_id"], plan["name"], now)
        record.trial = Trial(target, plan["build_id"], "armed", now)
        record.last = Outcome(plan["build_id"], target, host.running_id, RESULT_ARMED, "", now, {"write": written})
        host.save(record)
        # Last: from here on the next boot takes the trial.
        host.write_env(**{GRUBENV_TRIAL: target, GRUBENV_TAKEN: ""})
        publish_status(host, record)
    shutil.rmtree(host.staging, ignore_errors=True)
    return {"slot": target, "build_id": plan["build_id"], "armed": True, "write_seconds": round(written, 1)}


def format_slot(path: Path, offset: int, size: int, label: str, tree: Path | None) -> None:
    """A slot's ext4 file system, filled from TREE (mke2fs -d: no mount), flushed to the disk."""
    # A few large files: few inodes (-N), whatever the slot's size (largefile would give 8 to a test's 8 MiB).
    argv = [find_program("mke2fs", "e2fsprogs"), "-q", "-F", "-t", "ext4", "-b", "4096", "-N", "64", "-L", label]
    argv += ["-E", f"offset={offset},root_owner=0:0"]
    if tree is not None:
        argv += ["-d", str(tree)]
    run_tool([*argv, str(path), f"{size // 1024}k"])
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rollback(host: SlotHost) -> dict[str, Any]:
    """Make the other slot the default again (it must hold a build that booted well); the next boot takes it."""
    with host.locked() as record:
        env = host.read_env()
        default = host.default_slot(env)
        booted, other = host.disk.booted, host.disk.other
        if booted != default:
            raise conflict(f"slot {booted} runs on trial (slot {default} is the default): its health check decides")
        previous = record.slots[other]
        if previous.state != GOOD:
            raise AgentError(
                ErrorCode.NO_ROLLBACK,
                f"slot {other} holds no build that booted well ({previous.state}"
                f"{' ' + previous.build_id if previous.build_id else ''}): nothing to roll back to",
            )
        now = time.time()
        record.trial = None
        record.last = Outcome(previous.build_id, other, host.running_id, RESULT_ROLLED_BACK,
                              "rolled back by hand (appliance rollback)", now)  # fmt: skip
        host.save(record)
        host.write_env(**{GRUBENV_SLOT: other, GRUBENV_TRIAL: "", GRUBENV_TAKEN: ""})
        publish_status(host, record)
    return {"default": other, "build_id": previous.build_id, "from_build_id": host.running_id}
