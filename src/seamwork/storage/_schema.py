"""What the SQLite and PostgreSQL stores share about schema versions."""

from __future__ import annotations

from collections.abc import Iterable


def newer_schema(applied: dict[str, int], known: Iterable[tuple[str, int]]) -> str | None:
    """What is wrong when a component's applied schema version is above the newest
    this code knows (``known``: its migrations' ``(component, version)`` pairs) - a
    newer seamwork wrote it, and this code would read and write it by older rules -
    else None."""
    newest: dict[str, int] = {}
    for component, version in known:
        newest[component] = max(version, newest.get(component, 0))
    for component, version in newest.items():
        found = applied.get(component, 0)
        if found > version:
            return (
                f"the {component} schema v{found} is from a newer seamwork (this one knows "
                f"up to v{version}); upgrade seamwork to use this database"
            )
    return None
