"""Click parameter types shared by ``edgectl`` commands."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click
from click.shell_completion import CompletionItem

from edgeglm.errors import NotFoundError
from edgeglm.profiles import DeviceProfile, load_profile, shipped_profiles

__all__ = ["ProfileParam"]

if TYPE_CHECKING:
    _ProfileType = click.ParamType[DeviceProfile, Any]
else:  # ParamType is generic only from click 8.3; pyproject allows 8.1.
    _ProfileType = click.ParamType


class ProfileParam(_ProfileType):
    """``--profile``: a shipped profile name or a path to a profile ``.toml`` file.

    An unknown name or a missing file is a usage error (exit 2); a file that exists but is
    invalid raises :class:`edgeglm.errors.ConfigError` (exit 78) naming the file and the key.
    """

    name = "profile"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> DeviceProfile:
        if isinstance(value, DeviceProfile):
            return value
        try:
            return load_profile(value)
        except NotFoundError as exc:
            self.fail(f"{exc}. {exc.hint}" if exc.hint else str(exc), param, ctx)

    def shell_complete(
        self, ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        return [CompletionItem(name) for name in shipped_profiles() if name.startswith(incomplete)]
