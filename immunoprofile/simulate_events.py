"""The simulator's instrument and events: labelled cells -> an event matrix.

Given a sample's counts (:mod:`immunoprofile.simulate_model`), this module makes
one labelled event per count: debris, monocytes, lymphocytes (T, B, NK; some
dead, some doublets), gives each cell its stained marker intensities, adds a
partner cell's signal to every doublet, and passes the signals through a
simulated cytometer:

* a per-batch instrument: fluorochrome brightness (gain), autofluorescence and a
  spillover matrix (rows = fluorochromes, columns = detectors, diagonal 1), jittered
  per batch and written exactly to ``$SPILLOVER``;
* detector = signals @ spillover + autofluorescence, plus photon (Poisson-like,
  variance proportional to the detected signal) and electronic noise, so
  compensation removes the spillover but leaves its spread, as on a real cytometer;
* values quantised to 1/64 (exact in float32, so platform differences in the last
  bit of ``exp``/``log`` do not change the bytes), fluorescence clipped at 262143.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .simulate_model import (
    CD57, D_EVENTS, D_FMO_EVENTS, D_INSTRUMENT, FMO_MARKERS, LAG3, LIR1, NKG2A, PD1, POPULATIONS, TIM3,
    CohortDesign, Counts, Frequencies, SampleSpec, control_bit, stream,
)

__all__ = ["CORE_CHANNELS", "EXTRA_CHANNELS", "SPELLINGS", "DETECTORS", "Instrument", "instrument",
           "panel_channels", "make_events", "CELL_TYPES"]

#: cell types (codes of ``labels['cell_type']``)
CELL_TYPES: tuple[str, ...] = ("debris", "monocyte", "T", "B", "NK")
DEBRIS, MONO, T, B, NK = range(5)
T_SUBSETS: tuple[str, ...] = ("CD4", "CD8", "DP", "DN")
CD4_SUB, CD8_SUB, DP_SUB, DN_SUB = range(4)

#: fluorescence channel ($PnN) -> canonical marker, per panel, in file order
CORE_CHANNELS: dict[str, tuple[tuple[str, str], ...]] = {
    "t_cell": (("FITC-A", "CD3"), ("PerCP-Cy5.5-A", "CD8"), ("APC-H7-A", "CD4"), ("BV510-A", "Viability"),
               ("BV421-A", "PD1"), ("PE-A", "TIM3"), ("PE-Cy7-A", "LAG3"), ("APC-A", "CD45RA"),
               ("BV605-A", "CCR7")),
    "nk": (("FITC-A", "CD3"), ("BV510-A", "Viability"), ("PE-Cy7-A", "CD56"), ("APC-H7-A", "CD16"),
           ("PE-A", "LIR1"), ("BV421-A", "CD57"), ("APC-A", "NKG2A"), ("PerCP-Cy5.5-A", "CD19")),
}
#: passenger markers added by ``--extra-channels N`` (the first N), on detectors neither panel uses
EXTRA_CHANNELS: tuple[tuple[str, str], ...] = (
    ("BV650-A", "CD27"), ("BV711-A", "CD28"), ("BV786-A", "HLADR"), ("PE-CF594-A", "CD38"),
    ("AF700-A", "CD45"), ("BUV395-A", "CD14"), ("BUV737-A", "CD127"), ("PE-Cy5-A", "CD25"),
    ("BV570-A", "TIGIT"), ("BUV496-A", "CD20"),
)
#: $PnS spellings; batch i (0-based) uses ``spellings[i % len(spellings)]``
SPELLINGS: dict[str, tuple[str, ...]] = {
    "PD1": ("PD-1", "CD279", "PD1", "CD279 (PD-1)"),
    "TIM3": ("TIM-3", "CD366", "TIM3"),
    "LAG3": ("LAG-3", "CD223", "LAG3"),
    "LIR1": ("CD85j", "LIR-1", "ILT2"),
    "NKG2A": ("NKG2A", "CD159a"),
    "CD57": ("CD57",),
    "Viability": ("Live/Dead Aqua", "Viability", "Zombie Aqua"),
    "HLADR": ("HLA-DR",),
}

# detector -> (autofluorescence of a resting lymphocyte, electronic noise SD), in output units
DETECTORS: dict[str, tuple[float, float]] = {
    "FITC-A": (110, 30), "PerCP-Cy5.5-A": (60, 30), "PE-A": (70, 30), "PE-CF594-A": (50, 30),
    "PE-Cy5-A": (40, 30), "PE-Cy7-A": (35, 30), "APC-A": (30, 25), "AF700-A": (35, 25), "APC-H7-A": (30, 25),
    "BV421-A": (120, 30), "BV510-A": (150, 30), "BV570-A": (100, 30), "BV605-A": (80, 30),
    "BV650-A": (60, 30), "BV711-A": (50, 30), "BV786-A": (40, 30), "BUV395-A": (140, 30),
    "BUV496-A": (110, 30), "BUV737-A": (40, 30),
}
_DET_NAMES = tuple(DETECTORS)
_DET_INDEX = {d: i for i, d in enumerate(_DET_NAMES)}

#: base spillover: fraction of a fluorochrome's signal seen in another detector
SPILLOVER_BASE: dict[tuple[str, str], float] = {
    ("FITC-A", "PE-A"): 0.22, ("FITC-A", "PerCP-Cy5.5-A"): 0.03,
    ("PE-A", "FITC-A"): 0.01, ("PE-A", "PerCP-Cy5.5-A"): 0.06, ("PE-A", "PE-CF594-A"): 0.35,
    ("PE-A", "PE-Cy5-A"): 0.08, ("PE-A", "PE-Cy7-A"): 0.02,
    ("PE-CF594-A", "PE-A"): 0.05, ("PE-CF594-A", "PE-Cy5-A"): 0.25, ("PE-CF594-A", "PE-Cy7-A"): 0.06,
    ("PE-Cy5-A", "PerCP-Cy5.5-A"): 0.45, ("PE-Cy5-A", "APC-A"): 0.30, ("PE-Cy5-A", "AF700-A"): 0.15,
    ("PE-Cy5-A", "PE-Cy7-A"): 0.10,
    ("PerCP-Cy5.5-A", "PE-Cy7-A"): 0.08, ("PerCP-Cy5.5-A", "PE-Cy5-A"): 0.30,
    ("PerCP-Cy5.5-A", "BV711-A"): 0.04, ("PerCP-Cy5.5-A", "AF700-A"): 0.03,
    ("PE-Cy7-A", "APC-H7-A"): 0.10, ("PE-Cy7-A", "PE-A"): 0.01, ("PE-Cy7-A", "BV786-A"): 0.03,
    ("APC-A", "AF700-A"): 0.15, ("APC-A", "APC-H7-A"): 0.04, ("APC-A", "PE-Cy5-A"): 0.05,
    ("AF700-A", "APC-H7-A"): 0.15, ("AF700-A", "APC-A"): 0.02,
    ("APC-H7-A", "AF700-A"): 0.03, ("APC-H7-A", "PE-Cy7-A"): 0.03, ("APC-H7-A", "APC-A"): 0.02,
    ("BV421-A", "BV510-A"): 0.15, ("BV421-A", "BV570-A"): 0.04, ("BV421-A", "BV605-A"): 0.02,
    ("BV510-A", "BV570-A"): 0.25, ("BV510-A", "BV605-A"): 0.08,
    ("BV570-A", "BV605-A"): 0.35, ("BV570-A", "BV650-A"): 0.06,
    ("BV605-A", "BV650-A"): 0.35, ("BV605-A", "BV570-A"): 0.03, ("BV605-A", "PE-CF594-A"): 0.04,
    ("BV650-A", "BV711-A"): 0.25, ("BV650-A", "BV605-A"): 0.03, ("BV650-A", "APC-A"): 0.03,
    ("BV711-A", "BV786-A"): 0.20, ("BV711-A", "BV650-A"): 0.05, ("BV711-A", "AF700-A"): 0.02,
    ("BV786-A", "BV711-A"): 0.04, ("BV786-A", "APC-H7-A"): 0.02,
    ("BUV395-A", "BUV496-A"): 0.04, ("BUV395-A", "BV421-A"): 0.02,
    ("BUV496-A", "BV510-A"): 0.05, ("BUV496-A", "BUV395-A"): 0.01,
    ("BUV737-A", "BV711-A"): 0.05, ("BUV737-A", "BV786-A"): 0.08, ("BUV737-A", "AF700-A"): 0.02,
}
#: photon statistics: variance added = PHOTON_UNITS x detected signal
PHOTON_UNITS = 8.0
SPILL_JITTER_SD = 0.10   # per batch, log scale, on each off-diagonal coefficient
GAIN_SD = 0.06           # per batch, log scale, on each fluorochrome's brightness
AF_SD = 0.10             # per batch, log scale, on each detector's autofluorescence
CELL_AF_SD = 0.15        # per cell, log10 scale, shared by all detectors
AF_BY_TYPE = np.array([0.6, 2.5, 1.0, 1.0, 1.1])  # debris, monocyte, T, B, NK
DEAD_AF = 1.6
DEAD_STAIN = 0.5         # dead cells keep half their antibody signal
SCATTER_MAX = 262143.0
TIMESTEP = 0.01          # seconds per Time unit ($TIMESTEP)
EVENT_RATE = 2500.0      # events per second
QUANTUM = 64.0           # values are multiples of 1/64
MONO_DOUBLET, MONO_DEAD = 0.04, 0.04


@dataclass(frozen=True)
class Instrument:
    """One batch's cytometer: spillover (fluorochrome x detector), gains and autofluorescence."""

    spillover: np.ndarray
    gain: np.ndarray
    autofluorescence: np.ndarray
    noise: np.ndarray

    def matrix(self, channels: tuple[str, ...]) -> np.ndarray:
        """The spillover matrix restricted to ``channels`` (rows and columns in that order)."""
        idx = [_DET_INDEX[c] for c in channels]
        return self.spillover[np.ix_(idx, idx)].copy()


