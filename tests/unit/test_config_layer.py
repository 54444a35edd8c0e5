"""The node's configuration layer: the rendered files as a cpio archive in front of the base initrd."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from appliance.build.pack.config import config_cpio, layered_initrd, rendered_config
from appliance.build.render import BuildIdentity, render_image_files
from appliance.spec import parse_spec

IDENTITY = BuildIdentity(build_id="demo-1", created="2026-01-01T00:00:00+00:00", spec_sha256="0" * 64, tool_version="0")


@pytest.fixture
def rendered(tmp_path: Path, public_key: str) -> Path:
    spec = parse_spec(f'hostname = "hv07"\n[ssh]\nauthorized_keys = ["{public_key}"]', "t")
    render_image_files(spec, IDENTITY, tmp_path / "rendered")
    return tmp_path / "rendered"


def unpack(archive: bytes, into: Path) -> Path:
    """The archive unpacked by cpio(1), as the kernel would unpack it into the initramfs."""
    into.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=archive, cwd=into, check=True)
    return into


def test_the_layer_holds_every_rendered_file_at_its_place_in_the_root(rendered: Path, tmp_path: Path) -> None:
    files = {str(file.path): file.data for file in rendered_config(rendered)}
    assert files["etc/hostname"] == b"hv07\n"
    assert "etc/ssh/authorized_keys/agent-user" in files
    assert "etc/systemd/network/40-appliance-br0.network" in files
    assert "etc/appliance/network.env" in files and "etc/appliance/build.json" in files
    root = unpack(config_cpio(rendered_config(rendered), mtime=0), tmp_path / "initramfs") / "appliance/config"
    assert (root / "etc/hostname").read_text() == "hv07\n"
    assert {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()} == set(files)


def test_files_are_roots_and_readable_directories_searchable(rendered: Path) -> None:
    archive = config_cpio(rendered_config(rendered), mtime=0)
    listing = subprocess.run(["cpio", "-tv", "--quiet"], input=archive, capture_output=True, check=True).stdout.decode()
    for line in listing.splitlines():
        mode, _, owner, group = line.split()[:4]
        assert (owner, group) == ("root", "root")
        assert mode in ("-rw-r--r--", "drwxr-xr-x"), line


def test_the_same_configuration_gives_the_same_bytes_whole_words_long(rendered: Path) -> None:
    one = config_cpio(rendered_config(rendered), mtime=1_700_000_000)
    assert one == config_cpio(rendered_config(rendered), mtime=1_700_000_000)
    # The kernel looks for the next archive of the initrd on a 4-byte boundary.
    assert len(one) % 4 == 0


def test_the_initrd_is_the_layer_then_the_base_unchanged(rendered: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.initrd"
    base.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(256)) * 64)  # stands for the base's archives
    config = config_cpio(rendered_config(rendered), mtime=0)
    initrd = layered_initrd(config, base, tmp_path / "demo.initrd")
    assert initrd.read_bytes() == config + base.read_bytes()


def test_a_file_two_templates_render_is_refused(tmp_path: Path) -> None:
    for element in ("one", "two"):
        (tmp_path / element / "static/etc").mkdir(parents=True)
        (tmp_path / element / "static/etc/hostname").write_text(element)
    with pytest.raises(ValueError, match="etc/hostname"):
        rendered_config(tmp_path)
