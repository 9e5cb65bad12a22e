"""The simulator's biology: cohort design, effect model, true frequencies and counts.

This module holds everything the simulator decides *before* it makes events:

* the cohort design (patients, response groups, timepoints, days, batches);
* per patient and timepoint, the true frequencies of every population, drawn
  from a random-effects model on the logit scale (see :data:`PARAMETERS` and
  :data:`EFFECTS`; ``docs/simulator.md`` states the numbers);
* per sample, the counts of every population, drawn with binomial and
  multinomial draws from those frequencies.

:func:`cohort_truth` stops there and returns a ``populations.csv``-shaped table
in milliseconds; :mod:`immunoprofile.simulate_events` turns the same counts into
events, so the counts of :func:`cohort_truth` equal those of ``truth.csv`` for
the same arguments.

Randomness comes from :class:`numpy.random.SeedSequence` streams keyed by
``(seed, domain, ...)`` (:func:`stream`); a stream depends only on its key, so
a patient's values do not depend on how many patients or panels are simulated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import UsageError

__all__ = [
    "PANELS", "GROUPS", "DEFAULT_TIMEPOINTS", "KNOWN_DAYS", "FMO_MARKERS", "POPULATIONS",
    "PARAMETERS", "EFFECTS", "Timepoint", "CohortDesign", "SampleSpec", "Frequencies", "Counts",
    "design_cohort", "schedule_timepoints", "stream", "patient_parameters", "sample_frequencies",
    "pool_frequencies", "draw_counts", "population_counts", "cohort_truth", "expected_fractions",
    "typical_fractions",
]

PANELS: tuple[str, ...] = ("t_cell", "nk")
GROUPS: tuple[str, ...] = ("responder", "stable", "progressive")
DEFAULT_TIMEPOINTS: tuple[str, ...] = ("pre", "post_clofarabine", "post_lenalidomide")
#: days since the start of clofarabine for the trial's named timepoints
KNOWN_DAYS: dict[str, int] = {"pre": 0, "post_clofarabine": 10, "post_lenalidomide": 56}
#: phase of the trial's named timepoints (others: by position, see :func:`schedule_timepoints`)
KNOWN_PHASES: dict[str, str] = {"pre": "baseline", "post_clofarabine": "clofarabine",
                                "post_lenalidomide": "lenalidomide"}
#: days between consecutive timepoints whose names the simulator does not know
CUSTOM_SPACING_DAYS = 28
#: dim markers with an FMO control per batch, in file order
FMO_MARKERS: dict[str, tuple[str, ...]] = {"t_cell": ("PD1", "LAG3", "TIM3"), "nk": ("LIR1", "CD57", "NKG2A")}
MAX_PATIENTS = 999
MIN_EVENTS = 100
MAX_EVENTS = 20_000_000
MAX_EFFECT_SIZE = 10.0

# Bits of the marker patterns: T cells (PD1, LAG3, TIM3), NK cells (CD57, LIR1, NKG2A).
PD1, LAG3, TIM3 = 1, 2, 4
CD57, LIR1, NKG2A = 1, 2, 4
#: the marker each bit stands for, per pattern kind
PATTERN_BITS: dict[str, dict[str, int]] = {"t": {"PD1": PD1, "LAG3": LAG3, "TIM3": TIM3},
                                           "nk": {"CD57": CD57, "LIR1": LIR1, "NKG2A": NKG2A}}


@dataclass(frozen=True)
class Population:
    """A population of the bundled templates, as the simulator defines its truth.

    ``subset`` names the parent block whose marker pattern decides membership
    (``'CD4'``, ``'CD8'`` or ``'NK'``); ``mask`` the pattern bits that must all be set.
    """

    name: str
    parent: str
    subset: str = ""
    mask: int = 0


def _t_populations() -> tuple[Population, ...]:
    combos = (("PD1+", PD1), ("LAG3+", LAG3), ("TIM3+", TIM3), ("PD1+LAG3+", PD1 | LAG3),
              ("PD1+TIM3+", PD1 | TIM3), ("PD1+LAG3+TIM3+", PD1 | LAG3 | TIM3))
    pops = [Population("T cells", "live"), Population("CD4 T", "T cells"), Population("CD8 T", "T cells")]
    for x in ("CD4", "CD8"):
        pops += [Population(f"{x} {label}", f"{x} T", x, mask) for label, mask in combos]
    return tuple(pops)


_COMMON = (Population("lymphocytes", "root"), Population("singlets", "lymphocytes"),
           Population("live", "singlets"))
#: populations per panel (names and parents of the bundled templates)
POPULATIONS: dict[str, tuple[Population, ...]] = {
    "t_cell": _COMMON + _t_populations(),
    "nk": _COMMON + (
        Population("NK cells", "live"), Population("CD56bright NK", "NK cells"),
        Population("CD56dim NK", "NK cells"),
        Population("NK CD57+", "NK cells", "NK", CD57), Population("NK LIR1+", "NK cells", "NK", LIR1),
        Population("NK CD57+LIR1+", "NK cells", "NK", CD57 | LIR1),
        Population("NK NKG2A+", "NK cells", "NK", NKG2A),
    ),
}

# --------------------------------------------------------------------------- effect model
#: (name, baseline value, scale, patient-to-patient SD). ``scale`` is ``logit`` (value is a
#: probability), ``logratio`` (value is a ratio to the reference class) or ``log``.
PARAMETERS: tuple[tuple[str, float, str, float], ...] = (
    ("debris", 0.10, "logit", 0.3),            # P(event is debris)
    ("lymph", 0.70, "logit", 0.5),             # P(cell is a lymphocyte | not debris); else monocyte
    ("doublet", 0.03, "logit", 0.25),          # P(lymphocyte event is a doublet)
    ("dead", 0.06, "logit", 0.4),              # P(singlet lymphocyte is dead)
    ("B/T", 0.12 / 0.66, "logratio", 0.5),     # live lymphocytes: B, NK relative to T
    ("NK/T", 0.22 / 0.66, "logratio", 0.5),
    ("CD8/CD4", 0.32 / 0.58, "logratio", 0.45),  # T cells: CD8, DP, DN relative to CD4
    ("DP/CD4", 0.02 / 0.58, "logratio", 0.3),
    ("DN/CD4", 0.08 / 0.58, "logratio", 0.3),
    ("CD4 PD1", 0.25, "logit", 0.6),           # P(PD1+ | CD4 T)
    ("CD4 TIM3|PD1+", 0.22, "logit", 0.5),
    ("CD4 TIM3|PD1-", 0.03, "logit", 0.4),
    ("CD4 LAG3|PD1+", 0.18, "logit", 0.5),     # +1.0 logit when TIM3+ as well
    ("CD4 LAG3|PD1-", 0.02, "logit", 0.4),     # +0.7 logit when TIM3+ as well
    ("CD8 PD1", 0.35, "logit", 0.6),
    ("CD8 TIM3|PD1+", 0.30, "logit", 0.5),
    ("CD8 TIM3|PD1-", 0.05, "logit", 0.4),
    ("CD8 LAG3|PD1+", 0.22, "logit", 0.5),
    ("CD8 LAG3|PD1-", 0.03, "logit", 0.4),
    ("NK bright", 0.10, "logit", 0.4),         # P(CD56bright | NK)
    ("NK CD57", 0.45, "logit", 0.7),           # P(CD57+ | CD56dim NK)
    ("NK LIR1|CD57+", 0.55, "logit", 0.5),
    ("NK LIR1|CD57-", 0.20, "logit", 0.5),
    ("NK NKG2A|CD57+", 0.25, "logit", 0.5),    # -0.5 logit when LIR1+ as well
    ("NK NKG2A|CD57-", 0.60, "logit", 0.5),
    ("lymphocytes/ul", 1400.0, "log", 0.45),   # absolute lymphocyte count (blood count)
)
_INDEX = {name: i for i, (name, *_rest) in enumerate(PARAMETERS)}
_K = len(PARAMETERS)
#: SD of the patient x timepoint deviation (same at every timepoint: the null holds exactly)
TIMEPOINT_SD = 0.25
#: SD of the pooled FMO donor's per-batch deviation
POOL_SD = 0.15
#: weight of the shared "exhaustion" factor in the patient effects of PD1/TIM3/LAG3
EXHAUSTION_LOADING = 0.6
_EXHAUSTION = tuple(_INDEX[n] for n in ("CD4 PD1", "CD4 TIM3|PD1+", "CD4 LAG3|PD1+",
                                          "CD8 PD1", "CD8 TIM3|PD1+", "CD8 LAG3|PD1+"))
#: parameters that move "variably" (patient-specific direction) during lenalidomide
_VARIABLE = tuple(i for i, (name, *_r) in enumerate(PARAMETERS)
                  if name.startswith(("CD4 ", "CD8 ", "NK CD57", "NK LIR1", "NK NKG2A")))

#: Shifts at effect size 1 on each parameter's scale (logit, log ratio or log).
#: ``all``: every patient; a group's entry adds to it. ``clofarabine`` applies at the
#: second timepoint; at ``lenalidomide`` timepoints the shift is LENALIDOMIDE_CARRY x the
#: clofarabine shift plus a patient-specific N(0, LENALIDOMIDE_SD[group]) on the markers.
EFFECTS: dict[str, dict[str, float]] = {
    "all": {"debris": 0.5, "lymph": -0.9, "dead": 0.8, "B/T": -1.0, "NK/T": 0.5,
            "NK bright": 0.6, "lymphocytes/ul": -1.5},
    "responder": {"CD4 PD1": -1.0, "CD4 TIM3|PD1+": -0.6, "CD4 LAG3|PD1+": -0.6,
                  "CD8 PD1": -0.6, "CD8 TIM3|PD1+": -0.5, "CD8 LAG3|PD1+": -0.5,
                  "NK CD57": -0.8, "NK LIR1|CD57+": -0.8, "NK NKG2A|CD57-": 0.3},
    "stable": {},        # 0.6 x responder (filled in below)
    "progressive": {},   # no planted change
}
EFFECTS["stable"] = {k: round(0.6 * v, 6) for k, v in EFFECTS["responder"].items()}
LENALIDOMIDE_CARRY = {"all": 0.4, "responder": 0.5, "stable": 0.5, "progressive": 0.0}
LENALIDOMIDE_SD = {"responder": 0.6, "stable": 0.6, "progressive": 0.2}

# Fixed (not patient-specific) pattern probabilities of CD56bright NK cells.
_BRIGHT_CD57, _BRIGHT_LIR1, _BRIGHT_NKG2A = 0.03, 0.08, 0.92

# Stream domains (first element of every spawn key).
D_PATIENT, D_PATIENT_TIME, D_INSTRUMENT, D_POOL, D_COUNTS, D_EVENTS, D_FMO_COUNTS, D_FMO_EVENTS = range(1, 9)


def _baseline() -> np.ndarray:
    out = np.empty(_K)
    for i, (_name, value, scale, _sd) in enumerate(PARAMETERS):
        out[i] = np.log(value / (1 - value)) if scale == "logit" else np.log(value)
    return out


_BASE = _baseline()
_PATIENT_SD = np.array([p[3] for p in PARAMETERS])


def _shift_vector(entries: dict[str, float]) -> np.ndarray:
    v = np.zeros(_K)
    for name, shift in entries.items():
        v[_INDEX[name]] = shift
    return v


_SHIFT = {g: _shift_vector(EFFECTS["all"]) + _shift_vector(EFFECTS[g]) for g in GROUPS}
_SHIFT_LEN = {g: LENALIDOMIDE_CARRY["all"] * _shift_vector(EFFECTS["all"])
              + LENALIDOMIDE_CARRY[g] * _shift_vector(EFFECTS[g]) for g in GROUPS}
_VARIABLE_MASK = np.zeros(_K)
_VARIABLE_MASK[list(_VARIABLE)] = 1.0
_POOL_SHIFT = {"clofarabine": np.mean([_SHIFT[g] for g in GROUPS], axis=0),
               "lenalidomide": np.mean([_SHIFT_LEN[g] for g in GROUPS], axis=0)}


# --------------------------------------------------------------------------- design
@dataclass(frozen=True)
class Timepoint:
    """One timepoint of the cohort; each timepoint is acquired as its own batch."""

    name: str
    index: int
    day: int
    phase: str   # 'baseline', 'clofarabine' or 'lenalidomide'
    batch: str   # 'B1', 'B2', ...


@dataclass(frozen=True)
class CohortDesign:
    """A validated cohort: who is sampled when, with which panels, how many events."""

    patients: int
    timepoints: tuple[Timepoint, ...]
    panels: tuple[str, ...]
    events: int
    effect_size: float
    seed: int
    extra_channels: int = 0

    def patient_id(self, i: int) -> str:
        """``'P01'`` for patient index 0 (three digits beyond 99 patients)."""
        return f"P{i + 1:0{2 if self.patients < 100 else 3}d}"

    def timepoint(self, name: str) -> Timepoint:
        """The timepoint called ``name``."""
        for tp in self.timepoints:
            if tp.name == name:
                return tp
        raise UsageError(f"timepoint {name!r} is not one of {', '.join(t.name for t in self.timepoints)}")


def group_of(patient: int) -> str:
    """Response group of a patient index (round-robin responder, stable, progressive)."""
    return GROUPS[patient % len(GROUPS)]


@dataclass(frozen=True)
class SampleSpec:
    """One FCS file to simulate: a patient's stained tube, or a batch's FMO control."""

    sample_id: str
    panel: str
    timepoint: Timepoint
    patient: int | None = None      # None for an FMO control
    control: str | None = None      # the marker left out of an FMO control

    @property
    def panel_index(self) -> int:
        return PANELS.index(self.panel)


_TIMEPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def schedule_timepoints(names: Sequence[str]) -> tuple[Timepoint, ...]:
    """Days, phases and batches of the timepoints ``names`` (in sampling order).

    The trial's timepoints have fixed days (``pre`` 0, ``post_clofarabine`` 10,
    ``post_lenalidomide`` 56). Another name gets the previous timepoint's day plus
    28 (day 0 if it comes first) and a phase by position: first baseline, second
    clofarabine, later lenalidomide. Timepoint *i* is batch ``B{i+1}``.

    Raises
    ------
    UsageError
        If a name is empty, repeated, not file-name safe, or the days do not increase.
    """
    if isinstance(names, str):
        names = names.split(",")
    names = [n.strip() for n in names]
    if not names or any(not n for n in names):
        raise UsageError("--timepoints needs one or more comma-separated names, e.g. pre,post_clofarabine")
    for n in names:
        if not _TIMEPOINT_NAME.match(n):
            raise UsageError(f"timepoint name {n!r} may hold only letters, digits, '_' and '-' "
                             "(it becomes part of file names)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"timepoint(s) {', '.join(dupes)} given more than once in --timepoints")
    out: list[Timepoint] = []
    for i, n in enumerate(names):
        if n in KNOWN_DAYS:
            day, phase = KNOWN_DAYS[n], KNOWN_PHASES[n]
        else:
            day = 0 if i == 0 else out[-1].day + CUSTOM_SPACING_DAYS
            phase = ("baseline", "clofarabine")[i] if i < 2 else "lenalidomide"
        if out and day <= out[-1].day:
            raise UsageError(f"timepoint {n!r} (day {day}) comes after {out[-1].name!r} (day {out[-1].day}); "
                             "list timepoints in the order they were sampled")
        out.append(Timepoint(n, i, day, phase, f"B{i + 1}"))
    return tuple(out)


def design_cohort(
    patients: int = 8,
    timepoints: Sequence[str] = DEFAULT_TIMEPOINTS,
    events: int = 50_000,
    panels: Sequence[str] = PANELS,
    effect_size: float = 1.0,
    seed: int = 0,
    extra_channels: int = 0,
) -> CohortDesign:
    """Validate the simulator's options into a :class:`CohortDesign`.

    Raises
    ------
    UsageError
        If an option is out of range (patients 1-999, events 100-20,000,000, known and
        distinct panels, a finite ``|effect_size| <= 10``, a seed >= 0, extra channels
        within what the instrument offers).
    """
    from .simulate_events import EXTRA_CHANNELS  # the instrument defines what is available

    if isinstance(patients, bool) or not isinstance(patients, (int, np.integer)) or not 1 <= patients <= MAX_PATIENTS:
        raise UsageError(f"--patients must be a whole number from 1 to {MAX_PATIENTS}, got {patients!r}")
    if isinstance(events, bool) or not isinstance(events, (int, np.integer)) or not MIN_EVENTS <= events <= MAX_EVENTS:
        raise UsageError(f"--events must be a whole number from {MIN_EVENTS} to {MAX_EVENTS:,}, got {events!r}")
    panel_list = [p.strip() for p in (panels.split(",") if isinstance(panels, str) else panels)]
    if not panel_list or any(p not in PANELS for p in panel_list):
        bad = [p for p in panel_list if p not in PANELS]
        raise UsageError(f"unknown panel(s) {', '.join(map(repr, bad)) or '(none given)'} in --panels; "
                         f"choose from {', '.join(PANELS)}")
    if len(set(panel_list)) != len(panel_list):
        raise UsageError("a panel is given more than once in --panels")
    try:
        effect = float(effect_size)
    except (TypeError, ValueError):
        raise UsageError(f"--effect-size must be a number, got {effect_size!r}") from None
    if not np.isfinite(effect) or abs(effect) > MAX_EFFECT_SIZE:
        raise UsageError(f"--effect-size must be a finite number between -{MAX_EFFECT_SIZE:g} and "
                         f"{MAX_EFFECT_SIZE:g} (0 = null cohort, 1 = the documented effects), got {effect_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"--seed must be a whole number >= 0, got {seed!r}")
    if (isinstance(extra_channels, bool) or not isinstance(extra_channels, (int, np.integer))
            or not 0 <= extra_channels <= len(EXTRA_CHANNELS)):
        raise UsageError(f"--extra-channels must be from 0 to {len(EXTRA_CHANNELS)}, got {extra_channels!r}")
    ordered = tuple(p for p in PANELS if p in panel_list)
    return CohortDesign(int(patients), schedule_timepoints(timepoints), ordered, int(events), effect,
                        int(seed), int(extra_channels))


# --------------------------------------------------------------------------- randomness
def stream(seed: int, *key: int) -> np.random.Generator:
    """An independent random stream for ``key`` (a SeedSequence spawn key) under ``seed``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


