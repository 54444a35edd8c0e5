from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from appliance.agent.policy import LIMITS
from appliance.spec import (
    SETTINGS,
    Output,
    Spec,
    SpecError,
    check_public_key,
    default_spec_text,
    load_spec,
    parse_spec,
)


def problems_of(text: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "test.toml")
    return [problem.key for problem in caught.value.problems]


def test_empty_spec_is_the_default_spec() -> None:
    assert parse_spec("", "empty") == Spec()
    assert load_spec(None) == Spec()


def test_default_spec_text_parses_and_documents_every_top_level_key() -> None:
    text = default_spec_text()
    parse_spec(text, "default")
    for key in (
        "name",
        "release",
        "hostname",
        "packages",
        "outputs",
        "size_budget_mb",
        "[kernel]",
        "[console]",
        "[ssh]",
        "[mirrors]",
        "[policy]",
        "[storage]",
    ):
        assert key in text


def test_the_starter_spec_shows_every_declared_key_with_its_default() -> None:
    # What a key means is written once, in the starter spec's comments; the table holds the rest.
    text = default_spec_text()
    shown = [
        f"{name}.{key}" if isinstance(value, dict) else name
        for name, value in tomllib.loads(text).items()
        for key in (value if isinstance(value, dict) else [name])
    ]
    declared = [setting.path for setting in SETTINGS] + [f"policy.{limit.key}" for limit in LIMITS]
    assert sorted(shown) == sorted(declared)
    assert parse_spec(text, "starter") == Spec()
    lines = text.splitlines()
    for index, line in enumerate(lines):
        top_level_key = " = " in line and not any(row.startswith("[") for row in lines[:index])
        if line.startswith("[") or top_level_key:
            explained_by = lines[index + 1] if line.startswith("[") else lines[index - 1]
            assert explained_by.startswith("# "), f"no comment explains {line!r} in the starter spec"


def test_unknown_keys_are_refused_with_the_known_ones() -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec('colour = "blue"\n[console]\nspeed = 1\n[policy]\nguests = 3', "t")
    assert [str(problem) for problem in caught.value.problems] == [
        "colour = 'blue': unknown key; known keys here: name, release, hostname, packages, outputs, "
        "size_budget_mb, kernel, console, ssh, mirrors, policy, storage, network, upgrade",
        "console.speed = 1: unknown key; known keys here: serial, vga, serial_port, baud",
        "policy.guests = 3: unknown key; known keys here: reserved_memory_mib, memory_overcommit, "
        "cpu_overcommit, max_guests, disk_overcommit",
    ]


def test_good_spec_is_read_into_typed_values(public_key: str) -> None:
    spec = parse_spec(
        f"""
        name = "edge-1"
        release = "bookworm"
        hostname = "hv01"
        packages = ["tcpdump", "ethtool"]
        outputs = ["iso"]
        size_budget_mb = 150
        [kernel]
        cmdline = ["intel_iommu=on", "hugepages=512"]
        [console]
        vga = false
        baud = 57600
        [ssh]
        user = "ops"
        authorized_keys = ["{public_key}"]
        [mirrors]
        debian = "http://mirror.example/debian"
        """,
        "good.toml",
    )
    assert spec.name == "edge-1"
    assert spec.release == "bookworm"
    assert spec.packages == ("tcpdump", "ethtool")
    # An ISO carries the squashfs, so asking for an ISO brings the squashfs along.
    assert spec.outputs == (Output.SQUASHFS, Output.ISO)
    assert spec.kernel_cmdline == ("intel_iommu=on", "hugepages=512")
    assert not spec.console.vga and spec.console.serial and spec.console.baud == 57600
    assert spec.ssh.user == "ops" and spec.ssh.authorized_keys == (public_key,)
    assert spec.mirrors.debian == "http://mirror.example/debian" and spec.mirrors.security == ""
    assert not spec.storage.claim_blank_disk
    assert parse_spec("[storage]\nclaim_blank_disk = true", "t").storage.claim_blank_disk


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('name = "Bad Name"', "name"),
        ('name = "../etc"', "name"),
        ('release = "sid"', "release"),
        ('hostname = "-bad"', "hostname"),
        ("hostname = 5", "hostname"),
        ('packages = "vim"', "packages"),
        ('packages = ["ok", "bad pkg"]', "packages[1]"),
        ('outputs = ["floppy"]', "outputs[0]"),
        ("outputs = []", "outputs"),
        ("size_budget_mb = 0", "size_budget_mb"),
        ("size_budget_mb = true", "size_budget_mb"),
        ('size_budget_mb = "200"', "size_budget_mb"),
        ('colour = "blue"', "colour"),
        ('kernel = "quiet"', "kernel"),
        ('[kernel]\ncmdline = ["a b"]', "kernel.cmdline[0]"),
        ("[kernel]\ncmdline = ['x\"y']", "kernel.cmdline[0]"),
        ("[kernel]\nextra = 1", "kernel.extra"),
        ("[console]\nserial = false\nvga = false", "console"),
        ("[console]\nbaud = 1200", "console.baud"),
        ('[console]\nserial_port = "/dev/ttyS0"', "console.serial_port"),
        ('[console]\nserial = "yes"', "console.serial"),
        ('[ssh]\nuser = "root"', "ssh.user"),
        ('[ssh]\nuser = "breakglass"', "ssh.user"),
        ('[ssh]\nbreak_glass_keys = ["nope"]', "ssh.break_glass_keys[0]"),
        ('[ssh]\nuser = "Bad User"', "ssh.user"),
        ('[ssh]\nauthorized_keys = "ssh-ed25519 AAAA"', "ssh.authorized_keys"),
        ('[ssh]\nauthorized_keys = ["not a key"]', "ssh.authorized_keys[0]"),
        ('[mirrors]\ndebian = "ftp://x"', "mirrors.debian"),
        ('[mirrors]\nsecurity = "http://a b"', "mirrors.security"),
        ("[policy]\nreserved_memory_mib = -1", "policy.reserved_memory_mib"),
        ("[policy]\nreserved_memory_mib = 1.5", "policy.reserved_memory_mib"),
        ("[policy]\nmemory_overcommit = 0", "policy.memory_overcommit"),
        ('[policy]\ncpu_overcommit = "lots"', "policy.cpu_overcommit"),
        ("[policy]\nmax_guests = 0", "policy.max_guests"),
        ("[policy]\nguests = 3", "policy.guests"),
        ('[storage]\nclaim_blank_disk = "yes"', "storage.claim_blank_disk"),
        ("[storage]\nclaim = true", "storage.claim"),
        ("storage = true", "storage"),
    ],
)
def test_bad_value_is_named_with_its_key(text: str, key: str) -> None:
    assert key in problems_of(text)


