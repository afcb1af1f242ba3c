"""``tunestack compare`` (and, as the authoring kit lands, commands that manage plugins)."""

from __future__ import annotations

from pathlib import Path

import click

from tunestack.cli.output import table


def register(cli: click.Group) -> None:
    cli.add_command(compare_command)


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
