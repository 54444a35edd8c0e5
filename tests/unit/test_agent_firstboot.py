"""The first-boot reader: NoCloud and ConfigDrive volumes made here with mtools and xorriso, read without a
mount; what it takes, what it names as unsupported, and the networkd files it writes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from appliance.agent import firstboot, netconfig, yamlish
from appliance.agent.lifecycle_config import LifecycleConfig
from appliance.agent.yamlish import YamlError

MTOOLS = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
HOST_PRIVATE = """-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACA=
-----END OPENSSH PRIVATE KEY-----
"""


def user_data(key: str) -> str:
    return f"""#cloud-config
hostname: node7
fqdn: node7.example.net
ssh_authorized_keys:
  - {key}
users:
  - default
  - name: alice
    ssh_authorized_keys: [{key}]
ssh_keys:
  ed25519_private: |
{"".join("    " + line + chr(10) for line in HOST_PRIVATE.splitlines())}  ed25519_public: {key}
  rsa_private: nope
runcmd:
  - [touch, /tmp/x]
packages: [tcpdump]
"""


NETWORK_V2 = """version: 2
ethernets:
  nic0:
    match:
      macaddress: "52:54:00:12:34:56"
    addresses: [10.0.2.15/24]
    gateway4: 10.0.2.2
    nameservers:
      addresses: [10.0.2.3]
  nic1:
    match: {macaddress: "52:54:00:00:00:01"}
  nic2:
    match: {macaddress: "52:54:00:00:00:02"}
    wakeonlan: true
bonds:
  bond0:
    interfaces: [nic1, nic2]
    parameters: {mode: active-backup, mii-monitor-interval: 100, primary: nic1}
    dhcp4: true
vlans:
  vlan10:
    id: 10
    link: bond0
    addresses: [192.168.10.5/24]
