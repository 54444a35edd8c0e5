"""The appliance.toml model: dataclasses, parsing and validation.

Parsing happens once, at the edge: `load_spec` turns a file into a frozen
`Spec` or raises `SpecError` listing every problem found, each naming the key,
the bad value and what is allowed.

Each key is declared once, in SETTINGS: its table and name, its default, and
the parser that says what is allowed. The dataclasses take their defaults from
there and the known keys of each table follow from it. What a key means is
written in the commented starter spec, data/appliance.toml (`appliance init`);
tests/unit/test_spec.py checks that it shows every key with its default. The
[policy] keys are declared in appliance/agent/policy.py, so that the node's
agent reads its copy of that table (agent.toml) by the same rules.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from appliance.agent.lifecycle_config import MAX_CHECK_LENGTH as MAX_HEALTH_CHECK_LENGTH
from appliance.agent.lifecycle_config import MAX_CHECKS as MAX_HEALTH_CHECKS
from appliance.agent.lifecycle_config import MAX_HEALTH_TIMEOUT
from appliance.agent.policy import LIMITS, Policy, read_policy
from appliance.errors import UsageError
from appliance.network import (
    Management,
    Network,
    ProblemSink,
    check_network,
    parse_bonds,
    parse_bridges,
    parse_management,
)

RELEASES = ("trixie", "bookworm", "forky")
DEFAULT_RELEASE = "trixie"
SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-rsa",
)
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
HOSTNAME_PATTERN = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
USER_PATTERN = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
PACKAGE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
# Kernel arguments are written into grub.cfg and iPXE scripts: no quoting,
# no spaces, no characters either language treats specially.
CMDLINE_ARG_PATTERN = re.compile(r"^[A-Za-z0-9_.,:/=+@%-]+$")
MIRROR_PATTERN = re.compile(r"^(https?|file)://[^\s\"']+$")
MAX_BUDGET_MB = 100_000
BREAK_GLASS_USER = "breakglass"


class Output(StrEnum):
    """Artifacts a build can produce (kernel and initrd always come along)."""

    SQUASHFS = "squashfs"
    ISO = "iso"
    DISK = "disk"
    PXE = "pxe"


@dataclass(frozen=True)
class Problem:
    key: str
    value: object
    allowed: str

    def __str__(self) -> str:
        return f"{self.key} = {self.value!r}: {self.allowed}"


class SpecError(UsageError):
    """The spec is invalid; carries every problem found, not just the first."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"invalid spec: {source}: {len(problems)} problem(s)"] + [f"  {problem}" for problem in problems]
        super().__init__("\n".join(lines))


# A parser checks one value read from appliance.toml at its key path (e.g. "ssh.user"),
# appends a Problem for everything wrong with it, and returns the value as the Spec holds it.
# When it found a problem the spec is refused anyway, and the key keeps its default meanwhile.
Parser = Callable[[object, str, list[Problem]], Any]


@dataclass(frozen=True)
class Setting:
    """One key of appliance.toml: where it lives, its default, and what it may hold."""

    table: str  # "" for the top level, else the [table] it is written under
    key: str
    default: Any
    parse: Parser
    dest: str = ""  # the dataclass field holding it, when that is not `key`

    @property
    def path(self) -> str:
        return f"{self.table}.{self.key}" if self.table else self.key


def text(pattern: re.Pattern[str], allowed: str) -> Parser:
    """A string that `pattern` matches."""

    def parse(value: object, path: str, problems: list[Problem]) -> object:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            problems.append(Problem(path, value, allowed))
        return value

    return parse


def one_of(choices: tuple[object, ...]) -> Parser:
    def parse(value: object, path: str, problems: list[Problem]) -> object:
        if value not in choices:
            problems.append(Problem(path, value, f"one of {', '.join(str(choice) for choice in choices)}"))
        return value

    return parse


def flag(value: object, path: str, problems: list[Problem]) -> object:
    if not isinstance(value, bool):
        problems.append(Problem(path, value, "must be true or false"))
    return value


def whole_number(low: int, high: int, allowed: str) -> Parser:
    def parse(value: object, path: str, problems: list[Problem]) -> object:
        # TOML booleans are ints to Python.
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            problems.append(Problem(path, value, allowed))
        return value

    return parse


def text_list(pattern: re.Pattern[str], allowed: str) -> Parser:
    """A list of strings, each matched by `pattern`; a bad item is named by its index."""

    def parse(value: object, path: str, problems: list[Problem]) -> tuple[str, ...]:
        if not isinstance(value, list):
            problems.append(Problem(path, value, "must be a list of strings"))
            return ()
        for index, item in enumerate(value):
            if not isinstance(item, str) or not pattern.fullmatch(item):
                problems.append(Problem(f"{path}[{index}]", item, allowed))
        return tuple(value)

    return parse