# --------------------------------------------------------------------------- frequencies
@dataclass(frozen=True)
class Frequencies:
    """True probabilities that generate one sample (one patient at one timepoint).

    Pattern arrays have 8 entries indexed by the bits ``PD1|LAG3|TIM3`` (T cells) or
    ``CD57|LIR1|NKG2A`` (NK cells).
    """

    classes: np.ndarray      # P(debris, monocyte, lymphocyte) of an event
    doublet: float           # P(doublet | lymphocyte event)
    dead: float              # P(dead | singlet lymphocyte)
    lineage: np.ndarray      # P(T, B, NK | live lymphocyte)
    t_subsets: np.ndarray    # P(CD4, CD8, DP, DN | T)
    cd4_patterns: np.ndarray
    cd8_patterns: np.ndarray
    bright: float            # P(CD56bright | NK)
    bright_patterns: np.ndarray
    dim_patterns: np.ndarray
    lymphocytes_per_ul: float


def _sig(x: float) -> float:
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(logits: Sequence[float]) -> np.ndarray:
    e = np.exp(np.asarray(logits, dtype=np.float64))
    return e / e.sum()


def _t_patterns(pd1: float, tim3_pos: float, tim3_neg: float, lag3_pos: float, lag3_neg: float,
                lag3_tim3_boost: float) -> np.ndarray:
    out = np.zeros(8)
    for p in (0, 1):
        pp = _sig(pd1) if p else 1 - _sig(pd1)
        t_logit = tim3_pos if p else tim3_neg
        for t in (0, 1):
            pt = _sig(t_logit) if t else 1 - _sig(t_logit)
            l_logit = (lag3_pos if p else lag3_neg) + (lag3_tim3_boost * (1.0 if p else 0.7) if t else 0.0)
            for lag in (0, 1):
                pl = _sig(l_logit) if lag else 1 - _sig(l_logit)
                out[p * PD1 + lag * LAG3 + t * TIM3] = pp * pt * pl
    return out / out.sum()


