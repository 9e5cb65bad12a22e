"""Marker names and aliases: find the channel that carries a marker.

Templates name markers (``PD1``), never channels. A file may label the same
marker ``PD-1``, ``CD279``, ``CD279 (PD-1)`` or ``BV421-A :: PD-1``, in ``$PnS``
or, on some instruments, only in ``$PnN``. :func:`resolve_marker` finds the one
channel that carries a marker, case and punctuation insensitive, or raises a
:class:`~immunoprofile.errors.MarkerError` that lists what the file has and the
closest matches.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from .errors import MarkerError

# canonical marker -> spellings seen in real files (normalised on use).
ALIASES: dict[str, tuple[str, ...]] = {
    "PD1": ("PD1", "PD-1", "CD279", "PDCD1"),
    "LAG3": ("LAG3", "LAG-3", "CD223"),
    "TIM3": ("TIM3", "TIM-3", "CD366", "HAVCR2"),
    "LIR1": ("LIR1", "LIR-1", "CD85j", "ILT2", "ILT-2", "LILRB1"),
    "CD57": ("CD57", "B3GAT1", "HNK1", "HNK-1", "LEU7"),
    "NKG2A": ("NKG2A", "NKG2-A", "CD159a", "KLRC1"),
    "NKG2D": ("NKG2D", "CD314", "KLRK1"),
    "KIR2DL1": ("KIR2DL1", "CD158a"),
    "CD56": ("CD56", "NCAM1", "NCAM", "NKH1", "LEU19"),
    "CD16": ("CD16", "FCGR3A", "FCGR3", "FcgRIII", "LEU11"),
    "CD3": ("CD3", "CD3E", "CD3e", "LEU4"),
    "CD4": ("CD4", "LEU3"),
    "CD8": ("CD8", "CD8A", "CD8a", "LEU2"),
    "CD19": ("CD19", "LEU12"),
    "CD20": ("CD20", "MS4A1"),
    "CD14": ("CD14",),
    "CD45": ("CD45", "PTPRC", "LCA"),
    "CD45RA": ("CD45RA",),
    "CD45RO": ("CD45RO",),
    "CCR7": ("CCR7", "CD197"),
    "CD28": ("CD28",),
    "CD27": ("CD27",),
    "CD25": ("CD25", "IL2RA"),
    "CD127": ("CD127", "IL7R"),
    "HLADR": ("HLA-DR", "HLADR"),
    "CD38": ("CD38",),
    "KI67": ("Ki67", "Ki-67", "MKI67"),
    "TIGIT": ("TIGIT",),
    "CTLA4": ("CTLA4", "CTLA-4", "CD152"),
    "Viability": (
        "Viability", "Viability Dye", "Live/Dead", "LiveDead", "Live-Dead", "L/D", "LD",
        "Live Dead", "Dead", "Zombie", "Zombie NIR", "Zombie Aqua", "Zombie UV", "Aqua",
        "7-AAD", "7AAD", "DAPI", "PI", "Propidium Iodide", "FVS", "FVS780", "FVS575V",
        "Fixable Viability", "eF780", "eFluor780", "LIVE DEAD", "Sytox", "SYTOX Blue",
    ),
    "FSC-A": ("FSC-A", "FSC", "FS", "FS INT", "FS-A", "FSC Area", "Forward Scatter"),
    "FSC-H": ("FSC-H", "FS PEAK", "FS-H", "FSC Height"),
    "FSC-W": ("FSC-W", "FS TOF", "FS-W", "FSC Width"),
    "SSC-A": ("SSC-A", "SSC", "SS", "SS INT", "SS-A", "SSC Area", "Side Scatter"),
    "SSC-H": ("SSC-H", "SS PEAK", "SS-H", "SSC Height"),
    "SSC-W": ("SSC-W", "SS TOF", "SS-W", "SSC Width"),
    "Time": ("Time", "TIME", "HDR-T"),
}

_SPLIT = re.compile(r"::|[()\[\]{}/\\,;_]|\s+")


def normalise(label: str) -> str:
    """Upper-case ``label`` and drop everything but letters and digits."""
    return re.sub(r"[^0-9A-Z]", "", label.upper())


_LOOKUP: dict[str, str] = {}
for _canonical, _spellings in ALIASES.items():
    for _spelling in (_canonical, *_spellings):
        _LOOKUP.setdefault(normalise(_spelling), _canonical)


def canonical(name: str) -> str:
    """Canonical marker name for ``name`` (``'CD279'`` -> ``'PD1'``); unknown names map to themselves."""
    return _LOOKUP.get(normalise(name), name)


def _tokens(label: str) -> set[str]:
    """Normalised candidate marker names in a label such as ``'BV421-A :: CD279 (PD-1)'``."""
    if not label:
        return set()
    parts = [label, *(p for p in _SPLIT.split(label) if p)]
    return {normalise(p) for p in parts if normalise(p)}


def label_markers(label: str) -> set[str]:
    """Canonical markers named in a channel label."""
    return {_LOOKUP[t] for t in _tokens(label) if t in _LOOKUP}


def _describe(channels: Sequence[str], markers: Sequence[str]) -> list[str]:
    return [f"{c} ({m})" if m else c for c, m in zip(channels, markers)]


def resolve_marker(
    name: str,
    channels: Sequence[str],
    markers: Sequence[str],
    *,
    path: str | None = None,
) -> int:
    """Index of the channel that carries ``name``.

    A channel name (``$PnN``) that equals ``name`` wins outright; otherwise the
    marker labels (``$PnS``, or ``$PnN`` where ``$PnS`` is empty or also names
    the marker) are matched through :data:`ALIASES`. Where several channels
    carry the marker, an area (``-A``) channel is preferred over height/width.

    Raises
    ------
    MarkerError
        If no channel, or more than one area channel, carries the marker.
    """
    wanted_norm = normalise(name)
    exact = [i for i, c in enumerate(channels) if normalise(c) == wanted_norm]
    if len(exact) == 1:
        return exact[0]
    target = canonical(name)
    hits = []
    for i, (chan, marker) in enumerate(zip(channels, markers)):
        found = label_markers(marker) if marker else set()
        if target in found:
            hits.append(i)
            continue
        if target in label_markers(chan):
            hits.append(i)
    if len(hits) > 1:
        area = [i for i in hits if channels[i].upper().endswith("-A")]
        if len(area) == 1:
            return area[0]
        # a marker named in $PnS beats one only named in $PnN
        by_pns = [i for i in hits if markers[i] and target in label_markers(markers[i])]
        if len(by_pns) == 1:
            return by_pns[0]
    if len(hits) == 1:
        return hits[0]
    spellings = ", ".join(ALIASES.get(target, (name,)))
    have = _describe(channels, markers)
    if not hits:
        close = difflib.get_close_matches(name, [m or c for c, m in zip(channels, markers)], n=3, cutoff=0.5)
        raise MarkerError(
            f"marker {name!r} not found (looked for {spellings}); the file has: "
            + "; ".join(have)
            + (f"; closest: {', '.join(close)}" if close else ""),
            path=path,
            hint="check the panel, or add the file's spelling to the template's 'aliases'",
        )
    raise MarkerError(
        f"marker {name!r} is ambiguous: channels "
        + ", ".join(have[i] for i in hits)
        + " all carry it",
        path=path,
        hint="name the channel explicitly in the template's 'channels' map",
        code="MARKER_AMBIGUOUS",
    )
