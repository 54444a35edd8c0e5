"""The agent's state: SQLite (WAL, full sync) under the state directory.

Every change is one transaction, so a failed or interrupted change leaves no
row behind. Several agent processes (one per SSH connection) share the file.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.agent.errors import guest_exists, guest_not_found, image_exists, image_not_found
from appliance.agent.locks import held
from appliance.agent.model import GuestSpec, guest_spec_from_json

SCHEMA = """
CREATE TABLE IF NOT EXISTS guests (
    name TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    name TEXT PRIMARY KEY,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created REAL NOT NULL
);
"""
# Columns added since the first schema, each with a default for the rows already there. An image's
# kind (media.py) is "" in rows older than the column: detected from the file on first use.
ADDED_COLUMNS = (("images", "kind", "TEXT NOT NULL DEFAULT ''"),)
BUSY_TIMEOUT_SECONDS = 30


class Store:
    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "agent.db"
        # One opener at a time: turning a new database to WAL needs it alone, and SQLite answers
        # "database is locked" at once, without waiting, to the others (at a first boot, autostart,
        # the boot's health check and an operator's first request all open it together).
        with held(state_dir / "agent.db.open-lock", BUSY_TIMEOUT_SECONDS):
            self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            self._add_columns()

    def _add_columns(self) -> None:
        """Bring an older database up to the schema; in one transaction, so two agents opening it at once
        add each column once."""
        with self.transaction() as db:
            for table, column, declaration in ADDED_COLUMNS:
                present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: writers queue up instead of failing half way."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def add_guest(self, spec: GuestSpec) -> None:
        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO guests (name, definition, created) VALUES (?, ?, ?)",
                    (spec.name, json.dumps(spec.to_json()), time.time()),
                )
        except sqlite3.IntegrityError as error:
            raise guest_exists(spec.name) from error

    def replace_guest(self, spec: GuestSpec) -> None:
        with self.transaction() as db:
            if (
                db.execute(
                    "UPDATE guests SET definition = ? WHERE name = ?", (json.dumps(spec.to_json()), spec.name)
                ).rowcount
                == 0
            ):
                raise guest_not_found(spec.name)

    def guest(self, name: str) -> GuestSpec:
        row = self.db.execute("SELECT definition FROM guests WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise guest_not_found(name)
        return guest_spec_from_json(json.loads(row[0]))

    def guests(self) -> list[GuestSpec]:
        rows = self.db.execute("SELECT definition FROM guests ORDER BY name").fetchall()
        return [guest_spec_from_json(json.loads(row[0])) for row in rows]

    def remove_guest(self, name: str, missing_ok: bool = False) -> None:
        with self.transaction() as db:
            if db.execute("DELETE FROM guests WHERE name = ?", (name,)).rowcount == 0 and not missing_ok:
                raise guest_not_found(name)

    def has_guest(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM guests WHERE name = ?", (name,)).fetchone() is not None

    def add_image(self, name: str, size_bytes: int, sha256: str, kind: str = "") -> None:
        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO images (name, size_bytes, sha256, created, kind) VALUES (?, ?, ?, ?, ?)",
                    (name, size_bytes, sha256, time.time(), kind),
                )
        except sqlite3.IntegrityError as error:
            raise image_exists(name) from error

    def images(self) -> list[dict[str, object]]:
        rows = self.db.execute("SELECT name, size_bytes, sha256, created, kind FROM images ORDER BY name").fetchall()
        return [
            {"name": row[0], "size_bytes": row[1], "sha256": row[2], "created": row[3], "kind": row[4]} for row in rows
        ]

    def set_image_kind(self, name: str, kind: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE images SET kind = ? WHERE name = ?", (kind, name))

    def remove_image(self, name: str, missing_ok: bool = False) -> None:
        with self.transaction() as db:
            if db.execute("DELETE FROM images WHERE name = ?", (name,)).rowcount == 0 and not missing_ok:
                raise image_not_found(name)
