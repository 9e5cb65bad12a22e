"""Gating-ML 2.0 and FlowJo workspaces as templates; native templates exported to Gating-ML 2.0.

Two directions, both through FlowKit's own engine:

* :func:`load_external_template` reads a Gating-ML 2.0 document (``.xml``) or a
  FlowJo 10 workspace (``.wsp``) into an :class:`ExternalTemplate`, whose
  :meth:`~ExternalTemplate.gate` gates an :class:`~immunoprofile.fcs.FcsSample`
  with ``flowkit.GatingStrategy.gate_sample``. Compensation and transforms are
  the document's; nothing of our own engine is involved.
* :func:`export_gatingml` writes a native template, resolved against one
  sample's channels, as a Gating-ML 2.0 document that FlowKit, FlowJo or any
  other Gating-ML 2.0 consumer can apply. Data-driven gates are exported with
  the coordinates one sample actually used (the rows of ``gates.csv``).

Gating-ML 2.0 gate ids are XML ``ID`` values (no spaces, no ``+``), so population
names are mapped to ids by :func:`gatingml_id` (``'CD4 PD1+'`` -> ``'CD4_PD1pos'``);
the original name is kept in each gate's ``data-type:custom_info`` element and
read back by :func:`load_external_template`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import Finding, GatingError, MarkerError, TemplateError
from .fcs import FcsSample

log = logging.getLogger(__name__)

__all__ = [
    "ExternalPopulation", "ExternalTemplate", "load_external_template", "export_gatingml", "gatingml_id",
    "data_driven_populations", "flowkit_sample", "resolved_gates", "parse_external_template",
    "GATINGML_VERSION", "FLOWJO_VERSION",
]

ROOT = "root"
GATINGML_VERSION = "gatingml-2.0"
FLOWJO_VERSION = "flowjo-wsp"

NS_GATING = "http://www.isac-net.org/std/Gating-ML/v2.0/gating"
NS_DATATYPE = "http://www.isac-net.org/std/Gating-ML/v2.0/datatypes"
CUSTOM_TAG = "immunoprofile"  # element inside data-type:custom_info holding our metadata

_DOCS = "see docs/templates.md ('Gating-ML and FlowJo')"


# ================================================================ external templates
@dataclass(frozen=True)
class ExternalPopulation:
    """One population of an external template.

    ``name`` is unique in the template (see :func:`load_external_template`);
    ``gate_name`` and ``gate_path`` locate the gate in FlowKit's gate tree
    (``gate_path`` starts with ``'root'``).
    """

    name: str
    parent: str
    gate_name: str
    gate_path: tuple[str, ...]
    gate_type: str  # range, polygon, ellipse, quadrant, boolean
    dims: tuple[str, ...] = ()
    line: int = 0

    @property
    def reference(self) -> str:
        """Percentages are of the parent (external documents name no other reference)."""
        return self.parent


@dataclass(frozen=True)
class ExternalTemplate:
    """A Gating-ML 2.0 document or FlowJo workspace used as a template.

    Duck-types :class:`~immunoprofile.templates.Template` for the pipeline
    (``name``, ``version``, ``sha256``, ``populations``, ``panel``, ``beads``,
    ``markers``, ``fmo_markers``) and gates with FlowKit (:meth:`gate`).
    The document's bytes are kept and parsed again for every sample, so a
    template holds no FlowKit state between samples.
    """

    name: str
    version: str
    sha256: str
    source: str
    populations: tuple[ExternalPopulation, ...]
    document: bytes = field(repr=False)
    description: str = ""
    external: bool = True
    panel: str | None = None
    beads: Mapping[str, Any] | None = None
    markers: tuple[str, ...] = ()
    compensation: str = "document"
    transforms: Mapping[str, Any] = field(default_factory=dict)
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    channels: Mapping[str, str] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        """``'gatingml'`` or ``'flowjo'``."""
        return "flowjo" if self.version == FLOWJO_VERSION else "gatingml"

    def fmo_markers(self) -> tuple[str, ...]:
        """External documents have fixed gates only: no FMO controls are used."""
        return ()

    def population(self, name: str) -> ExternalPopulation:
        for p in self.populations:
            if p.name == name:
                return p
        raise KeyError(name)

    def gate(self, sample: FcsSample) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], list[Finding]]:
        """Gate ``sample`` with FlowKit's engine.

        Returns
        -------
        masks
            Boolean membership per population name, plus ``'root'`` (all events).
        gates
            One row per gate as applied (the shape of ``gates.csv`` rows).
        findings
            Non-fatal observations (workspace fallback, missing spillover...).

        Raises
        ------
        MarkerError
            A gate dimension is not a channel of the file.
        GatingError
            FlowKit cannot gate the file.
        TemplateError
            The workspace has no gates that can be applied to this file.
        """
        findings: list[Finding] = []
        strategy, group = self._strategy_for(sample, findings)
        fk_sample = flowkit_sample(sample, flowjo_labels=self.kind == "flowjo")
        _check_dimensions(strategy, fk_sample, sample, self.source)
        _note_missing_spillover(strategy, fk_sample, findings)
        results = _run_flowkit(strategy, fk_sample, sample)
        present = {(g, tuple(p)) for g, p in strategy.get_gate_ids()}
        masks: dict[str, np.ndarray] = {ROOT: np.ones(sample.n_events, dtype=bool)}
        rows: list[dict[str, Any]] = []
        names = {(p.gate_name, p.gate_path): p.name for p in self.populations}
        absent = []
        for pop in self.populations:
            if (pop.gate_name, pop.gate_path) not in present:
                absent.append(pop.name)
                continue
            mask = np.asarray(results.get_gate_membership(pop.gate_name, gate_path=pop.gate_path), dtype=bool)
            masks[pop.name] = mask
            rows.append(_gate_row(strategy, pop, fk_sample, sample, names, self.kind))
        if absent:
            findings.append(Finding("EXTERNAL_POPULATIONS_ABSENT",
                                    f"{len(absent)} population(s) of {Path(self.source).name} are not in the gate "
                                    f"tree used for this file{group}: {', '.join(absent[:5])}"
                                    + (" ..." if len(absent) > 5 else ""), "warning"))
        return masks, rows, findings

    # -- which gate tree applies to a sample
    def _strategy_for(self, sample: FcsSample, findings: list[Finding]) -> tuple[Any, str]:
        if self.kind == "gatingml":
            return _parse_gatingml(self.document, self.source)[0], ""
        wsp = _parse_wsp(self.document, self.source)
        samples = wsp["samples"]
        key = _match_wsp_sample(sample, samples)
        if key is not None:
            return samples[key]["gating_strategy"], ""
        fallback = _fallback_wsp_sample(wsp)
        if fallback is None:
            raise TemplateError(f"{Path(sample.path).name} is not a sample of this workspace, and no group of the "
                                "workspace has gates to apply instead", path=self.source,
                                hint="add the file to the workspace in FlowJo, or export its gates as Gating-ML")
        group, key = fallback
        findings.append(Finding("FLOWJO_SAMPLE_NOT_IN_WORKSPACE",
                                f"{Path(sample.path).name} is not in {Path(self.source).name}; gated with group "
                                f"{group!r}'s gates as defined for its sample {key!r} (that sample's compensation "
                                "and transforms)", "warning"))
        return samples[key]["gating_strategy"], f" (group {group!r})"


def load_external_template(path: str | Path) -> ExternalTemplate:
    """Read a Gating-ML 2.0 document or a FlowJo 10 workspace as a template.

    Population names: a Gating-ML gate's ``id`` (unique in the document), or the
    population name our export recorded in the gate's ``custom_info``. A FlowJo
    gate's name when no other gate of the workspace has that name; otherwise the
    shortest tail of its gate path that is unique, joined with ``/``
    (``CD4+/CD107a+`` and ``CD8+/CD107a+``). Quadrants of a Gating-ML quadrant gate
    are populations whose parent is the quadrant gate's parent.

    Raises
    ------
    TemplateError
        The file is missing, is not well-formed XML, is neither Gating-ML 2.0 nor
        a FlowJo 10 workspace, or uses a construct FlowKit cannot read.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise TemplateError("template file not found", path=str(p), code="TEMPLATE_NOT_FOUND",
                            hint="check the path, or run 'immunoprofile templates list'") from None
    except OSError as e:
        raise TemplateError(f"cannot be read ({e.strerror or e})", path=str(p)) from None
    return parse_external_template(data, str(p))


