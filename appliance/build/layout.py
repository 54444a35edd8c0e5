"""Where the repository keeps the parts the builder reads: elements/ and templates/."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent
REPOSITORY = PACKAGE.parent
ELEMENTS_DIR = REPOSITORY / "elements"
TEMPLATES_DIR = REPOSITORY / "templates"
AGENT_DIR = PACKAGE / "agent"
