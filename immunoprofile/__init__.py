"""immunoprofile: immune profiling by flow cytometry for clinical trials.

Read FCS files, compensate and transform them, apply versioned gating templates,
report subset counts, frequencies and intensities, compare timepoints with paired
statistics and draw per-patient longitudinal plots.

The package imports nothing heavy at the top level, so the CLI starts fast;
import the submodules you need (``immunoprofile.fcs``, ``immunoprofile.gating`` ...).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
