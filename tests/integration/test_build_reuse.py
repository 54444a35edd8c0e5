"""`appliance build` with its root image in the cache: no DIB run, real packers (grub-mkrescue, mke2fs,
sfdisk, mtools, qemu-img) on a stand-in root, and the node's configuration in front of the initrd."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from appliance.build import pipeline
from appliance.build.base import base_key, bases_dir
from appliance.build.dib import build_invocation
from appliance.build.layout import AGENT_DIR, ELEMENTS_DIR
from appliance.build.mirrors import host_mirrors
from appliance.manifest import Manifest
from appliance.progress import Progress
from appliance.spec import Spec, parse_spec

PACKAGES = [{"name": "bash", "version": "5.2.37-2", "arch": "amd64"}, {"name": "qemu-system-x86", "version": "1:10.0",
            "arch": "amd64"}]  # fmt: skip
BASE_INITRD = b"070701" + b"base initrd stands in here".ljust(250, b".")


def seed_base(cache: Path, spec: Spec, tmp_path: Path) -> str:
    """A base in CACHE under the key a build of SPEC computes, as build_base stores one."""
    invocation = build_invocation(
        spec, elements_dir=ELEMENTS_DIR, agent_dir=AGENT_DIR, output_prefix=tmp_path / "x" / spec.name,
        mirrors=host_mirrors(), cache_dir=cache,
    )  # fmt: skip
    key = base_key(invocation, ELEMENTS_DIR, AGENT_DIR, metadata.version("diskimage-builder"))
    directory = bases_dir(cache) / key
    directory.mkdir(parents=True)
    (directory / "root.squashfs").write_bytes(os.urandom(3 << 20))
    (directory / "vmlinuz").write_bytes(os.urandom(1 << 20))
    (directory / "initrd").write_bytes(BASE_INITRD)
    (directory / "packages.json").write_text(json.dumps(PACKAGES))
    (directory / "dib.log").write_text("dib-run-parts Running ... (the run that made this base)\n")
    (directory / "base.json").write_text(json.dumps({"key": key, "built": "2026-01-02T03:04:05+00:00",
                                                     "dib_seconds": 201.5}))  # fmt: skip
    return key


def config_files(initrd: Path, into: Path) -> Path:
    """The configuration layer unpacked from the front of the initrd (cpio reads the first archive)."""
    into.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], stdin=initrd.open("rb"), cwd=into, check=True)
    return into / "appliance" / "config"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("grub-mkrescue") is None, reason="grub-mkrescue is not installed (make deps)")
def test_a_new_host_name_is_packed_onto_the_cached_root_without_dib(
    tmp_path: Path, public_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_dib(*args: object, **kwargs: object) -> float:
        raise AssertionError("DIB ran although the cache holds the root image")

    monkeypatch.setattr("appliance.build.base.run_dib", no_dib)
    cache, out = tmp_path / "cache", tmp_path / "out"
    spec = parse_spec(f'hostname = "hv01"\n[ssh]\nauthorized_keys = ["{public_key}"]', "t")
    key = seed_base(cache, spec, tmp_path)

    pipeline.build(spec, out, Progress(io.StringIO(), interactive=False), cache_dir=cache)
    first = Manifest.load(out)
    assert first.base is not None and first.base.reused and first.base.key == key and first.base.dib_seconds == 201.5
    assert [package.name for package in first.packages] == ["bash", "qemu-system-x86"]
    assert {artifact.file for artifact in first.artifacts} >= {
        "appliance.squashfs", "appliance.vmlinuz", "appliance.initrd", "appliance.iso", "appliance.raw",
        "appliance.qcow2", "appliance.ipxe",
    }  # fmt: skip
    assert (out / "appliance.squashfs").read_bytes() == (bases_dir(cache) / key / "root.squashfs").read_bytes()
    initrd = (out / "appliance.initrd").read_bytes()
    assert initrd.endswith(BASE_INITRD)
    config = config_files(out / "appliance.initrd", tmp_path / "one")
    assert (config / "etc/hostname").read_text() == "hv01\n"
    assert public_key in (config / "etc/ssh/authorized_keys/agent-user").read_text()
    assert json.loads((config / "etc/appliance/build.json").read_text())["build_id"] == first.build_id
    assert "No DIB run in this build" in (out / "build.log").read_text()

    renamed = parse_spec(f'hostname = "hv02"\n[ssh]\nauthorized_keys = ["{public_key}"]', "t")
    pipeline.build(renamed, out, Progress(io.StringIO(), interactive=False), cache_dir=cache)
    second = Manifest.load(out)
    assert second.base is not None and second.base.key == key and second.build_id != first.build_id
    assert (config_files(out / "appliance.initrd", tmp_path / "two") / "etc/hostname").read_text() == "hv02\n"
    # The root is the same file; only the initrd (and the media that carry it) changed.
    digests = {artifact.file: artifact.sha256 for artifact in first.artifacts}
    assert {a.file for a in second.artifacts if a.sha256 != digests[a.file]} >= {"appliance.initrd", "appliance.iso"}
    assert next(a for a in second.artifacts if a.file == "appliance.squashfs").sha256 == digests["appliance.squashfs"]