def _nk_patterns(cd57: float, lir1_pos: float, lir1_neg: float, nkg2a_pos: float, nkg2a_neg: float) -> np.ndarray:
    out = np.zeros(8)
    for c in (0, 1):
        pc = _sig(cd57) if c else 1 - _sig(cd57)
        for lir in (0, 1):
            pl_ = _sig(lir1_pos if c else lir1_neg)
            pl = pl_ if lir else 1 - pl_
            pn_ = _sig((nkg2a_pos if c else nkg2a_neg) - (0.5 if lir else 0.0))
            for n in (0, 1):
                out[c * CD57 + lir * LIR1 + n * NKG2A] = pc * pl * (pn_ if n else 1 - pn_)
    return out / out.sum()


def _bright_patterns() -> np.ndarray:
    out = np.zeros(8)
    for c in (0, 1):
        for lir in (0, 1):
            for n in (0, 1):
                out[c * CD57 + lir * LIR1 + n * NKG2A] = (
                    (_BRIGHT_CD57 if c else 1 - _BRIGHT_CD57) * (_BRIGHT_LIR1 if lir else 1 - _BRIGHT_LIR1)
                    * (_BRIGHT_NKG2A if n else 1 - _BRIGHT_NKG2A))
    return out


_BRIGHT_PATTERNS = _bright_patterns()
_MASKS = np.arange(8)


