"""Our DIB elements: what the builder passes in is defaulted and documented by the element that reads it."""

from __future__ import annotations

import re
from pathlib import Path

from appliance.build.dib import build_invocation
from appliance.build.layout import ELEMENTS_DIR, TEMPLATES_DIR
from appliance.build.mirrors import HostMirrors
from appliance.spec import BREAK_GLASS_USER, Spec


def builder_variables(tmp_path: Path) -> dict[str, str]:
    """The DIB_APPLIANCE_* variables `appliance build` sets for a build of the default spec."""
    invocation = build_invocation(
        Spec(),
        elements_dir=tmp_path / "elements",
        agent_dir=tmp_path / "agent",
        output_prefix=tmp_path / "dib" / "demo",
        mirrors=HostMirrors(debian="http://d.example/debian", security="http://d.example/security"),
        base_env={},
    )
    return {name: value for name, value in invocation.env.items() if name.startswith("DIB_APPLIANCE_")}


def test_each_variable_the_builder_sets_is_defaulted_and_documented_by_an_element(tmp_path: Path) -> None:
    variables = builder_variables(tmp_path)
    assert "DIB_APPLIANCE_BREAK_GLASS_USER" in variables
    for name in variables:
        default = re.compile(rf"^export {name}=\$\{{{name}:-", re.MULTILINE)
        readers = [
            element
            for element in sorted(ELEMENTS_DIR.iterdir())
            if any(default.search(path.read_text()) for path in element.glob("environment.d/*"))
        ]
        assert len(readers) == 1, f"{name} is defaulted in {readers}, not in one element's environment.d"
        assert f"``{name}``" in (readers[0] / "README.rst").read_text(), f"{readers[0].name}'s README lacks {name}"


def test_the_break_glass_name_is_not_written_into_scripts_or_templates(tmp_path: Path) -> None:
    # spec.py holds the name and the builder passes it in; only the element's default repeats it.
    assert builder_variables(tmp_path)["DIB_APPLIANCE_BREAK_GLASS_USER"] == BREAK_GLASS_USER
    written = [
        path.relative_to(ELEMENTS_DIR.parent).as_posix()
        for path in sorted([*ELEMENTS_DIR.rglob("*"), *TEMPLATES_DIR.rglob("*")])
        if path.is_file() and "environment.d" not in path.parts and path.name != "README.rst"
        if BREAK_GLASS_USER in path.read_text(errors="replace")
    ]
    assert written == []
