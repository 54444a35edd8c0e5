"""manifest.json: what was built, from what, and every artifact's size and sha256."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Artifact:
    file: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str


@dataclass(frozen=True)
class Manifest:
    name: str
    build_id: str
    created: str
    spec_sha256: str
    tool_version: str
    dib_version: str
    release: str
    ssh_user: str
    kernel_cmdline: str
    build_seconds: float
    artifacts: tuple[Artifact, ...]
    packages: tuple[Package, ...]

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_artifacts(paths: list[Path]) -> tuple[Artifact, ...]:
    return tuple(Artifact(file=path.name, size_bytes=path.stat().st_size, sha256=sha256_of(path)) for path in paths)


def read_dpkg_manifest(path: Path) -> tuple[Package, ...]:
    """Packages from DIB's dpkg manifest (written by its dpkg element), sorted by name."""
    data = json.loads(path.read_text())
    packages = [
        Package(name=entry["package"], version=entry["version"], arch=entry["arch"])
        for entry in data["packages"]
        if entry.get("status", "ii").startswith("ii")
    ]
    return tuple(sorted(packages, key=lambda package: package.name))


def write_manifest(manifest: Manifest, out_dir: Path) -> Path:
    path = out_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return path


def load_manifest(out_dir: Path) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((out_dir / MANIFEST_NAME).read_text())
    return loaded


def artifact_entries(manifest: dict[str, object]) -> list[dict[str, Any]]:
    """The manifest's artifacts (file, size_bytes, sha256); none when the list is absent or malformed."""
    artifacts = manifest.get("artifacts")
    entries = artifacts if isinstance(artifacts, list) else []
    return [entry for entry in entries if isinstance(entry, dict) and "file" in entry]
