"""The appliance.toml model: dataclasses, parsing and validation.

Parsing happens once, at the edge: `load_spec` turns a file into a frozen
`Spec` or raises `SpecError` listing every problem found, each naming the key,
the bad value and what is allowed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from appliance.agent.policy import LIMITS, Policy, read_policy
from appliance.errors import UsageError

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


@dataclass(frozen=True)
class Console:
    serial: bool = True
    vga: bool = True
    serial_port: str = "ttyS0"
    baud: int = 115200


@dataclass(frozen=True)
class Ssh:
    user: str = "appliance"
    authorized_keys: tuple[str, ...] = ()
    # Break-glass: keys for a real shell (user "breakglass", sudo). Off unless given.
    break_glass_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mirrors:
    """Debian mirrors for the build; empty means 'what the build host's apt uses'."""

    debian: str = ""
    security: str = ""


@dataclass(frozen=True)
class Storage:
    """Where the node keeps its state when no disk carries the appliance's data partition."""

    # Off by default: claiming formats a disk, and a disk with no signature on
    # it may still hold data some other tool wrote there.
    claim_blank_disk: bool = False


@dataclass(frozen=True)
class Spec:
    name: str = "appliance"
    release: str = DEFAULT_RELEASE
    hostname: str = "appliance"
    packages: tuple[str, ...] = ()
    kernel_cmdline: tuple[str, ...] = ("quiet",)
    outputs: tuple[Output, ...] = (Output.SQUASHFS, Output.ISO, Output.DISK, Output.PXE)
    size_budget_mb: int = 200
    console: Console = field(default_factory=Console)
    ssh: Ssh = field(default_factory=Ssh)
    mirrors: Mirrors = field(default_factory=Mirrors)
    policy: Policy = field(default_factory=Policy)
    storage: Storage = field(default_factory=Storage)

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
    reader = _Reader()
    spec = reader.spec(data)
    if reader.problems:
        raise SpecError(source, reader.problems)
    return spec


