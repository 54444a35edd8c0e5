"""The root image every node of a spec shares, made by diskimage-builder and kept in the cache.

What DIB makes (the squashfs root, the kernel, the initrd and the package list)
depends on the package set, the release, the mirrors, our elements and the
agent's source, never on a node's host name, keys, policy or network: those are
the configuration layer (appliance.build.pack.config). So a base is stored in
the cache under a digest of exactly what DIB reads, and a build whose inputs
match reuses it without running DIB at all. A changed element, agent, package
list or DIB version is a new key, so a new base.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.build.dib import DibInvocation, run_dib
from appliance.manifest import Package, RootBase, read_dpkg_manifest

BASES_DIR = "appliance-bases"
# Bases kept in a cache: the ones used last. Each is about the size of the squashfs.
KEEP_BASES = 3
# What a base directory holds.
SQUASHFS, KERNEL, INITRD, PACKAGES, INFO, LOG = (
    "root.squashfs", "vmlinuz", "initrd", "packages.json", "base.json", "dib.log"
)  # fmt: skip
# Environment of a DIB run that names paths of this build rather than what goes into the image:
# the trees they name are digested by content instead (or not at all: the cache and output).
PATH_VARIABLES = frozenset({"ELEMENTS_PATH", "DIB_APPLIANCE_AGENT_SRC", "DIB_IMAGE_CACHE"})


@dataclass(frozen=True)
class Base:
    key: str
    directory: Path
    built: str  # when DIB made it (ISO 8601)
    dib_seconds: float
    packages: tuple[Package, ...]
    reused: bool  # found in the cache rather than made by this build

    @property
    def squashfs(self) -> Path:
        return self.directory / SQUASHFS

    @property
    def kernel(self) -> Path:
        return self.directory / KERNEL

    @property
    def initrd(self) -> Path:
        return self.directory / INITRD

    @property
    def log(self) -> Path:
        """DIB's log of the run that made it."""
        return self.directory / LOG

    def describe(self) -> RootBase:
        return RootBase(key=self.key, built=self.built, dib_seconds=self.dib_seconds, reused=self.reused)


def tree_digest(root: Path, skip: Callable[[Path], bool] = lambda path: False) -> str:
    """sha256 over every file below ROOT: its relative path, whether it is executable, its bytes."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if skip(relative) or path.is_dir():
            continue
        digest.update(relative.as_posix().encode() + b"\0")
        if path.is_symlink():
            digest.update(b"link\0" + os.readlink(path).encode() + b"\0")
            continue
        digest.update(b"x\0" if os.access(path, os.X_OK) else b"-\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def not_bytecode(relative: Path) -> bool:
    return "__pycache__" in relative.parts or relative.suffix == ".pyc"


def base_key(invocation: DibInvocation, elements_dir: Path, agent_dir: Path, dib_version: str) -> str:
    """The digest of everything the DIB run reads: its command line (less the output path), the
    DIB_* variables it gets, the elements and the agent by content, and DIB's own version."""
    argv = list(invocation.argv[1:])
    output = argv.index("-o")
    del argv[output : output + 2]
    inputs = {
        "argv": argv,
        "env": {
            name: value
            for name, value in sorted(invocation.env.items())
            if name.startswith("DIB_") and name not in PATH_VARIABLES
        },
        "elements": tree_digest(elements_dir),
        "agent": tree_digest(agent_dir, skip=not_bytecode),
        "dib": dib_version,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def bases_dir(cache_dir: Path) -> Path:
    return cache_dir / BASES_DIR


def find_base(cache_dir: Path, key: str) -> Base | None:
    """The cached base of this key, if a build stored a whole one."""
    directory = bases_dir(cache_dir) / key
    try:
        info = json.loads((directory / INFO).read_text())
        packages = tuple(Package(**entry) for entry in json.loads((directory / PACKAGES).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not all((directory / name).is_file() for name in (SQUASHFS, KERNEL, INITRD)):
        return None
    os.utime(directory)  # used now: pruning keeps the bases used last
    return Base(key, directory, str(info["built"]), float(info["dib_seconds"]), packages, reused=True)


def build_base(
    invocation: DibInvocation,
    key: str,
    cache_dir: Path,
    log_file: Path,
    on_phase: Callable[[str, str], None],
    on_wait: Callable[[str], None],
) -> Base:
    """Run DIB and store what it made in the cache as the base KEY (whole, or not at all)."""
    started = datetime.now(UTC)
    seconds = run_dib(invocation, log_file, on_phase, on_wait)
    packages = read_dpkg_manifest(invocation.dpkg_manifest)
    store = bases_dir(cache_dir)
    store.mkdir(parents=True, exist_ok=True)
    staging = store / f".{key}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for source, name in ((invocation.squashfs, SQUASHFS), (invocation.kernel, KERNEL), (invocation.initrd, INITRD)):
        shutil.move(source, staging / name)
    shutil.copyfile(log_file, staging / LOG)
    (staging / PACKAGES).write_text(json.dumps([asdict(package) for package in packages], indent=1) + "\n")
    built = started.isoformat(timespec="seconds")
    (staging / INFO).write_text(json.dumps({"key": key, "built": built, "dib_seconds": round(seconds, 1)}) + "\n")
    directory = store / key
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    prune_bases(store, keep=KEEP_BASES, spare=key)
    return Base(key, directory, built, round(seconds, 1), packages, reused=False)


def prune_bases(store: Path, keep: int, spare: str) -> list[Path]:
    """Remove all but the KEEP bases used last (never SPARE); returns what went."""
    bases = [path for path in store.iterdir() if path.is_dir() and not path.name.startswith(".")]
    bases.sort(key=lambda path: path.stat().st_mtime, reverse=True)
    removed = [path for path in bases[keep:] if path.name != spare]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def copy_files(pairs: Iterable[tuple[Path, Path]]) -> None:
    """Copies, not links, out of the cache: an artifact changed in place must not change the base."""
    for source, target in pairs:
        shutil.copyfile(source, target)
        target.chmod(0o644)
