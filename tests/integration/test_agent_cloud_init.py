"""Cloud-init seeds through a real agent: the volume read back with mtools, its user-data checked by
Debian's own `cloud-init schema`, and the tiny guest mounting it and taking its host name and key."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers.agent_process import AgentProcess
from helpers.tiny_guest import TINY_GUEST_MARKER, TinyGuest, build_tiny_guest
from helpers.waiting import wait_until

USER_DATA = """#cloud-config
package_update: true
packages:
- nginx
write_files:
- path: /etc/motd
  content: |
    seeded by the appliance agent
runcmd:
- [systemctl, enable, --now, nginx]
"""
NETWORK_CONFIG = {"version": 2, "ethernets": {"eth0": {"match": {"name": "en*"}, "dhcp4": True}}}


def section(public_key: str) -> dict[str, Any]:
    return {
        "hostname": "seeded-host",
        "ssh_authorized_keys": [public_key],
        "user": "operator",
        "user_data": USER_DATA,
        "network_config": NETWORK_CONFIG,
        "vendor_data": "#cloud-config\ntimezone: UTC\n",
    }


def seed_of(state_dir: Path, name: str) -> Path:
    (seed,) = (state_dir / "guests" / name).glob("seed-*.vfat")
    return seed


def mtools(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, env={"MTOOLS_SKIP_CHECK": "1"}).stdout


def test_the_seed_volume_holds_what_nocloud_reads(agent: AgentProcess, state_dir: Path, public_key: str) -> None:
    created = agent.result(
        "guest.create",
        {"name": "g1", "vcpus": 1, "memory_mib": 64, "disks": [{"size_gib": 1}], "cloud_init": section(public_key)},
    )
    assert created["cloud_init"]["hostname"] == "seeded-host"
    seed = seed_of(state_dir, "g1")
    assert "Volume label is cidata" in mtools("mlabel", "-s", "-i", str(seed), "::")
    listing = mtools("mdir", "-b", "-i", str(seed), "::")
    assert sorted(listing.split()) == ["::/meta-data", "::/network-config", "::/user-data", "::/vendor-data"]
    meta = mtools("mtype", "-i", str(seed), "::meta-data")
    assert meta.startswith("instance-id: iid-") and "local-hostname: seeded-host\n" in meta
    user = mtools("mtype", "-i", str(seed), "::user-data")
    assert user.startswith(USER_DATA) and public_key in user
    assert '"dhcp4": true' in mtools("mtype", "-i", str(seed), "::network-config")
    assert mtools("mtype", "-i", str(seed), "::vendor-data") == "#cloud-config\ntimezone: UTC\n"

    # The same section gives the same instance-id; a changed one a new id (cloud-init runs again).
    agent.result("guest.delete", {"name": "g1", "remove_disks": True})
    agent.result(
        "guest.create",
        {"name": "g1", "vcpus": 1, "memory_mib": 64, "disks": [{"size_gib": 1}], "cloud_init": section(public_key)},
    )
    assert mtools("mtype", "-i", str(seed_of(state_dir, "g1")), "::meta-data") == meta
    agent.result("guest.delete", {"name": "g1", "remove_disks": True})
    changed = {**section(public_key), "hostname": "renamed"}
    agent.result(
        "guest.create", {"name": "g1", "vcpus": 1, "memory_mib": 64, "disks": [{"size_gib": 1}], "cloud_init": changed}
    )
    renamed = mtools("mtype", "-i", str(seed_of(state_dir, "g1")), "::meta-data")
    assert renamed.split("\n")[0] != meta.split("\n")[0]


@pytest.mark.skipif(shutil.which("cloud-init") is None, reason="cloud-init is not installed (make deps installs it)")
def test_the_user_data_the_agent_writes_passes_cloud_inits_own_schema(
    agent: AgentProcess, state_dir: Path, tmp_path: Path, public_key: str
) -> None:
    agent.result(
        "guest.create",
        {"name": "g1", "vcpus": 1, "memory_mib": 64, "disks": [{"size_gib": 1}], "cloud_init": section(public_key)},
    )
    user_data = tmp_path / "user-data"
    user_data.write_text(mtools("mtype", "-i", str(seed_of(state_dir, "g1")), "::user-data"))
    result = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(user_data)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout
    # The check has teeth: a wrong type in the same document fails it.
    user_data.write_text(user_data.read_text() + "package_upgrade: sometimes\n")
    bad = subprocess.run(["cloud-init", "schema", "--config-file", str(user_data)], capture_output=True, text=True)
    assert bad.returncode != 0


def test_bad_sections_change_nothing(agent: AgentProcess, state_dir: Path) -> None:
    for cloud_init, field in (
        ({}, "cloud_init"),
        ({"user_data": "#cloud-config\n" + "x: " + "y" * 70000 + "\n"}, "cloud_init.user_data"),
        ({"ssh_authorized_keys": ["not a key"]}, "cloud_init.ssh_authorized_keys[0]"),
    ):
        reply = agent.call(
            "guest.create",
            {"name": "g1", "vcpus": 1, "memory_mib": 64, "disks": [{"size_gib": 1}], "cloud_init": cloud_init},
        )
        assert reply["error"]["data"] == {"code": "invalid_params", "field": field}
    assert agent.result("guest.list") == []
    assert not (state_dir / "guests" / "g1").exists()


@pytest.fixture(scope="module")
def tiny_guest(tmp_path_factory: pytest.TempPathFactory) -> TinyGuest:
    return build_tiny_guest(tmp_path_factory.mktemp("tiny-guest"))


@pytest.mark.slow
def test_the_tiny_guest_mounts_its_seed_and_takes_its_host_name_and_key(
    agent: AgentProcess, tiny_guest: TinyGuest, public_key: str
) -> None:
    assert "result" in agent.import_image("tiny-vmlinuz", tiny_guest.kernel.read_bytes())
    assert "result" in agent.import_image("tiny-initrd", tiny_guest.initrd.read_bytes())
    kernel_boot = {"kernel_image": "tiny-vmlinuz", "initrd_image": "tiny-initrd", "cmdline": tiny_guest.cmdline}
    params = {
        "name": "tiny",
        "vcpus": 1,
        "memory_mib": 256,
        "kernel_boot": kernel_boot,
        "cloud_init": section(public_key),
    }
    agent.result("guest.create", params)
    agent.result("guest.start", {"name": "tiny"})

    def console() -> str:
        text: str = agent.result("guest.console", {"name": "tiny", "max_bytes": 65536})["text"]
        return text

    wait_until(lambda: "tiny-seed key=" in console(), 120, "the seed's key on the tiny guest's console")
    text = console()
    assert TINY_GUEST_MARKER in text
    assert "tiny-seed hostname=seeded-host" in text
    key_type, key_data = public_key.split()[:2]
    assert f"tiny-seed key={key_type} {key_data}" in text
