"""Accuracy of the bundled templates against the simulator's truth, over many samples.

Simulates T-cell and NK samples (20,000 events; 3 patients x 2 timepoints per seed), gates them
with ``t_cell_exhaustion`` / ``nk_inhibitory`` and prints, for the major populations, the largest
error in percentage points of parent against the per-event truth.

    python benchmarks/accuracy.py                 # seeds 11 23 37 5 7 9 (72 samples)
    python benchmarks/accuracy.py --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from immunoprofile.fcs import fcs_bytes, parse_fcs  # noqa: E402
from immunoprofile.gating import gate_events, prepare  # noqa: E402
from immunoprofile.simulate import simulate_sample  # noqa: E402
from immunoprofile.templates import load_template  # noqa: E402

MAJOR = {"nk": ["NK cells", "CD56bright NK"], "t_cell": ["T cells", "CD4 T", "CD8 T"]}
TEMPLATE = {"nk": "nk_inhibitory", "t_cell": "t_cell_exhaustion"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 23, 37, 5, 7, 9])
    ap.add_argument("--events", type=int, default=20000)
    args = ap.parse_args(argv)
    templates = {p: load_template(t) for p, t in TEMPLATE.items()}
    errors: list[float] = []
    t0 = time.perf_counter()
    n = 0
    for seed in args.seeds:
        for patient in range(3):
            for tp in ("pre", "post_clofarabine"):
                for panel, tpl in templates.items():
                    s = simulate_sample(panel, args.events, patient=patient, timepoint=tp,
                                        timepoints=("pre", "post_clofarabine"), seed=seed, n_patients=3)
                    sample = parse_fcs(fcs_bytes(s.events, s.channels, s.markers, spillover=s.spillover), "sim")
                    res = gate_events(prepare(sample, tpl))
                    n += 1
                    for pop in MAJOR[panel]:
                        parent = tpl.population(pop).parent
                        est = 100 * res.masks[pop].sum() / res.masks[parent].sum()
                        tru = 100 * s.membership[pop].sum() / s.membership[parent].sum()
                        errors.append(abs(est - tru))
                        if abs(est - tru) > 1.5:
                            print(f"seed {seed} patient {patient} {tp} {panel} {pop}: {est:.2f} vs {tru:.2f}")
    e = np.asarray(errors)
    print(f"{n} samples, {e.size} population estimates: max error {e.max():.2f} points, mean {e.mean():.3f}, "
          f"over 1.5 points: {(e > 1.5).sum()} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
