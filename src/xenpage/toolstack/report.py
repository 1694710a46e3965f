"""What a command prints: lines on stdout/stderr (in order), an exit code, and data for
``--json``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Line:
    stream: str  # "out" or "err"
    text: str
    newline: bool = True


@dataclass
class Report:
    lines: list[Line] = field(default_factory=list)
    exit_code: int = 0
    data: dict = field(default_factory=dict)

    def out(self, text: str) -> None:
        self.lines.append(Line("out", text))

    def err(self, text: str, newline: bool = True) -> None:
        self.lines.append(Line("err", text, newline))

    def extend(self, other: "Report") -> None:
        self.lines.extend(other.lines)

    @property
    def stdout(self) -> str:
        return "".join(l.text + ("\n" if l.newline else "") for l in self.lines if l.stream == "out")

    @property
    def stderr(self) -> str:
        return "".join(l.text + ("\n" if l.newline else "") for l in self.lines if l.stream == "err")

    def to_json(self) -> dict:
        d = dict(self.data)
        d["exit"] = self.exit_code
        d["stdout"] = [l.text for l in self.lines if l.stream == "out"]
        d["stderr"] = [l.text for l in self.lines if l.stream == "err"]
        return d
