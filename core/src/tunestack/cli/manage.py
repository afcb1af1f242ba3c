"""``tunestack compare``, ``new-plugin``, ``install`` and ``uninstall``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from tunestack.cli.output import table


def register(cli: click.Group) -> None:
    for command in (compare_command, new_plugin_command, install_command, uninstall_command):
        cli.add_command(command)


@click.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--baseline", type=click.Path(path_type=Path), help="Run that retention is measured against (default: the first)."
)
@click.option("--metric", help="Metric to compare (default: the task's headline metric).")
@click.option("--plot", "plot_file", type=click.Path(path_type=Path), help="Write a Pareto plot (PNG).")
@click.option(
    "--latency", type=click.Choice(["b1", "b32"]), default="b32", show_default=True, help="Latency for the plot."
)
@click.option("--markdown", is_flag=True, help="Print a markdown table.")
def compare_command(
    runs: tuple[Path, ...],
    baseline: Path | None,
    metric: str | None,
    plot_file: Path | None,
    latency: str,
    markdown: bool,
) -> None:
    """One table of quality, retention, size, latency and training speed for finished runs."""
    from tunestack import compare

    rows = compare.compare_runs(list(runs), baseline, metric)
    if markdown:
        click.echo(compare.markdown(rows))
    else:
        click.echo(table(compare.COLUMNS, compare.table_rows(rows)))
    if plot_file is not None:
        click.echo(f"plot: {compare.plot(rows, plot_file, latency)}")


@click.command("new-plugin")
@click.argument("name")
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where to create tunestack-NAME/.",
)
def new_plugin_command(name: str, folder: Path) -> None:
    """Scaffold a method plugin distribution whose tests pass out of the box."""
    from tunestack import __version__
    from tunestack.scaffold import write_plugin

    root = write_plugin(name, folder, __version__)
    click.echo(f"created {root}")
    click.echo(f"next: pip install -e {root} && pytest {root / 'tests'}")


def _pip(args: list[str]) -> None:
    from tunestack.errors import TunestackError
    from tunestack.plugins import reset_default_host

    command = [sys.executable, "-m", "pip", *args]
    click.echo("$ " + " ".join(command), err=True)
    result = subprocess.run(command, check=False)
    reset_default_host()
    if result.returncode != 0:
        raise TunestackError(f"pip exited with status {result.returncode}")


@click.command("install", context_settings={"ignore_unknown_options": True})
@click.argument("packages", nargs=-1, required=True)
@click.option("-U", "--upgrade", is_flag=True, help="Upgrade the packages.")
@click.option("-e", "--editable", is_flag=True, help="Install a local folder in editable mode.")
@click.option("--no-deps", is_flag=True, help="Do not install dependencies.")
@click.option("--no-build-isolation", is_flag=True, help="Build with the packages already installed.")
def install_command(
    packages: tuple[str, ...], upgrade: bool, editable: bool, no_deps: bool, no_build_isolation: bool
) -> None:
    """Install method plugins into tunestack's own environment (pip install, right interpreter)."""
    from tunestack.plugins import default_host

    before = set(default_host().methods)
    args = ["install", *(["--upgrade"] if upgrade else []), *(["--no-deps"] if no_deps else [])]
    args += ["--no-build-isolation"] if no_build_isolation else []
    for package in packages:
        args += ["-e", package] if editable else [package]
    _pip(args)
    host = default_host()
    added = sorted(set(host.methods) - before)
    click.echo("new methods: " + (", ".join(added) if added else "none"))
    for info in host.failed:
        click.secho(f"warning: {info.label} failed to load: {info.error}", fg="yellow", err=True)


@click.command("uninstall")
@click.argument("packages", nargs=-1, required=True)
def uninstall_command(packages: tuple[str, ...]) -> None:
    """Remove plugins from tunestack's environment (pip uninstall -y)."""
    _pip(["uninstall", "-y", *packages])