class _Reader:
    """Reads a parsed TOML table into a Spec, collecting problems as it goes."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def problem(self, key: str, value: object, allowed: str) -> None:
        self.problems.append(Problem(key, value, allowed))

    def unknown_keys(self, table: dict[str, Any], prefix: str, known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                self.problem(f"{prefix}{key}", table[key], f"unknown key; known keys here: {', '.join(known)}")

    def table(self, data: dict[str, Any], key: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.problem(key, value, "must be a table, e.g. [" + key + "]")
            return {}
        return value

    def string(
        self, data: dict[str, Any], key: str, default: str, pattern: re.Pattern[str], allowed: str, path: str
    ) -> str:
        value = data.get(key, default)
        if not isinstance(value, str) or not pattern.match(value):
            self.problem(path, value, allowed)
            return default
        return value

    def boolean(self, data: dict[str, Any], key: str, default: bool, path: str) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            self.problem(path, value, "must be true or false")
            return default
        return value

    def string_list(
        self,
        data: dict[str, Any],
        key: str,
        pattern: re.Pattern[str],
        allowed: str,
        path: str,
        default: tuple[str, ...] = (),
    ) -> tuple[str, ...]:
        value = data.get(key, list(default))
        if not isinstance(value, list):
            self.problem(path, value, "must be a list of strings")
            return ()
        good = []
        for index, item in enumerate(value):
            if isinstance(item, str) and pattern.match(item):
                good.append(item)
            else:
                self.problem(f"{path}[{index}]", item, allowed)
        return tuple(good)

    def spec(self, data: dict[str, Any]) -> Spec:
        defaults = Spec()
        self.unknown_keys(
            data,
            "",
            (
                "name",
                "release",
                "hostname",
                "packages",
                "outputs",
                "size_budget_mb",
                "kernel",
                "console",
                "ssh",
                "mirrors",
                "policy",
                "storage",
            ),
        )
        name = self.string(
            data,
            "name",
            defaults.name,
            NAME_PATTERN,
            "lower-case letters, digits and '-', starting with a letter or digit, at most 63 characters",
            "name",
        )
        release = data.get("release", defaults.release)
        if release not in RELEASES:
            self.problem("release", release, f"one of {', '.join(RELEASES)}")
            release = defaults.release
        hostname = self.string(
            data,
            "hostname",
            defaults.hostname,
            HOSTNAME_PATTERN,
            "a host name label: lower-case letters, digits and '-', 1 to 63 characters, "
            "not starting or ending with '-'",
            "hostname",
        )
        packages = self.string_list(
            data,
            "packages",
            PACKAGE_PATTERN,
            "a Debian package name (lower-case letters, digits, '+', '-', '.')",
            "packages",
        )
        outputs = self.outputs(data)
        budget = data.get("size_budget_mb", defaults.size_budget_mb)
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= MAX_BUDGET_MB:
            self.problem("size_budget_mb", budget, f"a whole number of megabytes from 1 to {MAX_BUDGET_MB}")
            budget = defaults.size_budget_mb
        kernel = self.table(data, "kernel")
        self.unknown_keys(kernel, "kernel.", ("cmdline",))
        cmdline = self.string_list(
            kernel,
            "cmdline",
            CMDLINE_ARG_PATTERN,
            "one kernel argument without spaces or quotes (letters, digits and _ . , : / = + @ % -)",
            "kernel.cmdline",
            defaults.kernel_cmdline,
        )
        return Spec(
            name=name,
            release=release,
            hostname=hostname,
            packages=packages,
            kernel_cmdline=cmdline,
            outputs=outputs,
            size_budget_mb=budget,
            console=self.console(self.table(data, "console")),
            ssh=self.ssh(self.table(data, "ssh")),
            mirrors=self.mirrors(self.table(data, "mirrors")),
            policy=self.policy(self.table(data, "policy")),
            storage=self.storage(self.table(data, "storage")),
        )

    def outputs(self, data: dict[str, Any]) -> tuple[Output, ...]:
        value = data.get("outputs", [output.value for output in Spec().outputs])
        allowed = ", ".join(output.value for output in Output)
        if not isinstance(value, list) or not value:
            self.problem("outputs", value, f"a non-empty list of: {allowed}")
            return Spec().outputs
        found: list[Output] = []
        for index, item in enumerate(value):
            try:
                found.append(Output(item))
            except ValueError:
                self.problem(f"outputs[{index}]", item, f"one of {allowed}")
        # The ISO and the disk carry the squashfs and PXE serves it, so asking for any means building one.
        if {Output.ISO, Output.DISK, Output.PXE} & set(found) and Output.SQUASHFS not in found:
            found.insert(0, Output.SQUASHFS)
        return tuple(dict.fromkeys(found))

    def console(self, table: dict[str, Any]) -> Console:
        defaults = Console()
        self.unknown_keys(table, "console.", ("serial", "vga", "serial_port", "baud"))
        serial = self.boolean(table, "serial", defaults.serial, "console.serial")
        vga = self.boolean(table, "vga", defaults.vga, "console.vga")
        port = self.string(
            table,
            "serial_port",
            defaults.serial_port,
            re.compile(r"^ttyS[0-9]$"),
            "ttyS0 to ttyS9",
            "console.serial_port",
        )
        baud = table.get("baud", defaults.baud)
        if baud not in (9600, 19200, 38400, 57600, 115200):
            self.problem("console.baud", baud, "one of 9600, 19200, 38400, 57600, 115200")
            baud = defaults.baud
        if not serial and not vga:
            self.problem("console", table, "at least one of serial and vga must be true")
        return Console(serial=serial, vga=vga, serial_port=port, baud=baud)

    def ssh(self, table: dict[str, Any]) -> Ssh:
        defaults = Ssh()
        self.unknown_keys(table, "ssh.", ("user", "authorized_keys", "break_glass_keys"))
        user = self.string(
            table,
            "user",
            defaults.user,
            USER_PATTERN,
            "a user name: lower-case letters, digits, '_' and '-', at most 32 characters",
            "ssh.user",
        )
        if user in ("root", BREAK_GLASS_USER):
            self.problem("ssh.user", user, f"the agent user may not be root or {BREAK_GLASS_USER}")
        return Ssh(
            user=user,
            authorized_keys=self.public_keys(table, "authorized_keys"),
            break_glass_keys=self.public_keys(table, "break_glass_keys"),
        )

    def public_keys(self, table: dict[str, Any], key: str) -> tuple[str, ...]:
        keys = table.get(key, [])
        if not isinstance(keys, list):
            self.problem(f"ssh.{key}", keys, "must be a list of OpenSSH public key lines")
            return ()
        good = []
        for index, line in enumerate(keys):
            reason = check_public_key(line)
            if reason:
                self.problem(f"ssh.{key}[{index}]", line, reason)
            else:
                good.append(line.strip())
        return tuple(good)

    def mirrors(self, table: dict[str, Any]) -> Mirrors:
        self.unknown_keys(table, "mirrors.", ("debian", "security"))
        allowed = "an http://, https:// or file:// URL"
        return Mirrors(
            debian=self.string(
                table, "debian", "", re.compile(f"^$|{MIRROR_PATTERN.pattern}"), allowed, "mirrors.debian"
            ),
            security=self.string(
                table, "security", "", re.compile(f"^$|{MIRROR_PATTERN.pattern}"), allowed, "mirrors.security"
            ),
        )

    def storage(self, table: dict[str, Any]) -> Storage:
        self.unknown_keys(table, "storage.", ("claim_blank_disk",))
        return Storage(
            claim_blank_disk=self.boolean(
                table, "claim_blank_disk", Storage().claim_blank_disk, "storage.claim_blank_disk"
            )
        )

    def policy(self, table: dict[str, Any]) -> Policy:
        # Declared in the agent's policy module: the agent reads its agent.toml by the same rules.
        self.unknown_keys(table, "policy.", tuple(limit.key for limit in LIMITS))
        policy, refusals = read_policy(table)
        for refusal in refusals:
            self.problem(f"policy.{refusal.key}", refusal.value, refusal.allowed)
        return policy


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
