"""The DIB command line and environment for a spec, and running it with progress."""

from __future__ import annotations

import fcntl
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from appliance.build.mirrors import HostMirrors
from appliance.errors import ApplianceError
from appliance.run import CommandError, run_streaming
from appliance.spec import BREAK_GLASS_USER, Spec

# The stock distro element first, then ours; each of ours pulls in its deps.
ELEMENTS = (
    "debian-minimal",
    "appliance-base",
    "appliance-kvm",
    "appliance-agent",
    "appliance-guest-net",
    "appliance-network",
    "appliance-ssh",
    "appliance-data",
    "appliance-lifecycle",
    "appliance-live",
)
# The Debian architecture every build is for (written into slots' build.json, checked by upgrades).
ARCH = "amd64"
PHASE_LINE = re.compile(r"dib-run-parts Running \S*/(?P<phase>[a-z0-9-]+\.d)/(?P<script>\S+)$")
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "image-create"


@dataclass(frozen=True)
class DibInvocation:
    argv: tuple[str, ...]
    env: dict[str, str]
    output_prefix: Path

    @property
    def squashfs(self) -> Path:
        # Made by appliance-live's cleanup.d/100-make-squashfs.
        return self.output_prefix.with_name(self.output_prefix.name + ".squashfs")

    @property
    def kernel(self) -> Path:
        return self.output_prefix.with_name(self.output_prefix.name + ".vmlinuz")

    @property
    def initrd(self) -> Path:
        return self.output_prefix.with_name(self.output_prefix.name + ".initrd")

    @property
    def dpkg_manifest(self) -> Path:
        name = self.output_prefix.name
        return self.output_prefix.with_name(name + ".d") / "dib-manifests" / f"dib-manifest-dpkg-{name}"


class BuildError(ApplianceError):
    """The DIB build failed; names the phase it failed in and where its log is."""

    def __init__(self, phase: str, log_path: Path, tail: str) -> None:
        self.phase = phase
        self.log_path = log_path
        self.tail = tail
        super().__init__(f"image build failed in {phase}; last lines of the log:\n{tail}\nfull log: {log_path}")


def dib_executable() -> str:
    """disk-image-create from the same environment as this Python, else from PATH."""
    beside = Path(sys.executable).parent / "disk-image-create"
    return str(beside) if beside.exists() else "disk-image-create"


def build_invocation(
    spec: Spec,
    *,
    elements_dir: Path,
    agent_dir: Path,
    output_prefix: Path,
    mirrors: HostMirrors,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    base_env: dict[str, str] | None = None,
) -> DibInvocation:
    """The exact disk-image-create command and environment for `spec`."""
    # DIB makes no image of its own (appliance-live depends on no-final-image): the element makes
    # the squashfs itself, compressed for fast reading, beside the kernel and initrd.
    argv = [dib_executable(), "-a", ARCH, "-t", "raw", "-o", str(output_prefix)]
    if spec.packages:
        argv += ["-p", ",".join(spec.packages)]
    argv += ELEMENTS
    env = dict(os.environ if base_env is None else base_env)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])
    env.update(
        {
            "ELEMENTS_PATH": str(elements_dir),
            "DIB_RELEASE": spec.release,
            "DIB_DISTRIBUTION_MIRROR": spec.mirrors.debian or mirrors.debian,
            "DIB_DEBIAN_SECURITY_MIRROR": spec.mirrors.security or mirrors.security,
            "DIB_IMAGE_CACHE": str(cache_dir),
            # Reuse the debootstrap tarball from the cache: a second build skips debootstrap.
            "DIB_DEBOOTSTRAP_CACHE": "1",
            "DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE": "1",
            "DIB_APPLIANCE_AGENT_SRC": str(agent_dir),
            "DIB_APPLIANCE_AGENT_USER": spec.ssh.user,
            "DIB_APPLIANCE_BREAK_GLASS_USER": BREAK_GLASS_USER,
        }
    )
    return DibInvocation(argv=tuple(argv), env=env, output_prefix=output_prefix)


class PhaseFollower:
    """Turns DIB's output into 'where are we' updates and keeps the full log."""

    def __init__(self, log: TextIO, on_phase: Callable[[str, str], None]) -> None:
        self.log = log
        self.on_phase = on_phase
        self.phase = "setup"

    def __call__(self, line: str) -> None:
        self.log.write(line + "\n")
        match = PHASE_LINE.search(line)
        if match:
            self.phase = match["phase"]
            self.on_phase(match["phase"], match["script"])


def run_dib(
    invocation: DibInvocation,
    log_file: Path,
    on_phase: Callable[[str, str], None],
    on_wait: Callable[[str], None] = lambda message: None,
) -> float:
    """Run DIB; returns seconds taken, raises BuildError naming the failing phase."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # Builds sharing DIB's cache (its apt archive above all) would fail on each other's apt
    # locks: one at a time, the others wait and say so.
    cache_lock = Path(invocation.env["DIB_IMAGE_CACHE"]) / ".appliance-build.lock"
    with log_file.open("w", buffering=1) as log:
        follower = PhaseFollower(log, on_phase)
        try:
            with one_build_at_a_time(
                cache_lock, lambda: on_phase("waiting", f"for another build using {cache_lock.parent}")
            ):
                run_streaming(invocation.argv, env=invocation.env, on_line=follower)
        except CommandError as error:
            raise BuildError(follower.phase, log_file, error.output_tail) from error
    return time.monotonic() - started


@contextmanager
def one_build_at_a_time(lock: Path, waiting: Callable[[], None]) -> Iterator[None]:
    """Hold `lock` for the block; if another build holds it, call `waiting` once and wait for it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
