"""`appliance upgrade HOST DIR` and `appliance fleet upgrade`: a new build into the slot a node does not run.

The build directory is checked first (a build, its kernel, initrd and squashfs
matching its manifest's sizes and sha256) and described to the node, which
refuses another spec name, another architecture, a build too large for its
slot, or a trial still being judged, before a byte is sent; the build it runs
already is a no-op. Then the files it does not have yet (a cut-off upgrade
resumes) stream through the agent, each checked against the manifest's sha256
by the node; commit writes the slot and arms one trial boot of it. With
--stop-guests running guests are stopped (ACPI) after that, with --reboot the
node reboots into the trial, and with --wait the client waits until the node
has judged it: blessed (the new build is the default) or rolled back (the node
runs the build it ran before, and says why).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.agent.disklayout import INITRD_FILE, KERNEL_FILE, SQUASHFS_FILE
from appliance.build.dib import ARCH
from appliance.errors import ApplianceError
from appliance.manifest import ArtifactKind, Manifest, sha256_of
from appliance.nodes.client import Node, NodeAddress
from appliance.nodes.errors import NodeError
from appliance.nodes.inventory import HostEntry

DEFAULT_WAIT_SECONDS = 900.0
POLL_SECONDS = 5.0
POLL_TIMEOUT_SECONDS = 30.0  # each poll's connection and request
GUEST_STOP_SECONDS = 120
# The slot's file names, by the build's artifact kinds.
SLOT_FILES = (
    (KERNEL_FILE, ArtifactKind.KERNEL),
    (INITRD_FILE, ArtifactKind.INITRD),
    (SQUASHFS_FILE, ArtifactKind.SQUASHFS),
)


class UpgradeError(ApplianceError):
    """The build directory cannot be sent (its files do not match its manifest), or the node did not come back."""

    code = "upgrade_failed"


class RolledBackError(UpgradeError):
    """The node judged the trial boot and went back to the build it ran before."""

    code = "rolled_back"


@dataclass(frozen=True)
class BuildFile:
    name: str  # as the slot names it
    path: Path
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class UpgradeBuild:
    manifest: Manifest
    files: tuple[BuildFile, ...]

    def describe(self) -> dict[str, Any]:
        """The build as upgrade.prepare takes it."""
        return {
            "name": self.manifest.name,
            "build_id": self.manifest.build_id,
            "arch": build_arch(self.manifest),
            "kernel_cmdline": self.manifest.kernel_cmdline,
            "files": {file.name: {"size_bytes": file.size_bytes, "sha256": file.sha256} for file in self.files},
        }


@dataclass(frozen=True)
class UpgradeOptions:
    stop_guests: bool = False  # stop running guests (ACPI) once the slot is written, instead of refusing
    stop_timeout: int = GUEST_STOP_SECONDS  # then forced off after this long
    reboot: bool = False
    wait: float = 0.0  # after the reboot, seconds to wait for the node's verdict; 0: do not wait


@dataclass
class UpgradeOutcome:
    host: str
    build_id: str
    noop: bool = False
    reason: str = ""
    slot: str = ""
    sent_bytes: int = 0
    stopped_guests: list[str] = field(default_factory=list)
    rebooted: bool = False
    result: str = ""  # after --wait: "blessed" or "rolled_back"
    seconds: dict[str, float] = field(default_factory=dict)


def build_arch(manifest: Manifest) -> str:
    """The build's Debian architecture: its kernel package's (every build is ARCH today)."""
    for package in manifest.packages:
        if package.name.startswith("linux-image-") and package.arch not in ("", "all"):
            return package.arch
    return ARCH


def load_build(out_dir: Path) -> UpgradeBuild:
    """DIR's kernel, initrd and squashfs, each checked against the manifest before the node is asked."""
    manifest = Manifest.load(out_dir)
    files = []
    for name, kind in SLOT_FILES:
        path = manifest.artifact(kind)
        (artifact,) = manifest.artifacts_of(kind)[:1]
        try:
            size = path.stat().st_size
        except OSError as error:
            raise UpgradeError(f"{path}: {error.strerror}; the build in {out_dir} is incomplete") from error
        if size != artifact.size_bytes or sha256_of(path) != artifact.sha256:
            raise UpgradeError(f"{path} does not match {out_dir}/manifest.json (size or sha256): rebuild it")
        files.append(BuildFile(name, path, size, artifact.sha256))
    return UpgradeBuild(manifest, tuple(files))


Say = Callable[[str], None]
Sent = Callable[[str, int, int], None]


def push(
    node: Node, build: UpgradeBuild, options: UpgradeOptions, say: Say, sent: Sent | None = None
) -> UpgradeOutcome:
    """Prepare, send what the node lacks, commit: the new build is in the other slot, armed for one trial."""
    outcome = UpgradeOutcome(node.address.host, build.manifest.build_id)
    started = time.monotonic()
    prepared = node.call("upgrade.prepare", {"build": build.describe(), "stop_guests": options.stop_guests})
    if prepared.get("noop"):
        outcome.noop, outcome.reason, outcome.slot = (
            True,
            str(prepared.get("reason", "")),
            str(prepared.get("slot", "")),
        )
        return outcome
    outcome.slot = str(prepared["slot"])
    wanted = set(prepared.get("send", []))
    for file in build.files:
        if file.name not in wanted:
            say(f"{file.name}: on the node already (an earlier upgrade's), not sent again")
            continue
        node.upload(
            "upgrade.send", {"file": file.name, "sha256": file.sha256}, file.path, file_progress(sent, file.name)
        )
        outcome.sent_bytes += file.size_bytes
    outcome.seconds["push"] = round(time.monotonic() - started, 1)
    committed = node.call("upgrade.commit")
    outcome.seconds["write"] = float(committed.get("write_seconds", 0.0))
    for name in prepared.get("running_guests", []) if options.stop_guests else []:
        say(f"stop guest {name} (ACPI, then forced after {options.stop_timeout}s)")
        node.call("guest.stop", {"name": name, "timeout": options.stop_timeout})
        outcome.stopped_guests.append(name)
    return outcome


