"""Inventories: which nodes a fleet verb reaches, from an Ansible INI or YAML inventory or a host list.

Ansible's connection variables are honoured (ansible_host, ansible_port,
ansible_user) on hosts and on groups ([group:vars], a YAML group's vars:),
the nearer definition winning: the host's own, then its group's, then the
parent groups' up to `all`. Anything malformed is refused naming the file,
where in it (the line for INI; the key path and its line for YAML) and what
is wrong, rather than guessed at.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from appliance.errors import UsageError
from appliance.nodes.client import NodeAddress, parse_address, valid_port
from appliance.nodes.errors import NodeError

CONNECTION_VARS = ("ansible_host", "ansible_port", "ansible_user")
YAML_GROUP_KEYS = ("hosts", "children", "vars")
TOP = "all"


class InventoryError(UsageError):
    """The inventory file cannot be read, is malformed, or holds no hosts."""

    code = "inventory"


@dataclass(frozen=True)
class HostEntry:
    name: str
    address: NodeAddress


@dataclass
class Group:
    hosts: dict[str, dict[str, object]] = field(default_factory=dict)  # host name -> its own variables
    children: list[str] = field(default_factory=list)
    variables: dict[str, object] = field(default_factory=dict)


@dataclass
class Inventory:
    """Groups as both formats describe them; `all` holds the hosts of no group."""

    groups: dict[str, Group] = field(default_factory=lambda: {TOP: Group()})

    def group(self, name: str) -> Group:
        return self.groups.setdefault(name, Group())


def check_variable(name: str, value: object) -> object:
    """A connection variable's value, or ValueError saying what is wrong with it."""
    if name not in CONNECTION_VARS:
        return value
    if name == "ansible_port":
        text = str(value).strip()
        if isinstance(value, bool) or not valid_port(text):
            raise ValueError(f"ansible_port={value!r} is not a port (1-65535)")
        return int(text)
    if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
        raise ValueError(f"{name} is empty" if value in ("", None) else f"{name}={value!r} is not a name")
    if any(character.isspace() for character in str(value).strip()):
        raise ValueError(f"{name}={value!r} has a space in it")
    return str(value).strip()


def check_host_name(name: str) -> None:
    if "[" in name or "]" in name:
        raise ValueError(f"host {name!r}: host ranges and patterns are not supported, list each host")
    try:
        parse_address(name)
    except NodeError as error:
        raise ValueError(str(error)) from error


def parse_ini_inventory(text: str, source: str = "inventory") -> list[HostEntry]:
    """Ansible INI: [group], [group:vars] and [group:children] sections, 'host key=value ...' lines;
    a plain host list works too."""
    inventory = Inventory()
    section, kind = TOP, "hosts"
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        try:
            if line.startswith("["):
                section, kind = ini_section(line)
                inventory.group(section)
            elif kind == "children":
                inventory.group(section).children.append(ini_group_name(line))
            elif kind == "vars":
                name, value = ini_assignment(line.split(" #", 1)[0].strip())
                inventory.group(section).variables[name] = value
            else:
                name, variables = ini_host_line(line)
                inventory.group(section).hosts.setdefault(name, {}).update(variables)
        except ValueError as error:
            raise InventoryError(f"inventory {source} line {number}: {error}") from error
    return resolve(inventory, source)


def ini_section(line: str) -> tuple[str, str]:
    if not line.endswith("]"):
        raise ValueError(f"section header {line!r} is not closed with ']'")
    name, _, kind = line[1:-1].strip().partition(":")
    if kind not in ("", "vars", "children"):
        raise ValueError(f"section [{line[1:-1]}]: a section is [group], [group:vars] or [group:children]")
    return ini_group_name(name), kind or "hosts"


def ini_group_name(text: str) -> str:
    name = text.split(" #", 1)[0].strip()
    if not name or any(character.isspace() or character in "[]:=" for character in name):
        raise ValueError(f"{name!r} is not a group name")
    return name


def ini_assignment(text: str) -> tuple[str, object]:
    name, equals, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not equals or not name:
        raise ValueError(f"expected key=value, got {text!r}")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return name, check_variable(name, value)


def ini_host_line(line: str) -> tuple[str, dict[str, object]]:
    try:
        words = shlex.split(line, comments=True)
    except ValueError as error:
        raise ValueError(f"{line!r}: {error}") from error
    if not words:
        raise ValueError("no host on this line")
    name, *pairs = words
    check_host_name(name)
    return name, dict(ini_assignment(pair) for pair in pairs)


def parse_yaml_inventory(data: Any, source: str = "inventory", text: str | None = None) -> list[HostEntry]:
    """Ansible YAML: groups of `hosts`, `children` and `vars` maps, or a plain list of hosts. TEXT, the
    file's own, lets errors name their line."""
    if data is None:
        return []
    if isinstance(data, list):
        entries = []
        for index, name in enumerate(data):
            where = YamlPlace(source, text, (index,))
            if not isinstance(name, str | int) or isinstance(name, bool):
                raise where.error(f"expected a host name, got {name!r}")
            entries.append(name_entry(str(name), where))
        return entries
    if not isinstance(data, dict):
        raise YamlPlace(source, text, ()).error(f"expected a mapping of groups or a list of hosts, got {data!r}")
    inventory = Inventory()
    for name, group in data.items():
        yaml_group(inventory, str(name), group, YamlPlace(source, text, (name,)))
    return resolve(inventory, source)


