"""SSH keys made by the real ssh-keygen."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_key(directory: Path, name: str = "operator", passphrase: str = "") -> Path:
    """A fresh ed25519 key pair; returns the private key path (the public one is beside it, .pub)."""
    key = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", name, "-f", str(key)], check=True)
    return key