def frequencies_from_parameters(theta: np.ndarray) -> Frequencies:
    """Turn a parameter vector (on the scales of :data:`PARAMETERS`) into probabilities."""
    th = [float(x) for x in theta]
    p_debris, p_lymph = _sig(th[0]), _sig(th[1])
    classes = np.array([p_debris, (1 - p_debris) * (1 - p_lymph), (1 - p_debris) * p_lymph])
    return Frequencies(
        classes=classes / classes.sum(),
        doublet=_sig(th[2]),
        dead=_sig(th[3]),
        lineage=_softmax([0.0, th[4], th[5]]),
        t_subsets=_softmax([0.0, th[6], th[7], th[8]]),
        cd4_patterns=_t_patterns(th[9], th[10], th[11], th[12], th[13], 1.0),
        cd8_patterns=_t_patterns(th[14], th[15], th[16], th[17], th[18], 1.0),
        bright=_sig(th[19]),
        bright_patterns=_BRIGHT_PATTERNS,
        dim_patterns=_nk_patterns(th[20], th[21], th[22], th[23], th[24]),
        lymphocytes_per_ul=float(np.exp(th[25])),
    )


@dataclass(frozen=True)
class PatientDraws:
    """A patient's random effects (baseline deviation and lenalidomide-phase direction)."""

    baseline: np.ndarray
    lenalidomide: np.ndarray


