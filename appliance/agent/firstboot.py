"""At boot (`appliance-agent firstboot`, root): the provisioner's configuration for this node.

Sources, as Ironic, MAAS and Tinkerbell hand them out, the first found wins:
  a volume labelled cidata   NoCloud: meta-data, user-data, network-config, vendor-data
  a volume labelled config-2 ConfigDrive: openstack/latest/meta_data.json, user_data, network_data.json
  ds=nocloud;s=URL           on the kernel command line: the same files over HTTP (the late pass,
                             `--network`, once the network is up)
  the data partition's copy  of the last source taken (DATA/firstboot), when none of the above is there

What is taken: the host name (hostname, fqdn, local-hostname), operator SSH
keys (added to the image's, for the agent user, restricted like them), the
SSH host key (ed25519), and the network (cloud-init v1 or v2, or OpenStack's
network_data.json) as systemd-networkd files. Every other key is named on the
console and in host.report (`firstboot.unsupported`), never silently dropped.
The source is copied to /run/appliance/firstboot-seed (and kept on the data
partition), so a disk booted without the volume later, or the disk `node
install` writes, is configured the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.agent import netconfig, yamlish
from appliance.agent.errors import AgentError
from appliance.agent.iso9660 import IsoError, IsoVolume
from appliance.agent.lifecycle_config import LifecycleConfig
from appliance.agent.seed import check_hostname, check_ssh_key
from appliance.agent.slots import write_json
from appliance.agent.tools import find_program

NOCLOUD_FILES = ("meta-data", "user-data", "network-config", "vendor-data")
CONFIG_DRIVE_FILES = (
    "openstack/latest/meta_data.json",
    "openstack/latest/user_data",
    "openstack/latest/network_data.json",
    "openstack/latest/vendor_data.json",
)
LABELS = {"cidata": "nocloud", "CIDATA": "nocloud", "config-2": "configdrive", "CONFIG-2": "configdrive"}
SOURCE_FILE = "source.json"
NETWORK_DIR = Path("/run/systemd/network")
# The spec's network units (appliance-network's), set aside when the provisioner gives the network,
# and the marker that keeps appliance-network.service from applying them or falling back to DHCP.
SPEC_UNITS = Path("/etc/systemd/network")
SPEC_UNITS_ASIDE = Path("/run/appliance/network-replaced")
NETWORK_PROVISIONED = Path("/run/appliance/network-provisioned")
NETWORK_STATUS = Path("/run/appliance/network")
AUTHORIZED_KEYS = Path("/etc/ssh/authorized_keys/agent-user")
# As templates/image/appliance-ssh/etc/ssh/authorized_keys/agent-user.j2 installs the image's keys.
KEY_OPTIONS = 'restrict,command="/usr/bin/appliance-agent serve"'
HOST_KEY = Path("/etc/ssh/ssh_host_ed25519_key")
HOSTNAME_FILE = Path("/etc/hostname")
HOSTS_FILE = Path("/etc/hosts")
MAX_FILE = 1 << 20
URL_WAIT = 120.0
PRIVATE_KEY = re.compile(
    r"^-----BEGIN OPENSSH PRIVATE KEY-----\n[A-Za-z0-9+/=\n]+-----END OPENSSH PRIVATE KEY-----\n?$"
)

Say = Callable[[str], None]


@dataclass
class Taken:
    """What a source gives, checked, and what of it is not supported."""

    source: str = ""
    hostname: str = ""
    fqdn: str = ""
    keys: list[str] = field(default_factory=list)
    host_key: tuple[str, str] | None = None
    network: netconfig.Parsed | None = None
    unsupported: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def read_document(text: str, name: str, taken: Taken) -> Any:
    try:
        return yamlish.loads(text)
    except ValueError as error:
        taken.problems.append(f"{name}: not read ({error})")
        return None


def take_keys(value: Any, where: str, taken: Taken) -> None:
    items = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else [value]
    for index, item in enumerate(items):
        try:
            taken.keys.append(check_ssh_key(item, f"{where}[{index}]"))
        except AgentError as error:
            taken.problems.append(error.message)


def take_hostname(value: Any, where: str, taken: Taken, fqdn: bool = False) -> None:
    try:
        name = check_hostname(value, where)
    except AgentError as error:
        taken.problems.append(error.message)
        return
    if fqdn:
        taken.fqdn = name
    else:
        taken.hostname = name


def read_cloud_config(text: str, where: str, agent_user: str, taken: Taken) -> None:
    if not text.strip():
        return
    if not text.startswith("#cloud-config"):
        taken.unsupported.append(f"{where} (not #cloud-config: scripts and multipart are not run)")
        return
    document = read_document(text, where, taken)
    if document is None:
        return
    if not isinstance(document, dict):
        taken.problems.append(f"{where}: not a mapping")
        return
    for key, value in document.items():
        if key == "hostname":
            take_hostname(value, f"{where}.hostname", taken)
        elif key == "fqdn":
            take_hostname(value, f"{where}.fqdn", taken, fqdn=True)
        elif key == "ssh_authorized_keys":
            take_keys(value, f"{where}.ssh_authorized_keys", taken)
        elif key == "users":
            read_users(value, where, agent_user, taken)
        elif key == "ssh_keys" and isinstance(value, dict):
            read_host_keys(value, where, taken)
        else:
            taken.unsupported.append(f"{where}.{key}")


def read_users(users: Any, where: str, agent_user: str, taken: Taken) -> None:
    for index, user in enumerate(users if isinstance(users, list) else [users]):
        if user == "default":
            continue
        if isinstance(user, dict) and user.get("name") in ("default", agent_user):
            take_keys(user.get("ssh_authorized_keys", []), f"{where}.users[{index}].ssh_authorized_keys", taken)
            taken.unsupported += [
                f"{where}.users[{index}].{key}" for key in user if key not in ("name", "ssh_authorized_keys")
            ]
        else:
            name = user.get("name") if isinstance(user, dict) else user
            taken.unsupported.append(f"{where}.users[{index}] (user {name}: only the agent user {agent_user} is kept)")


def read_host_keys(keys: dict[str, Any], where: str, taken: Taken) -> None:
    private, public = keys.get("ed25519_private"), keys.get("ed25519_public")
    for key in keys:
        if key not in ("ed25519_private", "ed25519_public"):
            taken.unsupported.append(f"{where}.ssh_keys.{key} (the node's sshd uses an ed25519 key only)")
    if private is None and public is None:
        return
    if not isinstance(private, str) or not PRIVATE_KEY.match(private.strip() + "\n"):
        taken.problems.append(f"{where}.ssh_keys.ed25519_private: not an OpenSSH private key")
        return
    try:
        checked = check_ssh_key(public, f"{where}.ssh_keys.ed25519_public")
    except AgentError as error:
        taken.problems.append(error.message)
        return
    if not checked.startswith("ssh-ed25519 "):
        taken.problems.append(f"{where}.ssh_keys.ed25519_public: not an ed25519 key")
        return
    taken.host_key = (private.strip() + "\n", checked + "\n")


def read_network(document: Any, where: str, taken: Taken, openstack: bool = False) -> None:
    if document is None:
        return
    try:
        parsed = netconfig.parse_openstack(document) if openstack else netconfig.parse(document)
    except (netconfig.NetworkConfigError, ValueError, TypeError, KeyError) as error:
        taken.problems.append(f"{where}: {error}")
        return
    taken.unsupported += [f"{where}: {item}" for item in parsed.unsupported]
    taken.network = parsed


def read_nocloud(seed: Path, agent_user: str, taken: Taken) -> None:
    meta = read_document(text_of(seed / "meta-data"), "meta-data", taken)
    if isinstance(meta, dict):
        for key, value in meta.items():
            if key in ("instance-id", "dsmode"):
                continue
            if key in ("local-hostname", "hostname"):
                take_hostname(value, f"meta-data.{key}", taken)
            elif key == "public-keys":
                take_keys(value, "meta-data.public-keys", taken)
            else:
                taken.unsupported.append(f"meta-data.{key}")
    read_cloud_config(text_of(seed / "user-data"), "user-data", agent_user, taken)
    if (seed / "network-config").exists():
        read_network(read_document(text_of(seed / "network-config"), "network-config", taken), "network-config", taken)
    if text_of(seed / "vendor-data").strip():
        taken.unsupported.append("vendor-data")


def read_config_drive(seed: Path, agent_user: str, taken: Taken) -> None:
    latest = seed / "openstack" / "latest"
    try:
        meta = json.loads(text_of(latest / "meta_data.json") or "{}")
    except ValueError as error:
        taken.problems.append(f"meta_data.json: {error}")
        meta = {}
    for key, value in meta.items():
        if key in ("uuid",):
            continue
        if key == "hostname":
            take_hostname(str(value).split(".")[0], "meta_data.json.hostname", taken)
            if "." in str(value):
                take_hostname(value, "meta_data.json.hostname", taken, fqdn=True)
        elif key == "public_keys":
            take_keys(value, "meta_data.json.public_keys", taken)
        else:
            taken.unsupported.append(f"meta_data.json.{key}")
    read_cloud_config(text_of(latest / "user_data"), "user_data", agent_user, taken)
    if (latest / "network_data.json").exists():
        try:
            document = json.loads(text_of(latest / "network_data.json"))
        except ValueError as error:
            taken.problems.append(f"network_data.json: {error}")
            document = None
        read_network(document, "network_data.json", taken, openstack=True)
    if text_of(latest / "vendor_data.json").strip() not in ("", "{}"):
        taken.unsupported.append("vendor_data.json")


def text_of(path: Path) -> str:
    try:
        with path.open("rb") as stream:
            return stream.read(MAX_FILE).decode("utf-8", errors="replace")
    except OSError:
        return ""


def read_seed(seed: Path, agent_user: str) -> Taken:
    source = json.loads(text_of(seed / SOURCE_FILE) or "{}")
    taken = Taken(source=str(source.get("description", "")))
    if source.get("kind") == "configdrive":
        read_config_drive(seed, agent_user, taken)
    else:
        read_nocloud(seed, agent_user, taken)
    if source.get("hostname"):
        take_hostname(source["hostname"], "ds=...;h=", taken)
    return taken


def copy_from(
    files: dict[str, bytes], kind: str, description: str, target: Path, extra: dict[str, str] | None = None
) -> None:
    """The source's files into TARGET (a new seed directory), with what it was."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(mode=0o700, parents=True)
    for name, data in files.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(data[:MAX_FILE])
    write_json(target / SOURCE_FILE, {"kind": kind, "description": description, **(extra or {})}, mode=0o600)


