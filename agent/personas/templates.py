"""Placeholders in persona text: `{customer_name}` filled per call, `{{`/`}}` for literal braces.

A persona declares its variables with defaults ("" = unknown); any text field may use them,
plus the built-ins every call has (`caller_number`, `dialled_number`). Only plain names are
allowed: no attribute access, index, conversion or format spec, so a value can never reach
Python's formatting machinery.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

BUILTINS = ("caller_number", "dialled_number")
NAME = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class Template:
    """One piece of persona text, split into literal text and placeholder names."""

    parts: tuple[tuple[str, str | None], ...]  # (literal, name or None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for _, n in self.parts if n is not None)

    def render(self, values: dict[str, str]) -> str:
        return "".join(lit + (values.get(n, "") if n is not None else "") for lit, n in self.parts)

    def all_unknown(self, values: dict[str, str]) -> bool:
        """It has placeholders and none of them has a value (an item about nothing known)."""
        return bool(self.names) and not any(values.get(n) for n in self.names)


def parse(text: str) -> Template:
    """Split `text`; TemplateError says what is wrong with a placeholder."""
    try:
        pieces = list(string.Formatter().parse(text))
    except ValueError as exc:  # "Single '{' encountered", "expected '}' before end of string"
        raise TemplateError(f"malformed placeholder ({exc}); write {{name}}, or {{{{ }}}} for a literal brace") \
            from None
    parts = []
    for literal, field, spec, conversion in pieces:
        if field is None:
            parts.append((literal, None))
            continue
        if spec or conversion or not NAME.match(field):
            shown = "{" + field + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}"
            raise TemplateError(f"placeholder {shown} is not a plain variable name "
                                "(lowercase letters, digits, '_')")
        parts.append((literal, field))
    return Template(tuple(parts))