def outputs(value: object, path: str, problems: list[Problem]) -> tuple[Output, ...]:
    allowed = ", ".join(output.value for output in Output)
    if not isinstance(value, list) or not value:
        problems.append(Problem(path, value, f"a non-empty list of: {allowed}"))
        return ()
    found: list[Output] = []
    for index, item in enumerate(value):
        try:
            found.append(Output(item))
        except ValueError:
            problems.append(Problem(f"{path}[{index}]", item, f"one of {allowed}"))
    # The ISO and the disk carry the squashfs and PXE serves it, so asking for any means building one.
    if {Output.ISO, Output.DISK, Output.PXE} & set(found) and Output.SQUASHFS not in found:
        found.insert(0, Output.SQUASHFS)
    return tuple(dict.fromkeys(found))


user_name = text(USER_PATTERN, "a user name: lower-case letters, digits, '_' and '-', at most 32 characters")
mirror_url = text(re.compile(f"^$|{MIRROR_PATTERN.pattern}"), "an http://, https:// or file:// URL")


def agent_user(value: object, path: str, problems: list[Problem]) -> object:
    """A user name, but not one of the accounts the image has for people."""
    user_name(value, path, problems)
    if value in ("root", BREAK_GLASS_USER):
        problems.append(Problem(path, value, f"the agent user may not be root or {BREAK_GLASS_USER}"))
    return value


def public_keys(value: object, path: str, problems: list[Problem]) -> tuple[str, ...]:
    if not isinstance(value, list):
        problems.append(Problem(path, value, "must be a list of OpenSSH public key lines"))
        return ()
    good = []
    for index, line in enumerate(value):
        reason = check_public_key(line)
        if reason:
            problems.append(Problem(f"{path}[{index}]", line, reason))
        else:
            good.append(line.strip())
    return tuple(good)


def network_parser(parse: Callable[[object, str, ProblemSink], Any]) -> Parser:
    """One of appliance.network's parsers, reporting into this spec's problems."""

    def adapted(value: object, path: str, problems: list[Problem]) -> Any:
        return parse(value, path, lambda key, found, allowed: problems.append(Problem(key, found, allowed)))

    return adapted


def health_checks(value: object, path: str, problems: list[Problem]) -> tuple[str, ...]:
    """Commands a trial boot must pass: one line each, run with /bin/sh on the node."""
    if not isinstance(value, list) or len(value) > MAX_HEALTH_CHECKS:
        problems.append(Problem(path, value, f"a list of at most {MAX_HEALTH_CHECKS} commands"))
        return ()
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item.strip() or "\n" in item or len(item) > MAX_HEALTH_CHECK_LENGTH:
            problems.append(
                Problem(
                    f"{path}[{index}]", item, f"a command on one line, at most {MAX_HEALTH_CHECK_LENGTH} characters"
                )
            )
    return tuple(value)


# Every key of appliance.toml but [policy] (LIMITS in appliance/agent/policy.py), in the order
# they are read: problems are reported, and known keys listed, in this order.
SETTINGS = (
    Setting(
        "",
        "name",
        "appliance",
        text(
            NAME_PATTERN, "lower-case letters, digits and '-', starting with a letter or digit, at most 63 characters"
        ),
    ),
    Setting("", "release", DEFAULT_RELEASE, one_of(RELEASES)),
    Setting(
        "",
        "hostname",
        "appliance",
        text(
            HOSTNAME_PATTERN,
            "a host name label: lower-case letters, digits and '-', 1 to 63 characters, "
            "not starting or ending with '-'",
        ),
    ),
    Setting(
        "",
        "packages",
        (),
        text_list(PACKAGE_PATTERN, "a Debian package name (lower-case letters, digits, '+', '-', '.')"),
    ),
    Setting("", "outputs", (Output.SQUASHFS, Output.ISO, Output.DISK, Output.PXE), outputs),
    Setting(
        "",
        "size_budget_mb",
        200,
        whole_number(1, MAX_BUDGET_MB, f"a whole number of megabytes from 1 to {MAX_BUDGET_MB}"),
    ),
    Setting(
        "kernel",
        "cmdline",
        ("quiet",),
        text_list(
            CMDLINE_ARG_PATTERN,
            "one kernel argument without spaces or quotes (letters, digits and _ . , : / = + @ % -)",
        ),
        dest="kernel_cmdline",
    ),
    Setting("console", "serial", True, flag),
    Setting("console", "vga", True, flag),
    Setting("console", "serial_port", "ttyS0", text(re.compile(r"^ttyS[0-9]$"), "ttyS0 to ttyS9")),
    Setting("console", "baud", 115200, one_of((9600, 19200, 38400, 57600, 115200))),
    Setting("ssh", "user", "appliance", agent_user),
    Setting("ssh", "authorized_keys", (), public_keys),
    Setting("ssh", "break_glass_keys", (), public_keys),
    Setting("mirrors", "debian", "", mirror_url),
    Setting("mirrors", "security", "", mirror_url),
    Setting("storage", "claim_blank_disk", False, flag),
    Setting("network", "bridges", Network().bridges, network_parser(parse_bridges)),
    Setting("network", "bonds", (), network_parser(parse_bonds)),
    Setting("network", "management", Management(), network_parser(parse_management)),
    Setting("upgrade", "health_checks", (), health_checks),
    Setting(
        "upgrade",
        "health_timeout",
        180,
        whole_number(10, MAX_HEALTH_TIMEOUT, f"a whole number of seconds from 10 to {MAX_HEALTH_TIMEOUT}"),
    ),
)
# The tables below the top level, in the order they are read.
TABLES = ("kernel", "console", "ssh", "mirrors", "policy", "storage", "network", "upgrade")
_DEFAULTS: dict[str, Any] = {setting.path: setting.default for setting in SETTINGS}


