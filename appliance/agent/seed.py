"""A guest's cloud-init NoCloud seed: a small vfat volume labelled `cidata`, attached read-only.

The volume holds `meta-data` (a stable `instance-id`, which changes whenever
the guest's cloud_init section does, so cloud-init in the guest runs its
per-instance steps again, and `local-hostname`), `user-data`, and where given
`network-config` and `vendor-data`.

The agent has no YAML parser (standard library only), so what it writes is
JSON where it makes the text itself (JSON is YAML) and what it is given is
checked as far as a line scanner can: user-data must be a `#cloud-config`
document whose top level is a block mapping, with no tabs in indentation and
one document only. The host name, keys and user from the cloud_init section
are added to it as top-level keys; a user-data document that sets one of those
keys itself is refused rather than merged, since which value would win cannot
be seen from the text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.agent.errors import AgentError, ErrorCode
from appliance.agent.tools import find_program, run_tool

if TYPE_CHECKING:
    from appliance.agent.model import CloudInit

MAX_TEXT_BYTES = 64 * 1024
CLOUD_CONFIG_HEADER = "#cloud-config"
SEED_LABEL = "cidata"
# Room for the three 64 KiB documents and FAT's own tables.
SEED_SIZE_KIB = 1024
SEED_PREFIX = "seed-"

HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
# A top-level key of a block mapping: `key:` then a space or the end of the line.
TOP_LEVEL_KEY = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.-]*|\"[^\"]*\"|'[^']*'):(\s|$)")
NETWORK_VERSION_2 = re.compile(r"^\s*version:\s*2\s*(#.*)?$", re.MULTILINE)
# OpenSSH public key types (sshd's PubkeyAcceptedAlgorithms names).
SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
# What the cloud_init section's own fields set, and the user-data keys that would contradict them.
MERGED_KEYS = {
    "hostname": ("hostname", "fqdn"),
    "ssh_authorized_keys": ("ssh_authorized_keys",),
    "user": ("user",),
}


def refuse(field: str, message: str) -> AgentError:
    return AgentError(ErrorCode.INVALID_PARAMS, f"{field}: {message}", {"field": field})


def check_hostname(value: object, field: str) -> str:
    """A host name (RFC 1123): dot-separated labels of letters, digits and '-', at most 253 characters."""
    if not isinstance(value, str) or len(value) > 253 or not all(HOSTNAME_LABEL.fullmatch(p) for p in value.split(".")):
        raise refuse(field, "must be a host name: labels of letters, digits and '-' joined by '.'")
    return value


def check_ssh_key(value: object, field: str) -> str:
    """One OpenSSH public key line, `TYPE BASE64 [COMMENT]`, whose key blob names the same type."""
    allowed = f"an OpenSSH public key line (TYPE BASE64 [COMMENT], TYPE one of {', '.join(SSH_KEY_TYPES)})"
    if not isinstance(value, str) or "\n" in value.strip() or len(value) > 16 * 1024:
        raise refuse(field, f"must be {allowed}")
    parts = value.strip().split(maxsplit=2)
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        raise refuse(field, f"must be {allowed}")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except binascii.Error as error:
        raise refuse(field, f"the key is not valid base64; must be {allowed}") from error
    length = int.from_bytes(blob[:4], "big")
    if blob[4 : 4 + length] != parts[0].encode():
        raise refuse(field, f"the key's data is not a {parts[0]} key; must be {allowed}")
    return " ".join(parts)


def check_text(value: object, field: str) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise refuse(field, "must be text")
    if len(value.encode()) > MAX_TEXT_BYTES:
        raise refuse(field, f"is {len(value.encode())} bytes; at most {MAX_TEXT_BYTES} (64 KiB) are allowed")
    return value


def check_cloud_init_text(value: object, field: str, scripts: bool = False) -> str:
    """user-data (and vendor-data, which may also be a `#!` script): a `#cloud-config` document."""
    text = check_text(value, field)
    first_line = text.split("\n", 1)[0].rstrip()
    if scripts and first_line.startswith("#!"):
        return text
    if first_line != CLOUD_CONFIG_HEADER:
        wanted = "'#cloud-config' (or '#!' for a script)" if scripts else "'#cloud-config'"
        raise refuse(field, f"must start with a line {wanted}; the agent accepts cloud-config documents only")
    top_level_keys(text, field)
    return text


def top_level_keys(text: str, field: str) -> list[str]:
    """The keys of a #cloud-config document's top-level block mapping, refusing what is not one."""
    keys: list[str] = []
    seen_content = False
    for number, line in enumerate(text.split("\n")[1:], start=2):
        stripped = line.rstrip("\r")
        indent = stripped[: len(stripped) - len(stripped.lstrip(" \t"))]
        if "\t" in indent and stripped.strip():
            raise refuse(field, f"line {number} is indented with a tab; YAML allows only spaces")
        if not stripped.strip() or stripped.lstrip().startswith("#") or indent:
            continue
        if stripped.rstrip() in ("---", "...") or stripped.startswith(("--- ", "... ")):
            if seen_content or stripped.rstrip() == "...":
                raise refuse(field, f"line {number} starts another YAML document; one document only")
            continue
        if stripped.startswith("- ") or stripped.rstrip() == "-":
            if not seen_content:
                raise refuse(field, f"line {number}: the document must be a mapping (key: value), not a list")
            continue  # A sequence under the key above, at the key's own indentation.
        match = TOP_LEVEL_KEY.match(stripped)
        if match is None:
            raise refuse(field, f"line {number} is not 'key: value' at the top level; the document must be a mapping")
        keys.append(match.group(1).strip("\"'"))
        seen_content = True
    return keys