@lru_cache(maxsize=64)
def instrument(seed: int, batch_index: int) -> Instrument:
    """The cytometer of batch ``batch_index`` (every panel and control of the batch shares it)."""
    g = stream(seed, D_INSTRUMENT, batch_index)
    d = len(_DET_NAMES)
    spill = np.eye(d)
    jitter = g.standard_normal(len(SPILLOVER_BASE))
    for k, ((src, dst), v) in enumerate(SPILLOVER_BASE.items()):
        spill[_DET_INDEX[src], _DET_INDEX[dst]] = round(v * float(np.exp(SPILL_JITTER_SD * jitter[k])), 4)
    gain = np.exp(GAIN_SD * g.standard_normal(d))
    base_af = np.array([DETECTORS[c][0] for c in _DET_NAMES], dtype=np.float64)
    af = base_af * np.exp(AF_SD * g.standard_normal(d))
    noise = np.array([DETECTORS[c][1] for c in _DET_NAMES], dtype=np.float64)
    for a in (spill, gain, af, noise):
        a.setflags(write=False)
    return Instrument(spill, gain, af, noise)


def panel_channels(panel: str, extra_channels: int = 0) -> tuple[tuple[str, str], ...]:
    """Fluorescence channels of a panel and their canonical markers, in file order."""
    return CORE_CHANNELS[panel] + EXTRA_CHANNELS[:extra_channels]