@dataclass(frozen=True)
class Console:
    serial: bool = _DEFAULTS["console.serial"]
    vga: bool = _DEFAULTS["console.vga"]
    serial_port: str = _DEFAULTS["console.serial_port"]
    baud: int = _DEFAULTS["console.baud"]


@dataclass(frozen=True)
class Ssh:
    user: str = _DEFAULTS["ssh.user"]
    authorized_keys: tuple[str, ...] = _DEFAULTS["ssh.authorized_keys"]
    # Break-glass: keys for a real shell (user BREAK_GLASS_USER, with sudo). Off unless given.
    break_glass_keys: tuple[str, ...] = _DEFAULTS["ssh.break_glass_keys"]


@dataclass(frozen=True)
class Mirrors:
    """Debian mirrors for the build; empty means 'what the build host's apt uses'."""

    debian: str = _DEFAULTS["mirrors.debian"]
    security: str = _DEFAULTS["mirrors.security"]


@dataclass(frozen=True)
class Storage:
    """Where the node keeps its state when no disk carries the appliance's data partition."""

    # Off by default: claiming formats a disk, and a disk with no signature on
    # it may still hold data some other tool wrote there.
    claim_blank_disk: bool = _DEFAULTS["storage.claim_blank_disk"]


@dataclass(frozen=True)
class Upgrade:
    """What a trial boot of a new build must pass, and by when, before its slot becomes the default."""

    health_checks: tuple[str, ...] = _DEFAULTS["upgrade.health_checks"]
    health_timeout: int = _DEFAULTS["upgrade.health_timeout"]


