"""``tunestack explain``, ``plugins`` and ``methods``: what is installed and what a stack will do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from tunestack.cli.output import table

LIFECYCLE = ("tunestack_prepare", "tunestack_train_step", "tunestack_compress", "tunestack_evaluate")


def register(cli: click.Group) -> None:
    cli.add_command(explain_command)
    cli.add_command(plugins_command)
    cli.add_command(methods_command)


@click.command("explain")
@click.argument("stack", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a stack key.")
@click.option("--json", "as_json", is_flag=True, help="Print the resolved plan as JSON.")
def explain_command(stack: Path, overrides: tuple[str, ...], as_json: bool) -> None:
    """Print the resolved plan: stages, methods with every option, hook order, contracts."""
    from tunestack.plugins import default_host
    from tunestack.validation import load_plan

    host = default_host()
    plan = load_plan(stack, host, list(overrides))
    if as_json:
        click.echo(json.dumps(explain_data(plan, host), indent=2, default=str))
        return
    s = plan.stack
    source = "config (random init)" if s.model.config is not None else s.model.source
    click.echo(f"run '{plan.name}'  seed={s.seed}  task={s.model.task}  model={source}")
    click.echo(f"data: train={s.data.train} eval={s.data.eval} max_length={s.data.max_length}")
    for stage in plan.stages:
        t = stage.train
        training = (
            f"epochs={t.epochs} batch={t.batch_size}x{t.gradient_accumulation_steps} lr={t.learning_rate} "
            f"{t.scheduler} warmup={t.warmup_steps or t.warmup_ratio} precision={t.mixed_precision}"
            if stage.trains
            else "no training (epochs = 0)"
        )
        click.echo(f"\nstage {stage.index} '{stage.name}': {training}")
        click.echo(f"  tags before: {', '.join(sorted(stage.tags_before))}")
        for method in stage.methods:
            c = method.contract
            click.echo(f"  {method.slot.path or 'stack'}: {method.name}  [{method.plugin}]")
            for key, value in method.options.model_dump(mode="json").items():
                click.echo(f"      {key} = {json.dumps(value)}")
            click.echo(
                f"      phases: {', '.join(p for p in ('prepare', 'train', 'compress', 'evaluate') if p in c.phases)}"
            )
            for label, tags in (
                ("requires", c.requires),
                ("conflicts", c.conflicts),
                ("produces", c.produces),
                ("removes", c.removes),
                ("forbids after", c.forbids_after),
            ):
                if tags:
                    click.echo(f"      {label}: {', '.join(sorted(tags))}")
        click.echo("  hook order:")
        for hook_name in LIFECYCLE:
            if hook_name == "tunestack_train_step" and not stage.trains:
                continue
            order = hook_order(host, stage, hook_name)
            click.echo(f"    {hook_name}: {' -> '.join(order) or '-'}")
        click.echo(f"  tags after: {', '.join(sorted(stage.tags_after))}")
        if stage.gate is not None:
            click.echo(f"  gate: {stage.gate.model_dump(exclude_none=True)}")


def hook_order(host: Any, stage: Any, hook_name: str) -> list[str]:
    """Who a hook will call, in call order, while ``stage`` runs."""
    names = {f"method-{id(m.instance)}": f"{m.name} ({m.slot.path or 'stack'})" for m in stage.methods}
    with host.activated([m.instance for m in stage.methods]):
        impls = getattr(host.hook, hook_name).get_hookimpls()
        return [names.get(impl.plugin_name, impl.plugin_name) for impl in reversed(impls)]


def explain_data(plan: Any, host: Any) -> dict[str, Any]:
    data = plan.resolved()
    data["stages_plan"] = [
        {
            "name": stage.name,
            "trains": stage.trains,
            "tags_before": sorted(stage.tags_before),
            "tags_after": sorted(stage.tags_after),
            "methods": [
                {
                    "slot": m.slot.path,
                    "method": m.name,
                    "plugin": m.plugin,
                    "options": m.options.model_dump(mode="json"),
                    "contract": m.contract.model_dump(mode="json"),
                }
                for m in stage.methods
            ],
            "hooks": {name: hook_order(host, stage, name) for name in LIFECYCLE},
        }
        for stage in plan.stages
    ]
    return data


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_command(as_json: bool) -> None:
    """Installed plugins: name, distribution, version, methods, hooks, load errors."""
    from tunestack.plugins import default_host

    host = default_host()
    if as_json:
        click.echo(json.dumps([p.to_json() for p in host.plugins], indent=2))
        return
    rows = []
    for p in host.plugins:
        status = "disabled" if p.disabled else (f"FAILED: {p.error}" if p.error else "ok")
        provides = ", ".join(p.methods + p.tasks) or "-"
        hooks = ", ".join(h.removeprefix("tunestack_") for h in p.hooks) or "-"
        rows.append([p.name, p.distribution or "-", p.version or "-", provides, hooks, status])
    click.echo(table(["plugin", "distribution", "version", "provides", "hooks", "status"], rows))


@click.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("names", nargs=-1)
def methods_command(as_json: bool, names: tuple[str, ...]) -> None:
    """Every installed method with its options (type, default, description) and contract."""
    from tunestack.plugins import default_host

    host = default_host()
    selected = [host.methods[n] for n in sorted(host.methods) if not names or n in names]
    unknown = [n for n in names if n not in host.methods]
    if unknown:
        from tunestack.errors import UserError

        raise UserError("; ".join(host.describe_unknown_method(n) for n in unknown))
    data: list[dict[str, Any]] = []
    for spec in selected:
        plugin = host.method_plugin[spec.name]
        try:
            contract = spec.contract_for(spec.options()).model_dump(mode="json")
        except Exception:
            contract = None
        data.append(
            {
                "name": spec.name,
                "description": spec.description,
                "plugin": plugin.name,
                "distribution": plugin.distribution,
                "version": plugin.version,
                "tasks": sorted(spec.tasks) if spec.tasks else "all",
                "options": spec.describe_options(),
                "contract": contract,
            }
        )
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    if not data:
        click.echo("no methods installed (pip install tunestack-lora, for example)")
    for entry in data:
        dist = f"{entry['distribution']} {entry['version']}" if entry["distribution"] else entry["plugin"]
        click.echo(f"\n{entry['name']}  ({dist})\n  {entry['description']}")
        if entry["contract"]:
            phases = [p for p in ("prepare", "train", "compress", "evaluate") if p in entry["contract"]["phases"]]
            click.echo(f"  phases: {', '.join(phases)}")
        rows = [
            [
                o["name"],
                o["type"],
                "(required)" if o["required"] else json.dumps(o["default"]),
                o["description"],
            ]
            for o in entry["options"]
        ]
        if rows:
            click.echo("  " + table(["option", "type", "default", "description"], rows).replace("\n", "\n  "))