def spelling(marker: str, batch_index: int) -> str:
    """How batch ``batch_index`` spells ``marker`` in ``$PnS``."""
    options = SPELLINGS.get(marker, (marker,))
    return options[batch_index % len(options)]


# --------------------------------------------------------------------------- labels
@dataclass
class _Labels:
    cell_type: np.ndarray
    t_subset: np.ndarray
    t_pattern: np.ndarray
    bright: np.ndarray
    nk_pattern: np.ndarray
    dead: np.ndarray
    doublet: np.ndarray

    @property
    def m(self) -> int:
        return int(self.cell_type.shape[0])

    def take(self, idx: np.ndarray) -> _Labels:
        return _Labels(*(getattr(self, f)[idx] for f in _LABEL_FIELDS))


_LABEL_FIELDS = ("cell_type", "t_subset", "t_pattern", "bright", "nk_pattern", "dead", "doublet")


def _block(k: int, cell_type: int, *, t_subset: int = -1, t_pattern: np.ndarray | None = None,
           bright: bool = False, nk_pattern: np.ndarray | None = None, dead: bool = False,
           doublet: bool | np.ndarray = False) -> _Labels:
    return _Labels(
        np.full(k, cell_type, np.int8), np.full(k, t_subset, np.int8),
        np.zeros(k, np.int8) if t_pattern is None else t_pattern.astype(np.int8),
        np.full(k, bright, bool), np.zeros(k, np.int8) if nk_pattern is None else nk_pattern.astype(np.int8),
        np.full(k, dead, bool), np.broadcast_to(np.asarray(doublet, bool), (k,)).copy())