def probe(device: str) -> dict[str, str]:
    """What blkid says of a device (or a volume file): LABEL, TYPE, ..."""
    blkid = find_program("blkid", "util-linux")
    done = subprocess.run([blkid, "-p", "-o", "export", device], capture_output=True, text=True, check=False)
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def find_volume() -> tuple[str, str] | None:
    """The first volume labelled cidata or config-2: (device, kind)."""
    blkid = find_program("blkid", "util-linux")
    for label, kind in LABELS.items():
        done = subprocess.run(
            [blkid, "-o", "device", "-t", f"LABEL={label}"], capture_output=True, text=True, check=False
        )
        devices = done.stdout.split()
        if devices:
            return devices[0], kind
    return None


def volume_files(device: str, names: tuple[str, ...]) -> dict[str, bytes]:
    """The files of NAMES found on a vfat volume (read with mtools) or an ISO 9660 one, without mounting it."""
    fs_type = probe(device).get("TYPE", "")
    found: dict[str, bytes] = {}
    if fs_type == "iso9660":
        volume = IsoVolume(Path(device))
        for name in names:
            with suppress(IsoError):
                found[name] = volume.read_file(name)
        return found
    if fs_type != "vfat":
        raise OSError(f"{device} holds {fs_type or 'no file system'}; a seed volume is vfat or ISO 9660")
    mcopy = find_program("mcopy", "mtools")
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for name in names:
        done = subprocess.run([mcopy, "-n", "-i", device, f"::/{name}", "-"], capture_output=True, env=env, check=False)
        if done.returncode == 0:
            found[name] = done.stdout
    return found