def parse_external_template(data: bytes, source: str) -> ExternalTemplate:
    """:func:`load_external_template` on bytes already read (``source`` names them in messages).

    Raises
    ------
    TemplateError
        See :func:`load_external_template`.
    """
    sha = hashlib.sha256(data).hexdigest()
    root = _xml_root(data, source)
    if "flowJoVersion" in root.attrib:
        wsp = _parse_wsp(data, source)
        pops = _wsp_populations(wsp, source)
        n_samples = len(wsp["samples"])
        desc = (f"FlowJo workspace (FlowJo {root.attrib.get('flowJoVersion', '?')}): {len(pops)} populations, "
                f"{n_samples} sample(s), groups: {', '.join(wsp['groups']) or 'none'}")
        version = FLOWJO_VERSION
    else:
        strategy, info = _parse_gatingml(data, source)
        pops = _strategy_populations(strategy, info, source)
        desc = f"Gating-ML 2.0 document: {len(pops)} populations"
        version = GATINGML_VERSION
    if not pops:
        raise TemplateError("the document defines no gates", path=source,
                            hint="export the gates again from the software that made it")
    return ExternalTemplate(name=Path(source).stem, version=version, sha256=sha, source=source,
                            populations=tuple(pops), document=data, description=desc)


# ---------------------------------------------------------------- parsing documents
def _safe_parser() -> Any:
    from lxml import etree

    return etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True)


def _xml_root(data: bytes, source: str) -> Any:
    from lxml import etree

    try:
        return etree.fromstring(data, parser=_safe_parser())
    except etree.XMLSyntaxError as e:
        line = getattr(e, "lineno", None)
        where = f"line {line}: " if line else ""
        raise TemplateError(f"{where}not well-formed XML ({e.msg if hasattr(e, 'msg') else e})", path=source,
                            hint="the file is damaged or not a Gating-ML/FlowJo document; export it again") from None


def _schema_error(data: bytes) -> str:
    """The first Gating-ML 2.0 schema violation of ``data``, as 'line N: message' (best effort)."""
    try:
        from lxml import etree
        from flowkit._resources import gml_schema  # FlowKit's bundled Gating-ML 2.0 XSD

        doc = etree.parse(io.BytesIO(data))
        if gml_schema.validate(doc):
            return ""
        err = gml_schema.error_log.last_error
        if err is None:
            return ""
        msg = err.message
        for prefix, ns in (("gating:", NS_GATING), ("data-type:", NS_DATATYPE),
                           ("transforms:", "http://www.isac-net.org/std/Gating-ML/v2.0/transformations")):
            msg = msg.replace("{" + ns + "}", prefix)
        return f"line {err.line}: {msg}"
    except Exception:  # noqa: BLE001 - only used to improve a message
        return ""


def _parse_gatingml(data: bytes, source: str) -> tuple[Any, dict[str, Any]]:
    """FlowKit's GatingStrategy and :func:`_document_info` of a Gating-ML document."""
    import flowkit

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            strategy = flowkit.parse_gating_xml(io.BytesIO(data))
    except Exception as e:  # FlowKit raises ValueError, KeyError, GateTreeError ...
        detail = _schema_error(data)
        what = f"not a valid Gating-ML 2.0 document ({detail})" if detail else \
            f"FlowKit cannot read this Gating-ML document ({type(e).__name__}: {e})"
        raise TemplateError(what, path=source,
                            hint="check it against the Gating-ML 2.0 schema; only Gating-ML 2.0 gates, "
                                 "transforms and spectrum matrices are supported") from None
    return strategy, _document_info(data)


def _document_info(data: bytes) -> dict[str, Any]:
    """Gate ids in document order (quadrants in place of their quadrant gate) and the
    population names our export recorded in ``custom_info`` (gate id -> name)."""
    from lxml import etree

    root = etree.fromstring(data, parser=_safe_parser())
    names: dict[str, str] = {}
    order: list[str] = []
    for gate in root:
        if not isinstance(gate.tag, str) or not gate.tag.startswith(f"{{{NS_GATING}}}"):
            continue
        gid = gate.get(f"{{{NS_GATING}}}id")
        if gid is None:
            continue
        order.append(gid)
        order.extend(q.get(f"{{{NS_GATING}}}id") for q in gate.iter(f"{{{NS_GATING}}}Quadrant"))
        for info in gate.iterfind(f"{{{NS_DATATYPE}}}custom_info/{CUSTOM_TAG}"):
            if info.get("population"):
                names[gid] = info.get("population")
    return {"names": names, "order": order}


