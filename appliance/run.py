"""The one helper for subprocesses: logs the command, raises one typed error."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from appliance.errors import ApplianceError

log = logging.getLogger(__name__)
TAIL_LINES = 25


def find_tool(name: str) -> str | None:
    """NAME's path, looking in the sbin directories too: Debian keeps mkfs and sfdisk there,
    outside an ordinary user's PATH (a build by a user with sudo rights uses them on files)."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def tool(name: str) -> str:
    """NAME's path for an argv, or NAME itself to let the run fail naming it."""
    return find_tool(name) or name


class CommandError(ApplianceError):
    """A command exited non-zero or could not be started."""

    def __init__(self, argv: Sequence[str], returncode: int, output_tail: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.output_tail = output_tail
        message = f"{shlex.join(self.argv)} failed with exit code {returncode}"
        if output_tail:
            message += ":\n" + output_tail
        super().__init__(message)


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    input_bytes: bytes | None = None,
) -> str:
    """Run a command to completion and return its stdout; stderr goes into the error on failure."""
    log.debug("run: %s", shlex.join(argv))
    try:
        result = subprocess.run(list(argv), env=env, cwd=cwd, input=input_bytes, capture_output=True, check=False)
    except OSError as error:
        raise CommandError(argv, 127, f"cannot start {argv[0]}: {error.strerror}") from error
    if result.returncode != 0:
        tail = "\n".join(result.stderr.decode(errors="replace").splitlines()[-TAIL_LINES:])
        raise CommandError(argv, result.returncode, tail)
    return result.stdout.decode(errors="replace")


def run_streaming(
    argv: Sequence[str],
    *,
    on_line: Callable[[str], None],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> None:
    """Run a long command, handing each line of its combined output to `on_line`."""
    log.debug("run: %s", shlex.join(argv))
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    try:
        process = subprocess.Popen(
            list(argv), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    except OSError as error:
        raise CommandError(argv, 127, f"cannot start {argv[0]}: {error.strerror}") from error
    assert process.stdout is not None
    try:
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            tail.append(line)
            on_line(line)
    finally:
        # On Ctrl-C the child gets the signal too; wait so nothing is left behind.
        returncode = process.wait()
    if returncode != 0:
        raise CommandError(argv, returncode, "\n".join(tail))