@dataclass(frozen=True)
class Spec:
    name: str = _DEFAULTS["name"]
    release: str = _DEFAULTS["release"]
    hostname: str = _DEFAULTS["hostname"]
    packages: tuple[str, ...] = _DEFAULTS["packages"]
    kernel_cmdline: tuple[str, ...] = _DEFAULTS["kernel.cmdline"]
    outputs: tuple[Output, ...] = _DEFAULTS["outputs"]
    size_budget_mb: int = _DEFAULTS["size_budget_mb"]
    console: Console = field(default_factory=Console)
    ssh: Ssh = field(default_factory=Ssh)
    mirrors: Mirrors = field(default_factory=Mirrors)
    policy: Policy = field(default_factory=Policy)
    storage: Storage = field(default_factory=Storage)
    network: Network = field(default_factory=Network)
    upgrade: Upgrade = field(default_factory=Upgrade)

    def with_extra_keys(self, keys: tuple[str, ...]) -> Spec:
        """This spec with operator keys added on top of its own (duplicates dropped)."""
        merged = tuple(dict.fromkeys(self.ssh.authorized_keys + keys))
        return replace(self, ssh=replace(self.ssh, authorized_keys=merged))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["outputs"] = [output.value for output in self.outputs]
        return data

    def digest(self) -> str:
        """sha256 of the spec's canonical JSON: equal specs build equal images."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def default_spec_text() -> str:
    """The commented starter spec shipped with the package (`appliance init` writes it)."""
    return resources.files("appliance").joinpath("data/appliance.toml").read_text()


def load_spec(path: Path | None) -> Spec:
    """Read and validate a spec file; None means the default spec shipped with the package."""
    if path is None:
        return parse_spec(default_spec_text(), "default spec")
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(str(path), [Problem("(file)", str(path), f"cannot be read: {error.strerror}")]) from error
    return parse_spec(text, str(path))


def parse_spec(text: str, source: str) -> Spec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError(source, [Problem("(syntax)", "", f"not valid TOML: {error}")]) from error
    problems: list[Problem] = []
    spec = _read_spec(data, problems)
    if problems:
        raise SpecError(source, problems)
    return spec


def known_keys(table: str) -> tuple[str, ...]:
    """The keys a table may hold: its settings, and at the top level the tables themselves."""
    if table == "policy":
        return tuple(limit.key for limit in LIMITS)
    keys = tuple(setting.key for setting in SETTINGS if setting.table == table)
    return keys + TABLES if table == "" else keys


def _read_spec(data: dict[str, Any], problems: list[Problem]) -> Spec:
    # Table after table, so that problems come in the order the starter spec shows the keys.
    top = _read_table(data, "", problems)
    kernel = _read_subtable(data, "kernel", problems)
    console = Console(**_read_subtable(data, "console", problems))
    if not console.serial and not console.vga:
        problems.append(Problem("console", data["console"], "at least one of serial and vga must be true"))
    ssh = Ssh(**_read_subtable(data, "ssh", problems))
    mirrors = Mirrors(**_read_subtable(data, "mirrors", problems))
    policy_table = _subtable(data, "policy", problems)
    _refuse_unknown_keys(policy_table, "policy", problems)
    policy, refusals = read_policy(policy_table)
    problems.extend(Problem(f"policy.{refusal.key}", refusal.value, refusal.allowed) for refusal in refusals)
    storage = Storage(**_read_subtable(data, "storage", problems))
    network = Network(**_read_subtable(data, "network", problems))
    check_network(network, lambda key, value, allowed: problems.append(Problem(key, value, allowed)))
    upgrade = Upgrade(**_read_subtable(data, "upgrade", problems))
    return Spec(
        **top,
        **kernel,
        console=console,
        ssh=ssh,
        mirrors=mirrors,
        policy=policy,
        storage=storage,
        network=network,
        upgrade=upgrade,
    )


def _read_subtable(data: dict[str, Any], name: str, problems: list[Problem]) -> dict[str, Any]:
    return _read_table(_subtable(data, name, problems), name, problems)


def _subtable(data: dict[str, Any], name: str, problems: list[Problem]) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        problems.append(Problem(name, value, f"must be a table, e.g. [{name}]"))
        return {}
    return value


def _refuse_unknown_keys(values: dict[str, Any], table: str, problems: list[Problem]) -> None:
    known = known_keys(table)
    prefix = f"{table}." if table else ""
    for key, value in values.items():
        if key not in known:
            problems.append(Problem(f"{prefix}{key}", value, f"unknown key; known keys here: {', '.join(known)}"))


def _read_table(values: dict[str, Any], table: str, problems: list[Problem]) -> dict[str, Any]:
    """The settings of one table, by dataclass field; a key that is missing or has a problem keeps its default."""
    _refuse_unknown_keys(values, table, problems)
    read: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.table != table:
            continue
        value = setting.default
        if setting.key in values:
            found = len(problems)
            parsed = setting.parse(values[setting.key], setting.path, problems)
            value = parsed if len(problems) == found else setting.default
        read[setting.dest or setting.key] = value
    return read


def check_public_key(line: object) -> str:
    """Why `line` is not an OpenSSH public key line we accept, or '' if it is."""
    if not isinstance(line, str):
        return "must be a string holding one OpenSSH public key line"
    if "\n" in line.strip() or "\r" in line:
        return "must be a single line"
    fields = line.strip().split()
    if len(fields) < 2:
        return "must look like '<type> <base64> [comment]'"
    key_type, blob = fields[0], fields[1]
    if key_type not in SSH_KEY_TYPES:
        return f"key type must be one of {', '.join(SSH_KEY_TYPES)} (options before the key are not allowed)"
    try:
        decoded = base64.b64decode(blob, validate=True)
    except ValueError:
        return "the key data is not valid base64"
    # The blob starts with its own type name as an SSH string; a mismatch
    # means a truncated or pasted-wrong key.
    if len(decoded) < 4 or decoded[4 : 4 + int.from_bytes(decoded[:4], "big")] != key_type.encode():
        return "the key data does not match its type (truncated or mangled key?)"
    return ""
