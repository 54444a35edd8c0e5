"""The PXE set: NAME.ipxe rendered at build, and `appliance pxe serve` on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.build.pack.live import LiveSet
from appliance.build.pack.pxe import make_ipxe
from appliance.build.render import BuildIdentity
from appliance.deploy.pxe_server import PxeError, PxeServer, read_pxe_set, start_pxe_server
from appliance.manifest import NoBuildError
from appliance.spec import Spec

IDENTITY = BuildIdentity(build_id="demo-1", created="2026-01-01T00:00:00+00:00", spec_sha256="0" * 64, tool_version="0")


def fake_build(out_dir: Path, with_ipxe: bool = True) -> Path:
    """A build directory with a PXE set of small stand-in files (the HTTP side does not read them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    live = LiveSet(out_dir / "appliance.squashfs", out_dir / "appliance.vmlinuz", out_dir / "appliance.initrd")
    for path in (live.squashfs, live.kernel, live.initrd):
        path.write_bytes(path.name.encode() * 100)
    files = [live.squashfs.name, live.kernel.name, live.initrd.name]
    if with_ipxe:
        files.append(make_ipxe(live, Spec(), IDENTITY, out_dir).name)
    (out_dir / "secret.txt").write_text("not for the network")
    manifest = {"name": "appliance", "artifacts": [{"file": name} for name in files]}
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    return out_dir


def test_ipxe_script_boots_live_with_the_squashfs_fetched_from_base_url(tmp_path: Path) -> None:
    script = (fake_build(tmp_path) / "appliance.ipxe").read_text()
    assert script.startswith("#!ipxe\n")
    assert "isset ${base-url} || set base-url ${cwduri}" in script
    kernel_line = next(line for line in script.splitlines() if line.startswith("kernel "))
    assert kernel_line.startswith("kernel ${base-url}appliance.vmlinuz initrd=appliance.initrd boot=live ")
    assert "fetch=${base-url}appliance.squashfs" in kernel_line and "toram" not in kernel_line
    assert "console=ttyS0,115200n8" in kernel_line
    assert "initrd ${base-url}appliance.initrd" in script and script.rstrip().endswith("boot")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PxeServer]:
    served: list[str] = []
    running = start_pxe_server(read_pxe_set(fake_build(tmp_path / "out")), "127.0.0.1", 0, None, served.append)
    yield running
    running.close()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body


def test_server_serves_the_set_and_a_chain_script_and_nothing_else(server: PxeServer, tmp_path: Path) -> None:
    assert server.base_url.startswith("http://127.0.0.1:")
    assert fetch(server.base_url + "appliance.vmlinuz") == (tmp_path / "out" / "appliance.vmlinuz").read_bytes()
    assert fetch(server.base_url + "appliance.ipxe").startswith(b"#!ipxe")
    chain = fetch(server.base_url + "boot.ipxe").decode()
    assert chain == f"#!ipxe\nset base-url {server.base_url}\nchain ${{base-url}}appliance.ipxe\n"
    assert server.chain_file.read_text() == chain
    for name in ("secret.txt", "manifest.json", "../etc/passwd", ""):
        with pytest.raises(urllib.error.HTTPError) as refused:
            fetch(server.base_url + name)
        assert refused.value.code == 404


def test_a_build_without_pxe_output_is_named(tmp_path: Path) -> None:
    with pytest.raises(PxeError, match='add "pxe" to outputs'):
        read_pxe_set(fake_build(tmp_path, with_ipxe=False))
    with pytest.raises(NoBuildError, match=r"no manifest\.json"):
        read_pxe_set(tmp_path / "nothing")


def test_cli_pxe_serve_on_a_missing_build_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "pxe", "serve", str(tmp_path), "--http-port", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "no manifest.json" in result.stderr and "Traceback" not in result.stderr
