"""``immunoprofile simulate``: write a synthetic cohort with known truth."""

from __future__ import annotations

import click


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []


@click.command("simulate")
@click.option("--out", "out_dir", required=True, metavar="DIR",
              help="Folder to write (created; must be new or empty unless --force).")
@click.option("--patients", type=int, default=8, show_default=True, help="Number of patients (1-999).")
@click.option("--timepoints", default="pre,post_clofarabine,post_lenalidomide", show_default=True,
              help="Comma-separated timepoints in sampling order; each is one batch (acquisition day).")
@click.option("--events", type=int, default=50_000, show_default=True, help="Events per FCS file.")
@click.option("--panels", default="t_cell,nk", show_default=True, help="Comma-separated panels: t_cell, nk.")
@click.option("--effect-size", type=float, default=1.0, show_default=True,
              help="Multiplies every planted change (0 = null cohort).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same bytes).")
@click.option("--extra-channels", type=int, default=0, show_default=True,
              help="Add this many passenger markers (0-10), e.g. 5 for 18-channel T-cell files.")
@click.option("--force", is_flag=True,
              help="Write into a non-empty folder, replacing a previous simulated cohort there.")
@click.pass_context
def simulate(ctx: click.Context, out_dir: str, patients: int, timepoints: str, events: int, panels: str,
             effect_size: float, seed: int, extra_channels: int, force: bool) -> None:
    """Simulate a clinical immune-monitoring cohort with known truth.

    Writes one FCS 3.1 file per patient x timepoint x panel, FMO controls (PD1, LAG3,
    TIM3; LIR1, CD57, NKG2A) per batch, samplesheet.csv, truth.csv and simulation.json.

    \b
    Example:
      immunoprofile simulate --out cohort/ --patients 8 --events 50000 --seed 1
    """
    from ..errors import UsageError
    from ..simulate import simulate_cohort

    try:
        result = simulate_cohort(out_dir, patients, _split(timepoints), events, _split(panels), effect_size, seed,
                                 extra_channels=extra_channels, force=force)
    except UsageError as e:
        raise click.UsageError(str(e), ctx) from e
    if (ctx.obj or {}).get("verbosity", 0) >= 0:
        click.echo(f"simulated {result.n_samples} samples and {result.n_controls} FMO controls "
                   f"({result.design.events} events each) in {result.out_dir}", err=True)