def patient_parameters(seed: int, patient: int) -> PatientDraws:
    """The patient's random effects, from the stream ``(seed, PATIENT, patient)``."""
    g = stream(seed, D_PATIENT, patient)
    shared = g.standard_normal()
    own = g.standard_normal(_K)
    variable = g.standard_normal(_K)
    z = own.copy()
    idx = list(_EXHAUSTION)
    z[idx] = EXHAUSTION_LOADING * shared + np.sqrt(1 - EXHAUSTION_LOADING ** 2) * own[idx]
    return PatientDraws(_BASE + _PATIENT_SD * z, variable * _VARIABLE_MASK)


def _time_shift(phase: str, group: str, effect_size: float, draws: PatientDraws) -> np.ndarray:
    if phase == "baseline" or effect_size == 0:
        return np.zeros(_K)
    if phase == "clofarabine":
        return effect_size * _SHIFT[group]
    return effect_size * (_SHIFT_LEN[group] + LENALIDOMIDE_SD[group] * draws.lenalidomide)


def sample_parameters(design: CohortDesign, patient: int, timepoint: Timepoint,
                      draws: PatientDraws | None = None) -> np.ndarray:
    """A patient's parameter vector at a timepoint: baseline + planted shift + timepoint noise."""
    if draws is None:
        draws = patient_parameters(design.seed, patient)
    noise = stream(design.seed, D_PATIENT_TIME, patient, timepoint.index).standard_normal(_K)
    return (draws.baseline + _time_shift(timepoint.phase, group_of(patient), design.effect_size, draws)
            + TIMEPOINT_SD * noise)


