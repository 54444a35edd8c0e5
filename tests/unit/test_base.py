"""The root image's cache key and store: same DIB inputs, same base; anything DIB reads changes it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from appliance.build.base import KEEP_BASES, base_key, bases_dir, find_base, prune_bases
from appliance.build.dib import build_invocation
from appliance.build.layout import AGENT_DIR, ELEMENTS_DIR
from appliance.build.mirrors import HostMirrors
from appliance.spec import parse_spec

HOST = HostMirrors(debian="http://host.example/debian", security="http://host.example/debian-security")


def key_for(spec_text: str, tmp_path: Path, elements: Path = ELEMENTS_DIR, agent: Path = AGENT_DIR,
            output: str = "out", dib: str = "3.43.0") -> str:  # fmt: skip
    invocation = build_invocation(
        parse_spec(spec_text, "t"),
        elements_dir=elements,
        agent_dir=agent,
        output_prefix=tmp_path / output / "dib" / "appliance",
        mirrors=HOST,
        cache_dir=tmp_path / "cache",
        base_env={"PATH": "/usr/bin"},
    )
    return base_key(invocation, elements, agent, dib)


def test_the_nodes_configuration_and_where_the_build_goes_leave_the_base_alone(tmp_path: Path) -> None:
    plain = key_for("", tmp_path)
    assert key_for("", tmp_path, output="elsewhere") == plain
    configured = (
        'hostname = "hv07"\n[ssh]\nauthorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOzqSMB3qASpZoFPY4Y3y2ygIQk8'
        '+QnLk1Ktj8J3bNzz x"]\n[policy]\nmax_guests = 3\n[storage]\nclaim_blank_disk = true\n'
        '[network]\nbridges = [{name = "br1", ports = ["first-wired"]}]\n'
        '[network.management]\ninterface = "br1"\n'
    )
    assert key_for(configured, tmp_path) == plain


def test_what_dib_reads_makes_a_new_base(tmp_path: Path) -> None:
    plain = key_for("", tmp_path)
    assert key_for('packages = ["tcpdump"]', tmp_path) != plain
    assert key_for('release = "bookworm"', tmp_path) != plain
    assert key_for('[ssh]\nuser = "ops"', tmp_path) != plain
    assert key_for('[mirrors]\ndebian = "http://other.example/debian"', tmp_path) != plain
    assert key_for("", tmp_path, dib="3.44.0") != plain


def test_elements_and_agent_count_by_content_not_by_place(tmp_path: Path) -> None:
    elements, agent = tmp_path / "elements", tmp_path / "agent"
    shutil.copytree(ELEMENTS_DIR, elements, symlinks=True)
    shutil.copytree(AGENT_DIR, agent, ignore=shutil.ignore_patterns("__pycache__"))
    plain = key_for("", tmp_path)
    assert key_for("", tmp_path, elements, agent) == plain
    (agent / "__pycache__").mkdir(exist_ok=True)
    (agent / "__pycache__" / "x.cpython-313.pyc").write_bytes(b"bytecode")
    assert key_for("", tmp_path, elements, agent) == plain
    script = elements / "appliance-base/post-install.d/60-configure-system"
    script.write_text(script.read_text() + "# changed\n")
    assert key_for("", tmp_path, elements, agent) != plain
    script.write_text(script.read_text().removesuffix("# changed\n"))
    script.chmod(0o644)  # no longer executable: DIB would skip it
    assert key_for("", tmp_path, elements, agent) != plain
    script.chmod(0o755)
    (agent / "server.py").write_text((agent / "server.py").read_text() + "\n")
    assert key_for("", tmp_path, elements, agent) != plain


def make_base(cache: Path, key: str, mtime: float) -> Path:
    directory = bases_dir(cache) / key
    directory.mkdir(parents=True)
    for name in ("root.squashfs", "vmlinuz", "initrd", "dib.log"):
        (directory / name).write_bytes(name.encode())
    (directory / "packages.json").write_text(json.dumps([{"name": "bash", "version": "5.2", "arch": "amd64"}]))
    (directory / "base.json").write_text(json.dumps({"key": key, "built": "2026-01-01T00:00:00+00:00",
                                                     "dib_seconds": 99.5}))  # fmt: skip
    os.utime(directory, (mtime, mtime))
    return directory


def test_a_stored_base_is_found_whole_or_not_at_all(tmp_path: Path) -> None:
    make_base(tmp_path, "k1", 1000)
    found = find_base(tmp_path, "k1")
    assert found is not None and found.reused and found.dib_seconds == 99.5
    assert [package.name for package in found.packages] == ["bash"]
    assert found.squashfs.read_bytes() == b"root.squashfs"
    assert find_base(tmp_path, "k2") is None
    (found.directory / "initrd").unlink()
    assert find_base(tmp_path, "k1") is None


def test_pruning_keeps_the_bases_used_last(tmp_path: Path) -> None:
    for number in range(KEEP_BASES + 2):
        make_base(tmp_path, f"k{number}", 1000 + number)
    os.utime(bases_dir(tmp_path) / "k0", (5000, 5000))  # used last
    removed = prune_bases(bases_dir(tmp_path), KEEP_BASES, spare="k1")
    assert sorted(path.name for path in removed) == ["k2"]
    assert sorted(path.name for path in bases_dir(tmp_path).iterdir()) == ["k0", "k1", "k3", "k4"]
