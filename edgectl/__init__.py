"""``edgectl``: the operator's command line.

Expected errors (:class:`edgeglm.errors.EdgeError`) are converted in exactly one place,
:meth:`EdgeGroup.invoke`: one line ``Error: what: why`` plus ``hint: ...`` on stderr and the
error's exit code (0 ok, 1 failed, 2 usage, 69 unavailable, 78 bad config). Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

import click

from edgeglm import __version__
from edgeglm.errors import EdgeError, UsageError

__all__ = ["EdgeGroup", "main", "root"]


class _EdgeClickError(click.ClickException):
    """Carries an :class:`EdgeError` through click's own error handling."""

    def __init__(self, error: EdgeError) -> None:
        super().__init__(str(error))
        self.error = error
        self.exit_code = error.exit_code  # type: ignore[misc]  # click declares it per class

    def show(self, file: IO[Any] | None = None) -> None:
        stream = file or sys.stderr
        click.echo(f"Error: {self.error}", file=stream)
        if self.error.hint:
            click.echo(f"hint: {self.error.hint}", file=stream)


class EdgeGroup(click.Group):
    """A click group that turns :class:`EdgeError` into a one-line error and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            raise click.UsageError(f"{exc}" + (f"\nhint: {exc.hint}" if exc.hint else ""), ctx) from exc
        except EdgeError as exc:
            raise _EdgeClickError(exc) from exc


@click.group(cls=EdgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgectl")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def root(verbose: int) -> None:
    """EdgeGLM: export GLM models, serve them on edge boxes, roll them out to fleets."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _register() -> None:
    # Imported here so that importing edgectl stays cheap and free of cycles.
    from edgectl import (
        agent_cmd,
        bundle_cmd,
        demo_cmd,
        devices_cmd,
        export_cmd,
        hub_cmd,
        keys_cmd,
        profiles_cmd,
        registry_cmd,
        rollouts_cmd,
    )

    root.add_command(profiles_cmd.profiles)
    root.add_command(keys_cmd.keys)
    root.add_command(bundle_cmd.bundle)
    root.add_command(demo_cmd.demo)
    root.add_command(export_cmd.export)
    root.add_command(agent_cmd.agent)
    root.add_command(hub_cmd.hub)
    root.add_command(registry_cmd.publish)
    root.add_command(registry_cmd.releases)
    root.add_command(devices_cmd.devices)
    root.add_command(devices_cmd.audit)
    root.add_command(rollouts_cmd.deploy)
    root.add_command(rollouts_cmd.rollouts)
    root.add_command(rollouts_cmd.rollback)


_register()


def main() -> None:
    root(prog_name="edgectl")