def check_network_config(value: object, field: str) -> str:
    """A v2 network config: an object (kept as JSON) or YAML text that says `version: 2`."""
    if isinstance(value, dict):
        inner = value.get("network", value)
        if not isinstance(inner, dict) or inner.get("version") != 2:
            raise refuse(field, "must be a network config version 2 ({'version': 2, 'ethernets': {...}})")
        return check_text(json.dumps(value, sort_keys=True), field)
    text = check_text(value, field)
    try:
        stored = json.loads(text)
    except ValueError:
        stored = None
    if isinstance(stored, dict):
        # An object given earlier, kept as JSON text (JSON is YAML too): checked as the object it was.
        return check_network_config(stored, field)
    if not NETWORK_VERSION_2.search(text):
        raise refuse(field, "must be a network config version 2: an object, or YAML text with 'version: 2'")
    for number, line in enumerate(text.split("\n"), start=1):
        if line[: len(line) - len(line.lstrip(" \t"))].count("\t"):
            raise refuse(field, f"line {number} is indented with a tab; YAML allows only spaces")
    return text


def instance_id(guest: str, cloud_init: CloudInit) -> str:
    """Stable for one cloud_init section of one guest; any change to the section gives a new one."""
    section = json.dumps({"guest": guest, **asdict(cloud_init)}, sort_keys=True)
    return "iid-" + hashlib.sha256(section.encode()).hexdigest()[:16]


def default_hostname(guest: str) -> str:
    """The guest's name as a host name, when it is one (as Proxmox names a VM's host)."""
    try:
        return check_hostname(guest, "name")
    except AgentError:
        return ""


def meta_data(guest: str, cloud_init: CloudInit) -> str:
    lines = [f"instance-id: {instance_id(guest, cloud_init)}"]
    hostname = cloud_init.hostname or default_hostname(guest)
    if hostname:
        lines.append(f"local-hostname: {hostname}")
    return "\n".join(lines) + "\n"


def user_data(cloud_init: CloudInit) -> str:
    """The given #cloud-config document with the section's host name, keys and user added at its top level."""
    text = cloud_init.user_data or CLOUD_CONFIG_HEADER + "\n"
    given = set(top_level_keys(text, "cloud_init.user_data"))
    added: dict[str, Any] = {}
    if cloud_init.hostname:
        added["hostname"] = cloud_init.hostname
    if cloud_init.ssh_authorized_keys:
        added["ssh_authorized_keys"] = list(cloud_init.ssh_authorized_keys)
    if cloud_init.user:
        # The default user takes this name (and the keys above).
        added["user"] = cloud_init.user
    for name in added:
        clash = given.intersection(MERGED_KEYS[name])
        if clash:
            raise refuse(
                f"cloud_init.{name}",
                f"user_data sets {', '.join(sorted(clash))} itself; give it in one place, not both",
            )
    if not added:
        return text
    lines = [text if text.endswith("\n") else text + "\n", "# From the guest's cloud_init section (appliance agent):"]
    lines += [f"{name}: {json.dumps(value)}" for name, value in added.items()]
    return "\n".join(lines) + "\n"


def seed_path(directory: Path, guest: str, cloud_init: CloudInit) -> Path:
    return directory / f"{SEED_PREFIX}{instance_id(guest, cloud_init)}.vfat"


def ensure_seed(directory: Path, guest: str, cloud_init: CloudInit) -> Path:
    """The seed volume for this cloud_init section, made if missing; seeds of earlier sections are removed."""
    target = seed_path(directory, guest, cloud_init)
    for stale in directory.glob(f"{SEED_PREFIX}*.vfat"):
        if stale != target:
            stale.unlink(missing_ok=True)
    if target.exists():
        return target
    files = {"meta-data": meta_data(guest, cloud_init), "user-data": user_data(cloud_init)}
    if cloud_init.network_config:
        files["network-config"] = cloud_init.network_config
    if cloud_init.vendor_data:
        files["vendor-data"] = cloud_init.vendor_data
    mkfs = find_program("mkfs.vfat", "dosfstools")
    mcopy = find_program("mcopy", "mtools")
    with tempfile.TemporaryDirectory(dir=directory, prefix=".seed-") as work:
        staged = []
        for name, text in files.items():
            (Path(work) / name).write_text(text)
            staged.append(str(Path(work) / name))
        image = Path(work) / "seed.vfat"
        # The volume id follows from the instance id, so one section always makes the same volume.
        volume_id = instance_id(guest, cloud_init)[4:12]
        run_tool([mkfs, "-n", SEED_LABEL, "-i", volume_id, "-C", str(image), str(SEED_SIZE_KIB)])
        run_tool([mcopy, "-i", str(image), *staged, "::"], env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
        image.chmod(0o440)
        image.rename(target)
    return target
