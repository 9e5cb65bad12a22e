"""Gating templates: YAML -> validated, versioned, hashed :class:`Template`.

A template names markers, never channels, and lists populations in order, each
with a parent and a gate. See README.md ("Gating templates") for the format.
Errors name the file, the line and the field, and say what is expected.

Bundled templates live in ``gating_templates/`` and are found by name
(``t_cell_exhaustion``); any other argument is read as a path.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TemplateError

BUNDLED_DIR = Path(__file__).resolve().parent / "gating_templates"
ROOT = "root"

SIDES = ("above", "below")
THRESHOLD_METHODS = ("fixed", "fmo", "density")
QUADRANTS = ("++", "+-", "-+", "--")


# ---------------------------------------------------------------- gate specs
@dataclass(frozen=True)
class Threshold:
    """A one-dimensional cut on a marker, fixed or chosen from the data.

    ``method``: ``fixed`` (``value`` in transformed units), ``fmo`` (``percentile`` of
    the FMO control's events in the same parent population, same batch and panel),
    or ``density`` (valley between negative and positive modes, else ``offset``
    robust SDs above the negative mode). ``fallback`` is used when the FMO is absent.
    """

    marker: str
    method: str = "density"
    value: float | None = None
    percentile: float = 99.5
    fallback: str | None = None
    offset: float = 3.0
    min_value: float | None = None
    max_value: float | None = None


@dataclass(frozen=True)
class RangeGate:
    """Rectangle/range: ``min <= x < max`` in every dimension (Gating-ML 2.0, 5.1)."""

    dims: tuple[str, ...]
    mins: tuple[float | None, ...]
    maxs: tuple[float | None, ...]
    kind: str = "range"


@dataclass(frozen=True)
class ThresholdGate:
    """Events above (``>= t``) or below (``< t``) a threshold on one marker."""

    threshold: Threshold
    side: str = "above"
    kind: str = "threshold"

    @property
    def dims(self) -> tuple[str, ...]:
        return (self.threshold.marker,)


@dataclass(frozen=True)
class PolygonGate:
    """Polygon in two dimensions (Gating-ML 2.0, 5.2)."""

    x: str
    y: str
    vertices: tuple[tuple[float, float], ...]
    kind: str = "polygon"

    @property
    def dims(self) -> tuple[str, ...]:
        return (self.x, self.y)


@dataclass(frozen=True)
class EllipseGate:
    """Ellipse: ``(v-c)' C^-1 (v-c) <= d^2`` (Gating-ML 2.0, 5.3)."""

    x: str
    y: str
    center: tuple[float, float]
    covariance: tuple[tuple[float, float], tuple[float, float]]
    distance: float
    kind: str = "ellipse"

    @property
    def dims(self) -> tuple[str, ...]:
        return (self.x, self.y)


@dataclass(frozen=True)
class QuadrantGate:
    """One quadrant of a split on two markers; ``quadrant`` is e.g. ``'+-'`` (x positive, y negative).

    An event on a divider belongs to the positive side (Gating-ML 2.0, 5.4).
    """

    x: Threshold
    y: Threshold
    quadrant: str
    kind: str = "quadrant"

    @property
    def dims(self) -> tuple[str, ...]:
        return (self.x.marker, self.y.marker)


@dataclass(frozen=True)
class ScatterGate:
    """Adaptive scatter gate: a Gaussian mixture on two scatter channels; keeps one component's ellipse."""

    x: str
    y: str
    components: int = 6
    select: str = "lymphocytes"
    quantile: float | None = None  # None: widest ellipse with <= 1% other components
    max_events: int = 10000
    kind: str = "scatter_gmm"

    @property
    def dims(self) -> tuple[str, ...]:
        return (self.x, self.y)


@dataclass(frozen=True)
class SingletGate:
    """Adaptive singlet gate: area/height ratio within ``mads`` robust SDs of the median."""

    area: str
    height: str
    mads: float = 4.0
    kind: str = "singlets"

    @property
    def dims(self) -> tuple[str, ...]:
        return (self.height, self.area)


@dataclass(frozen=True)
class BooleanGate:
    """``and``/``or`` of other populations (each possibly negated), or ``not`` one."""

    op: str
    operands: tuple[tuple[str, bool], ...]  # (population, negated)
    kind: str = "boolean"

    @property
    def dims(self) -> tuple[str, ...]:
        return ()


Gate = RangeGate | ThresholdGate | PolygonGate | EllipseGate | QuadrantGate | ScatterGate | SingletGate | BooleanGate


@dataclass(frozen=True)
class Population:
    """A named population: its parent, its gate, and the reference for ``pct_of``."""

    name: str
    parent: str
    gate: Gate
    reference: str
    line: int = 0


@dataclass(frozen=True)
class Template:
    """A validated gating template.

    ``sha256`` is the hash of the template's canonical content (comments and
    formatting do not change it), written with every result.
    """

    name: str
    version: str
    description: str
    panel: str | None
    compensation: str  # 'auto' | 'file' | 'none' | path to a matrix file
    transforms: Mapping[str, Any]  # 'fluorescence', 'scatter', and per-marker overrides
    aliases: Mapping[str, tuple[str, ...]]
    channels: Mapping[str, str]
    populations: tuple[Population, ...]
    source: str
    sha256: str
    beads: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def population(self, name: str) -> Population:
        for p in self.populations:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def markers(self) -> tuple[str, ...]:
        """Every marker or channel a gate of this template uses, in order of first use."""
        seen: dict[str, None] = {}
        for p in self.populations:
            for d in p.gate.dims:
                seen.setdefault(d, None)
        return tuple(seen)

    def fmo_markers(self) -> tuple[str, ...]:
        """Markers whose thresholds come from FMO controls."""
        out: dict[str, None] = {}
        for p in self.populations:
            for t in gate_thresholds(p.gate):
                if t.method == "fmo":
                    out.setdefault(t.marker, None)
        return tuple(out)


def gate_thresholds(gate: Gate) -> tuple[Threshold, ...]:
    """The thresholds a gate takes (one for a threshold gate, two for a quadrant, else none)."""
    if isinstance(gate, ThresholdGate):
        return (gate.threshold,)
    if isinstance(gate, QuadrantGate):
        return (gate.x, gate.y)
    return ()


# ---------------------------------------------------------------- YAML with line numbers
class _Located:
    """Parsed YAML plus the line of every field path (for error messages)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[str, int] = {}

    def build(self, node: Any, path: str) -> Any:
        import yaml

        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for k, v in node.value:
                key = self.build(k, path)
                if not isinstance(key, (str, int, float)):
                    raise TemplateError(f"line {k.start_mark.line + 1}: a key must be a plain name", path=self.source)
                key = str(key)
                if key in out:
                    raise TemplateError(f"line {k.start_mark.line + 1}: field {key!r} appears twice in {path or 'the top level'}",
                                        path=self.source)
                out[key] = self.build(v, f"{path}.{key}" if path else key)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(v, f"{path}[{i}]") for i, v in enumerate(node.value)]
        constructor = yaml.SafeLoader("")
        return constructor.construct_object(node, deep=True)


class _Checker:
    """Field access with precise errors: file, line, field, what is expected."""

    def __init__(self, loc: _Located) -> None:
        self.loc = loc

    def fail(self, path: str, expected: str, got: Any = None, *, code: str | None = None) -> TemplateError:
        line = self.loc.lines.get(path)
        while line is None and path:
            path_up = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", path)
            if path_up == path:
                break
            path = path_up
            line = self.loc.lines.get(path)
        where = f"line {line} ({path})" if line else (path or "top level")
        got_txt = "" if got is None else f", got {got!r}"
        return TemplateError(f"{where}: expected {expected}{got_txt}", path=self.loc.source, code=code)

    def mapping(self, obj: Any, path: str, allowed: Sequence[str], required: Sequence[str] = ()) -> dict:
        if not isinstance(obj, dict):
            raise self.fail(path, "a mapping of fields", type(obj).__name__)
        for k in obj:
            if k not in allowed:
                close = __import__("difflib").get_close_matches(k, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.fail(f"{path}.{k}" if path else k, f"one of the fields {', '.join(allowed)}{hint}", k)
        for k in required:
            if k not in obj:
                raise self.fail(path, f"the field {k!r}")
        return obj

    def string(self, obj: Any, path: str) -> str:
        if not isinstance(obj, (str, int, float)) or isinstance(obj, bool) or str(obj).strip() == "":
            raise self.fail(path, "a non-empty text", obj)
        return str(obj).strip()

    def number(self, obj: Any, path: str, *, allow_none: bool = False) -> float | None:
        if obj is None and allow_none:
            return None
        if isinstance(obj, str):  # YAML 1.1 reads 1e9 (no dot) as text
            try:
                obj = float(obj)
            except ValueError:
                pass
        if isinstance(obj, bool) or not isinstance(obj, (int, float)):
            raise self.fail(path, "a number" + (" or null" if allow_none else ""), obj)
        return float(obj)

    def choice(self, obj: Any, path: str, choices: Sequence[str]) -> str:
        if obj not in choices:
            raise self.fail(path, "one of " + ", ".join(repr(c) for c in choices), obj)
        return str(obj)


# ---------------------------------------------------------------- parsing
TOP_FIELDS = ("name", "version", "description", "panel", "compensation", "transforms", "aliases",
              "channels", "reference", "populations", "beads")


def load_template(name_or_path: str | Path) -> Template:
    """Load a bundled template by name, or a template file by path.

    Raises
    ------
    TemplateError
        If the template cannot be found or is invalid.
    """
    p = Path(name_or_path)
    if p.suffix.lower() in (".xml", ".wsp"):
        from .interop import load_external_template

        return load_external_template(p)  # type: ignore[return-value]
    if not p.suffix and not p.exists():
        candidate = BUNDLED_DIR / f"{name_or_path}.yaml"
        if candidate.exists():
            p = candidate
        else:
            names = ", ".join(list_bundled()) or "none"
            raise TemplateError(f"unknown template {str(name_or_path)!r}; bundled templates: {names}",
                                hint="give a bundled name or the path to a template file", code="TEMPLATE_NOT_FOUND")
    if not p.exists():
        raise TemplateError("template file not found", path=str(p), code="TEMPLATE_NOT_FOUND",
                            hint="check the path, or run 'immunoprofile templates list'")
    text = p.read_text(encoding="utf-8", errors="replace")
    return parse_template(text, str(p))


def list_bundled() -> list[str]:
    """Names of the bundled templates."""
    return sorted(f.stem for f in BUNDLED_DIR.glob("*.yaml"))


def parse_template(text: str, source: str = "<template>") -> Template:
    """Parse and validate the YAML text of a template.

    Raises
    ------
    TemplateError
        With the file, line, field and what is expected.
    """
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise TemplateError(f"{where}not valid YAML ({getattr(e, 'problem', e)})", path=source,
                            hint="check indentation and quoting") from None
    if node is None:
        raise TemplateError("the template is empty", path=source)
    loc = _Located(source)
    data = loc.build(node, "")
    ck = _Checker(loc)
    ck.mapping(data, "", TOP_FIELDS, required=("name", "version", "populations"))
    name = ck.string(data["name"], "name")
    version = ck.string(data["version"], "version")
    if not re.fullmatch(r"\d+(\.\d+){0,2}([.-]?\w+)?", version):
        raise ck.fail("version", "a version like 1.0.0", version)
    description = str(data.get("description", "") or "").strip()
    panel = ck.string(data["panel"], "panel") if data.get("panel") is not None else None
    compensation = ck.string(data.get("compensation", "auto"), "compensation")
    transforms = _parse_transforms(data.get("transforms", {}) or {}, ck)
    aliases = _parse_aliases(data.get("aliases", {}) or {}, ck)
    channels = {}
    if data.get("channels"):
        ck.mapping(data["channels"], "channels", list(data["channels"]))
        channels = {str(k): ck.string(v, f"channels.{k}") for k, v in data["channels"].items()}
    default_ref = ck.string(data["reference"], "reference") if data.get("reference") else None

    pops_raw = data["populations"]
    if not isinstance(pops_raw, list) or not pops_raw:
        raise ck.fail("populations", "a non-empty list of populations")
    populations: list[Population] = []
    seen: set[str] = {ROOT}
    for i, item in enumerate(pops_raw):
        path = f"populations[{i}]"
        ck.mapping(item, path, ("name", "parent", "gate", "reference", "description"), required=("name", "gate"))
        pname = ck.string(item["name"], f"{path}.name")
        if pname == ROOT:
            raise ck.fail(f"{path}.name", f"a population name other than {ROOT!r} (reserved for all events)", pname)
        if pname in seen:
            raise ck.fail(f"{path}.name", "a population name used only once", pname, code="TEMPLATE_DUPLICATE")
        parent = ck.string(item.get("parent", ROOT), f"{path}.parent")
        if parent not in seen:
            raise ck.fail(f"{path}.parent", "the name of a population defined above (or 'root')", parent)
        gate = _parse_gate(item["gate"], f"{path}.gate", ck, seen, parent, populations)
        populations.append(Population(pname, parent, gate, reference="", line=loc.lines.get(path, 0)))
        seen.add(pname)
    # references: per population, else template default, else parent
    final: list[Population] = []
    parent_of = {p.name: p.parent for p in populations}

    def below(name: str, ancestor: str) -> bool:
        while name in parent_of:
            name = parent_of[name]
            if name == ancestor:
                return True
        return False

    for i, (item, p) in enumerate(zip(pops_raw, populations)):
        ref = item.get("reference")
        if ref is None:
            # the template's default reference applies to the populations below it; above it
            # (e.g. lymphocytes when the reference is live) a percentage of it would exceed 100
            ref = default_ref if default_ref is not None and below(p.name, default_ref) else p.parent
        ref = ck.string(ref, f"populations[{i}].reference" if "reference" in item else "reference")
        if ref not in seen:
            raise ck.fail(f"populations[{i}].reference" if "reference" in item else "reference",
                          "the name of a population of this template (or 'root')", ref)
        final.append(Population(p.name, p.parent, p.gate, ref, p.line))
    beads = None
    if data.get("beads") is not None:
        b = ck.mapping(data["beads"], "beads", ("population", "beads_per_test", "volume_ul"),
                       required=("population", "beads_per_test", "volume_ul"))
        bpop = ck.string(b["population"], "beads.population")
        if bpop not in seen:
            raise ck.fail("beads.population", "a population of this template", bpop)
        beads = {"population": bpop, "beads_per_test": ck.number(b["beads_per_test"], "beads.beads_per_test"),
                 "volume_ul": ck.number(b["volume_ul"], "beads.volume_ul")}
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    sha = hashlib.sha256(canonical.encode()).hexdigest()
    return Template(name=name, version=version, description=description, panel=panel,
                    compensation=compensation, transforms=transforms, aliases=aliases, channels=channels,
                    populations=tuple(final), source=source, sha256=sha, beads=beads, raw=data)


def _parse_transforms(obj: Any, ck: _Checker) -> dict[str, Any]:
    from .transform import transform_from_spec

    if not isinstance(obj, dict):
        raise ck.fail("transforms", "a mapping: fluorescence, scatter, or a marker name -> transform", obj)
    out: dict[str, Any] = {}
    for k, v in obj.items():
        try:
            out[str(k)] = transform_from_spec(v, where=f"{ck.loc.source}: line {ck.loc.lines.get(f'transforms.{k}', '?')} (transforms.{k})")
        except TemplateError:
            raise
        except Exception as e:  # defensive: transform_from_spec should raise TemplateError itself
            raise ck.fail(f"transforms.{k}", f"a valid transform ({e})", v) from None
    return out


def _parse_aliases(obj: Any, ck: _Checker) -> dict[str, tuple[str, ...]]:
    if not isinstance(obj, dict):
        raise ck.fail("aliases", "a mapping: marker -> list of spellings", obj)
    out = {}
    for k, v in obj.items():
        vals = v if isinstance(v, list) else [v]
        out[str(k)] = tuple(ck.string(x, f"aliases.{k}") for x in vals)
    return out


def _parse_threshold(obj: Any, path: str, ck: _Checker, marker: str | None = None) -> Threshold:
    allowed = ("marker", "method", "value", "percentile", "fallback", "offset", "min", "max")
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        if marker is None:
            raise ck.fail(path, "a mapping with 'marker'", obj)
        return Threshold(marker=marker, method="fixed", value=float(obj))
    ck.mapping(obj, path, allowed)
    m = obj.get("marker", marker)
    if m is None:
        raise ck.fail(path, "the field 'marker'")
    m = ck.string(m, f"{path}.marker")
    method = ck.choice(obj.get("method", "fixed" if "value" in obj else "density"), f"{path}.method", THRESHOLD_METHODS)
    value = ck.number(obj["value"], f"{path}.value") if "value" in obj else None
    if method == "fixed" and value is None:
        raise ck.fail(path, "a 'value' for a fixed threshold")
    pct = ck.number(obj.get("percentile", 99.5), f"{path}.percentile")
    if not 50 <= pct < 100:
        raise ck.fail(f"{path}.percentile", "a percentile between 50 and 100", pct)
    fallback = obj.get("fallback")
    if fallback is not None:
        fallback = ck.choice(fallback, f"{path}.fallback", ("density", "fixed"))
        if fallback == "fixed" and value is None:
            raise ck.fail(path, "a 'value' to fall back to")
    offset = ck.number(obj.get("offset", 3.0), f"{path}.offset")
    return Threshold(marker=m, method=method, value=value, percentile=pct, fallback=fallback, offset=offset,
                     min_value=ck.number(obj.get("min"), f"{path}.min", allow_none=True),
                     max_value=ck.number(obj.get("max"), f"{path}.max", allow_none=True))


def _pair(obj: Any, path: str, ck: _Checker) -> tuple[float, float]:
    if not isinstance(obj, list) or len(obj) != 2:
        raise ck.fail(path, "a pair [x, y]", obj)
    return (ck.number(obj[0], f"{path}[0]"), ck.number(obj[1], f"{path}[1]"))


GATE_TYPES = ("range", "rectangle", "threshold", "polygon", "ellipse", "quadrant", "scatter", "singlets", "boolean")


def _parse_gate(obj: Any, path: str, ck: _Checker, known: set[str], parent: str,
                defined: list[Population]) -> Gate:
    if not isinstance(obj, dict) or "type" not in obj:
        raise ck.fail(path, "a mapping with a 'type' (one of " + ", ".join(GATE_TYPES) + ")", obj)
    kind = ck.choice(obj["type"], f"{path}.type", GATE_TYPES)
    if kind in ("range", "rectangle"):
        ck.mapping(obj, path, ("type", "dimensions"), required=("dimensions",))
        dims = ck.mapping(obj["dimensions"], f"{path}.dimensions", list(obj["dimensions"] or {}))
        if not dims:
            raise ck.fail(f"{path}.dimensions", "at least one dimension: marker: [min, max]")
        names, mins, maxs = [], [], []
        for k, v in dims.items():
            if not isinstance(v, list) or len(v) != 2:
                raise ck.fail(f"{path}.dimensions.{k}", "[min, max] (null for unbounded)", v)
            lo = ck.number(v[0], f"{path}.dimensions.{k}[0]", allow_none=True)
            hi = ck.number(v[1], f"{path}.dimensions.{k}[1]", allow_none=True)
            if lo is None and hi is None:
                raise ck.fail(f"{path}.dimensions.{k}", "at least one of min and max", v)
            if lo is not None and hi is not None and lo >= hi:
                raise ck.fail(f"{path}.dimensions.{k}", "min < max", v)
            names.append(str(k))
            mins.append(lo)
            maxs.append(hi)
        return RangeGate(tuple(names), tuple(mins), tuple(maxs))
    if kind == "threshold":
        ck.mapping(obj, path, ("type", "marker", "side", "method", "value", "percentile", "fallback", "offset",
                               "min", "max"), required=("marker",))
        side = ck.choice(obj.get("side", "above"), f"{path}.side", SIDES)
        body = {k: v for k, v in obj.items() if k not in ("type", "side")}
        return ThresholdGate(_parse_threshold(body, path, ck), side)
    if kind == "polygon":
        ck.mapping(obj, path, ("type", "x", "y", "vertices"), required=("x", "y", "vertices"))
        verts = obj["vertices"]
        if not isinstance(verts, list) or len(verts) < 3:
            raise ck.fail(f"{path}.vertices", "a list of at least 3 [x, y] vertices", verts)
        return PolygonGate(ck.string(obj["x"], f"{path}.x"), ck.string(obj["y"], f"{path}.y"),
                           tuple(_pair(v, f"{path}.vertices[{i}]", ck) for i, v in enumerate(verts)))
    if kind == "ellipse":
        ck.mapping(obj, path, ("type", "x", "y", "center", "covariance", "distance"),
                   required=("x", "y", "center", "covariance", "distance"))
        cov = obj["covariance"]
        if not isinstance(cov, list) or len(cov) != 2:
            raise ck.fail(f"{path}.covariance", "a 2x2 matrix [[a, b], [b, c]]", cov)
        c = (_pair(cov[0], f"{path}.covariance[0]", ck), _pair(cov[1], f"{path}.covariance[1]", ck))
        det = c[0][0] * c[1][1] - c[0][1] * c[1][0]
        if det <= 0 or c[0][0] <= 0:
            raise ck.fail(f"{path}.covariance", "a positive-definite covariance matrix", cov)
        d = ck.number(obj["distance"], f"{path}.distance")
        if d <= 0:
            raise ck.fail(f"{path}.distance", "a positive distance", d)
        return EllipseGate(ck.string(obj["x"], f"{path}.x"), ck.string(obj["y"], f"{path}.y"),
                           _pair(obj["center"], f"{path}.center", ck), c, d)
    if kind == "quadrant":
        ck.mapping(obj, path, ("type", "x", "y", "quadrant"), required=("x", "y", "quadrant"))
        q = ck.choice(str(obj["quadrant"]), f"{path}.quadrant", QUADRANTS)
        return QuadrantGate(_parse_threshold(obj["x"], f"{path}.x", ck), _parse_threshold(obj["y"], f"{path}.y", ck), q)
    if kind == "scatter":
        ck.mapping(obj, path, ("type", "x", "y", "components", "select", "quantile", "max_events"), required=("x", "y"))
        comps = ck.number(obj.get("components", 6), f"{path}.components")
        if comps != int(comps) or not 2 <= comps <= 8:
            raise ck.fail(f"{path}.components", "a whole number from 2 to 8", obj.get("components"))
        q = obj.get("quantile", "auto")
        if q != "auto":
            q = ck.number(q, f"{path}.quantile")
            if not 0.5 <= q < 1:
                raise ck.fail(f"{path}.quantile", "'auto' or a coverage between 0.5 and 1 (e.g. 0.95)", q)
        else:
            q = None
        sel = ck.choice(obj.get("select", "lymphocytes"), f"{path}.select", ("lymphocytes", "largest"))
        return ScatterGate(ck.string(obj["x"], f"{path}.x"), ck.string(obj["y"], f"{path}.y"), int(comps), sel, q,
                           int(ck.number(obj.get("max_events", 10000), f"{path}.max_events")))
    if kind == "singlets":
        ck.mapping(obj, path, ("type", "area", "height", "mads"), required=("area", "height"))
        mads = ck.number(obj.get("mads", 4.0), f"{path}.mads")
        if mads <= 0:
            raise ck.fail(f"{path}.mads", "a positive number", mads)
        return SingletGate(ck.string(obj["area"], f"{path}.area"), ck.string(obj["height"], f"{path}.height"), mads)
    # boolean
    ck.mapping(obj, path, ("type", "and", "or", "not"))
    ops = [k for k in ("and", "or", "not") if k in obj]
    if len(ops) != 1:
        raise ck.fail(path, "exactly one of 'and', 'or', 'not'")
    op = ops[0]
    raw = obj[op]
    items = raw if isinstance(raw, list) else [raw]
    if op == "not" and len(items) != 1:
        raise ck.fail(f"{path}.not", "one population name", raw)
    if op != "not" and len(items) < 2:
        raise ck.fail(f"{path}.{op}", "a list of at least two population names", raw)
    operands = []
    for j, it in enumerate(items):
        ipath = f"{path}.{op}[{j}]" if isinstance(raw, list) else f"{path}.{op}"
        negated = False
        if isinstance(it, dict):
            ck.mapping(it, ipath, ("not",), required=("not",))
            it, negated = it["not"], True
        nm = ck.string(it, ipath)
        if nm not in known:
            raise ck.fail(ipath, "the name of a population defined above", nm)
        operands.append((nm, negated))
    # a boolean gate's operands must lie inside its parent (so the result does too)
    return BooleanGate(op, tuple(operands))
