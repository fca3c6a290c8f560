"""How ``edgectl`` reaches the hub: ``--hub URL`` and ``--token`` (or EDGEGLM_HUB_URL / EDGEGLM_TOKEN)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from edgectl.hub_client import DEFAULT_HUB_URL, HubClient

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["client_from", "hub_options"]


def hub_options(func: F) -> F:
    func = click.option(
        "--token",
        envvar="EDGEGLM_TOKEN",
        default=None,
        show_envvar=True,
        help="API token (bearer). Prefer the environment variable: flags show up in ps.",
    )(func)
    return click.option(
        "--hub",
        "hub_url",
        envvar="EDGEGLM_HUB_URL",
        default=DEFAULT_HUB_URL,
        show_default=True,
        show_envvar=True,
        help="The hub's base URL.",
    )(func)


def client_from(hub_url: str, token: str | None) -> HubClient:
    return HubClient(hub_url, token or "")
