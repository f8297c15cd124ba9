"""Checks of the command line's own values, shared by the commands."""

from __future__ import annotations

import typer


def utf8(value: str | None) -> str | None:
    """A text argument or option a store can hold: argv bytes that are not UTF-8 reach
    Python as lone surrogates, which no store, driver or terminal can encode (they
    ended the command with a ``UnicodeEncodeError`` traceback)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise typer.BadParameter(
                f"{value!r} is not valid UTF-8 (is the terminal's encoding UTF-8?)"
            ) from None
    return value