def seed_from_volume(device: str, kind: str, seed: Path) -> None:
    names = NOCLOUD_FILES if kind == "nocloud" else CONFIG_DRIVE_FILES
    what = "NoCloud" if kind == "nocloud" else "ConfigDrive"
    copy_from(volume_files(device, names), kind, f"{what} volume {device}", seed)


def nocloud_url(cmdline: str) -> tuple[str, str] | None:
    """ds=nocloud;s=URL (or nocloud-net, seedfrom=): the URL, and the host name given as h=."""
    for word in cmdline.split():
        if not word.startswith("ds="):
            continue
        parts = word.removeprefix("ds=").split(";")
        if parts[0] not in ("nocloud", "nocloud-net"):
            continue
        values = dict(part.split("=", 1) for part in parts[1:] if "=" in part)
        url = values.get("s") or values.get("seedfrom") or ""
        if url.startswith(("http://", "https://")):
            return (url if url.endswith("/") else url + "/"), values.get("h") or values.get("local-hostname") or ""
    return None


def seed_from_url(url: str, hostname: str, seed: Path, wait: float = URL_WAIT) -> None:
    # Imported here: urllib.request brings http.client, email and ssl, a second of a boot's
    # CPU under emulation, and only a NoCloud seed given by URL needs it.
    import urllib.request

    deadline = time.monotonic() + wait
    with tempfile.TemporaryDirectory(prefix="firstboot-", dir="/run") as where:
        root = Path(where)
        for name in NOCLOUD_FILES:
            while True:
                try:
                    with urllib.request.urlopen(url + name, timeout=10) as response:
                        (root / name).write_bytes(response.read(MAX_FILE))
                    break
                except urllib.error.HTTPError as error:
                    if error.code == 404 and name != "meta-data":
                        break
                    raise
                except (urllib.error.URLError, OSError):
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(2)
        files = {name: (root / name).read_bytes() for name in NOCLOUD_FILES if (root / name).is_file()}
        copy_from(files, "nocloud", f"NoCloud seed at {url}", seed, {"hostname": hostname} if hostname else None)


