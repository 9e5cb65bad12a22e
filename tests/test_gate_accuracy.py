"""The bundled templates recover the simulator's truth on fresh cohorts (several seeds).

Issue 3: major populations (T, CD4 T, CD8 T, NK) within 2 percentage points of parent,
marker-positive subsets within 3 points when FMOs are given.
"""

from __future__ import annotations

import pandas as pd
import pytest

from immunoprofile.batch import run_gate
from immunoprofile.samplesheet import read_sheet
from immunoprofile.simulate import simulate_cohort
from immunoprofile.templates import load_template

MAJOR = ["T cells", "CD4 T", "CD8 T", "NK cells"]
MARKERS = ["CD4 PD1+", "CD4 LAG3+", "CD4 TIM3+", "CD4 PD1+LAG3+", "CD4 PD1+TIM3+", "CD4 PD1+LAG3+TIM3+",
           "CD8 PD1+", "CD8 LAG3+", "CD8 TIM3+", "CD8 PD1+LAG3+", "CD8 PD1+TIM3+", "CD8 PD1+LAG3+TIM3+",
           "NK CD57+", "NK LIR1+", "NK CD57+LIR1+", "NK NKG2A+", "CD56bright NK", "CD56dim NK"]


@pytest.fixture(scope="module", params=[11, 23, 37])
def gated(request, tmp_path_factory):
    seed = request.param
    base = tmp_path_factory.mktemp(f"acc{seed}")
    simulate_cohort(base / "cohort", patients=3, timepoints=("pre", "post_clofarabine"), events=20000, seed=seed)
    sheet = read_sheet(base / "cohort" / "samplesheet.csv")
    summary = run_gate(sheet, [load_template("t_cell_exhaustion"), load_template("nk_inhibitory")], base / "out")
    assert summary.failed == 0, summary.failures
    pops = pd.read_csv(base / "out" / "populations.csv")
    truth = pd.read_csv(base / "cohort" / "truth.csv")
    m = pops.merge(truth, on=["sample_id", "population"], suffixes=("", "_true"), validate="one_to_one")
    m["error_pp"] = (m["pct_parent"] - 100 * m["fraction"]).abs()
    return m


def test_every_population_has_truth(gated):
    assert len(gated) == 3 * 2 * (18 + 10)


def test_major_populations_within_2_points(gated):
    worst = gated[gated.population.isin(MAJOR)].sort_values("error_pp").iloc[-1]
    assert worst.error_pp <= 2.0, f"{worst.sample_id} {worst.population}: {worst.pct_parent:.2f} vs {100 * worst.fraction:.2f}"


def test_marker_subsets_within_3_points_with_fmo(gated):
    worst = gated[gated.population.isin(MARKERS)].sort_values("error_pp").iloc[-1]
    assert worst.error_pp <= 3.0, f"{worst.sample_id} {worst.population}: {worst.pct_parent:.2f} vs {100 * worst.fraction:.2f}"
