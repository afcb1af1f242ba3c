"""``tunestack eval`` and ``tunestack predict``: use a finished run's final model."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tunestack.cli.output import table


def register(cli: click.Group) -> None:
    cli.add_command(eval_command)
    cli.add_command(predict_command)


@click.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Evaluation file (default: the run's eval file).")
@click.option("--json", "as_json", is_flag=True, help="Print all metrics as JSON.")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
def eval_command(run_dir: Path, data: Path | None, as_json: bool, no_latency: bool) -> None:
    """Reload a run's final model and evaluate it."""
    from tunestack import load

    loaded = load(run_dir)
    metrics = loaded.evaluate(data, latency=False if no_latency else None)
    if as_json:
        click.echo(json.dumps(metrics, indent=2, default=str))
        return
    rows = [[k, v] for k, v in metrics.items() if isinstance(v, int | float | str)]
    click.echo(table(["metric", "value"], rows))
    if "tag_report" in metrics:
        from tunestack.metrics import format_report

        click.echo("\n" + format_report(metrics["tag_report"]))


@click.command("predict")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1)
@click.option(
    "--file",
    "file_",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="One input per line.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def predict_command(run_dir: Path, texts: tuple[str, ...], file_: Path | None, as_json: bool) -> None:
    """Predictions of a run's final model for TEXT arguments or the lines of --file."""
    from tunestack import load
    from tunestack.errors import UserError

    inputs = list(texts)
    if file_ is not None:
        inputs += [line for line in file_.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not inputs:
        raise UserError("give at least one TEXT or --file")
    loaded = load(run_dir)
    for result in loaded.predict(inputs):
        if as_json:
            click.echo(json.dumps(result, default=str))
        elif "label" in result:
            click.echo(f"{result['label']}\t{result['score']:.4f}\t{result['text']}")
        elif "tags" in result:
            click.echo(" ".join(f"{t}/{g}" for t, g in zip(result["tokens"], result["tags"])))
        else:
            click.echo(f"{result['prompt']}{result['completion']}")
