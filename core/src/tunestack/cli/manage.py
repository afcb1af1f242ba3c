"""Commands that manage the installation (filled in as the authoring kit lands)."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    return None
