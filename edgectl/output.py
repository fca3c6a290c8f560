"""``--output table|json`` for every command that prints results."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from pydantic import BaseModel

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["emit", "output_option", "render_table"]


def output_option(func: F) -> F:
    """Add ``--output table|json`` (default table) to a command."""
    return click.option(
        "--output",
        "-o",
        "output",
        type=click.Choice(["table", "json"]),
        default="table",
        show_default=True,
        help="table for people, json for scripts.",
    )(func)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (no colours, so it pipes cleanly)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def emit(data: Any, output: str, table: Callable[[Any], str]) -> None:
    """Print ``data`` as JSON, or as the text ``table(data)`` returns.

    A model (or a list of them) prints as the JSON the hub sent it as (``edgeglm.hub_api``).
    """
    if output == "json":
        click.echo(json.dumps(_plain(data), indent=2, sort_keys=True, default=str))
    else:
        click.echo(table(data))


def _plain(data: Any) -> Any:
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json", by_alias=True)
    if isinstance(data, list):
        return [_plain(item) for item in data]
    return data