def _parse_wsp(data: bytes, source: str) -> dict[str, Any]:
    import flowkit

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flowkit.parse_wsp(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - FlowKit raises many types for unsupported content
        raise TemplateError(f"FlowKit cannot read this FlowJo workspace ({type(e).__name__}: {e})", path=source,
                            hint="FlowJo 10 workspaces are supported; rename gates named '.' or '..', or export "
                                 "the gates as Gating-ML 2.0 from FlowJo") from None


def _node_kind(gate: Any) -> str:
    from flowkit import gates as fk_gates

    if isinstance(gate, fk_gates.QuadrantGate):
        return "quadrant_gate"
    if isinstance(gate, fk_gates.Quadrant):
        return "quadrant"
    if isinstance(gate, fk_gates.RectangleGate):
        return "range"
    if isinstance(gate, fk_gates.PolygonGate):
        return "polygon"
    if isinstance(gate, fk_gates.EllipsoidGate):
        return "ellipse"
    if isinstance(gate, fk_gates.BooleanGate):
        return "boolean"
    return type(gate).__name__


def _node_gate(strategy: Any, name: str, path: tuple[str, ...]) -> Any:
    """The gate of a node; for a single quadrant, the :class:`flowkit.gates.Quadrant`."""
    from flowkit.exceptions import QuadrantReferenceError

    try:
        return strategy.get_gate(name, gate_path=path)
    except QuadrantReferenceError:
        return strategy.get_gate(path[-1], gate_path=path[:-1]).quadrants[name]


def _tree(strategy: Any) -> list[tuple[str, tuple[str, ...], str, tuple[str, ...]]]:
    """(gate name, gate path from 'root', kind, dimension ids) of every node, parents first."""
    out = []
    for name, path in strategy.get_gate_ids():
        path = tuple(path)
        gate = _node_gate(strategy, name, path)
        kind = _node_kind(gate)
        dims: tuple[str, ...] = ()
        if kind == "quadrant":
            qgate = strategy.get_gate(path[-1], gate_path=path[:-1])
            by_id = {d.id: d.dimension_ref for d in qgate.dimensions}
            dims = tuple(by_id.get(r, r) for r in gate.divider_refs)
        elif kind != "boolean":
            dims = tuple(_dim_id(d) for d in gate.dimensions or ())
        out.append((name, path, kind, dims))
    return out


def _dim_id(dim: Any) -> str:
    from flowkit import QuadrantDivider, RatioDimension

    if isinstance(dim, RatioDimension):
        return dim.ratio_ref
    if isinstance(dim, QuadrantDivider):
        return dim.dimension_ref
    return dim.id


def _strategy_populations(strategy: Any, info: Mapping[str, Any], source: str) -> list[ExternalPopulation]:
    tree = _tree(strategy)
    nodes = [n for n in tree if n[2] != "quadrant_gate"]
    quad_gates = {(n[0], n[1]) for n in tree if n[2] == "quadrant_gate"}
    custom = info["names"]
    names = {(name, path): custom.get(name, name) for name, path, _, _ in nodes}
    if len(set(names.values())) != len(names) or ROOT in names.values():
        names = {k: k[0] for k in names}  # recorded names clash: fall back to the ids
    pops = _populations(nodes, names, quad_gates, source)
    # document order, as far as parents and boolean operands allow (Gating-ML ids are unique)
    rank = {gid: i for i, gid in enumerate(info["order"])}
    deps = {}
    for p in pops:
        d = {p.parent} - {ROOT}
        if p.gate_type == "boolean":
            gate = strategy.get_gate(p.gate_name, gate_path=p.gate_path)
            d |= {names.get((r["ref"], tuple(r["path"])), r["ref"]) for r in gate.gate_refs}
        deps[p.name] = d
    todo = sorted(pops, key=lambda p: rank.get(p.gate_name, len(rank)))
    out: list[ExternalPopulation] = []
    done: set[str] = set()
    while todo:
        nxt = next((p for p in todo if deps[p.name] <= done), todo[0])
        todo.remove(nxt)
        out.append(nxt)
        done.add(nxt.name)
    return out


def _populations(nodes: Sequence[tuple[str, tuple[str, ...], str, tuple[str, ...]]],
                 names: Mapping[tuple[str, tuple[str, ...]], str],
                 quad_gates: set[tuple[str, tuple[str, ...]]], source: str) -> list[ExternalPopulation]:
    pops = []
    for name, path, kind, dims in nodes:
        parent = ROOT
        # nearest ancestor that is a population (a quadrant gate is not)
        for k in range(len(path) - 1, 0, -1):
            anc = (path[k], path[:k])
            if anc in quad_gates:
                continue
            parent = names[anc]
            break
        if names[(name, path)] == ROOT:
            raise TemplateError(f"a gate is named {ROOT!r}, which is reserved for all events", path=source,
                                hint="rename the gate")
        pops.append(ExternalPopulation(names[(name, path)], parent, name, path, kind, dims))
    return pops


def _unique_names(keys: Sequence[tuple[str, tuple[str, ...]]]) -> dict[tuple[str, tuple[str, ...]], str]:
    """Shortest unique tail of each gate path (without 'root'), joined with '/'."""
    full = {k: (*k[1][1:], k[0]) for k in keys}
    out = {}
    for k, parts in full.items():
        for n in range(1, len(parts) + 1):
            tail = parts[-n:]
            clash = any(o != k and other[-n:] == tail for o, other in full.items())
            if not clash and "/".join(tail) != ROOT:
                out[k] = "/".join(tail)
                break
        else:
            out[k] = "/".join(parts)
    taken: dict[str, tuple[str, tuple[str, ...]]] = {}
    for k, v in out.items():  # a tail can still equal another gate's literal name containing '/'
        if v in taken:
            out[k] = "/".join(full[k])
        taken[out[k]] = k
    return out


def _wsp_populations(wsp: Mapping[str, Any], source: str) -> list[ExternalPopulation]:
    """Union of the gate trees of the workspace's samples, in order of first appearance."""
    seen: dict[tuple[str, tuple[str, ...]], tuple[str, tuple[str, ...], str, tuple[str, ...]]] = {}
    quad_gates: set[tuple[str, tuple[str, ...]]] = set()
    for sample_name in wsp["samples"]:
        for node in _tree(wsp["samples"][sample_name]["gating_strategy"]):
            key = (node[0], node[1])
            if node[2] == "quadrant_gate":
                quad_gates.add(key)
                continue
            seen.setdefault(key, node)
    names = _unique_names(list(seen))
    return _populations(list(seen.values()), names, quad_gates, source)


def _match_wsp_sample(sample: FcsSample, samples: Mapping[str, Any]) -> str | None:
    """The workspace sample for an FCS file: by file name, then by ``$FIL``, case-insensitively last."""
    candidates = [Path(sample.path).name]
    fil = sample.text.get("$FIL") or sample.text.get("FIL")
    if fil:
        candidates.append(Path(fil.strip()).name)
    for c in candidates:
        if c in samples:
            return c
    lower = {k.casefold(): k for k in samples}
    for c in candidates:
        if c.casefold() in lower:
            return lower[c.casefold()]
    return None


def _fallback_wsp_sample(wsp: Mapping[str, Any]) -> tuple[str, str] | None:
    """(group, sample) whose gates stand in for an unknown file: the first group with gates and samples."""
    for group, info in wsp["groups"].items():
        if info.get("gates") and info.get("samples"):
            for s in info["samples"]:
                if s in wsp["samples"] and wsp["samples"][s]["gating_strategy"].get_gate_ids():
                    return group, s
    for s, info in wsp["samples"].items():  # groups without their own gates (e.g. only 'All Samples')
        if info["gating_strategy"].get_gate_ids():
            group = next((g for g, gi in wsp["groups"].items() if s in gi.get("samples", ())), "")
            return group, s
    return None


# ---------------------------------------------------------------- FlowKit sample
def flowkit_sample(sample: FcsSample, *, flowjo_labels: bool = False) -> Any:
    """A ``flowkit.Sample`` holding exactly ``sample.events``.

    ``sample.events`` are the values FlowKit gates on (see :mod:`immunoprofile.fcs`).
    When they are float32 (lossless), FlowKit reads an in-memory FCS 3.1 file written
    from them by :func:`immunoprofile.fcs.fcs_bytes` (with the spillover), so the file
    is never read again. When they are float64 (Time scaled by ``$TIMESTEP``,
    log-decoded or gain-scaled channels: most real files), no float32 FCS can hold
    them, so FlowKit parses the original file's bytes, read again from
    ``sample.path`` and checked against ``sample.sha256``. Either way the matrix
    FlowKit holds is compared with ``sample.events`` before gating.

    Raises
    ------
    GatingError
        The file changed since it was read, cannot be read again, or FlowKit reads
        other values than immunoprofile's reader.
    """
    import flowkit

    ev = sample.events
    exact32 = ev.dtype == np.float32 or (
        ev.dtype == np.float64 and np.array_equal(ev.astype(np.float32).astype(np.float64), ev, equal_nan=True))
    sid = Path(sample.path).name or "sample"
    # fluorescence channels outside $SPILLOVER are FlowKit "null channels": used as they are,
    # as our engine does (FlowKit otherwise refuses Gating-ML 'FCS' compensation for the file)
    null = None
    if sample.spillover is not None:
        null = [c for c in _flowkit_fluorescence(sample.channels) if c not in sample.spillover[0]] or None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exact32:
            from .fcs import fcs_bytes

            blob = fcs_bytes(ev.astype(np.float32), sample.channels, sample.markers, spillover=sample.spillover)
            fk = flowkit.Sample(io.BytesIO(blob), sample_id=sid, use_flowjo_labels=flowjo_labels,
                                null_channel_list=null)
        else:
            log.debug("%s: float64 events; FlowKit parses the file's bytes again", sample.path)
            fk = _flowkit_sample_from_file(sample, sid, flowjo_labels, null)
    _check_same_events(fk, sample, flowjo_labels)
    return fk


def _flowkit_sample_from_file(sample: FcsSample, sid: str, flowjo_labels: bool, null: list[str] | None) -> Any:
    import flowio
    import flowkit

    p = Path(sample.path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise GatingError(f"cannot be read again for FlowKit ({e.strerror or e})", path=sample.path,
                          hint="keep the FCS file in place while it is gated") from None
    if hashlib.sha256(data).hexdigest() != sample.sha256:
        raise GatingError("the file changed while it was being gated (its SHA-256 differs from when it was read)",
                          path=sample.path, hint="do not modify FCS files during a run; run again")
    codes = {f.code for f in sample.findings}
    lenient = bool(codes & {"FCS_ENDDATA_OFF_BY_ONE", "FCS_DATA_OFFSETS", "FCS_TEXT_OFFSETS_IGNORED"})
    try:
        offset = 0
        for _ in range(sample.dataset):  # $NEXTDATA chain, as flowio.read_multiple_data_sets walks it
            head = flowio.FlowData(io.BytesIO(data), only_text=True, nextdata_offset=offset,
                                   ignore_offset_error=lenient, ignore_offset_discrepancy=lenient)
            offset += int(head.text["nextdata"])
        flow_data = flowio.FlowData(io.BytesIO(data), ignore_offset_error=lenient, ignore_offset_discrepancy=lenient,
                                    nextdata_offset=offset if (sample.dataset or sample.n_datasets > 1) else None,
                                    null_channel_list=null)
        return flowkit.Sample(flow_data, sample_id=sid, use_flowjo_labels=flowjo_labels)
    except Exception as e:  # noqa: BLE001 - FlowIO raises many types
        raise GatingError(f"FlowKit cannot read this file ({type(e).__name__}: {e})", path=sample.path,
                          hint="gate it with a native YAML template, or re-export the file") from None


def _check_same_events(fk: Any, sample: FcsSample, flowjo_labels: bool) -> None:
    want = [c.replace("/", "_") for c in sample.channels] if flowjo_labels else list(sample.channels)
    if list(fk.pnn_labels) != want:
        raise GatingError(f"FlowKit reads the channels {list(fk.pnn_labels)} where immunoprofile reads "
                          f"{list(sample.channels)}", path=sample.path, hint="report this file to the maintainers")
    got = fk.get_events(source="raw")
    ours = sample.events.astype(np.float64)
    if got.shape != ours.shape or not np.allclose(got, ours, rtol=1e-12, atol=0.0, equal_nan=True):
        diff = float(np.nanmax(np.abs(got - ours))) if got.shape == ours.shape else float("nan")
        raise GatingError(f"FlowKit reads other event values from this file than immunoprofile's reader "
                          f"(shape {got.shape} vs {ours.shape}, largest difference {diff:g})", path=sample.path,
                          hint="gate it with a native YAML template and report the file to the maintainers")


# ---------------------------------------------------------------- gating with FlowKit
def _channel_index(dim_id: str, fk_sample: Any, strategy: Any, comp_ref: str | None) -> int | None:
    """The column FlowKit uses for a dimension id (the same lookup as FlowKit's own)."""
    pnn, pns = list(fk_sample.pnn_labels), list(fk_sample.pns_labels)
    fj = [p.replace("/", "_") for p in pnn]
    for labels in (pnn, pns, fj):
        if dim_id in labels:
            return labels.index(dim_id)
    if comp_ref not in (None, "uncompensated", "FCS") and comp_ref in strategy.comp_matrices:
        m = strategy.comp_matrices[comp_ref]
        if dim_id in m.fluorochromes:
            det = m.detectors[m.fluorochromes.index(dim_id)]
            if det in pnn:
                return pnn.index(det)
    return None


def _check_dimensions(strategy: Any, fk_sample: Any, sample: FcsSample, source: str) -> None:
    from flowkit import RatioDimension
    from flowkit.exceptions import QuadrantReferenceError

    missing: dict[str, list[str]] = {}
    for name, path in strategy.get_gate_ids():
        try:
            gate = strategy.get_gate(name, gate_path=path)
        except QuadrantReferenceError:  # a single quadrant: checked with its quadrant gate
            continue
        for d in gate.dimensions or ():
            if isinstance(d, RatioDimension):  # a ratio transform names its channels
                t = strategy.transformations.get(d.ratio_ref)
                chans = list(getattr(t, "dimensions", None) or ())
            else:
                chans = [_dim_id(d)] if _channel_index(_dim_id(d), fk_sample, strategy,
                                                       d.compensation_ref) is None else []
            for c in chans:
                if isinstance(d, RatioDimension) and _channel_index(c, fk_sample, strategy, None) is not None:
                    continue
                missing.setdefault(c, []).append(name)
    if missing:
        listing = "; ".join(f"{d} (gate {', '.join(sorted(set(g)))})" for d, g in sorted(missing.items()))
        raise MarkerError(f"{Path(source).name} gates on channel(s) this file does not have: {listing}; the file "
                          f"has: {'; '.join(sample.labels)}", path=sample.path,
                          hint="use a template made for this panel and instrument")


def _note_missing_spillover(strategy: Any, fk_sample: Any, findings: list[Finding]) -> None:
    uses_fcs = False
    for name, path in strategy.get_gate_ids():
        try:
            gate = strategy.get_gate(name, gate_path=path)
        except Exception:  # noqa: BLE001
            continue
        uses_fcs |= any(getattr(d, "compensation_ref", None) == "FCS" for d in gate.dimensions or ())
    meta = fk_sample.get_metadata()
    if uses_fcs and "spill" not in meta and "spillover" not in meta:
        findings.append(Finding("COMPENSATION_ABSENT", "the template asks for the file's spillover matrix but the "
                                "file has none; fluorescence used uncompensated (Gating-ML 2.0, 'FCS')"))


def _run_flowkit(strategy: Any, fk_sample: Any, sample: FcsSample) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return strategy.gate_sample(fk_sample)
    except (LookupError, ValueError) as e:
        raise GatingError(f"FlowKit cannot apply the template to this file ({type(e).__name__}: {e})",
                          path=sample.path, hint="check that the template matches this panel") from None
    except Exception as e:  # noqa: BLE001 - FlowKitException, numpy errors ...
        raise GatingError(f"FlowKit failed to gate this file ({type(e).__name__}: {e})", path=sample.path) from None


def _transform_desc(t: Any) -> str:
    if t is None:
        return "identity"
    kind = type(t).__name__.replace("Transform", "").lower() or "transform"
    order = ("t", "w", "m", "a", "b", "c")
    params = {k[len("param_"):]: v for k, v in vars(t).items() if k.startswith("param_")}
    if not params:
        params = {k: v for k, v in vars(t).items()
                  if not k.startswith("_") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    keys = sorted(params, key=lambda k: (order.index(k) if k in order else len(order), k))
    inner = ",".join(f"{k.upper() if k in order else k}={float(params[k]):g}" for k in keys)
    return f"{kind}({inner})" if inner else kind


def _num(x: Any) -> Any:
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else str(v)


def _gate_row(strategy: Any, pop: ExternalPopulation, fk_sample: Any, sample: FcsSample,
              names: Mapping[tuple[str, tuple[str, ...]], str], kind: str) -> dict[str, Any]:
    from flowkit import RatioDimension

    if pop.gate_type == "quadrant":
        qgate = strategy.get_gate(pop.gate_path[-1], gate_path=pop.gate_path[:-1])
        quad = qgate.quadrants[pop.gate_name]
        dividers = {d.id: d for d in qgate.dimensions}
        dims = [dividers[r] for r in quad.divider_refs]
        coords: dict[str, Any] = {"quadrant": pop.gate_name, "quadrant_gate": qgate.gate_name,
                                  "ranges": {d.dimension_ref: [_num(v) for v in quad.get_divider_range(d.id)]
                                             for d in dims}}
    else:
        gate = strategy.get_gate(pop.gate_name, gate_path=pop.gate_path)
        dims = list(gate.dimensions or ())
        if pop.gate_type == "range":
            coords = {_dim_id(d): [_num(d.min), _num(d.max)] for d in dims}
        elif pop.gate_type == "polygon":
            coords = {"vertices": [[_num(c) for c in v] for v in gate.vertices]}
        elif pop.gate_type == "ellipse":
            ds = float(gate.distance_square)
            coords = {"center": [_num(c) for c in gate.coordinates],
                      "covariance": [[_num(c) for c in r] for r in np.asarray(gate.covariance_matrix)],
                      "distance": math.sqrt(ds), "distance_square": ds}
        elif pop.gate_type == "boolean":
            refs = []
            for r in gate.gate_refs:
                ref_name = names.get((r["ref"], tuple(r["path"])), r["ref"])
                refs.append(("not " if r.get("complement") else "") + ref_name)
            coords = {gate.type: refs}
        else:  # pragma: no cover - FlowKit has no other gate types
            coords = {}
        if getattr(gate, "use_complement", False):
            coords["complement"] = True
    comp = {}
    for d in dims:
        if isinstance(d, RatioDimension):
            comp[d.ratio_ref] = d.compensation_ref or "uncompensated"
        else:
            comp[_dim_id(d)] = d.compensation_ref or "uncompensated"
    if comp and pop.gate_type != "boolean":
        coords["compensation"] = comp
    row: dict[str, Any] = {"population": pop.name, "parent": pop.parent,
                           "gate_type": pop.gate_type, "method": kind}
    for axis, d in zip(("x", "y"), dims[:2]):
        if isinstance(d, RatioDimension):
            t = strategy.transformations.get(d.ratio_ref)
            row[f"{axis}_marker"] = d.ratio_ref
            row[f"{axis}_channel"] = "/".join(getattr(t, "dimensions", []) or [])
            desc = _transform_desc(t)
            if d.transformation_ref:
                desc += "," + _transform_desc(strategy.transformations.get(d.transformation_ref))
            row[f"{axis}_transform"] = desc
            continue
        dim_id = _dim_id(d)
        col = _channel_index(dim_id, fk_sample, strategy, d.compensation_ref)
        row[f"{axis}_channel"] = sample.channels[col] if col is not None else dim_id
        row[f"{axis}_marker"] = (sample.markers[col] or sample.channels[col]) if col is not None else dim_id
        xf = strategy.transformations.get(d.transformation_ref) if d.transformation_ref else None
        row[f"{axis}_transform"] = _transform_desc(xf)
    for axis in ("x", "y"):
        for part in ("marker", "channel", "transform"):
            row.setdefault(f"{axis}_{part}", "")
    row["coordinates"] = json.dumps(coords, sort_keys=True)
    row["fmo_sample_id"] = ""
    row["n_fit_events"] = ""
    return row


# ================================================================ export
def gatingml_id(name: str) -> str:
    """A Gating-ML 2.0 gate id (an XML NCName) for a population name.

    ``+`` becomes ``pos``, every run of characters other than letters, digits,
    ``.``, ``-`` and ``_`` becomes ``_``, and an id that would not start with a
    letter or ``_`` gets a leading ``_``: ``'CD4 PD1+LAG3+'`` -> ``'CD4_PD1posLAG3pos'``.
    """
    s = name.replace("+", "pos")
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")
    if not s or not (s[0].isalpha() or s[0] == "_"):
        s = "_" + s
    return s


def _ids(names: Sequence[str], reserved: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    used = set(reserved)
    for n in names:
        base = gatingml_id(n)
        cand, k = base, 2
        while cand in used:
            cand, k = f"{base}_{k}", k + 1
        out[n] = cand
        used.add(cand)
    return out


def data_driven_populations(template: Any) -> list[str]:
    """Populations whose gate is computed from the data (FMO, density, scatter, singlets)."""
    from .templates import QuadrantGate, ScatterGate, SingletGate, ThresholdGate

    out = []
    for p in template.populations:
        g = p.gate
        if isinstance(g, (ScatterGate, SingletGate)):
            out.append(p.name)
        elif isinstance(g, ThresholdGate) and g.threshold.method != "fixed":
            out.append(p.name)
        elif isinstance(g, QuadrantGate) and (g.x.method != "fixed" or g.y.method != "fixed"):
            out.append(p.name)
    return out


def _gate_description(gate: Any) -> str:
    from .templates import QuadrantGate, ScatterGate, SingletGate, ThresholdGate

    if isinstance(gate, ThresholdGate):
        return f"threshold on {gate.threshold.marker} ({gate.threshold.method})"
    if isinstance(gate, QuadrantGate):
        return f"quadrant on {gate.x.marker} ({gate.x.method}) x {gate.y.marker} ({gate.y.method})"
    if isinstance(gate, ScatterGate):
        return f"scatter gate on {gate.x}/{gate.y}"
    if isinstance(gate, SingletGate):
        return f"singlet gate on {gate.area}/{gate.height}"
    return gate.kind  # pragma: no cover


def export_gatingml(
    template: Any,
    sample: FcsSample,
    *,
    resolved: Sequence[Mapping[str, Any]] | None = None,
    compensation: tuple[Sequence[str], np.ndarray] | None = None,
    sample_id: str | None = None,
) -> bytes:
    """A native template as a Gating-ML 2.0 document, resolved against ``sample``'s channels.

    Each marker becomes the ``$PnN`` it resolves to in ``sample`` (as
    :func:`immunoprofile.gating.prepare` finds it); transforms are the template's
    (identity dimensions get none); compensation is ``'FCS'`` (the file's own
    spillover) where our engine compensates with the file's matrix, a
    ``spectrumMatrix`` where it uses another matrix, and ``'uncompensated'``
    for channels outside the matrix. Thresholds and quadrants become rectangle
    gates (``min <= x < max``, the same rule), so a divider of 0 or below is kept
    exactly. Data-driven gates (FMO, density, scatter, singlets) are exported
    from ``resolved``: the ``gates.csv`` rows of one sample (threshold -> range,
    quadrant -> two-dimensional range, scatter -> ellipse, singlets -> polygon).

    Parameters
    ----------
    resolved
        ``gates.csv`` rows of one sample; required when the template has data-driven gates.
    compensation
        ``(channel names, spillover matrix)`` overriding the template and the file, as in ``gate --compensation``.
    sample_id
        Recorded in the document's ``custom_info`` with the resolved rows' origin.

    Raises
    ------
    TemplateError
        The template is external, has data-driven gates and no ``resolved`` rows,
        or ``resolved`` does not fit the template or the sample.
    MarkerError, CompensationError
        A marker or the compensation matrix does not fit ``sample``.
    """
    import flowkit
    from flowkit import Dimension, gates as fk_gates

    from .gating import prepare
    from .templates import (
        BooleanGate, EllipseGate, PolygonGate, QuadrantGate, RangeGate, ThresholdGate,
    )
    from .transform import Identity

    if getattr(template, "external", False):
        raise TemplateError("this template is already a Gating-ML/FlowJo document; export works on native YAML "
                            "templates", path=template.source, hint="use the document itself")
    dynamic = data_driven_populations(template)
    rows = _resolved_rows(resolved, template) if resolved is not None else {}
    if dynamic and resolved is None:
        listing = "; ".join(f"{n} ({_gate_description(template.population(n).gate)})" for n in dynamic)
        raise TemplateError(f"{len(dynamic)} gate(s) are computed from the data and have no fixed coordinates to "
                            f"export: {listing}", path=template.source,
                            hint="export the gates one sample used: 'immunoprofile templates export NAME --sample "
                                 "FCS --resolved RESULTS_DIR --sample-id ID'")
    missing = [n for n in dynamic if n not in rows]
    if missing:
        raise TemplateError(f"the resolved gates have no row for population(s) {', '.join(missing)}",
                            path=template.source, hint="give the gates.csv rows of one sample gated with this "
                                                       "template version")
    data = prepare(sample, template, compensation=(tuple(compensation[0]), np.asarray(compensation[1], float))
                   if compensation is not None else None)
    ids = _ids([p.name for p in template.populations], {ROOT})
    strategy = flowkit.GatingStrategy()

    comp_ref = None
    comp_note = data.compensation_source
    if data.spill_inverse is not None:
        names, matrix = _compensation_source(data, compensation)
        uncovered = [c for c in _flowkit_fluorescence(sample.channels) if c not in names]
        if data.compensation_source == "file" and not uncovered:
            comp_ref = "FCS"
        else:
            # FlowKit applies 'FCS' only when $SPILLOVER covers every fluorescence channel;
            # otherwise (and for matrices not from the file) the matrix goes in the document
            comp_ref = _ids(["spillover"], set(ids.values()))["spillover"]
            strategy.add_comp_matrix(comp_ref, flowkit.Matrix(np.asarray(matrix, dtype=np.float64), list(names),
                                                              fluorochromes=list(names)))
            if data.compensation_source == "file":
                comp_note = ("file (embedded: the file's spillover matrix does not cover "
                             f"{', '.join(uncovered)}, which Gating-ML 'FCS' requires in FlowKit)")
    xform_ids: dict[tuple, str] = {}
    used_ids = set(ids.values()) | ({comp_ref} if comp_ref else set())

    def dimension(dim: str, lo: float | None = None, hi: float | None = None) -> Any:
        col = data.channel_of[dim]
        t = data.transforms[dim]
        xid = None
        if not isinstance(t, Identity):
            key = (t.kind, tuple(sorted(t.params().items())))
            if key not in xform_ids:
                xid = _ids([f"{t.kind}_{len(xform_ids) + 1}"], used_ids)[f"{t.kind}_{len(xform_ids) + 1}"]
                used_ids.add(xid)
                xform_ids[key] = xid
                strategy.add_transform(xid, t.to_flowkit(xid))
            xid = xform_ids[key]
        cref = comp_ref if (comp_ref and col in data.spill_columns) else "uncompensated"
        return Dimension(data.sample.channels[col], compensation_ref=cref, transformation_ref=xid,
                         range_min=lo, range_max=hi)

    def range_gate(gid: str, bounds: Sequence[tuple[str, float | None, float | None]]) -> Any:
        return fk_gates.RectangleGate(gid, [dimension(d, lo, hi) for d, lo, hi in bounds])

    paths: dict[str, tuple[str, ...]] = {ROOT: (ROOT,)}
    info: dict[str, dict[str, str]] = {}
    for pop in template.populations:
        gid = ids[pop.name]
        g = pop.gate
        origin = "template"
        if pop.name in dynamic:
            fk_gate = _gate_from_row(gid, pop, rows[pop.name], data, dimension, range_gate, template.source)
            origin = f"gates.csv ({rows[pop.name].get('method', '')})"
        elif isinstance(g, RangeGate):
            fk_gate = range_gate(gid, list(zip(g.dims, g.mins, g.maxs)))
        elif isinstance(g, ThresholdGate):
            v = float(g.threshold.value)
            fk_gate = range_gate(gid, [(g.threshold.marker, v, None) if g.side == "above"
                                       else (g.threshold.marker, None, v)])
        elif isinstance(g, QuadrantGate):
            fk_gate = range_gate(gid, _quadrant_bounds(g.x.marker, g.y.marker, float(g.x.value),
                                                       float(g.y.value), g.quadrant))
        elif isinstance(g, PolygonGate):
            fk_gate = fk_gates.PolygonGate(gid, [dimension(g.x), dimension(g.y)],
                                           [[float(a), float(b)] for a, b in g.vertices])
        elif isinstance(g, EllipseGate):
            fk_gate = fk_gates.EllipsoidGate(gid, [dimension(g.x), dimension(g.y)], [float(c) for c in g.center],
                                             [[float(c) for c in r] for r in g.covariance], float(g.distance) ** 2)
        elif isinstance(g, BooleanGate):
            refs = [{"ref": ids[n], "path": paths[n], "complement": neg} for n, neg in g.operands]
            if g.op == "not":
                refs = [{"ref": ids[g.operands[0][0]], "path": paths[g.operands[0][0]], "complement": False}]
            fk_gate = fk_gates.BooleanGate(gid, g.op, refs)
        else:  # pragma: no cover - data-driven kinds are handled above
            raise TemplateError(f"population {pop.name!r}: gate type {g.kind!r} cannot be exported",
                                path=template.source)
        strategy.add_gate(fk_gate, paths[pop.parent])
        paths[pop.name] = (*paths[pop.parent], gid)
        info[gid] = {"population": pop.name, "parent": pop.parent, "gate": g.kind, "origin": origin}
    buf = io.BytesIO()
    flowkit.export_gatingml(strategy, buf)
    meta = {"template": template.name, "template_version": template.version, "template_sha256": template.sha256,
            "sample": Path(sample.path).name, "sample_sha256": sample.sha256,
            "compensation": comp_note}
    if resolved is not None:
        meta["resolved_sample_id"] = sample_id or ""
    return _annotate(buf.getvalue(), info, meta)


def resolved_gates(results: str | Path, sample_id: str, template: Any) -> tuple[list[dict[str, str]], str]:
    """The ``gates.csv`` rows of one sample and template, and the sample's file SHA-256 (``''`` if unknown).

    ``results`` is a results folder of ``immunoprofile gate`` or the path of its ``gates.csv``.

    Raises
    ------
    ResultsError
        The folder has no readable ``gates.csv``, or no rows for this sample and template.
    """
    import pandas as pd

    from .errors import ResultsError

    p = Path(results)
    csv = p / "gates.csv" if p.is_dir() else p
    if not csv.is_file():
        raise ResultsError("no gates.csv here", path=str(p), code="RESULTS_NOT_FOUND",
                           hint="give the results folder written by 'immunoprofile gate'")
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise ResultsError(f"cannot be read as CSV ({e})", path=str(csv)) from None
    need = {"sample_id", "population", "gate_type", "coordinates"}
    if not need <= set(table.columns):
        raise ResultsError(f"is not a gates table (missing columns {', '.join(sorted(need - set(table.columns)))})",
                           path=str(csv))
    mine = table[table["sample_id"] == sample_id]
    if "template" in table.columns:
        mine = mine[mine["template"] == template.name]
    if mine.empty:
        ids = sorted(set(table.loc[table["template"] == template.name, "sample_id"])) \
            if "template" in table.columns else sorted(set(table["sample_id"]))
        shown = ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")
        raise ResultsError(f"no gates of sample {sample_id!r} with template {template.name!r}; samples gated "
                           f"with it: {shown or 'none'}", path=str(csv), hint="check --sample-id")
    file_sha = ""
    pops = csv.with_name("populations.csv")
    if pops.is_file():
        try:
            ptab = pd.read_csv(pops, dtype=str, keep_default_na=False, usecols=["sample_id", "file_sha256"])
            shas = set(ptab.loc[ptab["sample_id"] == sample_id, "file_sha256"])
            file_sha = shas.pop() if len(shas) == 1 else ""
        except (OSError, ValueError):
            file_sha = ""
    return mine.to_dict("records"), file_sha


def _quadrant_bounds(x: str, y: str, tx: float, ty: float,
                     quadrant: str) -> list[tuple[str, float | None, float | None]]:
    bx = (x, tx, None) if quadrant[0] == "+" else (x, None, tx)
    by = (y, ty, None) if quadrant[1] == "+" else (y, None, ty)
    return [bx, by]


def _flowkit_fluorescence(channels: Sequence[str]) -> list[str]:
    """Channels FlowIO/FlowKit count as fluorescence (not FSC-*, SSC-* or Time)."""
    return [c for c in channels if c.lower()[:4] not in ("fsc-", "ssc-", "time")]


def _compensation_source(data: Any, override: tuple[Sequence[str], np.ndarray] | None
                         ) -> tuple[Sequence[str], np.ndarray]:
    if data.compensation_source == "file":
        names, matrix = data.sample.spillover
        return names, np.asarray(matrix, dtype=np.float64)
    if data.compensation_source == "command line" and override is not None:
        return override[0], np.asarray(override[1], dtype=np.float64)
    from .transform import compensation_matrix_from_csv

    names, matrix = compensation_matrix_from_csv(data.compensation_source)
    return names, np.asarray(matrix, dtype=np.float64)


def _resolved_rows(rows: Sequence[Mapping[str, Any]], template: Any) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    sids = {str(r.get("sample_id", "")) for r in rows}
    if len(sids) > 1:
        raise TemplateError(f"the resolved gates hold {len(sids)} samples ({', '.join(sorted(sids)[:4])}...); "
                            "give the rows of one sample", path=template.source)
    for r in rows:
        sha = str(r.get("template_sha256", "") or "")
        if sha and sha != template.sha256:
            raise TemplateError(f"the resolved gates were made with another version of template {template.name!r} "
                                f"(sha256 {sha[:12]}..., this template {template.sha256[:12]}...)",
                                path=template.source, hint="export with the template version the results used")
        out[str(r.get("population", ""))] = r
    return out


def _coords(row: Mapping[str, Any], pop: Any, source: str) -> dict[str, Any]:
    raw = row.get("coordinates", "")
    try:
        coords = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (TypeError, ValueError):
        raise TemplateError(f"population {pop.name!r}: the resolved coordinates {raw!r} are not JSON",
                            path=source) from None
    if not isinstance(coords, dict):
        raise TemplateError(f"population {pop.name!r}: the resolved coordinates {raw!r} are not a mapping",
                            path=source)
    return coords


def _gate_from_row(gid: str, pop: Any, row: Mapping[str, Any], data: Any, dimension: Any, range_gate: Any,
                   source: str) -> Any:
    """A FlowKit gate with the coordinates one sample used (a ``gates.csv`` row)."""
    from flowkit import gates as fk_gates

    from .templates import QuadrantGate, ScatterGate, SingletGate, ThresholdGate

    g = pop.gate
    coords = _coords(row, pop, source)
    for axis, dim in zip(("x", "y"), g.dims):
        chan = str(row.get(f"{axis}_channel", "") or "")
        if chan and chan != data.channel(dim):
            raise TemplateError(f"population {pop.name!r}: the resolved gate used channel {chan!r} for {dim} but "
                                f"{Path(data.sample.path).name} has it in {data.channel(dim)!r}", path=source,
                                hint="give the FCS file of the sample whose gates are exported (--sample)")

    def number(v: Any, what: str) -> float | None:
        if v is None:
            return None
        try:
            out = float(v)
        except (TypeError, ValueError):
            raise TemplateError(f"population {pop.name!r}: resolved {what} {v!r} is not a number",
                                path=source) from None
        if not math.isfinite(out):
            raise TemplateError(f"population {pop.name!r}: resolved {what} is {v!r}; the sample's gate could not "
                                "be computed, so it cannot be exported", path=source)
        return out

    try:
        if isinstance(g, ThresholdGate):
            lo, hi = coords[g.threshold.marker]
            return range_gate(gid, [(g.threshold.marker, number(lo, "minimum"), number(hi, "maximum"))])
        if isinstance(g, QuadrantGate):
            q = str(coords.get("quadrant", g.quadrant))
            if q != g.quadrant:
                raise TemplateError(f"population {pop.name!r}: resolved quadrant {q!r} differs from the template's "
                                    f"{g.quadrant!r}", path=source)
            return range_gate(gid, _quadrant_bounds(g.x.marker, g.y.marker, number(coords["x_divider"], "x divider"),
                                                    number(coords["y_divider"], "y divider"), g.quadrant))
        if isinstance(g, ScatterGate):
            center = [number(c, "center") for c in coords["center"]]
            cov = [[number(c, "covariance") for c in r] for r in coords["covariance"]]
            dist = number(coords["distance"], "distance")
            return fk_gates.EllipsoidGate(gid, [dimension(g.x), dimension(g.y)], center, cov, dist ** 2)
        if isinstance(g, SingletGate):
            verts = [[number(a, "vertex"), number(b, "vertex")] for a, b in coords["vertices"]]
            return fk_gates.PolygonGate(gid, [dimension(g.height), dimension(g.area)], verts)
    except (KeyError, TypeError, ValueError) as e:
        raise TemplateError(f"population {pop.name!r}: the resolved coordinates {row.get('coordinates')!r} do not "
                            f"fit its {g.kind} gate ({type(e).__name__}: {e})", path=source) from None
    raise TemplateError(f"population {pop.name!r}: gate type {g.kind!r} cannot be exported",
                        path=source)  # pragma: no cover


def _annotate(xml: bytes, info: Mapping[str, Mapping[str, str]], meta: Mapping[str, str]) -> bytes:
    """Add ``data-type:custom_info`` with our population names and provenance (allowed by the schema)."""
    from lxml import etree

    root = etree.fromstring(xml)
    tag = f"{{{NS_DATATYPE}}}custom_info"
    top = etree.Element(tag)
    el = etree.SubElement(top, CUSTOM_TAG)
    for k in sorted(meta):
        el.set(k, str(meta[k]))
    root.insert(0, top)
    gates = {g.get(f"{{{NS_GATING}}}id"): g for g in root if g.get(f"{{{NS_GATING}}}id") in info}
    for gid, gate in gates.items():
        ci = etree.Element(tag)
        sub = etree.SubElement(ci, CUSTOM_TAG)
        for k in sorted(info[gid]):
            sub.set(k, info[gid][k])
        gate.insert(0, ci)
        root.remove(gate)
    for gid in info:  # gates in template order (FlowKit writes them depth first)
        root.append(gates[gid])
    etree.indent(root, space="  ")
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)