def sample_frequencies(design: CohortDesign, patient: int, timepoint: Timepoint) -> Frequencies:
    """True frequencies of one patient at one timepoint (the same for every panel)."""
    return frequencies_from_parameters(sample_parameters(design, patient, timepoint))


def pool_frequencies(design: CohortDesign, timepoint: Timepoint) -> Frequencies:
    """True frequencies of the pooled donor whose cells make a batch's FMO controls.

    The pool sits at the population means, shifted by the average planted effect of the
    batch's phase, plus a small per-batch deviation (SD :data:`POOL_SD`).
    """
    shift = np.zeros(_K) if timepoint.phase == "baseline" else design.effect_size * _POOL_SHIFT[timepoint.phase]
    noise = stream(design.seed, D_POOL, timepoint.index).standard_normal(_K)
    return frequencies_from_parameters(_BASE + shift + POOL_SD * noise)


def expected_fractions(freq: Frequencies, panel: str) -> dict[str, float]:
    """Expected fraction of parent of each population of ``panel`` under ``freq`` (no sampling noise)."""
    fixed = {"lymphocytes": freq.classes[2], "singlets": 1 - freq.doublet, "live": 1 - freq.dead,
             "T cells": freq.lineage[0], "NK cells": freq.lineage[2], "CD4 T": freq.t_subsets[0],
             "CD8 T": freq.t_subsets[1], "CD56bright NK": freq.bright, "CD56dim NK": 1 - freq.bright}
    patterns = {"CD4": freq.cd4_patterns, "CD8": freq.cd8_patterns}
    out = {}
    for pop in POPULATIONS[panel]:
        if not pop.subset:
            out[pop.name] = float(fixed[pop.name])
        elif pop.subset == "NK":
            sel = (_MASKS & pop.mask) == pop.mask
            out[pop.name] = float(freq.bright * freq.bright_patterns[sel].sum()
                                  + (1 - freq.bright) * freq.dim_patterns[sel].sum())
        else:
            out[pop.name] = float(patterns[pop.subset][(_MASKS & pop.mask) == pop.mask].sum())
    return out


