"""Inventories as an operator writes them, and as they get them wrong: each mistake named with its
file, its line (INI) or key path and line (YAML), and what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from appliance.nodes.client import NodeAddress
from appliance.nodes.inventory import InventoryError, load_inventory, parse_ini_inventory, parse_yaml_inventory


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME of the test's own: host names are looked up in ~/.ssh/config, never the engineer's."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_ini_inventory_with_groups_vars_and_plain_hosts() -> None:
    entries = parse_ini_inventory(
        "plain1\n[hv]\nnode1 ansible_host=10.0.0.1 ansible_port=2222 ansible_user=ops # comment\n"
        "ops@node2:2200\n[hv:vars]\nsomething=1\n"
    )
    assert [entry.name for entry in entries] == ["plain1", "node1", "ops@node2:2200"]
    assert entries[1].address == NodeAddress("10.0.0.1", 2222, "ops")
    assert entries[2].address == NodeAddress("node2", 2200, "ops")


def test_yaml_inventory_with_children_and_a_plain_list() -> None:
    data = {"all": {"children": {"hv": {"hosts": {"n1": {"ansible_host": "10.0.0.9"}, "n2": None}}}}}
    entries = parse_yaml_inventory(data)
    assert [(e.name, e.address.host) for e in entries] == [("n1", "10.0.0.9"), ("n2", "n2")]
    assert [e.name for e in parse_yaml_inventory(["a", "b"])] == ["a", "b"]


def test_empty_or_unreadable_inventory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.ini").write_text("# nothing\n")
    with pytest.raises(InventoryError, match="no hosts"):
        load_inventory(tmp_path / "empty.ini")
    with pytest.raises(InventoryError, match="cannot read"):
        load_inventory(tmp_path / "missing.ini")


def refused(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    return str(caught.value)


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("node1\n[hv\nnode2\n", 2, "section header '[hv' is not closed with ']'"),
        ("[hv]\nnode1 ansible_host=\n", 2, "ansible_host is empty"),
        ("[hv]\nnode1 ansible_port=22x\n", 2, "ansible_port='22x' is not a port (1-65535)"),
        ("[hv]\nnode1 ansible_port=70000\n", 2, "ansible_port='70000' is not a port"),
        ("node1:0\n", 1, "not a node address: 'node1:0'"),
        ("[hv]\nnode1 ansible_user\n", 2, "expected key=value, got 'ansible_user'"),
        ("[hv]\nnode1 ansible_host='10.0.0.1\n", 2, "No closing quotation"),
        ("[hv]\nnode[1:3]\n", 2, "host ranges and patterns are not supported"),
        ("[hv:vars]\nansible_port=abc\n", 2, "ansible_port='abc' is not a port"),
        ("[hv:nope]\nnode1\n", 1, "a section is [group], [group:vars] or [group:children]"),
        ("[hv:children]\nbad group\n", 2, "'bad group' is not a group name"),
    ],
)
def test_a_malformed_ini_inventory_is_refused_with_its_line(tmp_path: Path, text: str, line: int, what: str) -> None:
    message = refused(tmp_path, "hosts.ini", text)
    assert message.startswith(f"inventory {tmp_path / 'hosts.ini'} line {line}: ")
    assert what in message


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("all:\n  hosts: 5\n", "all.hosts (line 2)", "expected a mapping of hosts, got 5"),
        ("all: 5\n", "all (line 1)", "a group must be a mapping of hosts, children, vars, got 5"),
        ("all:\n  children:\n    hv: [a, b]\n", "all.children.hv (line 3)", "a group must be a mapping"),
        ("all:\n  children: [hv]\n", "all.children (line 2)", "expected a mapping of child groups"),
        ("all:\n  host:\n    n1:\n", "all.host (line 2)", "unknown key 'host' in a group"),
        ("all:\n  hosts:\n    n1:\n      ansible_host: ''\n", "all.hosts.n1.ansible_host (line 4)",
         "ansible_host is empty"),
        ("all:\n  hosts:\n    n1:\n      ansible_port: 99999\n", "all.hosts.n1.ansible_port (line 4)",
         "ansible_port=99999 is not a port"),
        ("all:\n  hosts:\n    n1: 5\n", "all.hosts.n1 (line 3)", "expected a mapping of variables, got 5"),
        ("all:\n  vars:\n    ansible_port: nope\n", "all.vars.ansible_port (line 3)", "is not a port"),
        ("- n1\n- [n2]\n", "[1] (line 2)", "expected a host name, got ['n2']"),
        ("42\n", "(top) (line 1)", "expected a mapping of groups or a list of hosts, got 42"),
    ],
)  # fmt: skip
def test_a_malformed_yaml_inventory_is_refused_with_its_key_path_and_line(
    tmp_path: Path, text: str, where: str, what: str
) -> None:
    message = refused(tmp_path, "hosts.yml", text)
    assert message.startswith(f"inventory {tmp_path / 'hosts.yml'} {where}: ")
    assert what in message


def test_yaml_that_does_not_parse_names_its_line(tmp_path: Path) -> None:
    message = refused(tmp_path, "hosts.yaml", "all:\n  hosts:\n    n1: {\n")
    assert message.startswith(f"inventory {tmp_path / 'hosts.yaml'} line 4: not valid YAML")


def test_a_directory_or_non_text_inventory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "inv").mkdir()
    with pytest.raises(InventoryError, match="is a directory"):
        load_inventory(tmp_path / "inv")
    (tmp_path / "binary.ini").write_bytes(b"node1\n\xff\xfe\n")
    with pytest.raises(InventoryError, match="is not text"):
        load_inventory(tmp_path / "binary.ini")


def test_group_variables_apply_with_the_nearest_winning() -> None:
    entries = parse_ini_inventory(
        "[all:vars]\nansible_user=ops\nansible_port=2200\n"
        "[hv]\nnode1\nnode2 ansible_port=2300\n"
        "[hv:vars]\nansible_user=hvops\n"
        "[dc:children]\nhv\n[dc:vars]\nansible_user=dcops\nansible_port=2400\n"
        "[other]\nnode3\n"
    )
    assert [entry.address for entry in entries] == [
        NodeAddress("node1", 2400, "hvops"),
        NodeAddress("node2", 2300, "hvops"),
        NodeAddress("node3", 2200, "ops"),
    ]
    data = yaml.safe_load(
        "all:\n  vars: {ansible_user: ops}\n  children:\n    hv:\n      vars: {ansible_port: 2222}\n"
        "      hosts:\n        n1:\n        n2: {ansible_user: root}\n"
    )
    assert [entry.address for entry in parse_yaml_inventory(data)] == [
        NodeAddress("n1", 2222, "ops"),
        NodeAddress("n2", 2222, "root"),
    ]


def test_a_host_in_two_groups_is_reached_once() -> None:
    entries = parse_ini_inventory("[a]\nnode1\n[b]\nnode1 ansible_port=2201\nnode2\n")
    assert [(entry.name, entry.address.port) for entry in entries] == [("node1", 2201), ("node2", 22)]


def test_an_inventory_name_may_be_an_ssh_config_alias(home: Path) -> None:
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host lab\n  HostName 10.0.0.7\n  User ops\n  IdentityFile ~/k\n")
    (entry,) = parse_ini_inventory("lab ansible_port=2222\n")
    assert entry.address == NodeAddress("10.0.0.7", 2222, "ops", identity_files=(home / "k",))
