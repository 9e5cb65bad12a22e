"""``immunoprofile templates``: list, show, validate and export gating templates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

_CTX = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=_CTX)
def templates() -> None:
    """List, show, validate and export gating templates.

    \b
    Examples:
      immunoprofile templates list
      immunoprofile templates show t_cell_exhaustion
      immunoprofile templates validate my_panel.yaml other.yaml
      immunoprofile templates export my_fixed_panel.yaml --sample pt01.fcs --out my_fixed_panel.xml
      immunoprofile templates export t_cell_exhaustion --sample pt01.fcs \\
          --resolved results/ --sample-id pt01_pre --out pt01_pre_gates.xml
    """


@templates.command("list", context_settings=_CTX)
def list_cmd() -> None:
    """List the bundled templates with their versions."""
    from ..errors import ImmunoprofileError
    from ..templates import list_bundled, load_template

    rows = [("NAME", "VERSION", "PANEL", "POPULATIONS", "DESCRIPTION")]
    for name in list_bundled():
        try:
            t = load_template(name)
        except ImmunoprofileError as e:
            rows.append((name, "?", "?", "?", f"INVALID: {e}"))
            continue
        desc = " ".join(t.description.split())
        rows.append((t.name, t.version, t.panel or "-", str(len(t.populations)),
                     desc if len(desc) <= 70 else desc[:67] + "..."))
    click.echo(_table(rows))


@templates.command("show", context_settings=_CTX)
@click.argument("template")
def show_cmd(template: str) -> None:
    """Show a template: versions, transforms, and every population with its parent and gate.

    TEMPLATE is a bundled name or a file (.yaml, Gating-ML .xml, FlowJo .wsp).
    """
    from ..templates import load_template

    t = load_template(template)
    click.echo(f"{t.name} {t.version}")
    click.echo(f"  source:       {t.source}")
    click.echo(f"  sha256:       {t.sha256}")
    if getattr(t, "external", False):
        click.echo(f"  kind:         {t.description}")
        click.echo("  compensation and transforms: as defined in the document (applied by FlowKit)")
    else:
        if t.description:
            click.echo(f"  description:  {' '.join(t.description.split())}")
        click.echo(f"  panel:        {t.panel or '-'}")
        click.echo(f"  compensation: {t.compensation}")
        tf = "; ".join(f"{k}={_transform_text(v)}" for k, v in t.transforms.items()) or "defaults"
        click.echo(f"  transforms:   {tf}")
        if t.aliases:
            click.echo("  aliases:      " + "; ".join(f"{k}={', '.join(v)}" for k, v in t.aliases.items()))
        if t.channels:
            click.echo("  channels:     " + "; ".join(f"{k}={v}" for k, v in t.channels.items()))
        if t.beads:
            click.echo(f"  beads:        {t.beads['population']} ({t.beads['beads_per_test']:g} per test, "
                       f"{t.beads['volume_ul']:g} uL)")
    click.echo(f"populations ({len(t.populations)}):")
    rows = [("POPULATION", "PARENT", "REFERENCE", "GATE")]
    for p in t.populations:
        rows.append((p.name, p.parent, p.reference, describe_gate(p)))
    click.echo(_table(rows, indent="  "))


@templates.command("validate", context_settings=_CTX)
@click.argument("files", nargs=-1, required=True)
@click.pass_context
def validate_cmd(ctx: click.Context, files: tuple[str, ...]) -> None:
    """Check template files (or bundled names); exit 2 if any is invalid.

    Each error names the file, the line and the field, and says what is expected.
    """
    from ..errors import ImmunoprofileError
    from ..templates import load_template

    bad = 0
    for f in files:
        try:
            t = load_template(f)
        except ImmunoprofileError as e:
            bad += 1
            click.echo(f"invalid: {e}", err=True)
            continue
        click.echo(f"ok: {f}: {t.name} {t.version}, {len(t.populations)} populations, sha256 {t.sha256[:12]}")
    if bad:
        click.echo(f"{bad} of {len(files)} template(s) invalid", err=True)
        ctx.exit(2)


@templates.command("export", context_settings=_CTX)
@click.argument("template")
@click.option("--sample", "sample_path", required=True, type=click.Path(dir_okay=False),
              help="FCS file whose channels the template's markers resolve to.")
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Gating-ML 2.0 file to write (.xml).")
@click.option("--resolved", "results_dir", type=click.Path(),
              help="Results folder of 'immunoprofile gate' (or its gates.csv): export the gates one sample used, "
                   "so data-driven gates (FMO, density, scatter, singlets) become fixed.")
@click.option("--sample-id", help="With --resolved: the sample whose gates to export.")
@click.option("--compensation", "comp_file", type=click.Path(dir_okay=False),
              help="Spillover matrix file (CSV) overriding the template and the file, as in 'gate --compensation'.")
@click.option("--dataset", type=int, default=0, show_default=True, help="Data set of a multi-data-set FCS file.")
def export_cmd(template: str, sample_path: str, out_path: str, results_dir: str | None, sample_id: str | None,
               comp_file: str | None, dataset: int) -> None:
    """Export a template as Gating-ML 2.0 for FlowJo, FlowKit or any Gating-ML 2.0 tool.

    Markers become the channels they have in --sample. Templates whose gates are
    all fixed export as they are; data-driven gates need --resolved and
    --sample-id, and then carry the coordinates that sample was gated with.
    """
    import logging

    from ..errors import UsageError
    from ..atomic import write_bytes_atomic
    from ..fcs import read_fcs
    from ..interop import export_gatingml, resolved_gates
    from ..templates import load_template

    log = logging.getLogger("immunoprofile")
    if (results_dir is None) != (sample_id is None):
        raise UsageError("--resolved and --sample-id go together: give both to export one sample's gates")
    t = load_template(template)
    sample = read_fcs(sample_path, dataset=dataset)
    rows = None
    if results_dir is not None:
        rows, file_sha = resolved_gates(results_dir, sample_id, t)
        if file_sha and file_sha != sample.sha256:
            log.warning("%s is not the file sample %s was gated from (SHA-256 differs); markers resolve to its "
                        "channels", sample_path, sample_id)
    comp = None
    if comp_file:
        from ..transform import compensation_matrix_from_csv

        comp = compensation_matrix_from_csv(comp_file)
    xml = export_gatingml(t, sample, resolved=rows, compensation=comp, sample_id=sample_id)
    write_bytes_atomic(Path(out_path), xml)
    n = len(t.populations)
    how = f", data-driven gates from sample {sample_id!r}" if rows is not None else ""
    click.echo(f"wrote {out_path}: {n} gates of {t.name} {t.version}{how}", err=True)


# ---------------------------------------------------------------- helpers
def _table(rows: list[tuple[str, ...]], indent: str = "") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths)] + [r[-1]]
        lines.append((indent + "  ".join(cells)).rstrip())
    return "\n".join(lines)


def _transform_text(t: Any) -> str:
    params = t.params() if hasattr(t, "params") else {}
    inner = ",".join(f"{k}={v:g}" for k, v in params.items())
    return f"{t.kind}({inner})" if inner else str(t.kind)


def _threshold_text(th: Any) -> str:
    if th.method == "fixed":
        how = f"{th.value:g}"
    elif th.method == "fmo":
        how = f"FMO {th.percentile:g}th percentile" + (f", else {th.fallback}" if th.fallback else "")
    else:
        how = "density" if th.offset == 3.0 else f"density (else mode + {th.offset:g} SD)"
    clip = []
    if th.min_value is not None:
        clip.append(f">= {th.min_value:g}")
    if th.max_value is not None:
        clip.append(f"<= {th.max_value:g}")
    return how + (f", clipped {' and '.join(clip)}" if clip else "")


def describe_gate(pop: Any) -> str:
    """One line describing a population's gate (native or external)."""
    if not hasattr(pop, "gate"):  # external template population
        dims = "/".join(pop.dims)
        return f"{pop.gate_type} {dims}".strip() + f" [{pop.gate_name}]"
    g = pop.gate
    kind = g.kind
    if kind == "range":
        parts = []
        for d, lo, hi in zip(g.dims, g.mins, g.maxs):
            lo_t = "-inf" if lo is None else f"{lo:g}"
            hi_t = "inf" if hi is None else f"{hi:g}"
            parts.append(f"{lo_t} <= {d} < {hi_t}")
        return "range " + ", ".join(parts)
    if kind == "threshold":
        op = ">=" if g.side == "above" else "<"
        return f"threshold {g.threshold.marker} {op} {_threshold_text(g.threshold)}"
    if kind == "quadrant":
        return (f"quadrant {g.quadrant} of {g.x.marker} ({_threshold_text(g.x)}) x "
                f"{g.y.marker} ({_threshold_text(g.y)})")
    if kind == "polygon":
        return f"polygon {g.x}/{g.y}, {len(g.vertices)} vertices"
    if kind == "ellipse":
        return f"ellipse {g.x}/{g.y}, center ({g.center[0]:g}, {g.center[1]:g}), distance {g.distance:g}"
    if kind == "scatter_gmm":
        q = getattr(g, "quantile", None)
        cover = f"{q:g} coverage" if q is not None else "automatic coverage"
        return f"scatter {g.x}/{g.y}: Gaussian mixture ({g.components} components), {g.select}, {cover}"
    if kind == "singlets":
        return f"singlets {g.area}/{g.height}: ratio within {g.mads:g} robust SD of the median"
    if kind == "boolean":
        ops = [("not " if neg else "") + n for n, neg in g.operands]
        return f"boolean {g.op}: " + ", ".join(ops)
    return kind  # pragma: no cover