def apply(taken: Taken, config: LifecycleConfig, persistent: bool, late: bool, root: Path = Path("/")) -> list[str]:
    """Put what was taken into effect (below ROOT: another directory in tests); returns what was done."""

    def at(path: Path) -> Path:
        return root / path.relative_to("/")

    done = []
    name = taken.hostname or (taken.fqdn.split(".")[0] if taken.fqdn else "")
    if name:
        at(HOSTNAME_FILE).write_text(name + "\n")
        if root == Path("/"):
            socket.sethostname(name)
        if taken.fqdn:
            hosts = [line for line in text_of(at(HOSTS_FILE)).splitlines() if not line.startswith("127.0.1.1")]
            at(HOSTS_FILE).write_text("\n".join([*hosts, f"127.0.1.1\t{taken.fqdn} {name}"]) + "\n")
        done.append(f"host name {taken.fqdn or name}")
    if taken.keys:
        present = text_of(at(AUTHORIZED_KEYS))
        added = [key for key in dict.fromkeys(taken.keys) if f"{KEY_OPTIONS} {key}" not in present]
        if added:
            with at(AUTHORIZED_KEYS).open("a") as stream:
                stream.write("".join(f"{KEY_OPTIONS} {key}\n" for key in added))
        done.append(f"{len(taken.keys)} operator key(s)")
    if taken.host_key:
        private, public = taken.host_key
        targets = [at(HOST_KEY)]
        if persistent:
            targets.append(config.data_dir / "ssh" / HOST_KEY.name)
        for target in targets:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as stream:
                stream.write(private)
        at(HOST_KEY).with_name(HOST_KEY.name + ".pub").write_text(public)
        done.append("the SSH host key")
    if taken.network and taken.network.interfaces:
        made = set_spec_network_aside(at)
        network_dir = at(NETWORK_DIR)
        network_dir.mkdir(parents=True, exist_ok=True)
        for old in network_dir.glob(f"{netconfig.PREFIX}*"):
            old.unlink()
        for file, text in netconfig.render(taken.network).items():
            (network_dir / file).write_text(text)
        at(NETWORK_PROVISIONED).parent.mkdir(parents=True, exist_ok=True)
        at(NETWORK_PROVISIONED).write_text("")
        at(NETWORK_STATUS).write_text("provisioned\n")
        if late and root == Path("/"):
            # Up already with the spec's network: its bridges and bonds go, their ports are reconfigured.
            for link in made:
                subprocess.run(["ip", "link", "delete", link], check=False, capture_output=True)
            subprocess.run(["networkctl", "reload"], check=False, capture_output=True)
            subprocess.run(["networkctl", "reconfigure", *wired_links()], check=False, capture_output=True)
        done.append("network (in place of the spec's): " + "; ".join(netconfig.describe(taken.network)))
    return done