def file_progress(sent: Sent | None, name: str) -> Callable[[int, int], None] | None:
    if sent is None:
        return None
    return lambda done, size: sent(name, done, size)


def reboot(node: Node, outcome: UpgradeOutcome) -> None:
    node.call("node.reboot")
    outcome.rebooted = True


def upgrade_node(
    connect: Callable[[NodeAddress], Node],
    address: NodeAddress,
    build: UpgradeBuild,
    options: UpgradeOptions,
    say: Say,
    sent: Sent | None = None,
) -> UpgradeOutcome:
    """One node's whole upgrade; with options.wait (after a reboot) until the trial is judged."""
    with connect(address) as node:
        from_build = str(node.call("host.report", idempotent=True).get("build_id", ""))
        outcome = push(node, build, options, say, sent)
        if outcome.noop or not options.reboot:
            return outcome
        reboot(node, outcome)
    if options.wait > 0:
        await_verdict(connect, address, outcome, from_build, options.wait, say)
    return outcome


def await_verdict(
    connect: Callable[[NodeAddress], Node],
    address: NodeAddress,
    outcome: UpgradeOutcome,
    from_build: str,
    timeout: float,
    say: Say,
) -> None:
    """After the reboot into OUTCOME's trial, poll the node until it has judged the trial: blessed and
    running OUTCOME's build, or rolled back and running FROM_BUILD again. The verdict, its reason and
    the node's seconds go into OUTCOME; RolledBackError when it went back."""
    started = time.monotonic()
    deadline = started + timeout
    last_seen = ""
    while True:
        seen = ""
        try:
            node = connect(address)
            # The upload may need a long timeout; a poll must not: a connection opened while the node is
            # down can be accepted by a port forward (QEMU's user network, a NAT) and then wait for a
            # banner that only a later connection would get.
            node.timeout = min(node.timeout, POLL_TIMEOUT_SECONDS)
            with node:
                report = node.call("host.report", idempotent=True)
            last = (report.get("slots") or {}).get("last_upgrade") or {}
            running = str(report.get("build_id", ""))
            seen = f"{running}: {last.get('result', '?')}"
            judged = last.get("build_id") == outcome.build_id and (
                (last.get("result") == "blessed" and running == outcome.build_id)
                or (last.get("result") == "rolled_back" and running == from_build)
            )
            if judged:
                break
        except NodeError as error:
            seen = f"not answering ({error.code})"
        if seen != last_seen:
            say(f"{address.host}: {seen}")
            last_seen = seen
        if time.monotonic() >= deadline:
            raise UpgradeError(
                f"{address.host} did not judge the trial of {outcome.build_id} within {timeout:.0f}s (last: {seen})"
            )
        time.sleep(POLL_SECONDS)
    outcome.result = str(last["result"])
    outcome.reason = str(last.get("reason", ""))
    outcome.seconds["verdict"] = round(time.monotonic() - started, 1)
    outcome.seconds.update({key: float(value) for key, value in (last.get("seconds") or {}).items()})
    if outcome.result == "rolled_back":
        raise RolledBackError(f"{address.host} rolled back to {from_build}: {outcome.reason}")


@dataclass(frozen=True)
class FleetOutcome:
    name: str
    ok: bool
    status: str  # "blessed", "noop", "rolled_back", "failed", "skipped"
    detail: str = ""
    code: str = ""


def upgrade_fleet(
    entries: list[HostEntry],
    connect: Callable[[NodeAddress], Node],
    build: UpgradeBuild,
    max_parallel: int,
    options: UpgradeOptions,
    say: Say,
) -> list[FleetOutcome]:
    """Waves of at most MAX_PARALLEL nodes, each rebooted into the trial and waited for; the first
    node that rolls back or fails stops the rollout (the nodes after its wave are left as they are)."""
    outcomes: list[FleetOutcome] = []

    def one(entry: HostEntry) -> FleetOutcome:
        def said(line: str) -> None:
            say(f"{entry.name}: {line}")

        try:
            done = upgrade_node(connect, entry.address, build, options, said)
        except RolledBackError as error:
            return FleetOutcome(entry.name, False, "rolled_back", str(error), error.code)
        except ApplianceError as error:
            return FleetOutcome(entry.name, False, "failed", str(error), error.code)
        if done.noop:
            return FleetOutcome(entry.name, True, "noop", done.reason)
        return FleetOutcome(entry.name, True, "blessed", f"sent {done.sent_bytes / 1e6:.0f} MB")

    width = max(1, max_parallel)
    for start in range(0, len(entries), width):
        wave = entries[start : start + width]
        say(f"wave {start // width + 1}: {', '.join(entry.name for entry in wave)}")
        with ThreadPoolExecutor(max_workers=width) as pool:
            results = list(pool.map(one, wave))
        outcomes += results
        if not all(result.ok for result in results):
            outcomes += [FleetOutcome(entry.name, False, "skipped", "not upgraded: an earlier node failed")
                         for entry in entries[start + width :]]  # fmt: skip
            break
    return outcomes