def _concat(blocks: list[_Labels]) -> _Labels:
    return _Labels(*(np.concatenate([getattr(b, f) for b in blocks]) for f in _LABEL_FIELDS))


def _choose(rng: np.random.Generator, k: int, p: np.ndarray) -> np.ndarray:
    """k independent categorical draws with probabilities p (inverse CDF on uniforms)."""
    cdf = np.cumsum(p)
    cdf[-1] = 1.0
    return np.searchsorted(cdf, rng.random(k), side="right").astype(np.int8)


def _random_lymphocytes(rng: np.random.Generator, k: int, freq: Frequencies, *, dead: bool,
                        doublet: bool) -> _Labels:
    """k lymphocytes with lineage, subset and patterns drawn from ``freq`` (dead cells, doublets, partners)."""
    lineage = _choose(rng, k, freq.lineage) + T
    return _random_details(rng, lineage, freq, dead=dead, doublet=doublet)


def _random_details(rng: np.random.Generator, cell_type: np.ndarray, freq: Frequencies, *, dead: bool,
                    doublet: bool) -> _Labels:
    k = cell_type.shape[0]
    t_subset = np.where(cell_type == T, _choose(rng, k, freq.t_subsets), -1).astype(np.int8)
    cd4_pat = _choose(rng, k, freq.cd4_patterns)
    cd8_pat = _choose(rng, k, freq.cd8_patterns)
    t_pattern = np.where(t_subset == CD4_SUB, cd4_pat, np.where(t_subset >= 0, cd8_pat, 0)).astype(np.int8)
    bright = (cell_type == NK) & (rng.random(k) < freq.bright)
    bright_pat = _choose(rng, k, freq.bright_patterns)
    dim_pat = _choose(rng, k, freq.dim_patterns)
    nk_pattern = np.where(cell_type == NK, np.where(bright, bright_pat, dim_pat), 0).astype(np.int8)
    return _Labels(cell_type.astype(np.int8), t_subset, t_pattern, bright, nk_pattern,
                   np.full(k, dead, bool), np.full(k, doublet, bool))


