"""manifest.json: the contract between a build and everything that uses it (boot, flash, PXE, bench).

The build writes it; everyone else reads it with `Manifest.load(dir)`, which
raises one `NoBuildError` for a directory that holds no build, and finds files
with `manifest.artifact(kind)`, which names the spec output to add when the
build lacks one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError

MANIFEST_NAME = "manifest.json"


class NoBuildError(ApplianceError):
    """A directory given as a build holds no (readable) manifest.json."""

    code = "no_build"


class MissingArtifactError(ApplianceError):
    """The build has no artifact of the kind asked for."""


class ArtifactKind(Enum):
    """Each kind of file a build makes: its file suffix, and the spec output that makes it."""

    KERNEL = (".vmlinuz", "squashfs")
    INITRD = (".initrd", "squashfs")
    SQUASHFS = (".squashfs", "squashfs")
    ISO = (".iso", "iso")
    DISK_RAW = (".raw", "disk")
    DISK_QCOW2 = (".qcow2", "disk")
    IPXE = (".ipxe", "pxe")

    @property
    def suffix(self) -> str:
        return self.value[0]

    @property
    def output(self) -> str:
        return self.value[1]


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
class RootBase:
    """The root image a build used (appliance.build.base): its cache key, when DIB made it and in
    how long, and whether this build reused it from the cache instead of running DIB."""

    key: str
    built: str
    dib_seconds: float
    reused: bool


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
    base: RootBase | None = None
    # Where it was loaded from (not written to the file).
    directory: Path | None = None

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        del data["directory"]
        return data

    @classmethod
    def load(cls, out_dir: Path) -> Manifest:
        path = out_dir / MANIFEST_NAME
        hint = f"run `appliance build -o {out_dir}` first"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as error:
            raise NoBuildError(f"{out_dir} holds no build (no {MANIFEST_NAME}); {hint}") from error
        except (OSError, ValueError) as error:
            raise NoBuildError(f"{path} cannot be read as a build manifest ({error}); {hint}") from error
        try:
            return manifest_from_json(data, out_dir)
        except (KeyError, TypeError, ValueError) as error:
            raise NoBuildError(
                f"{path} is not a build manifest of this tool (bad or missing {error}); {hint}"
            ) from error

    def artifacts_of(self, kind: ArtifactKind) -> list[Artifact]:
        return [artifact for artifact in self.artifacts if artifact.file.endswith(kind.suffix)]

    def artifact(self, kind: ArtifactKind) -> Path:
        """The build's file of this kind; an error naming the spec output to add if there is none."""
        found = self.artifacts_of(kind)
        where = self.directory or Path(".")
        if not found:
            raise MissingArtifactError(
                f'the build in {where} has no {kind.suffix} file (add "{kind.output}" to outputs in the spec)'
            )
        return where / found[0].file


def manifest_from_json(data: dict[str, Any], directory: Path | None) -> Manifest:
    return Manifest(
        name=str(data.get("name", "")),
        build_id=str(data.get("build_id", "")),
        created=str(data.get("created", "")),
        spec_sha256=str(data.get("spec_sha256", "")),
        tool_version=str(data.get("tool_version", "")),
        dib_version=str(data.get("dib_version", "")),
        release=str(data.get("release", "")),
        ssh_user=str(data.get("ssh_user", "appliance")),
        kernel_cmdline=str(data.get("kernel_cmdline", "")),
        build_seconds=float(data.get("build_seconds", 0.0)),
        artifacts=tuple(
            Artifact(
                file=str(entry["file"]), size_bytes=int(entry.get("size_bytes", 0)), sha256=str(entry.get("sha256", ""))
            )
            for entry in data["artifacts"]
        ),
        packages=tuple(
            Package(name=str(entry["name"]), version=str(entry["version"]), arch=str(entry["arch"]))
            for entry in data.get("packages", [])
        ),
        base=root_base_from_json(data.get("base")),
        directory=directory,
    )


def root_base_from_json(data: Any) -> RootBase | None:
    """A manifest's base, or None for a build made before bases were kept."""
    if not isinstance(data, dict):
        return None
    return RootBase(
        key=str(data["key"]),
        built=str(data.get("built", "")),
        dib_seconds=float(data.get("dib_seconds", 0.0)),
        reused=bool(data.get("reused", False)),
    )


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
