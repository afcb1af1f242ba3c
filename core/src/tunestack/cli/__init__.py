"""The ``tunestack`` command line. One module per command group; user errors never show a traceback."""

from __future__ import annotations

import sys
from typing import Any

import click

from tunestack import __version__
from tunestack.errors import TunestackError


class TunestackGroup(click.Group):
    """Turns tunestack errors into one clear message and the documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TunestackError as error:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.secho(f"error: {error}", fg="red", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            click.secho("interrupted", fg="red", err=True)
            sys.exit(130)


@click.group(cls=TunestackGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tunestack")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compose fine-tuning, parameter-efficient methods and compression in one TOML stack."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register_commands() -> None:
    from tunestack.cli import inspect, manage, run, use

    for module in (run, inspect, use, manage):
        module.register(cli)
    from tunestack.plugins import default_host

    host = default_host()
    try:
        host.hook.tunestack_register_commands(cli=cli)
    except Exception as error:  # a plugin's command must not take the whole CLI down
        click.secho(f"warning: a plugin failed to add its commands: {error}", fg="yellow", err=True)


def main() -> None:
    _register_commands()
    cli(prog_name="tunestack")
