"""A validation finding: which file, what is wrong, what to do."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "warning"
    file: str  # path relative to the dataset folder ("." for the folder itself)
    message: str
    hint: str
    code: str

    @classmethod
    def error(cls, file: str, message: str, hint: str, *, code: str) -> "Finding":
        return cls("error", file, message, hint, code)

    @classmethod
    def warning(cls, file: str, message: str, hint: str, *, code: str) -> "Finding":
        return cls("warning", file, message, hint, code)

    def line(self) -> str:
        return f"{self.level.upper()}: {self.file}: {self.message} -> {self.hint}"

    def to_dict(self) -> dict:
        return asdict(self)
