"""The one root of every error the `appliance` command reports to a user.

The CLI catches `ApplianceError` alone and prints its message; `exit_code`
says what the user gets (1: the work failed, 2: the input was wrong) and
`code` a stable name for scripts (`--json` prints it). Any other exception
reaching the CLI is a bug and keeps its traceback.
The node agent has its own codes (appliance.agent.errors): it runs on the
node without this package.
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2


class ApplianceError(Exception):
    """A failure to report in one line; the work did not happen (or not all of it)."""

    exit_code = EXIT_FAILED
    code = "failed"


class UsageError(ApplianceError):
    """What the user gave (a spec, an inventory, a file, an address) cannot be used as it is."""

    exit_code = EXIT_USAGE
    code = "usage"
