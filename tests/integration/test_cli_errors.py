"""No error path of the node-facing CLI prints a traceback.

Every node, guest, image and fleet verb, as the parser defines it (verbs added
later are covered too), is run against a dead port, a silent listener, an sshd
that refuses the key, a public key given as --key, and (fleet) a malformed
inventory. Each must fail with exit 1 or 2 and an `appliance: ...` message,
and with --json print JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers.cli import run_cli
from helpers.keys import make_key
from helpers.listeners import Listener
from helpers.sshd import Sshd, free_port

from appliance.cli import build_parser

NOUNS = ("node", "guest", "image", "kept", "fleet")
# --json is run where the network fails; the key and agent failures' JSON is checked in test_client.py.
JSON_PLACES = ("dead port", "silent listener")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def verbs() -> list[tuple[str, str, argparse.ArgumentParser]]:
    """Every verb of every noun; a verb with verbs of its own (guest disk) as each of them ("disk add")."""
    nouns = subcommands(build_parser())
    found = []
    for noun in NOUNS:
        for verb, parser in subcommands(nouns[noun]).items():
            inner = subcommands(parser)
            found += [(noun, f"{verb} {name}", sub) for name, sub in inner.items()] or [(noun, verb, parser)]
    return found


def arguments(parser: argparse.ArgumentParser, host: str, inventory: Path, image: Path) -> list[str]:
    """What the verb needs and nothing more: its positionals and required options, filled in."""
    given: list[str] = []
    for action in parser._actions:
        if action.dest in ("help", "key", "known_hosts", "timeout", "json"):
            continue
        if action.dest == "host":
            value = host
        elif action.dest == "inventory":
            value = str(inventory)
        elif action.type is Path:
            value = str(image)
        elif action.type is not None:  # int, float, and the CLI's own (a disk size, a port): 1 is each
            value = "1"
        elif action.choices:
            value = str(next(iter(action.choices)))
        else:
            value = "web"
        if not action.option_strings:
            given.append(value)
        elif action.required:
            given += [action.option_strings[-1], value]
    return given


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_key(tmp_path_factory.mktemp("error-keys"))


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    directory = tmp_path_factory.mktemp("refusing-sshd")
    # It knows another operator's key only: ours is refused.
    other = make_key(directory, "other")
    server = Sshd(directory, other.with_suffix(".pub").read_text().strip(), directory / "state")
    server.start()
    yield server
    server.stop()


def test_no_node_facing_verb_prints_a_traceback(sshd: Sshd, key: Path, tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(b"\0" * 4096)
    good_inventory, bad_inventory = tmp_path / "hosts.ini", tmp_path / "bad.yml"
    bad_inventory.write_text("all:\n  hosts: 5\n")
    with Listener("silent") as silent:
        places = {
            "dead port": (f"127.0.0.1:{free_port()}", str(key)),
            "silent listener": (f"127.0.0.1:{silent.port}", str(key)),
            "wrong key": (f"root@127.0.0.1:{sshd.port}", str(key)),
            "public key": (f"root@127.0.0.1:{sshd.port}", str(key) + ".pub"),
        }
        runs: list[tuple[str, list[str]]] = []
        for noun, verb, parser in verbs():
            for place, (host, given_key) in places.items():
                good_inventory.write_text(f"{host}\n")
                argv = [noun, *verb.split(), *arguments(parser, host, good_inventory, image), "--key", given_key,
                        "--known-hosts", str(tmp_path / "known_hosts"), "--timeout", "2"]  # fmt: skip
                runs.append((place, argv))
                if place in JSON_PLACES:
                    runs.append((place, [*argv, "--json"]))
            if noun == "fleet":
                argv = [noun, verb, *arguments(parser, "", bad_inventory, image), "--key", str(key)]
                runs += [("malformed inventory", argv), ("malformed inventory", [*argv, "--json"])]
        assert {argv[1] for _, argv in runs} >= {"report", "list", "info", "console", "create", "push", "guests"}

        def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
            return run_cli(*argv, home=tmp_path)

        # Eight at a time: each mostly waits on the network (timeouts, retries), not on the CPU.
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(run, [argv for _, argv in runs]))
    for (place, argv), result in zip(runs, results, strict=True):
        said = f"{place}: appliance {' '.join(argv)}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        assert result.returncode in (1, 2), said
        assert "Traceback" not in result.stderr + result.stdout, said
        assert result.stderr.strip().splitlines()[-1].startswith("appliance: "), said
        if "--json" in argv:
            answer = json.loads(result.stdout)
            if isinstance(answer, list):  # a fleet's answer: every node's outcome, each failure with its code
                assert answer and all(not outcome["ok"] and outcome["code"] for outcome in answer), said
            else:
                assert answer["error"]["code"] and answer["error"]["message"], said