def yaml_group(inventory: Inventory, name: str, data: Any, where: YamlPlace) -> None:
    group = inventory.group(name)
    if data is None:
        return
    if not isinstance(data, dict):
        raise where.error(f"a group must be a mapping of {', '.join(YAML_GROUP_KEYS)}, got {data!r}")
    for key in data:
        if key not in YAML_GROUP_KEYS:
            raise where.child(key).error(f"unknown key {key!r} in a group (expected {', '.join(YAML_GROUP_KEYS)})")
    for host, variables in yaml_mapping(data.get("hosts"), where.child("hosts"), "hosts").items():
        host_place = where.child("hosts").child(host)
        try:
            check_host_name(str(host))
        except ValueError as error:
            raise host_place.error(str(error)) from error
        values = yaml_variables(variables, host_place)
        group.hosts.setdefault(str(host), {}).update(values)
    group.variables.update(yaml_variables(data.get("vars"), where.child("vars")))
    for child, child_data in yaml_mapping(data.get("children"), where.child("children"), "child groups").items():
        group.children.append(str(child))
        yaml_group(inventory, str(child), child_data, where.child("children").child(child))


def yaml_mapping(value: Any, where: YamlPlace, what: str) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise where.error(f"expected a mapping of {what}, got {value!r}")
    return value


def yaml_variables(value: Any, where: YamlPlace) -> dict[str, object]:
    variables: dict[str, object] = {}
    for name, item in yaml_mapping(value, where, "variables").items():
        try:
            variables[str(name)] = check_variable(str(name), item)
        except ValueError as error:
            raise where.child(name).error(str(error)) from error
    return variables


@dataclass(frozen=True)
class YamlPlace:
    """A key path in a YAML inventory, and its line when the text is at hand."""

    source: str
    text: str | None
    path: tuple[Any, ...]

    def child(self, key: Any) -> YamlPlace:
        return YamlPlace(self.source, self.text, (*self.path, key))

    def error(self, what: str) -> InventoryError:
        dotted = "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in self.path).lstrip(".")
        line = yaml_line(self.text, self.path) if self.text is not None else None
        at = f" {dotted or '(top)'}" + (f" (line {line})" if line else "")
        return InventoryError(f"inventory {self.source}{at}: {what}")


def yaml_line(text: str, path: tuple[Any, ...]) -> int | None:
    """The line (from 1) of PATH in TEXT: its key's line (or its item's, in a list), found on the composed
    node tree."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    mark = None if node is None else node.start_mark
    for key in path:
        if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            mark = node.start_mark
        elif isinstance(node, yaml.MappingNode):
            found = [(name, value) for name, value in node.value if name.value == str(key)]
            if not found:
                return None
            mark, node = found[0][0].start_mark, found[0][1]
        else:
            return None
    return None if mark is None else int(mark.line) + 1


def name_entry(name: str, where: YamlPlace) -> HostEntry:
    try:
        check_host_name(name)
    except ValueError as error:
        raise where.error(str(error)) from error
    return HostEntry(name, parse_address(name))


def resolve(inventory: Inventory, source: str) -> list[HostEntry]:
    """Every host once, in the order first named, with its connection variables: its own first, then its
    groups' from the nearest up to `all`."""
    parents: dict[str, set[str]] = {name: set() for name in inventory.groups}
    for name, group in inventory.groups.items():
        for child in group.children:
            parents.setdefault(child, set()).add(name)
            inventory.group(child)
    depth: dict[str, int] = {}

    def depth_of(name: str, seen: tuple[str, ...] = ()) -> int:
        if name in seen:
            raise InventoryError(f"inventory {source}: groups {' > '.join((*seen, name))} contain each other")
        if name not in depth:
            above = [depth_of(parent, (*seen, name)) for parent in parents.get(name, ()) if parent != TOP]
            depth[name] = 0 if name == TOP else 1 + max(above, default=0)
        return depth[name]

    order: list[str] = []
    memberships: dict[str, set[str]] = {}
    host_vars: dict[str, dict[str, object]] = {}
    for name, group in inventory.groups.items():
        for host, variables in group.hosts.items():
            if host not in host_vars:
                order.append(host)
            memberships.setdefault(host, set()).add(name)
            host_vars.setdefault(host, {}).update(variables)
    entries = []
    for host in order:
        groups = set(memberships[host])
        pending = list(groups)
        while pending:
            for parent in parents.get(pending.pop(), ()):
                if parent not in groups:
                    groups.add(parent)
                    pending.append(parent)
        variables = dict(inventory.groups[TOP].variables)
        for member in sorted(groups - {TOP}, key=lambda name: (depth_of(name), name)):
            variables.update(inventory.groups[member].variables)
        variables.update(host_vars[host])
        entries.append(entry_from_vars(host, variables))
    return entries


def entry_from_vars(name: str, variables: dict[str, object]) -> HostEntry:
    """An Ansible-style host: ansible_host, ansible_port and ansible_user override the name."""
    base = parse_address(name)
    port = variables.get("ansible_port", base.port)
    return HostEntry(
        name=name,
        address=NodeAddress(
            host=str(variables.get("ansible_host", base.host)),
            port=port if isinstance(port, int) else int(str(port)),
            user=str(variables.get("ansible_user", base.user)),
            identity_files=base.identity_files,
            identities_only=base.identities_only,
        ),
    )


def load_inventory(path: Path) -> list[HostEntry]:
    if path.is_dir():
        raise InventoryError(f"inventory {path} is a directory: give an inventory file")
    try:
        text = path.read_text()
    except OSError as error:
        raise InventoryError(f"cannot read inventory {path}: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise InventoryError(f"inventory {path} is not text: {error.reason} at byte {error.start}") from error
    if path.suffix in (".yml", ".yaml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            at = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error)
            raise InventoryError(f"inventory {path}{at}: not valid YAML: {problem}") from error
        entries = parse_yaml_inventory(data, str(path), text)
    else:
        entries = parse_ini_inventory(text, str(path))
    if not entries:
        raise InventoryError(f"inventory {path} names no hosts")
    return entries
