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


def utf8_each(values: list[str]) -> list[str]:
    """``utf8`` for an argument taken several times (message ids)."""
    for value in values:
        utf8(value)
    return values


def abort_reason(value: str) -> str:
    """``--reason``: UTF-8 and not blank; an empty reason recorded nothing but a
    dangling ``; `` after the saga's failure."""
    checked = utf8(value)
    if checked is None or not checked.strip():
        raise typer.BadParameter("give the reason the saga is given up on (it is recorded)")
    return checked