"""


def cidata_vfat(path: Path, files: dict[str, str]) -> Path:
    subprocess.run(["mkfs.vfat", "-C", "-n", "CIDATA", str(path), "1024"], check=True, capture_output=True)
    for name, text in files.items():
        source = path.with_name(name)
        source.write_text(text)
        subprocess.run(["mcopy", "-i", str(path), str(source), f"::/{name}"], check=True, env=MTOOLS)
    return path


def iso(path: Path, label: str, files: dict[str, str]) -> Path:
    tree = path.with_suffix(".tree")
    for name, text in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-J", "-r", "-V", label, "-o", str(path), str(tree)],
                   check=True, capture_output=True)  # fmt: skip
    return path


def read_volume(volume: Path, kind: str, seed: Path) -> firstboot.Taken:
    firstboot.seed_from_volume(str(volume), kind, seed)
    return firstboot.read_seed(seed, "appliance")


def test_a_nocloud_vfat_volume_gives_host_name_keys_host_key_and_network(tmp_path: Path, public_key: str) -> None:
    volume = cidata_vfat(tmp_path / "cidata.img", {
        "meta-data": "instance-id: iid-1\nlocal-hostname: ignored-when-user-data-says\n",
        "user-data": user_data(public_key),
        "network-config": NETWORK_V2,
    })  # fmt: skip
    assert firstboot.probe(str(volume))["LABEL"] == "CIDATA"
    taken = read_volume(volume, "nocloud", tmp_path / "seed")
    assert taken.hostname == "node7" and taken.fqdn == "node7.example.net"
    assert taken.keys == [public_key.strip()] * 1 or taken.keys == [public_key.strip()]
    assert taken.host_key is not None and taken.host_key[1].startswith(public_key.split()[0])
    assert "CIDATA" not in taken.source and "NoCloud volume" in taken.source
    for named in ("user-data.runcmd", "user-data.packages", "network-config: network.ethernets.nic2.wakeonlan"):
        assert named in taken.unsupported, taken.unsupported
    assert any(item.startswith("user-data.users[1] (user alice") for item in taken.unsupported)
    assert any("rsa_private" in item for item in taken.unsupported)
    assert taken.network is not None and set(taken.network.interfaces) == {"nic0", "nic1", "nic2", "bond0", "vlan10"}


def test_what_is_taken_is_applied_below_a_root(tmp_path: Path, public_key: str) -> None:
    volume = cidata_vfat(tmp_path / "cidata.img", {"meta-data": "instance-id: x\n", "user-data": user_data(public_key),
                                                   "network-config": NETWORK_V2})  # fmt: skip
    taken = read_volume(volume, "nocloud", tmp_path / "seed")
    root = tmp_path / "root"
    for directory in ("etc/ssh/authorized_keys", "run/systemd", "etc/systemd/network"):
        (root / directory).mkdir(parents=True)
    # The spec's network (appliance-network's units): the provisioner's replaces it.
    (root / "etc/systemd/network/10-appliance-br0.netdev").write_text("[NetDev]\nName=br0\nKind=bridge\n")
    (root / "etc/ssh/authorized_keys/agent-user").write_text(
        f'restrict,command="/usr/bin/appliance-agent serve" {public_key}\n'
    )
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tappliance\n")
    config = LifecycleConfig(data_dir=tmp_path / "data")
    done = firstboot.apply(taken, config, persistent=True, late=False, root=root)
    assert done[0] == "host name node7.example.net" and "the SSH host key" in done
    assert (root / "etc/hostname").read_text() == "node7\n"
    assert "127.0.1.1\tnode7.example.net node7" in (root / "etc/hosts").read_text()
    # The key was in the image already: not twice.
    assert (root / "etc/ssh/authorized_keys/agent-user").read_text().count(public_key.split()[1]) == 1
    assert (root / "etc/ssh/ssh_host_ed25519_key").read_text() == HOST_PRIVATE
    assert oct((config.data_dir / "ssh" / "ssh_host_ed25519_key").stat().st_mode & 0o777) == "0o600"
    assert not (root / "etc/systemd/network/10-appliance-br0.netdev").exists()
    assert (root / "run/appliance/network-replaced/10-appliance-br0.netdev").exists()
    assert (root / "run/appliance/network-provisioned").exists()
    assert (root / "run/appliance/network").read_text() == "provisioned\n"
    network = sorted(path.name for path in (root / "run/systemd/network").iterdir())
    assert network == [f"{netconfig.PREFIX}{name}" for name in (
        "bond0.netdev", "bond0.network", "nic0.network", "nic1.network", "nic2.network", "vlan10.netdev",
        "vlan10.network")]  # fmt: skip


def test_networkd_files_say_what_the_v2_config_says() -> None:
    files = netconfig.render(netconfig.parse(yamlish.loads(NETWORK_V2)))
    nic0 = files[f"{netconfig.PREFIX}nic0.network"]
    assert "MACAddress=52:54:00:12:34:56" in nic0 and "Address=10.0.2.15/24" in nic0
    assert "Gateway=10.0.2.2" in nic0 and "DNS=10.0.2.3" in nic0 and "DHCP=no" in nic0
    nic1 = files[f"{netconfig.PREFIX}nic1.network"]
    assert "Bond=bond0" in nic1 and "PrimarySlave=yes" in nic1 and "\nAddress=" not in nic1
    bond = files[f"{netconfig.PREFIX}bond0.netdev"]
    assert "Kind=bond" in bond and "Mode=active-backup" in bond and "MIIMonitorSec=100ms" in bond
    assert "VLAN=vlan10" in files[f"{netconfig.PREFIX}bond0.network"]
    assert "DHCP=ipv4" in files[f"{netconfig.PREFIX}bond0.network"]
    vlan = files[f"{netconfig.PREFIX}vlan10.netdev"]
    assert "Kind=vlan" in vlan and "Id=10" in vlan
    assert "Address=192.168.10.5/24" in files[f"{netconfig.PREFIX}vlan10.network"]


def test_a_v1_config_with_a_netmask_and_global_dns() -> None:
    v1 = {"network": {"version": 1, "config": [
        {"type": "physical", "name": "eth0", "mac_address": "52:54:00:AA:BB:CC",
         "subnets": [{"type": "static", "address": "10.0.2.15", "netmask": "255.255.255.0", "gateway": "10.0.2.2"}]},
        {"type": "nameserver", "address": ["1.1.1.1"], "search": ["example.net"]},
        {"type": "route", "destination": "10.9.0.0/16", "gateway": "10.0.2.1"},
    ]}}  # fmt: skip
    parsed = netconfig.parse(v1)
    files = netconfig.render(parsed)
    eth0 = files[f"{netconfig.PREFIX}eth0.network"]
    assert "MACAddress=52:54:00:aa:bb:cc" in eth0 and "Address=10.0.2.15/24" in eth0
    assert "DNS=1.1.1.1" in eth0 and "Domains=example.net" in eth0
    assert parsed.unsupported == ["network.config[2] (a global route: give it on an interface's subnet)"]


def test_a_config_drive_iso_gives_host_name_keys_and_network(tmp_path: Path, public_key: str) -> None:
    meta = {"uuid": "u-1", "hostname": "node8.example.net", "public_keys": {"ops": public_key},
            "availability_zone": "nova", "launch_index": 0}  # fmt: skip
    network = {
        "links": [{"id": "tap1", "type": "phy", "ethernet_mac_address": "52:54:00:12:34:56", "mtu": 1500},
                  {"id": "vlan7", "type": "vlan", "vlan_link": "tap1", "vlan_id": 7}],
        "networks": [{"id": "n1", "link": "tap1", "type": "ipv4", "ip_address": "10.0.2.15", "netmask": "255.255.255.0",
                      "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.0.2.2"}]},
                     {"id": "n2", "link": "vlan7", "type": "ipv4_dhcp"}],
        "services": [{"type": "dns", "address": "10.0.2.3"}],
    }  # fmt: skip
    volume = iso(tmp_path / "config-2.iso", "config-2", {
        "openstack/latest/meta_data.json": json.dumps(meta),
        "openstack/latest/network_data.json": json.dumps(network),
        "openstack/latest/user_data": "#!/bin/sh\necho hi\n",
    })  # fmt: skip
    assert firstboot.probe(str(volume))["TYPE"] == "iso9660"
    taken = read_volume(volume, "configdrive", tmp_path / "seed")
    assert taken.hostname == "node8" and taken.fqdn == "node8.example.net"
    assert taken.keys == [" ".join(public_key.split()[:3])]
    assert (
        "meta_data.json.availability_zone" in taken.unsupported and "meta_data.json.launch_index" in taken.unsupported
    )
    assert any("user_data (not #cloud-config" in item for item in taken.unsupported)
    assert taken.network is not None
    files = netconfig.render(taken.network)
    tap = files[f"{netconfig.PREFIX}tap1.network"]
    assert "Address=10.0.2.15/24" in tap and "Gateway=10.0.2.2" in tap and "VLAN=vlan7" in tap and "DNS=10.0.2.3" in tap
    assert "DHCP=ipv4" in files[f"{netconfig.PREFIX}vlan7.network"]


def test_a_nocloud_iso_made_by_xorriso_reads_like_the_vfat_one(tmp_path: Path, public_key: str) -> None:
    files = {
        "meta-data": "instance-id: i\nlocal-hostname: isonode\n",
        "user-data": f"#cloud-config\nssh_authorized_keys: [{public_key}]\n",
    }
    volume = iso(tmp_path / "seed.iso", "cidata", files)
    taken = read_volume(volume, "nocloud", tmp_path / "seed")
    assert taken.hostname == "isonode" and len(taken.keys) == 1 and not taken.unsupported and not taken.problems


def test_bad_values_are_refused_by_name_and_the_rest_still_taken(tmp_path: Path, public_key: str) -> None:
    volume = cidata_vfat(tmp_path / "cidata.img", {
        "meta-data": "local-hostname: bad_name!\n",
        "user-data": f"#cloud-config\nssh_authorized_keys:\n  - not a key\n  - {public_key}\n",
        "network-config": "version: 3\n",
    })  # fmt: skip
    taken = read_volume(volume, "nocloud", tmp_path / "seed")
    assert taken.hostname == "" and len(taken.keys) == 1 and taken.network is None
    assert len(taken.problems) == 3, taken.problems
    assert any("meta-data.local-hostname" in problem for problem in taken.problems)
    assert any("versions 1 and 2" in problem for problem in taken.problems)


def test_the_kernel_command_line_names_a_nocloud_url() -> None:
    assert firstboot.nocloud_url("quiet ds=nocloud;s=http://10.0.2.2:8000/seed;h=n1 x") == (
        "http://10.0.2.2:8000/seed/", "n1")  # fmt: skip
    assert firstboot.nocloud_url("ds=nocloud-net;seedfrom=https://a/b/") == ("https://a/b/", "")
    assert firstboot.nocloud_url("ds=nocloud;s=file:///x/") is None
    assert firstboot.nocloud_url("quiet") is None


YAML_SAMPLES = [
    NETWORK_V2,
    "a: [1, 'two', \"three\", {x: y}]\nb: {}\nc: ~\nd: 'it''s'\ne: -3\nf: 1.5\n",
    "list:\n- a\n-\n  b: 1\n- - x\n  - y\nfolded: >-\n  one\n  two\n\n  three\nliteral: |+\n  kept\n\n",
    "# comment\n---\nkey: value # trailing\nurl: http://h:80/p\n",
]


@pytest.mark.parametrize("text", YAML_SAMPLES)
def test_the_yaml_subset_reads_as_pyyaml_does(text: str) -> None:
    assert yamlish.loads(text) == yaml.safe_load(text)


@pytest.mark.parametrize(
    "text", ["a: &anchor 1\nb: *anchor\n", "a: 1\n---\nb: 2\n", "a:\n\tb: 1\n", "a: 1\na: 2\n", "a: !!str 1\n"]
)
def test_what_the_yaml_subset_does_not_read_is_refused_with_its_line(text: str) -> None:
    with pytest.raises(YamlError, match="line"):
        yamlish.loads(text)


def test_a_nocloud_url_is_fetched_over_http(tmp_path: Path, public_key: str) -> None:
    import functools
    import http.server
    import threading

    served = tmp_path / "served" / "seed"
    served.mkdir(parents=True)
    (served / "meta-data").write_text("instance-id: i-url\nlocal-hostname: from-url\n")
    (served / "user-data").write_text(f"#cloud-config\nssh_authorized_keys: [{public_key}]\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url, hostname = firstboot.nocloud_url(f"quiet ds=nocloud;s=http://127.0.0.1:{server.server_port}/seed")  # type: ignore[misc]
        firstboot.seed_from_url(url, hostname, tmp_path / "seed", wait=5)
    finally:
        server.shutdown()
    taken = firstboot.read_seed(tmp_path / "seed", "appliance")
    # network-config and vendor-data are not served (404): optional, as in cloud-init.
    assert taken.hostname == "from-url" and len(taken.keys) == 1 and taken.network is None
    assert taken.source.startswith("NoCloud seed at http://127.0.0.1:")