def _labelled_cells(counts: Counts, freq: Frequencies, rng: np.random.Generator) -> tuple[_Labels, _Labels]:
    """Primary events (exactly ``counts``; unshuffled) and the partner cell of each doublet."""
    mono_doublet = rng.random(counts.monocytes) < MONO_DOUBLET
    mono_dead = (rng.random(counts.monocytes) < MONO_DEAD) & ~mono_doublet
    mono = _block(counts.monocytes, MONO, doublet=mono_doublet)
    mono.dead = mono_dead
    rep = np.repeat
    blocks = [
        _block(counts.debris, DEBRIS),
        mono,
        _random_lymphocytes(rng, counts.lymph_doublets, freq, dead=False, doublet=True),
        _random_lymphocytes(rng, counts.dead, freq, dead=True, doublet=False),
        _block(counts.cd4, T, t_subset=CD4_SUB, t_pattern=rep(np.arange(8), counts.cd4_patterns)),
        _block(counts.cd8, T, t_subset=CD8_SUB, t_pattern=rep(np.arange(8), counts.cd8_patterns)),
        _block(counts.dp, T, t_subset=DP_SUB, t_pattern=_choose(rng, counts.dp, freq.cd8_patterns)),
        _block(counts.dn, T, t_subset=DN_SUB, t_pattern=_choose(rng, counts.dn, freq.cd8_patterns)),
        _block(counts.b, B),
        _block(counts.bright, NK, bright=True, nk_pattern=rep(np.arange(8), counts.bright_patterns)),
        _block(counts.dim, NK, nk_pattern=rep(np.arange(8), counts.dim_patterns)),
    ]
    primary = _concat(blocks)
    # partners: a lymphocyte doublet pairs two lymphocytes; a monocyte doublet a monocyte with any cell
    n_mono_d = int(mono_doublet.sum())
    lymph_partners = _random_lymphocytes(rng, counts.lymph_doublets, freq, dead=False, doublet=False)
    mono_partner_type = np.where(rng.random(n_mono_d) < 0.5, MONO, _choose(rng, n_mono_d, freq.lineage) + T)
    mono_partners = _random_details(rng, mono_partner_type.astype(np.int8), freq, dead=False, doublet=False)
    # order partners like the doublets in ``primary`` (monocyte block comes first)
    return primary, _concat([mono_partners, lymph_partners])


# --------------------------------------------------------------------------- stains
_Rule = tuple[Callable[[_Labels], np.ndarray], float, float, float]  # (selector, fraction, log10 mean, log10 SD)


def _type(t: int) -> Callable[[_Labels], np.ndarray]:
    return lambda L: L.cell_type == t


def _tbit(bit: int, extra: Callable[[_Labels], np.ndarray] | None = None) -> Callable[[_Labels], np.ndarray]:
    def sel(L: _Labels) -> np.ndarray:
        m = (L.cell_type == T) & ((L.t_pattern & bit) > 0)
        return m if extra is None else m & extra(L)
    return sel


def _nkbit(bit: int) -> Callable[[_Labels], np.ndarray]:
    return lambda L: (L.cell_type == NK) & ((L.nk_pattern & bit) > 0)


def _cells(L: _Labels) -> np.ndarray:
    return L.cell_type != DEBRIS