def set_spec_network_aside(at: Callable[[Path], Path]) -> list[str]:
    """The spec's network units moved aside: the provisioner's network replaces them, as cloud-init's
    network-config replaces an image's. Returns the links their .netdev files make."""
    aside = at(SPEC_UNITS_ASIDE)
    aside.mkdir(parents=True, exist_ok=True)
    links = []
    for unit in sorted(at(SPEC_UNITS).glob("*appliance-*")):
        if unit.suffix == ".netdev":
            links += [line.split("=", 1)[1].strip() for line in text_of(unit).splitlines() if line.startswith("Name=")]
        shutil.move(str(unit), aside / unit.name)
    return links


def wired_links() -> list[str]:
    return sorted(
        link.name for link in Path("/sys/class/net").iterdir() if (link / "device").exists() and link.name != "lo"
    )


def gather(config: LifecycleConfig, late: bool) -> str:
    """Copy this boot's source into the seed directory; what it was ("" for none)."""
    seed, saved = config.firstboot_seed, config.firstboot_saved
    if late:
        found = nocloud_url(text_of(Path("/proc/cmdline")))
        if found is None:
            return ""
        seed_from_url(found[0], found[1], seed)
        return "url"
    volume = find_volume()
    if volume is not None:
        seed_from_volume(volume[0], volume[1], seed)
        return "volume"
    if (saved / SOURCE_FILE).is_file():
        copy_tree(saved, seed)
        return "saved"
    return ""


def main(config: LifecycleConfig, say: Say, late: bool = False) -> int:
    persistent = text_of(Path("/run/appliance/storage")).strip() == "persistent"
    try:
        found = gather(config, late)
    except (OSError, subprocess.CalledProcessError, urllib.error.URLError, AgentError) as error:
        say(f"first boot: cannot read the provisioner's configuration: {error}")
        write_json(config.firstboot_file, {"source": "", "problems": [str(error)]})
        return 1
    if not found:
        if not late:
            write_json(config.firstboot_file, {"source": ""})
        return 0
    taken = read_seed(config.firstboot_seed, config.agent_user)
    if found == "saved":
        taken.source += " (the copy kept on the data partition)"
    done = apply(taken, config, persistent, late)
    if persistent and found != "saved":
        with suppress(OSError):
            copy_tree(config.firstboot_seed, config.firstboot_saved)
    say(f"first boot: from {taken.source}: {', '.join(done) or 'nothing to take'}")
    if taken.unsupported:
        say(f"first boot: not supported, ignored: {', '.join(taken.unsupported)}")
    for problem in taken.problems:
        say(f"first boot: refused: {problem}")
    report: dict[str, Any] = {
        "source": taken.source,
        "applied": done,
        "hostname": taken.fqdn or taken.hostname,
        "keys": len(taken.keys),
        "host_key": taken.host_key is not None,
        "network": netconfig.describe(taken.network) if taken.network else [],
        "unsupported": taken.unsupported,
        "problems": taken.problems,
    }
    write_json(config.firstboot_file, report)
    return 0


def copy_tree(source: Path, target: Path) -> None:
    staged = target.with_name(f".{target.name}.new")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(source, staged)
    shutil.rmtree(target, ignore_errors=True)
    staged.rename(target)
