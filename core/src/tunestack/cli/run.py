"""``tunestack run`` and ``tunestack validate``."""

from __future__ import annotations

import os
from pathlib import Path

import click

from tunestack.cli.output import print_summary


def register(cli: click.Group) -> None:
    cli.add_command(run_command)
    cli.add_command(validate_command)


@click.command("run")
@click.argument("stack", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("runs"),
    show_default=True,
    help="Folder that receives the run folder <out>/<name>.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a stack key, e.g. train.epochs=2 or stage[1].stack[0].ratio=0.3.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--force", is_flag=True, help="Replace an existing run folder (only once the new run finishes).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run_command(stack: Path, out: Path, overrides: tuple[str, ...], resume: bool, force: bool, quiet: bool) -> None:
    """Run a stack file end to end and print a summary."""
    from tunestack.runner import GateFailed, run

    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun/accelerate, one summary
    try:
        result = run(stack, out=out, overrides=list(overrides), resume=resume, force=force, progress=not quiet)
    except GateFailed as failed:
        if main_process:
            print_summary(failed.result)
        raise
    if main_process:
        print_summary(result)


@click.command("validate")
@click.argument("stack", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a stack key.")
def validate_command(stack: Path, overrides: tuple[str, ...]) -> None:
    """Check a stack file without running it (exit 2 and every problem if invalid)."""
    from tunestack.plugins import default_host
    from tunestack.validation import load_plan

    plan = load_plan(stack, default_host(), list(overrides))
    methods = sum(len(s.methods) for s in plan.stages)
    click.echo(f"{stack}: valid ({len(plan.stages)} stage(s), {methods} method(s))")
