from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from appliance.build.pack.budget import BudgetError, check_budget
from appliance.manifest import (
    Artifact,
    ArtifactKind,
    Manifest,
    MissingArtifactError,
    NoBuildError,
    describe_artifacts,
    read_dpkg_manifest,
)


def test_artifacts_are_described_by_size_and_sha256(tmp_path: Path) -> None:
    path = tmp_path / "a.iso"
    path.write_bytes(b"x" * 3000)
    (artifact,) = describe_artifacts([path])
    assert artifact == Artifact(file="a.iso", size_bytes=3000, sha256=hashlib.sha256(b"x" * 3000).hexdigest())


def test_dpkg_manifest_lists_installed_packages_sorted(tmp_path: Path) -> None:
    path = tmp_path / "dib-manifest-dpkg-demo"
    path.write_text(
        json.dumps(
            {
                "packages": [
                    {"package": "zstd", "arch": "amd64", "version": "1.5", "status": "ii "},
                    {"package": "bash", "arch": "amd64", "version": "5.2", "status": "ii "},
                    {"package": "gone", "arch": "amd64", "version": "1", "status": "rc "},
                ]
            }
        )
    )
    packages = read_dpkg_manifest(path)
    assert [package.name for package in packages] == ["bash", "zstd"]
    assert packages[0].version == "5.2"


def test_budget_names_every_artifact_over_it() -> None:
    artifacts = (
        Artifact("a.iso", 250_000_000, ""),
        Artifact("a.initrd", 40_000_000, ""),
        Artifact("a.squashfs", 210_000_000, ""),
    )
    with pytest.raises(BudgetError) as caught:
        check_budget(artifacts, 200)
    message = str(caught.value)
    assert "a.iso is 250.0 MB" in message and "a.squashfs is 210.0 MB" in message
    assert "a.initrd" not in message and "200 MB" in message


def test_budget_passes_when_everything_fits() -> None:
    check_budget((Artifact("a.iso", 200_000_000, ""),), 200)


def test_a_directory_without_a_readable_manifest_is_one_no_build_error(tmp_path: Path) -> None:
    with pytest.raises(NoBuildError, match=r"no manifest\.json"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(NoBuildError, match="cannot be read as a build manifest"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(NoBuildError, match="not a build manifest"):
        Manifest.load(tmp_path)


def test_artifacts_are_found_by_kind_and_a_missing_kind_names_its_output(tmp_path: Path) -> None:
    artifacts = [
        {"file": "demo.iso", "size_bytes": 3, "sha256": "a"},
        {"file": "demo.raw", "size_bytes": 5, "sha256": "b"},
    ]
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "demo", "build_id": "demo-1", "artifacts": artifacts}))
    manifest = Manifest.load(tmp_path)
    assert manifest.artifact(ArtifactKind.ISO) == tmp_path / "demo.iso"
    assert manifest.artifacts_of(ArtifactKind.DISK_RAW) == [Artifact("demo.raw", 5, "b")]
    with pytest.raises(MissingArtifactError, match='add "pxe" to outputs'):
        manifest.artifact(ArtifactKind.IPXE)
