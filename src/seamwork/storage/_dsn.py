"""What a PostgreSQL DSN's error may show: never the password.

libpq quotes the piece of a connection string it cannot parse - the password
itself (``invalid percent-encoded token: "s3cret%zz"``), a word of it
(``missing "=" after "cret"``) or the whole URI - so a driver's error about a DSN
is shown with each quoted piece that holds, or is part of, the password masked.
No driver is imported here.
"""

from __future__ import annotations

import re

_QUOTED = re.compile(r'"([^"]*)"')
_PASSWORD = re.compile(r"password\s*=\s*", re.IGNORECASE)
_NEXT_KEY = re.compile(r"\s\w+\s*=")


def without_password(text: str, dsn: str) -> str:
    """``text`` (an error about ``dsn``) with every quoted piece that could be, or
    hold, the DSN's password shown as ``"***"``."""
    regions, words = _secrets(dsn)
    if not regions:
        return text

    def mask(found: re.Match[str]) -> str:
        piece = found[1]
        if piece and (any(piece in region for region in regions) or any(w in piece for w in words)):
            return '"***"'
        return found[0]

    return _QUOTED.sub(mask, text)


def _secrets(dsn: str) -> tuple[list[str], list[str]]:
    """Where a password may be in ``dsn`` (from it to the next ``key=``: a value with
    a space runs on into the next word), and the words of those places."""
    regions: list[str] = []
    _, uri, rest = dsn.partition("://")
    if uri:
        userinfo, at, _ = rest.rpartition("@")
        password = userinfo.partition(":")[2] if at else ""
        if password:
            regions.append(password)
    for found in _PASSWORD.finditer(dsn):
        after = dsn[found.end() :]
        regions.append(_NEXT_KEY.split(after, maxsplit=1)[0])
    words = [w for region in regions for w in re.split(r"[\s&'\"\\]+", region) if w]
    return regions, words
