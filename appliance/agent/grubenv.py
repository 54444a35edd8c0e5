"""GRUB's environment block (grub/grubenv on the ESP): read, and rewritten in place.

The block is 1024 bytes: `# GRUB Environment Block\\n`, `name=value` lines,
then `#` to the end. GRUB's load_env reads it and save_env rewrites it in
place; the node does the same here (appliance.agent.fat finds its sectors),
never through grub-editenv, which the node does not carry. The variables are
kept within the first 512-byte sector, so every update is one sector written
whole: a power cut leaves the old block or the new one.
"""

from __future__ import annotations

import re
from pathlib import Path

from appliance.agent.fat import Fat32

BLOCK_SIZE = 1024
SIGNATURE = b"# GRUB Environment Block\n"
# What a sector written at once can hold: updates never tear across two.
WRITE_LIMIT = 512
ENV_FILE = "grub/grubenv"
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
VALUE = re.compile(r"^[A-Za-z0-9_.:/=+@%,-]*$")


class GrubEnvError(Exception):
    """The block is not a GRUB environment block, or the variables cannot be written into it."""


def parse(block: bytes) -> dict[str, str]:
    if not block.startswith(SIGNATURE):
        raise GrubEnvError("not a GRUB environment block (no signature)")
    variables: dict[str, str] = {}
    for line in block[len(SIGNATURE) :].decode("utf-8", errors="replace").split("\n"):
        if not line or line.startswith("#"):
            continue
        name, equals, value = line.partition("=")
        if equals:
            variables[name] = value
    return variables


def render(variables: dict[str, str]) -> bytes:
    """The 1024-byte block for these variables; refused if they would not fit one sector."""
    body = b"".join(f"{name}={value}\n".encode() for name, value in variables.items())
    for name, value in variables.items():
        if not NAME.fullmatch(name) or not VALUE.fullmatch(value):
            raise GrubEnvError(f"{name}={value!r} is not a variable GRUB reads back as written")
    text = SIGNATURE + body
    if len(text) > WRITE_LIMIT:
        raise GrubEnvError(f"the variables take {len(text)} bytes; at most {WRITE_LIMIT} fit one sector")
    return text.ljust(BLOCK_SIZE, b"#")


class GrubEnv:
    """grub/grubenv in the ESP's FAT32 file system at `offset` bytes into `path`."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.fat = Fat32(path, offset)

    def read(self) -> dict[str, str]:
        return parse(self.fat.read_file(ENV_FILE))

    def update(self, **changes: str) -> dict[str, str]:
        """Set variables (others are kept) and write the block back in place; returns the new set."""
        variables = {**self.read(), **changes}
        self.fat.overwrite(ENV_FILE, render(variables))
        return variables
