"""Many agent processes opening a node's state for the first time at once (a first boot: autostart, the
trial's health check and an operator's request), each a real process on a real SQLite file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OPEN_AND_LIST = """
import sys
from pathlib import Path
from appliance.agent.store import Store
store = Store(Path(sys.argv[1]))
print(len(store.guests()), len(store.images()))
"""


def test_sixteen_first_openers_at_once_all_get_the_store(tmp_path: Path) -> None:
    for round_ in range(3):
        state_dir = tmp_path / f"state-{round_}"
        command = [sys.executable, "-c", OPEN_AND_LIST, str(state_dir)]
        openers = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(16)
        ]
        results = [(opener.wait(timeout=120), *opener.communicate()) for opener in openers]
        assert all(code == 0 and out.strip() == "0 0" for code, out, _ in results), results