#: marker -> stain rules; a cell selected by a rule (with probability ``fraction``) carries
#: 10 ** N(mean, SD) units of that marker's fluorochrome. Unselected cells carry none.
STAINS: dict[str, tuple[_Rule, ...]] = {
    "CD3": ((_type(T), 1.0, 3.9, 0.15),),
    "CD8": ((lambda L: (L.cell_type == T) & ((L.t_subset == CD8_SUB) | (L.t_subset == DP_SUB)), 1.0, 4.2, 0.15),
            (_type(NK), 0.3, 3.4, 0.25)),
    "CD4": ((lambda L: (L.cell_type == T) & ((L.t_subset == CD4_SUB) | (L.t_subset == DP_SUB)), 1.0, 3.85, 0.12),
            (_type(MONO), 1.0, 3.1, 0.15)),
    "Viability": ((lambda L: L.dead, 1.0, 4.3, 0.2), (_type(DEBRIS), 0.35, 3.6, 0.5)),
    "PD1": ((_tbit(PD1, lambda L: (L.t_pattern & TIM3) > 0), 1.0, 3.15, 0.3),
            (_tbit(PD1, lambda L: (L.t_pattern & TIM3) == 0), 1.0, 3.0, 0.3)),
    "TIM3": ((_tbit(TIM3), 1.0, 3.3, 0.24), (_type(MONO), 1.0, 3.3, 0.2), (_type(NK), 0.3, 3.0, 0.25)),
    "LAG3": ((_tbit(LAG3), 1.0, 3.25, 0.24),),
    "CD45RA": ((_type(T), 0.45, 3.8, 0.2), (_type(B), 0.9, 3.8, 0.2), (_type(NK), 0.9, 3.6, 0.2)),
    "CCR7": ((_type(T), 0.45, 3.3, 0.25), (_type(B), 0.8, 3.2, 0.25)),
    "CD56": ((lambda L: (L.cell_type == NK) & L.bright, 1.0, 4.35, 0.12),
             (lambda L: (L.cell_type == NK) & ~L.bright, 1.0, 3.35, 0.15), (_type(T), 0.05, 3.3, 0.2)),
    "CD16": ((lambda L: (L.cell_type == NK) & ~L.bright, 1.0, 4.05, 0.2), (_type(MONO), 0.15, 3.8, 0.2),
             (_type(T), 0.02, 3.3, 0.2)),
    "LIR1": ((_nkbit(LIR1), 1.0, 3.35, 0.22), (_type(B), 0.7, 3.3, 0.2), (_type(MONO), 0.9, 3.6, 0.2),
             (_type(T), 0.05, 3.2, 0.2)),
    "CD57": ((_nkbit(CD57), 1.0, 3.85, 0.25), (_type(T), 0.15, 3.7, 0.25)),
    "NKG2A": ((_nkbit(NKG2A), 1.0, 3.6, 0.22), (_type(T), 0.03, 3.4, 0.2)),
    "CD19": ((_type(B), 1.0, 4.0, 0.15),),
    "CD27": ((_type(T), 0.7, 3.6, 0.2), (_type(B), 0.4, 3.4, 0.2)),
    "CD28": ((_type(T), 0.7, 3.5, 0.2),),
    "HLADR": ((_type(B), 0.95, 4.0, 0.2), (_type(MONO), 0.95, 4.1, 0.2), (_type(T), 0.1, 3.3, 0.2)),
    "CD38": ((_type(B), 0.8, 3.6, 0.2), (_type(NK), 0.9, 3.5, 0.2), (_type(MONO), 0.8, 3.5, 0.2),
             (_type(T), 0.3, 3.2, 0.2)),
    "CD45": ((lambda L: (L.cell_type >= T), 1.0, 4.2, 0.1), (_type(MONO), 1.0, 4.0, 0.1)),
    "CD14": ((_type(MONO), 0.95, 4.1, 0.15),),
    "CD127": ((_type(T), 0.6, 3.2, 0.2),),
    "CD25": ((lambda L: (L.cell_type == T) & (L.t_subset == CD4_SUB), 0.1, 3.3, 0.25),),
    "TIGIT": ((_type(T), 0.25, 3.2, 0.25), (_type(NK), 0.4, 3.2, 0.25)),
    "CD20": ((_type(B), 0.95, 4.0, 0.15),),
}