def test_every_problem_is_reported_at_once() -> None:
    keys = problems_of('name = "X"\nrelease = "sid"\nsize_budget_mb = -1\n[ssh]\nuser = "root"')
    assert keys == ["name", "release", "size_budget_mb", "ssh.user"]


def test_error_message_names_key_value_and_what_is_allowed() -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec('release = "sid"', "my.toml")
    message = str(caught.value)
    assert "my.toml" in message and "release" in message and "'sid'" in message and "trixie" in message


def test_toml_syntax_error_is_a_spec_error() -> None:
    assert problems_of("name = ") == ["(syntax)"]


def test_unreadable_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot be read"):
        load_spec(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("ssh-ed25519", "must look like"),
        ("ssh-dss AAAAB3NzaC1kc3M= x", "key type must be"),
        ('command="sh" ssh-ed25519 AAAA', "key type must be"),
        ("ssh-ed25519 not_base64!", "not valid base64"),
        ("ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQAB", "does not match its type"),
        ("ssh-ed25519 AAAA\nssh-ed25519 AAAA", "single line"),
    ],
)
def test_bad_public_keys_are_explained(line: str, reason: str) -> None:
    assert reason in check_public_key(line)


def test_real_public_key_is_accepted(public_key: str) -> None:
    assert check_public_key(public_key) == ""


def test_extra_keys_are_added_without_duplicates(public_key: str) -> None:
    spec = parse_spec(f'[ssh]\nauthorized_keys = ["{public_key}"]', "t")
    merged = spec.with_extra_keys((public_key, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExtra extra"))
    assert merged.ssh.authorized_keys[0] == public_key
    assert len(merged.ssh.authorized_keys) == 2


def test_digest_follows_content() -> None:
    assert Spec().digest() == parse_spec("", "t").digest()
    assert Spec().digest() != parse_spec('hostname = "other"', "t").digest()


def test_a_disk_brings_the_squashfs_it_carries() -> None:
    spec = parse_spec('outputs = ["disk"]', "t")
    assert spec.outputs == (Output.SQUASHFS, Output.DISK)
    assert Output.DISK in Spec().outputs


def test_values_that_become_names_and_files_are_matched_whole() -> None:
    spec = 'name = "demo\\n"\nhostname = "hv01\\n"\npackages = ["vim\\n"]\n[ssh]\nuser = "ops\\n"\n'
    with pytest.raises(SpecError) as caught:
        parse_spec(spec, "test")
    assert {problem.key for problem in caught.value.problems} == {"name", "hostname", "packages[0]", "ssh.user"}
