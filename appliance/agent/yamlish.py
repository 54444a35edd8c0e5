"""The part of YAML that provisioners write into NoCloud seeds, read with the standard library.

cloud-init's meta-data, user-data (#cloud-config) and network-config as
Ironic, MAAS and Tinkerbell write them use block mappings and sequences,
plain, quoted and block (| >) scalars, flow lists and maps, comments. That is
what this reads; anchors, tags, multi-document streams and complex keys are
refused with the line they are on, never guessed at. JSON (which is YAML) is
read by the json module.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

INT = re.compile(r"^[-+]?(0|[1-9][0-9]*)$")
FLOAT = re.compile(r"^[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$")
KEY = re.compile(r"^(\"(?:[^\"\\]|\\.)*\"|'(?:[^']|'')*'|[^\s#'\"\[\]{},&*!|>%@`][^#]*?)\s*:(\s|$)")
TRUE = {"true", "True", "TRUE", "yes", "Yes", "on", "On"}
FALSE = {"false", "False", "FALSE", "no", "No", "off", "Off"}
NULL = {"", "~", "null", "Null", "NULL"}


class YamlError(ValueError):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


@dataclass
class Line:
    number: int
    indent: int
    text: str  # without indentation and trailing comment


def strip_comment(text: str) -> str:
    """TEXT up to a ` #` comment that is outside quotes."""
    quote = ""
    for index, char in enumerate(text):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or text[index - 1] in " \t"):
            return text[:index].rstrip()
    return text.rstrip()


def loads(text: str) -> Any:
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        try:
            return json.loads(stripped)
        except ValueError:
            pass
    raw = text.replace("\r\n", "\n").split("\n")
    if raw and raw[-1] == "":
        raw.pop()  # the final newline ends the last line; it starts no other
    parser = Parser(raw)
    return parser.document()


class Parser:
    def __init__(self, raw: list[str]) -> None:
        self.raw = raw
        self.position = 0

    def document(self) -> Any:
        self.skip_blank()
        if self.position < len(self.raw) and self.raw[self.position].rstrip() == "---":
            self.position += 1
        line = self.peek()
        if line is None:
            return None
        value = self.block(line.indent)
        rest = self.peek()
        if rest is not None:
            if rest.text.startswith("---") or rest.text.startswith("..."):
                raise YamlError(rest.number, "only one document is read")
            raise YamlError(rest.number, "indentation does not match anything above it")
        return value

    def skip_blank(self) -> None:
        while self.position < len(self.raw):
            content = self.raw[self.position]
            if content.strip() and not content.lstrip().startswith("#"):
                return
            self.position += 1

    def peek(self) -> Line | None:
        self.skip_blank()
        if self.position >= len(self.raw):
            return None
        content = self.raw[self.position]
        body = content.lstrip(" ")
        if body.startswith("\t"):
            raise YamlError(self.position + 1, "tabs are not allowed in indentation")
        return Line(self.position + 1, len(content) - len(body), strip_comment(body))

    def block(self, indent: int) -> Any:
        line = self.peek()
        assert line is not None
        if line.text == "-" or line.text.startswith("- "):
            return self.sequence(indent)
        if KEY.match(line.text):
            return self.mapping(indent)
        self.position += 1
        return self.scalar(line.text, line, indent)

    def sequence(self, indent: int) -> list[Any]:
        items: list[Any] = []
        while True:
            line = self.peek()
            if line is None or line.indent < indent:
                return items
            if line.indent > indent:
                raise YamlError(line.number, "indentation does not match the list above it")
            if not (line.text == "-" or line.text.startswith("- ")):
                return items
            rest = line.text[1:].lstrip(" ")
            if not rest:
                self.position += 1
                following = self.peek()
                items.append(None if following is None or following.indent <= indent else self.block(following.indent))
                continue
            # The item's content starts after the dash: rewrite the line as if it began there.
            column = line.indent + (len(line.text) - len(rest))
            self.raw[self.position] = " " * column + self.raw[self.position].lstrip(" ")[len(line.text) - len(rest) :]
            items.append(self.block(column))

    def mapping(self, indent: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while True:
            line = self.peek()
            if line is None or line.indent < indent:
                return result
            if line.indent > indent:
                raise YamlError(line.number, "indentation does not match the mapping above it")
            match = KEY.match(line.text)
            if not match:
                return result
            key = self.key(match.group(1), line)
            if key in result:
                raise YamlError(line.number, f"key {key!r} appears twice")
            rest = line.text[match.end() :].strip()
            self.position += 1
            if rest:
                result[key] = self.scalar(rest, line, indent)
                continue
            following = self.peek()
            if following is not None and following.indent > indent:
                result[key] = self.block(following.indent)
            elif (
                following is not None
                and following.indent == indent
                and (following.text == "-" or following.text.startswith("- "))
            ):
                result[key] = self.sequence(indent)
            else:
                result[key] = None

    def key(self, text: str, line: Line) -> str:
        value = self.flow_scalar(text, line)
        if not isinstance(value, str | int | bool) or value is None:
            raise YamlError(line.number, f"unsupported key {text!r}")
        return str(value)

    def scalar(self, text: str, line: Line, indent: int) -> Any:
        if text[0] in "&*!":
            raise YamlError(line.number, "anchors, aliases and tags are not read")
        if text[0] in "|>":
            return self.block_scalar(text, line, indent)
        if text[0] in "[{":
            return self.flow(text, line)
        if text[0] in "'\"":
            return self.flow_scalar(text, line)
        # A plain scalar may go on over more-indented lines, folded with spaces.
        parts = [text]
        while True:
            following = self.peek()
            if following is None or following.indent <= indent or KEY.match(following.text):
                break
            parts.append(following.text)
            self.position += 1
        return plain(" ".join(parts))

    def block_scalar(self, header: str, line: Line, indent: int) -> str:
        style, chomp = header[0], header[1:].strip()
        if chomp not in ("", "-", "+"):
            raise YamlError(line.number, f"block scalar header {header!r} is not read")
        lines: list[str] = []
        block_indent = -1
        while self.position < len(self.raw):
            content = self.raw[self.position]
            if not content.strip():
                lines.append("")
                self.position += 1
                continue
            current = len(content) - len(content.lstrip(" "))
            if current <= indent:
                break
            if block_indent < 0:
                block_indent = current
            if current < block_indent:
                break
            lines.append(content[block_indent:])
            self.position += 1
        while lines and not lines[-1] and chomp != "+":
            lines.pop()
            # Blank lines at the end belong to what follows unless kept with "+".
        text = "\n".join(lines) if style == "|" else fold(lines)
        if chomp == "-":
            return text
        return text + "\n" if text else ""

    def flow(self, text: str, line: Line) -> Any:
        value, rest = FlowReader(text, line.number).value(0)
        if text[rest:].strip():
            raise YamlError(line.number, f"unexpected {text[rest:].strip()!r} after a flow collection")
        return value

    def flow_scalar(self, text: str, line: Line) -> Any:
        text = text.strip()
        if text.startswith('"'):
            if not text.endswith('"') or len(text) < 2:
                raise YamlError(line.number, "an unterminated double-quoted string")
            try:
                return json.loads(text)
            except ValueError as error:
                raise YamlError(line.number, f"a double-quoted string YAML escapes JSON does not: {text}") from error
        if text.startswith("'"):
            if not text.endswith("'") or len(text) < 2:
                raise YamlError(line.number, "an unterminated single-quoted string")
            return text[1:-1].replace("''", "'")
        return plain(text)


def fold(lines: list[str]) -> str:
    """Folded (>) lines: a break between two lines of text is a space, each empty line a newline."""
    out = ""
    for index, text in enumerate(lines):
        if index and text and lines[index - 1]:
            out += " "
        elif index and not text:
            out += "\n"
        out += text
    return out


def plain(text: str) -> Any:
    if text in NULL:
        return None
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    if INT.match(text):
        return int(text)
    if FLOAT.match(text):
        return float(text)
    return text


class FlowReader:
    """[a, "b", {c: d}] and {a: 1, b: [2]} on one line."""

    def __init__(self, text: str, number: int) -> None:
        self.text = text
        self.number = number

    def fail(self, message: str) -> YamlError:
        return YamlError(self.number, message)

    def space(self, at: int) -> int:
        while at < len(self.text) and self.text[at] == " ":
            at += 1
        return at

    def value(self, at: int) -> tuple[Any, int]:
        at = self.space(at)
        if at >= len(self.text):
            raise self.fail("a flow collection ends too early")
        char = self.text[at]
        if char == "[":
            return self.items(at + 1, "]")
        if char == "{":
            return self.items(at + 1, "}")
        if char in "'\"":
            end = at + 1
            while end < len(self.text):
                if self.text[end] == "\\" and char == '"':
                    end += 2
                    continue
                if self.text[end] == char:
                    if char == "'" and self.text[end + 1 : end + 2] == "'":
                        end += 2
                        continue
                    break
                end += 1
            token = self.text[at : end + 1]
            return Parser([]).flow_scalar(token, Line(self.number, 0, token)), end + 1
        end = at
        while (end < len(self.text) and self.text[end] not in ",]}:") or (
            self.text[end] == ":" and end + 1 < len(self.text) and self.text[end + 1] not in " ,]}"
        ):
            end += 1
        return plain(self.text[at:end].strip()), end

    def items(self, at: int, closing: str) -> tuple[Any, int]:
        collected: list[Any] = []
        mapped: dict[str, Any] = {}
        at = self.space(at)
        if self.text[at : at + 1] == closing:
            return (mapped if closing == "}" else collected), at + 1
        while True:
            item, at = self.value(at)
            at = self.space(at)
            if closing == "}":
                if self.text[at : at + 1] != ":":
                    raise self.fail("a flow mapping's key has no ':'")
                item_value, at = self.value(at + 1)
                mapped[str(item)] = item_value
                at = self.space(at)
            else:
                collected.append(item)
            if self.text[at : at + 1] == ",":
                at = self.space(at + 1)
                if self.text[at : at + 1] == closing:
                    return (mapped if closing == "}" else collected), at + 1
                continue
            if self.text[at : at + 1] == closing:
                return (mapped if closing == "}" else collected), at + 1
            raise self.fail(f"expected ',' or {closing!r} in a flow collection")
