"""`--redact REGEX`: every match in a text becomes `[REDACTED]` before the store writes it.
Messages are walked whole (contents, content parts, tool-call arguments, tool results, names);
the values of `role` and `type`, and every key, are protocol and stay as they are."""

from __future__ import annotations

import re

REDACTED = "[REDACTED]"
STRUCTURE = ("role", "type")  # message keys whose values are protocol, not text: never redacted


class Redactor:
    def __init__(self, patterns: list[str] | tuple = ()):
        self.patterns = [re.compile(p) for p in patterns]

    def text(self, text: str | None) -> str | None:
        for pattern in self.patterns:
            text = pattern.sub(REDACTED, text) if text is not None else None
        return text

    def messages(self, messages: list[dict]) -> list[dict]:
        return [self._value(m) for m in messages] if self.patterns else messages

    def _value(self, value, key: str | None = None):
        if isinstance(value, str):
            return value if key in STRUCTURE else self.text(value)
        if isinstance(value, dict):
            return {k: self._value(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self._value(v) for v in value]
        return value
