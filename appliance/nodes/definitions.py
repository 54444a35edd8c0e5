"""Guest definitions as an operator writes them: command-line options and definition files,
turned into the params the agent's guest.create and guest.update take.

The agent checks every field; here only what the agent cannot see is checked
(files that cannot be read, option syntax), each error naming the option.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from appliance.errors import UsageError

SIZE_PATTERN = re.compile(r"(?P<number>[0-9]+)\s*(?P<unit>G|GiB|T|TiB)?", re.IGNORECASE)


class DefinitionError(UsageError):
    """A guest option or definition file that cannot be used; names the option or file."""

    code = "definition"


@dataclass(frozen=True)
class GuestOptions:
    """What the guest create/edit options gave; None (or empty) where an option was not given."""

    memory_mib: int | None = None
    vcpus: int | None = None
    disks: tuple[str, ...] = ()
    nics: tuple[str, ...] = ()
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    cdrom: str | None = None
    boot: str | None = None
    display: bool | None = None
    autostart: bool | None = None
    restart: str | None = None
    cpu_weight: int | None = None
    cpu_quota_percent: int | None = None
    hostname: str | None = None
    ssh_key_files: tuple[Path, ...] = ()
    user: str | None = None
    user_data: Path | None = None
    network_config: Path | None = None
    vendor_data: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_definition_file(path: Path) -> dict[str, Any]:
    """A guest definition file: TOML (.toml) or YAML (.yaml, .yml), holding guest.create's params."""
    try:
        text = path.read_text()
    except OSError as error:
        raise DefinitionError(f"--from {path}: cannot be read: {error.strerror}") from error
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        kind = "TOML" if path.suffix == ".toml" else "YAML"
        raise DefinitionError(f"--from {path}: not valid {kind}: {error}") from error
    if not isinstance(data, dict):
        raise DefinitionError(f"--from {path}: must hold a table of guest fields (memory_mib, disks, nics, ...)")
    return data


def parse_size_gib(text: str) -> int | None:
    """A disk size in GiB from 20G, 20GiB, 2T or 20 (GiB); None when the text is no size."""
    match = SIZE_PATTERN.fullmatch(text.strip())
    if match is None:
        return None
    number = int(match["number"])
    return number * 1024 if (match["unit"] or "G").upper().startswith("T") else number


def parse_disk_option(text: str) -> dict[str, Any]:
    """--disk size=20G (a blank disk; G or T, GiB by default) or --disk image=NAME (over a node image)."""
    key, _, value = text.partition("=")
    if key == "image" and value:
        return {"base_image": value}
    size = parse_size_gib(value) if key == "size" else None
    if size is not None:
        return {"size_gib": size}
    raise DefinitionError(f"--disk {text!r}: give size=SIZE (e.g. size=20G) or image=NAME")


def parse_boot_option(text: str) -> list[str]:
    """--boot cdrom,disk: the boot order as the agent takes it (it checks the names); '' for none."""
    return [part.strip() for part in text.split(",") if part.strip()]


NIC_KEYS = ("bridge", "vlan", "mac", "model")


def parse_nic_option(text: str) -> dict[str, Any]:
    """--nic bridge=br0[,vlan=10][,mac=..][,model=virtio] or --nic user[,mac=..][,model=..]."""
    nic: dict[str, Any] = {}
    for part in text.split(","):
        key, has_value, value = part.strip().partition("=")
        if key == "user" and not has_value:
            nic["user"] = True
        elif key in NIC_KEYS and value:
            nic[key] = int(value) if key == "vlan" and value.isdigit() else value
        else:
            raise DefinitionError(
                f"--nic {text!r}: {part!r} is not one of user, bridge=NAME, vlan=ID, mac=MAC, model=MODEL"
            )
    return nic


def read_text_option(option: str, path: Path) -> str:
    try:
        return path.read_text()
    except OSError as error:
        raise DefinitionError(f"{option} {path}: cannot be read: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise DefinitionError(f"{option} {path}: not text") from error


def read_ssh_keys(paths: tuple[Path, ...]) -> list[str]:
    """Public key lines from --ssh-key files (comments and blank lines skipped)."""
    keys = []
    for path in paths:
        lines = read_text_option("--ssh-key", path).splitlines()
        found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise DefinitionError(f"--ssh-key {path}: holds no public key")
        keys += found
    return keys


def network_config_option(path: Path) -> Any:
    """A v2 network config file; YAML or JSON both load to the object the agent takes."""
    text = read_text_option("--network-config", path)
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise DefinitionError(f"--network-config {path}: not valid YAML or JSON: {error}") from error


def cloud_init_options(options: GuestOptions) -> dict[str, Any]:
    section: dict[str, Any] = {}
    if options.hostname is not None:
        section["hostname"] = options.hostname
    if options.ssh_key_files:
        section["ssh_authorized_keys"] = read_ssh_keys(options.ssh_key_files)
    if options.user is not None:
        section["user"] = options.user
    if options.user_data is not None:
        section["user_data"] = read_text_option("--user-data", options.user_data)
    if options.network_config is not None:
        section["network_config"] = network_config_option(options.network_config)
    if options.vendor_data is not None:
        section["vendor_data"] = read_text_option("--vendor-data", options.vendor_data)
    return section


def guest_params(base: dict[str, Any], options: GuestOptions) -> dict[str, Any]:
    """`base` (a definition file's fields, or {}) with every given option on top."""
    params = dict(base)
    plain = {"memory_mib": options.memory_mib, "vcpus": options.vcpus, "autostart": options.autostart,
             "restart": options.restart, "cpu_weight": options.cpu_weight,
             "cpu_quota_percent": options.cpu_quota_percent, "cdrom": options.cdrom,
             "display": options.display}  # fmt: skip
    params.update({key: value for key, value in plain.items() if value is not None})
    if options.boot is not None:
        params["boot_order"] = parse_boot_option(options.boot)
    if options.disks:
        params["disks"] = [parse_disk_option(text) for text in options.disks]
    if options.nics:
        params["nics"] = [parse_nic_option(text) for text in options.nics]
    if options.kernel is not None:
        boot = {"kernel_image": options.kernel}
        if options.initrd:
            boot["initrd_image"] = options.initrd
        if options.cmdline:
            boot["cmdline"] = options.cmdline
        params["kernel_boot"] = boot
    elif options.initrd is not None or options.cmdline is not None:
        raise DefinitionError("--initrd and --cmdline go with --kernel IMAGE")
    section = cloud_init_options(options)
    if section:
        params["cloud_init"] = {**params.get("cloud_init", {}), **section}
    params.update(options.extra)
    return params