def typical_fractions(group: str, phase: str, panel: str, effect_size: float = 1.0) -> dict[str, float]:
    """Expected fractions of parent for a typical patient (all random effects 0).

    ``phase`` is ``'baseline'``, ``'clofarabine'`` or ``'lenalidomide'`` (the mean
    lenalidomide shift; individual patients scatter around it). Useful to state power
    against the planted effects.

    Raises
    ------
    UsageError
        If ``group``, ``phase`` or ``panel`` is unknown.
    """
    if group not in GROUPS or panel not in PANELS or phase not in ("baseline", "clofarabine", "lenalidomide"):
        raise UsageError(f"unknown group, phase or panel: {group!r}, {phase!r}, {panel!r}")
    zero = PatientDraws(_BASE, np.zeros(_K))
    theta = _BASE + _time_shift(phase, group, float(effect_size), zero)
    return expected_fractions(frequencies_from_parameters(theta), panel)


# --------------------------------------------------------------------------- counts
@dataclass(frozen=True)
class Counts:
    """Counts of one sample's event classes and labelled populations (live singlet lymphocytes).

    Doublets and dead cells are counted but their lineages are drawn with the events.
    """

    n: int
    debris: int
    monocytes: int
    lymphocytes: int
    lymph_doublets: int
    dead: int
    live: int
    t: int
    b: int
    nk: int
    cd4: int
    cd8: int
    dp: int
    dn: int
    cd4_patterns: np.ndarray
    cd8_patterns: np.ndarray
    bright: int
    dim: int
    bright_patterns: np.ndarray
    dim_patterns: np.ndarray


def draw_counts(freq: Frequencies, n: int, rng: np.random.Generator) -> Counts:
    """Draw one sample's counts (always the same sequence of draws, whatever the panel)."""
    debris, mono, lymph = (int(x) for x in rng.multinomial(n, freq.classes))
    doublets = int(rng.binomial(lymph, freq.doublet))
    dead = int(rng.binomial(lymph - doublets, freq.dead))
    live = lymph - doublets - dead
    t, b, nk = (int(x) for x in rng.multinomial(live, freq.lineage))
    cd4, cd8, dp, dn = (int(x) for x in rng.multinomial(t, freq.t_subsets))
    cd4_pat = rng.multinomial(cd4, freq.cd4_patterns)
    cd8_pat = rng.multinomial(cd8, freq.cd8_patterns)
    bright = int(rng.binomial(nk, freq.bright))
    bright_pat = rng.multinomial(bright, freq.bright_patterns)
    dim_pat = rng.multinomial(nk - bright, freq.dim_patterns)
    return Counts(n, debris, mono, lymph, doublets, dead, live, t, b, nk, cd4, cd8, dp, dn,
                  cd4_pat, cd8_pat, bright, nk - bright, bright_pat, dim_pat)


def _pattern_count(patterns: np.ndarray, mask: int) -> int:
    return int(patterns[(_MASKS & mask) == mask].sum())


def control_bit(panel: str, control: str | None) -> int:
    """Pattern bit of the marker an FMO control leaves out (0 for a stained sample)."""
    if control is None:
        return 0
    return PATTERN_BITS["t" if panel == "t_cell" else "nk"][control]


def population_counts(counts: Counts, panel: str, control: str | None = None) -> list[tuple[str, str, int, int]]:
    """``(population, parent, count, parent_count)`` for the panel's populations, in template order.

    In an FMO control no event is positive for the left-out marker (its antibody is absent).
    """
    off = control_bit(panel, control)
    base = {"root": counts.n, "lymphocytes": counts.lymphocytes,
            "singlets": counts.lymphocytes - counts.lymph_doublets, "live": counts.live,
            "T cells": counts.t, "CD4 T": counts.cd4, "CD8 T": counts.cd8, "NK cells": counts.nk,
            "CD56bright NK": counts.bright, "CD56dim NK": counts.dim}
    patterns = {"CD4": counts.cd4_patterns, "CD8": counts.cd8_patterns}
    out = []
    for pop in POPULATIONS[panel]:
        if pop.subset:
            if pop.mask & off:
                c = 0
            elif pop.subset == "NK":
                c = _pattern_count(counts.bright_patterns, pop.mask) + _pattern_count(counts.dim_patterns, pop.mask)
            else:
                c = _pattern_count(patterns[pop.subset], pop.mask)
        else:
            c = base[pop.name]
        out.append((pop.name, pop.parent, c, base[pop.parent] if pop.parent in base else -1))
    resolved = {name: c for name, _p, c, _pc in out}
    return [(name, parent, c, pc if pc >= 0 else resolved[parent]) for name, parent, c, pc in out]


