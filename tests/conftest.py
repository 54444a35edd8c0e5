"""What every test may use: operator keys made by the real ssh-keygen.

The folders say what a test costs: unit/ runs in milliseconds to seconds with
no QEMU and no sshd; integration/ drives real processes on this host (the agent
over its pipes, QEMU under TCG, OpenSSH on loopback); system/ builds the
appliance and boots it (minutes; every test there is marked slow).
Shared helpers are in helpers/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.keys import make_key


@pytest.fixture
def public_key(tmp_path: Path) -> str:
    return (make_key(tmp_path).with_suffix(".pub")).read_text().strip()


@pytest.fixture(scope="session")
def operator_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reuse = os.environ.get("APPLIANCE_TEST_KEY")
    if reuse:
        return Path(reuse)
    return make_key(tmp_path_factory.mktemp("keys"))
