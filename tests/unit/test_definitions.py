"""Guest definitions from options and files: what the agent's guest.create gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.nodes.definitions import (
    DefinitionError,
    GuestOptions,
    guest_params,
    load_definition_file,
    parse_disk_option,
    parse_nic_option,
    parse_size_gib,
)


def test_disk_and_nic_options_become_the_agents_fields() -> None:
    assert parse_disk_option("size=20G") == {"size_gib": 20}
    assert parse_disk_option("size=2T") == {"size_gib": 2048}
    assert parse_disk_option("size=5") == {"size_gib": 5}
    assert parse_disk_option("image=debian-13.qcow2") == {"base_image": "debian-13.qcow2"}
    assert parse_nic_option("bridge=br0,vlan=10,model=e1000") == {"bridge": "br0", "vlan": 10, "model": "e1000"}
    assert parse_nic_option("user,mac=52:54:00:00:00:01") == {"user": True, "mac": "52:54:00:00:00:01"}


@pytest.mark.parametrize("text", ["20G", "size=", "size=big", "image=", "disk=1"])
def test_a_disk_option_that_says_neither_size_nor_image_is_refused_naming_it(text: str) -> None:
    with pytest.raises(DefinitionError, match=f"--disk '{text}'"):
        parse_disk_option(text)


@pytest.mark.parametrize("text", ["br0", "bridge", "user=1", "colour=red"])
def test_a_nic_option_with_an_unknown_part_is_refused_naming_it(text: str) -> None:
    with pytest.raises(DefinitionError, match="--nic"):
        parse_nic_option(text)


def test_options_go_on_top_of_a_definition_file(tmp_path: Path) -> None:
    definition = tmp_path / "web.toml"
    definition.write_text(
        'memory_mib = 512\nvcpus = 2\ndisks = [{size_gib = 10}]\n[cloud_init]\nhostname = "from-file"\nuser = "ops"\n'
    )
    key = tmp_path / "key.pub"
    key.write_text("# a comment\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKXNHKCHLVXq1bTI2EmDpEBdrPxvZJWlLHSA4ymKTkUi op\n")
    params = guest_params(
        load_definition_file(definition),
        GuestOptions(memory_mib=1024, hostname="web", ssh_key_files=(key,), nics=("user",), kernel="vmlinuz"),
    )
    assert params["memory_mib"] == 1024 and params["vcpus"] == 2 and params["disks"] == [{"size_gib": 10}]
    assert params["cloud_init"] == {
        "hostname": "web",
        "user": "ops",
        "ssh_authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKXNHKCHLVXq1bTI2EmDpEBdrPxvZJWlLHSA4ymKTkUi op"],
    }
    assert params["nics"] == [{"user": True}] and params["kernel_boot"] == {"kernel_image": "vmlinuz"}


def test_yaml_files_work_too_and_bad_files_are_named(tmp_path: Path) -> None:
    good = tmp_path / "db.yaml"
    good.write_text("memory_mib: 256\nnics:\n  - bridge: br0\n    vlan: 20\n")
    assert load_definition_file(good) == {"memory_mib": 256, "nics": [{"bridge": "br0", "vlan": 20}]}
    for name, text, message in (
        ("list.yaml", "- 1\n- 2\n", "must hold a table"),
        ("broken.toml", "memory_mib = \n", "not valid TOML"),
        ("broken.yml", "a: [\n", "not valid YAML"),
    ):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DefinitionError, match=message):
            load_definition_file(path)
    with pytest.raises(DefinitionError, match="cannot be read"):
        load_definition_file(tmp_path / "missing.toml")
    with pytest.raises(DefinitionError, match="--initrd and --cmdline go with --kernel"):
        guest_params({}, GuestOptions(initrd="initrd"))
    with pytest.raises(DefinitionError, match="holds no public key"):
        empty = tmp_path / "empty.pub"
        empty.write_text("# nothing\n")
        guest_params({}, GuestOptions(ssh_key_files=(empty,)))


def test_install_media_options_become_the_agents_fields() -> None:
    params = guest_params({}, GuestOptions(cdrom="debian.iso", boot=" cdrom, disk ", display=True))
    assert params == {"cdrom": "debian.iso", "boot_order": ["cdrom", "disk"], "display": True}
    # An edit that ejects the CD and drops the boot order says so with empty values.
    assert guest_params({}, GuestOptions(cdrom="", boot="", display=False)) == {
        "cdrom": "",
        "boot_order": [],
        "display": False,
    }
    assert guest_params({"boot_order": ["disk"]}, GuestOptions()) == {"boot_order": ["disk"]}


@pytest.mark.parametrize(("text", "gib"), [("20G", 20), ("20GiB", 20), ("2T", 2048), ("7", 7), ("big", None)])
def test_disk_sizes_are_read_in_gib(text: str, gib: int | None) -> None:
    assert parse_size_gib(text) == gib