def stained_specs(design: CohortDesign) -> list[SampleSpec]:
    """The stained samples of a cohort, ordered by patient, timepoint and panel."""
    return [SampleSpec(f"{design.patient_id(i)}_{tp.name}_{panel}", panel, tp, patient=i)
            for i in range(design.patients) for tp in design.timepoints for panel in design.panels]


def fmo_specs(design: CohortDesign) -> list[SampleSpec]:
    """The FMO controls of a cohort: per batch and panel, one per dim marker."""
    return [SampleSpec(f"{tp.batch}_{panel}_FMO_{marker}", panel, tp, control=marker)
            for tp in design.timepoints for panel in design.panels for marker in FMO_MARKERS[panel]]


def spec_counts(design: CohortDesign, spec: SampleSpec, freq: Frequencies | None = None) -> Counts:
    """Draw the counts of one sample from its own stream."""
    if spec.control is None:
        if freq is None:
            freq = sample_frequencies(design, spec.patient, spec.timepoint)
        rng = stream(design.seed, D_COUNTS, spec.patient, spec.timepoint.index, spec.panel_index)
    else:
        if freq is None:
            freq = pool_frequencies(design, spec.timepoint)
        marker = FMO_MARKERS[spec.panel].index(spec.control)
        rng = stream(design.seed, D_FMO_COUNTS, spec.timepoint.index, spec.panel_index, marker)
    return draw_counts(freq, design.events, rng)


TRUTH_COLUMNS = ("sample_id", "patient_id", "timepoint", "day", "group", "panel", "batch",
                 "population", "parent", "count", "parent_count", "pct_parent")


def cohort_truth(
    n_patients: int = 8,
    timepoints: Sequence[str] = DEFAULT_TIMEPOINTS,
    effect_size: float = 1.0,
    seed: int = 0,
    events: int = 50_000,
    panels: Sequence[str] = PANELS,
) -> "pandas.DataFrame":  # noqa: F821
    """True counts of a cohort's stained samples, without making events.

    Draws the same per-patient frequencies and the same counts as
    :func:`immunoprofile.simulate.simulate_cohort` with the same arguments (so the
    counts equal those of its ``truth.csv``), in the layout of gating's
    ``populations.csv``: ``sample_id, patient_id, timepoint, day, group, panel, batch,
    population, parent, count, parent_count, pct_parent`` (percent of parent, NaN when
    the parent is empty). Rows are sorted by ``sample_id`` then ``population``. FMO
    controls are not included.

    Raises
    ------
    UsageError
        If an argument is out of range (see :func:`design_cohort`).
    """
    import pandas as pd

    design = design_cohort(n_patients, timepoints, events, panels, effect_size, seed)
    cols: dict[str, list] = {c: [] for c in TRUTH_COLUMNS}
    specs = sorted(stained_specs(design), key=lambda s: s.sample_id)
    draws_cache: dict[int, PatientDraws] = {}
    freq_cache: dict[tuple[int, int], Frequencies] = {}
    for spec in specs:
        i, tp = spec.patient, spec.timepoint
        if i not in draws_cache:
            draws_cache[i] = patient_parameters(seed, i)
        key = (i, tp.index)
        if key not in freq_cache:
            freq_cache[key] = frequencies_from_parameters(sample_parameters(design, i, tp, draws_cache[i]))
        rows = sorted(population_counts(spec_counts(design, spec, freq_cache[key]), spec.panel))
        k = len(rows)
        cols["sample_id"] += [spec.sample_id] * k
        cols["patient_id"] += [design.patient_id(i)] * k
        cols["timepoint"] += [tp.name] * k
        cols["day"] += [tp.day] * k
        cols["group"] += [group_of(i)] * k
        cols["panel"] += [spec.panel] * k
        cols["batch"] += [tp.batch] * k
        for name, parent, c, pc in rows:
            cols["population"].append(name)
            cols["parent"].append(parent)
            cols["count"].append(c)
            cols["parent_count"].append(pc)
    count = np.asarray(cols["count"], dtype=np.int64)
    parent = np.asarray(cols["parent_count"], dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = np.where(parent > 0, 100.0 * count / np.maximum(parent, 1), np.nan)
    cols["count"], cols["parent_count"], cols["pct_parent"] = count, parent, pct
    return pd.DataFrame(cols, columns=list(TRUTH_COLUMNS))