def _stain(marker: str, L: _Labels, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(L.m)
    for select, fraction, mean, sd in STAINS[marker]:
        mask = select(L)
        if fraction < 1.0:
            mask = mask & (rng.random(L.m) < fraction)
        k = int(np.count_nonzero(mask))
        if k:
            out[mask] += 10.0 ** (mean + sd * rng.standard_normal(k))
    if marker != "Viability":
        out[L.dead] *= DEAD_STAIN
    return out


# --------------------------------------------------------------------------- scatter
_SCATTER = {  # cell type -> (FSC-A mean, FSC-A SD, log10 SSC-A mean, log10 SSC-A SD)
    T: (52000.0, 6000.0, 4.12, 0.08), B: (54000.0, 6000.0, 4.12, 0.08), NK: (56000.0, 6000.0, 4.22, 0.08),
    MONO: (95000.0, 11000.0, 4.6, 0.09),
}
_DEBRIS_FSC, _DEBRIS_SSC = (3.9, 0.25), (3.7, 0.35)
SINGLET_HEIGHT = (0.86, 0.025)   # FSC-H / FSC-A of a single cell
DOUBLET_HEIGHT = (1.2, 0.08)     # FSC-H of a doublet / the taller cell's FSC-H
DEAD_FSC, DEAD_SSC = 0.78, 1.25


def _scatter(L: _Labels, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = L.m
    z = rng.standard_normal((3, m))
    fsc = np.empty(m)
    ssc = np.empty(m)
    deb = L.cell_type == DEBRIS
    fsc[deb] = 10.0 ** (_DEBRIS_FSC[0] + _DEBRIS_FSC[1] * z[0, deb])
    ssc[deb] = 10.0 ** (_DEBRIS_SSC[0] + _DEBRIS_SSC[1] * z[1, deb])
    for t, (fm, fs, sm, ss) in _SCATTER.items():
        sel = L.cell_type == t
        fsc[sel] = fm + fs * z[0, sel]
        ssc[sel] = 10.0 ** (sm + ss * z[1, sel])
    fsc[L.dead] *= DEAD_FSC
    ssc[L.dead] *= DEAD_SSC
    fsc = np.maximum(fsc, 200.0)
    height = fsc * (SINGLET_HEIGHT[0] + SINGLET_HEIGHT[1] * z[2])
    return fsc, height, ssc


# --------------------------------------------------------------------------- events
@dataclass(frozen=True)
class EventData:
    """What :func:`make_events` returns (wrapped by :class:`immunoprofile.simulate.SimulatedSample`)."""

    events: np.ndarray
    channels: tuple[str, ...]
    markers: tuple[str, ...]
    spillover: tuple[tuple[str, ...], np.ndarray]
    membership: Mapping[str, np.ndarray]
    labels: Mapping[str, np.ndarray]
    acquisition_seconds: float


def _quantise(x: np.ndarray) -> np.ndarray:
    return (np.rint(x * QUANTUM) / QUANTUM).astype(np.float32)


def make_events(design: CohortDesign, spec: SampleSpec, freq: Frequencies, counts: Counts) -> EventData:
    """Make the events of one sample whose counts have been drawn.

    The events come from the stream ``(seed, EVENTS, patient, timepoint, panel)``, or
    ``(seed, FMO_EVENTS, batch, panel, marker)`` for an FMO control.
    """
    tp = spec.timepoint
    if spec.control is None:
        rng = stream(design.seed, D_EVENTS, spec.patient, tp.index, spec.panel_index)
    else:
        rng = stream(design.seed, D_FMO_EVENTS, tp.index, spec.panel_index,
                     FMO_MARKERS[spec.panel].index(spec.control))
    inst = instrument(design.seed, tp.index)
    primary, partners = _labelled_cells(counts, freq, rng)
    n = primary.m
    cells = _concat([primary, partners])
    doublet_rows = np.flatnonzero(primary.doublet)
    assert doublet_rows.shape[0] == partners.m
    partner_rows = n + np.arange(partners.m)

    fluor = panel_channels(spec.panel, design.extra_channels)
    fl_names = tuple(c for c, _m in fluor)
    det = np.array([_DET_INDEX[c] for c in fl_names])
    # stained signal of each fluorochrome (brightness scaled by the batch's gain)
    signal = []   # one contiguous column per fluorochrome
    for j, (_chan, marker) in enumerate(fluor):
        col = _stain(marker, cells, rng)
        if spec.control is not None and marker == spec.control:
            col[:] = 0.0   # FMO: the antibody is absent
        signal.append(col * inst.gain[det[j]])
    cell_af = 10.0 ** (CELL_AF_SD * rng.standard_normal(cells.m)) * AF_BY_TYPE[cells.cell_type]
    cell_af[cells.dead] *= DEAD_AF
    fsc, height, ssc = _scatter(cells, rng)

    # doublets: add the partner cell (signals, autofluorescence, area); height grows a little
    for col in (*signal, cell_af, fsc, ssc):
        col[doublet_rows] += col[partner_rows]
    tall = np.maximum(height[doublet_rows], height[partner_rows])
    height[doublet_rows] = tall * (DOUBLET_HEIGHT[0] + DOUBLET_HEIGHT[1] * rng.standard_normal(doublet_rows.shape[0]))

    # acquisition order is random: shuffle the cells (time increases with the row)
    order = rng.permutation(n)
    signal = [col[order] for col in signal]
    cell_af, fsc, height, ssc = cell_af[order], fsc[order], height[order], ssc[order]
    labels = primary.take(order)

    # detectors: spillover (elementwise, in a fixed order: no BLAS, same bytes everywhere),
    # then photon and electronic noise
    spill = inst.matrix(fl_names)
    p = len(fluor)
    columns = np.empty((p + 4, n), dtype=np.float32)   # one row per channel; transposed at the end
    columns[0] = _quantise(np.clip(fsc, 0.0, SCATTER_MAX))
    columns[1] = _quantise(np.clip(height, 0.0, SCATTER_MAX))
    columns[2] = _quantise(np.clip(ssc, 0.0, SCATTER_MAX))
    del fsc, height, ssc
    for j in range(p):
        col = cell_af * inst.autofluorescence[det[j]]
        for i in range(p):
            if spill[i, j] != 0.0:
                col += signal[i] * spill[i, j]
        sd = np.sqrt(PHOTON_UNITS * np.maximum(col, 0.0) + inst.noise[det[j]] ** 2)
        col += sd * rng.standard_normal(n)
        columns[3 + j] = _quantise(np.minimum(col, SCATTER_MAX))
    del signal
    seconds = np.cumsum(rng.exponential(1.0 / EVENT_RATE, n))
    columns[3 + p] = _quantise(seconds / TIMESTEP)
    out = np.ascontiguousarray(columns.T)
    del columns

    markers = tuple("" if (spec.control is not None and mk == spec.control) else spelling(mk, tp.index)
                    for _c, mk in fluor)
    return EventData(
        events=out,
        channels=("FSC-A", "FSC-H", "SSC-A", *fl_names, "Time"),
        markers=("", "", "", *markers, ""),
        spillover=(fl_names, spill),
        membership=membership(labels, spec.panel, spec.control),
        labels={f: getattr(labels, f) for f in _LABEL_FIELDS},
        acquisition_seconds=float(seconds[-1]) if n else 0.0,
    )


def membership(labels: _Labels, panel: str, control: str | None = None) -> dict[str, np.ndarray]:
    """Per-event membership of each population of ``panel`` (the simulator's truth)."""
    L = labels
    lymph = L.cell_type >= T
    base = {"lymphocytes": lymph}
    base["singlets"] = lymph & ~L.doublet
    base["live"] = base["singlets"] & ~L.dead
    live = base["live"]
    base["T cells"] = live & (L.cell_type == T)
    base["CD4 T"] = base["T cells"] & (L.t_subset == CD4_SUB)
    base["CD8 T"] = base["T cells"] & (L.t_subset == CD8_SUB)
    base["NK cells"] = live & (L.cell_type == NK)
    base["CD56bright NK"] = base["NK cells"] & L.bright
    base["CD56dim NK"] = base["NK cells"] & ~L.bright
    off = control_bit(panel, control)
    out: dict[str, np.ndarray] = {}
    for pop in POPULATIONS[panel]:
        if not pop.subset:
            out[pop.name] = base[pop.name]
            continue
        parent = base[pop.parent]
        if pop.mask & off:
            out[pop.name] = np.zeros_like(parent)
            continue
        pattern = L.nk_pattern if pop.subset == "NK" else L.t_pattern
        out[pop.name] = parent & ((pattern & pop.mask) == pop.mask)
    for v in out.values():
        v.setflags(write=False)
    return out
