"""Reference service ``dxf2svg``: converts an ASCII DXF drawing to SVG.

The routine a CAD program runs for "Export as SVG".  It is pure Python with
its own DXF reader, so the bundle is self-contained.

Theory of operation
-------------------
1. **Tags.**  An ASCII DXF file is a sequence of *group code / value* line
   pairs.  :func:`read_tags` turns the text into ``Tag(code, value, line)``
   triples, remembering the line number of each group code so every error can
   say where it is ("line 123: ...").
2. **Sections.**  :func:`read_drawing` walks ``0/SECTION 2/<name> ... 0/ENDSEC``
   blocks: layer colours from TABLES, block definitions from BLOCKS (``BLOCK``
   ... ``ENDBLK``), model-space entities from ENTITIES.  Everything else
   (HEADER, CLASSES, OBJECTS, paper space) is skipped.  An entity is a
   ``0/<TYPE>`` tag and the tags up to the next ``0``; a POLYLINE owns the
   VERTEX entities that follow it up to SEQEND, an INSERT its ATTRIBs.
3. **Geometry.**  :func:`flatten` expands the model space into primitives in
   world coordinates (WCS): :class:`Line`, :class:`EllipticArc` (circles and
   arcs become elliptic arcs under a non-uniform block scale), :class:`Path`
   (a polyline: lines and arcs from bulges) and :class:`Text`.  Points go
   through one 2-D affine matrix per nesting level: the entity's object
   coordinate system (OCS, from its extrusion vector by the DXF "arbitrary
   axis algorithm", projected onto the XY plane) and, for each INSERT,
   ``OCS . T(insert) . R(rotation) . T(column, row) . S(scale) . T(-base)``.
   An arc is kept as ``centre + a*cos(t) + b*sin(t)``, t from t0 to t1: an
   affine map only transforms ``centre``, ``a`` and ``b``, so arcs stay exact
   under any block transform, mirroring included.
4. **SVG.**  :func:`to_svg` flips the Y axis (DXF's y points up, SVG's down),
   turns each arc's conjugate axes into principal radii and a rotation for
   SVG's ``A`` command, and sets the ``viewBox`` to the drawing's extents.

Supported: LINE, CIRCLE, ARC, ELLIPSE, LWPOLYLINE and POLYLINE (2-D and 3-D,
bulges, closed), TEXT, MTEXT (plain text), POINT (as a dot), HATCH (boundary
loops of polylines, lines, arcs and ellipse arcs, filled; patterns drawn as a
translucent fill), SOLID, TRACE, 3DFACE (outline), INSERT and MINSERT with
translation, rotation, scale and nesting.  Other entity types are
counted in the result's ``skipped`` table.  Malformed input raises
:class:`DxfError` (a ValueError) naming the line; nothing else escapes.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

#: Nesting depth of INSERTs; real drawings use a handful of levels.
MAX_NESTING = 32
#: Primitives one drawing may expand to (MINSERT arrays and nested blocks
#: multiply): keeps a ten-line hostile file from producing gigabytes of SVG.
MAX_PRIMITIVES = 1_000_000
#: Group code value lines are at most 2049 characters in AutoCAD.
MAX_VALUE_LEN = 65536
BINARY_SENTINEL = b"AutoCAD Binary DXF"
#: Relative size of the margin around the extents in the viewBox.
MARGIN = 0.02
#: Tolerance for "this ellipse is a circle" and "this vector is the Z axis".
EPS = 1e-9
#: Below this, the arbitrary axis algorithm uses the world Y axis (DXF spec).
ARBITRARY_AXIS_LIMIT = 1.0 / 64.0

#: AutoCAD Color Index -> SVG colour, for the standard colours 1..9; other
#: indices draw in black (7 is "black on white paper").
ACI_COLOURS = {
    1: "#ff0000",
    2: "#ffff00",
    3: "#00ff00",
    4: "#00ffff",
    5: "#0000ff",
    6: "#ff00ff",
    7: "#000000",
    8: "#808080",
    9: "#c0c0c0",
}
BYBLOCK = 0
BYLAYER = 256
DEFAULT_COLOUR = "#000000"

_INT_RE = re.compile(r"^[+-]?\d{1,18}$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,3})?$")


class DxfError(ValueError):
    """The input is not a DXF drawing this converter can read; the message names the line."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


# --------------------------------------------------------------------------- tags


@dataclass(frozen=True)
class Tag:
    code: int
    value: str
    line: int

    def float(self) -> float:
        text = self.value.strip()
        if not _FLOAT_RE.match(text):
            raise DxfError(self.line + 1, f"group code {self.code} needs a number, got {text!r}")
        value = float(text)
        if not math.isfinite(value):
            raise DxfError(self.line + 1, f"group code {self.code}: number out of range")
        return value

    def int(self) -> int:
        text = self.value.strip()
        if not _INT_RE.match(text):
            # Some writers put "1.0" where an integer belongs; accept whole floats.
            if _FLOAT_RE.match(text) and float(text).is_integer() and abs(float(text)) < 2**53:
                return int(float(text))
            raise DxfError(self.line + 1, f"group code {self.code} needs an integer, got {text!r}")
        return int(text)


def decode(data: bytes) -> str:
    """Return the text of a DXF file: UTF-8 (R2007+) or, failing that, ANSI (Latin-1).

    Raises DxfError for binary DXF.
    """
    if data.startswith(BINARY_SENTINEL):
        raise DxfError(1, "binary DXF is not supported; save the drawing as ASCII DXF")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def read_tags(text: str) -> list[Tag]:
    """Split DXF text into tags.

    Returns the tags in file order.  Raises DxfError when a group code is not
    an integer, a value is missing or a line is absurdly long.
    """
    lines = text.split("\n")
    if lines and lines[-1].strip() == "":
        lines.pop()
    if len(lines) % 2:
        raise DxfError(len(lines), "group code without a value (file truncated?)")
    tags = []
    for i in range(0, len(lines), 2):
        code_text = lines[i].strip()
        if not _INT_RE.match(code_text):
            raise DxfError(i + 1, f"expected a group code (an integer), got {code_text[:40]!r}")
        value = lines[i + 1]
        if value.endswith("\r"):
            value = value[:-1]
        if len(value) > MAX_VALUE_LEN:
            raise DxfError(i + 2, "value line too long")
        tags.append(Tag(int(code_text), value, i + 1))
    return tags


# --------------------------------------------------------------------------- structure


@dataclass
class Entity:
    """One DXF entity: its type, its own tags, and owned sub-entities (VERTEX, ATTRIB)."""

    type: str
    line: int
    tags: list[Tag]
    children: list[Entity] = field(default_factory=list)

    def first(self, code: int) -> Tag | None:
        for tag in self.tags:
            if tag.code == code:
                return tag
        return None

    def float(self, code: int, default: float | None = None) -> float:
        tag = self.first(code)
        if tag is None:
            if default is None:
                raise DxfError(self.line, f"{self.type} has no group code {code}")
            return default
        return tag.float()

    def int(self, code: int, default: int) -> int:
        tag = self.first(code)
        return default if tag is None else tag.int()

    def text(self, code: int, default: str = "") -> str:
        tag = self.first(code)
        return default if tag is None else tag.value


@dataclass
class Block:
    name: str
    base: tuple[float, float]
    entities: list[Entity]
    line: int


@dataclass
class Drawing:
    """What :func:`read_drawing` found: model space, blocks, layer colours."""

    entities: list[Entity]
    blocks: dict[str, Block]
    layers: dict[str, int]


def _split_entities(tags: list[Tag]) -> list[Entity]:
    """Group tags into entities, skipping application groups (102 {...})."""
    entities: list[Entity] = []
    current: Entity | None = None
    in_app_group = False
    for tag in tags:
        if tag.code == 0:
            current = Entity(tag.value.strip(), tag.line, [])
            entities.append(current)
            in_app_group = False
            continue
        if current is None:
            raise DxfError(tag.line, f"group code {tag.code} outside any entity")
        if tag.code == 102:
            in_app_group = tag.value.strip().startswith("{")
            continue
        if not in_app_group:
            current.tags.append(tag)
    return _attach_children(entities)


def _attach_children(flat: list[Entity]) -> list[Entity]:
    """Hang VERTEX under POLYLINE and ATTRIB under INSERT, up to SEQEND."""
    out: list[Entity] = []
    i = 0
    while i < len(flat):
        entity = flat[i]
        i += 1
        owns = {"POLYLINE": "VERTEX", "INSERT": "ATTRIB"}.get(entity.type)
        if owns is not None:
            while i < len(flat) and flat[i].type == owns:
                entity.children.append(flat[i])
                i += 1
            if i < len(flat) and flat[i].type == "SEQEND":
                i += 1
            elif entity.type == "POLYLINE":
                where = flat[i].line if i < len(flat) else entity.line
                raise DxfError(where, "POLYLINE vertices not closed by SEQEND")
        out.append(entity)
    return out


def _sections(tags: list[Tag]) -> Iterator[tuple[str, list[Tag], int]]:
    i = 0
    while i < len(tags):
        tag = tags[i]
        if tag.code == 999:  # comment
            i += 1
            continue
        if tag.code != 0:
            raise DxfError(tag.line, f"expected 0/SECTION, got group code {tag.code}")
        word = tag.value.strip()
        if word == "EOF":
            return
        if word != "SECTION":
            raise DxfError(tag.line, f"expected SECTION or EOF, got {word[:40]!r}")
        if i + 1 >= len(tags) or tags[i + 1].code != 2:
            raise DxfError(tag.line, "SECTION without a name (group code 2)")
        name = tags[i + 1].value.strip()
        j = i + 2
        while j < len(tags) and not (tags[j].code == 0 and tags[j].value.strip() == "ENDSEC"):
            j += 1
        if j >= len(tags):
            raise DxfError(tag.line, f"section {name} is not closed by ENDSEC")
        yield name, tags[i + 2 : j], tag.line
        i = j + 1


def read_drawing(text: str) -> Drawing:
    """Parse DXF text into model-space entities, blocks and layer colours.

    Raises DxfError naming the line of the first structural problem.
    """
    tags = read_tags(text)
    entities: list[Entity] = []
    blocks: dict[str, Block] = {}
    layers: dict[str, int] = {}
    for name, body, _line in _sections(tags):
        if name == "ENTITIES":
            entities.extend(e for e in _split_entities(body) if e.int(67, 0) == 0)
        elif name == "BLOCKS":
            _read_blocks(_split_entities(body), blocks)
        elif name == "TABLES":
            for entity in _split_entities(body):
                if entity.type == "LAYER":
                    layers[entity.text(2).strip()] = abs(entity.int(62, 7))
    return Drawing(entities, blocks, layers)


def _read_blocks(entities: list[Entity], blocks: dict[str, Block]) -> None:
    current: Block | None = None
    for entity in entities:
        if entity.type == "BLOCK":
            if current is not None:
                raise DxfError(entity.line, f"BLOCK inside block {current.name!r}")
            name = entity.text(2).strip() or entity.text(3).strip()
            if not name:
                raise DxfError(entity.line, "BLOCK without a name")
            current = Block(name, (entity.float(10, 0.0), entity.float(20, 0.0)), [], entity.line)
        elif entity.type == "ENDBLK":
            if current is None:
                raise DxfError(entity.line, "ENDBLK without BLOCK")
            blocks[current.name.upper()] = current
            current = None
        elif current is None:
            raise DxfError(entity.line, f"{entity.type} outside a BLOCK in the BLOCKS section")
        else:
            current.entities.append(entity)
    if current is not None:
        raise DxfError(current.line, f"block {current.name!r} is not closed by ENDBLK")


# --------------------------------------------------------------------------- geometry

Point = tuple[float, float]


@dataclass(frozen=True)
class Matrix:
    """2-D affine map: x' = a*x + c*y + e, y' = b*x + d*y + f (SVG's order)."""

    a: float = 1.0
    b: float = 0.0
    c: float = 0.0
    d: float = 1.0
    e: float = 0.0
    f: float = 0.0

    def __matmul__(self, o: Matrix) -> Matrix:
        return Matrix(
            self.a * o.a + self.c * o.b,
            self.b * o.a + self.d * o.b,
            self.a * o.c + self.c * o.d,
            self.b * o.c + self.d * o.d,
            self.a * o.e + self.c * o.f + self.e,
            self.b * o.e + self.d * o.f + self.f,
        )

    def point(self, p: Point) -> Point:
        return (self.a * p[0] + self.c * p[1] + self.e, self.b * p[0] + self.d * p[1] + self.f)

    def vector(self, v: Point) -> Point:
        return (self.a * v[0] + self.c * v[1], self.b * v[0] + self.d * v[1])

    @staticmethod
    def translate(x: float, y: float) -> Matrix:
        return Matrix(e=x, f=y)

    @staticmethod
    def scale(sx: float, sy: float) -> Matrix:
        return Matrix(a=sx, d=sy)

    @staticmethod
    def rotate(degrees: float) -> Matrix:
        r = math.radians(degrees)
        cos, sin = math.cos(r), math.sin(r)
        return Matrix(cos, sin, -sin, cos)


def ocs_matrix(extrusion: tuple[float, float, float], elevation: float = 0.0) -> Matrix:
    """Map an entity's OCS plane to the world XY plane (arbitrary axis algorithm).

    Returns the identity for the usual extrusion (0, 0, 1), a mirror for
    (0, 0, -1), and for any other vector the parallel projection of the OCS
    plane onto XY (circles then project to ellipses).
    """
    nx, ny, nz = extrusion
    length = math.sqrt(nx * nx + ny * ny + nz * nz)
    if length < EPS:
        return Matrix()
    nx, ny, nz = nx / length, ny / length, nz / length
    if abs(nx) < EPS and abs(ny) < EPS and nz > 0:
        return Matrix()
    if abs(nx) < ARBITRARY_AXIS_LIMIT and abs(ny) < ARBITRARY_AXIS_LIMIT:
        ax = (nz, 0.0, -nx)  # world Y x N
    else:
        ax = (-ny, nx, 0.0)  # world Z x N
    la = math.sqrt(ax[0] ** 2 + ax[1] ** 2 + ax[2] ** 2)
    ax = (ax[0] / la, ax[1] / la, ax[2] / la)
    ay = (ny * ax[2] - nz * ax[1], nz * ax[0] - nx * ax[2], nx * ax[1] - ny * ax[0])
    return Matrix(ax[0], ax[1], ay[0], ay[1], elevation * nx, elevation * ny)


@dataclass(frozen=True)
class Line:
    start: Point
    end: Point
    colour: str = DEFAULT_COLOUR


@dataclass(frozen=True)
class EllipticArc:
    """``centre + a*cos(t) + b*sin(t)`` for t from t0 to t1 (t1 > t0).

    ``a`` and ``b`` are conjugate semi-diameters (perpendicular and equal
    for a circle before any non-uniform scaling).  ``reverse`` marks a
    polyline piece traversed from t1 to t0.
    """

    centre: Point
    a: Point
    b: Point
    t0: float
    t1: float
    colour: str = DEFAULT_COLOUR
    reverse: bool = False

    @property
    def full(self) -> bool:
        return self.t1 - self.t0 >= math.tau - EPS

    def at(self, t: float) -> Point:
        return (
            self.centre[0] + self.a[0] * math.cos(t) + self.b[0] * math.sin(t),
            self.centre[1] + self.a[1] * math.cos(t) + self.b[1] * math.sin(t),
        )

    def transformed(self, m: Matrix) -> EllipticArc:
        return EllipticArc(
            m.point(self.centre),
            m.vector(self.a),
            m.vector(self.b),
            self.t0,
            self.t1,
            self.colour,
            self.reverse,
        )


@dataclass(frozen=True)
class Path:
    """A polyline: its pieces in order (each a Line or an EllipticArc)."""

    pieces: tuple[Line | EllipticArc, ...]
    closed: bool
    colour: str = DEFAULT_COLOUR


@dataclass(frozen=True)
class Text:
    position: Point
    height: float
    rotation: float  # degrees, counter-clockwise in the world
    text: str
    anchor: str = "start"  # SVG text-anchor
    baseline: str = "auto"  # SVG dominant-baseline
    colour: str = DEFAULT_COLOUR


@dataclass(frozen=True)
class Hatch:
    """A filled area (HATCH, SOLID, TRACE): boundary loops, filled even-odd.

    ``solid`` is False for a pattern hatch, drawn as a translucent fill (the
    pattern lines themselves are not drawn).
    """

    loops: tuple[Path, ...]
    solid: bool
    colour: str = DEFAULT_COLOUR


Primitive = Line | EllipticArc | Path | Text | Hatch

#: Fill opacity standing in for a hatch pattern.
PATTERN_OPACITY = 0.3


@dataclass
class Flattened:
    """:func:`flatten`'s output: world-space primitives and what was skipped."""

    primitives: list[Primitive] = field(default_factory=list)
    entities: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)


def _arc(
    centre: Point, radius: float, start_deg: float, end_deg: float, colour: str
) -> EllipticArc:
    t0 = math.radians(start_deg % 360.0)
    t1 = math.radians(end_deg % 360.0)
    if t1 <= t0:
        t1 += math.tau
    return EllipticArc(centre, (radius, 0.0), (0.0, radius), t0, t1, colour)


def _bulge_piece(p1: Point, p2: Point, bulge: float, colour: str) -> Line | EllipticArc:
    dx, dy = p2[0] - p1[0], p2[1] - p1[1]
    chord = math.hypot(dx, dy)
    if abs(bulge) < EPS or chord < EPS:
        return Line(p1, p2, colour)
    theta = 4.0 * math.atan(bulge)
    radius = chord / (2.0 * math.sin(theta / 2.0))
    angle = math.atan2(dy, dx) + math.pi / 2.0 - theta / 2.0
    centre = (p1[0] + radius * math.cos(angle), p1[1] + radius * math.sin(angle))
    r = abs(radius)
    a1 = math.atan2(p1[1] - centre[1], p1[0] - centre[0])
    a2 = math.atan2(p2[1] - centre[1], p2[0] - centre[0])
    start, end = (a1, a2) if theta > 0 else (a2, a1)
    if end <= start:
        end += math.tau
    return EllipticArc(centre, (r, 0.0), (0.0, r), start, end, colour, reverse=theta < 0)


def _text_plain(raw: str) -> str:
    """Resolve DXF text escapes: %%d %%p %%c %%%, %%u/%%o toggles, \\U+XXXX."""

    def unicode_escape(m: re.Match[str]) -> str:
        code = int(m.group(1), 16)
        return chr(code) if 0 < code < 0x110000 and not 0xD800 <= code < 0xE000 else "\ufffd"

    text = re.sub(r"\\U\+([0-9A-Fa-f]{4,5})", unicode_escape, raw)
    text = re.sub(r"%%[uUoOkK]", "", text)
    for code, char in (("%%d", "\u00b0"), ("%%p", "\u00b1"), ("%%c", "\u2300"), ("%%%", "%")):
        text = re.sub(re.escape(code), char, text, flags=re.IGNORECASE)
    return text


def _mtext_plain(raw: str) -> str:
    """Strip MTEXT formatting codes, keeping paragraph breaks as newlines."""
    text = raw.replace("\\P", "\n").replace("\\~", "\u00a0")
    text = re.sub(r"\\[ACFHQTWfchqtw][^;]*;", "", text)
    text = re.sub(r"\\S([^;]*);", lambda m: m.group(1).replace("^", "/"), text)
    text = re.sub(r"\\([LlOoKk])", "", text)
    text = text.replace("\\\\", "\\").replace("\\{", "{").replace("\\}", "}")
    return _text_plain(text.replace("{", "").replace("}", ""))


_HALIGN = {0: "start", 1: "middle", 2: "end", 3: "start", 4: "middle", 5: "start"}
_VALIGN = {0: "auto", 1: "text-after-edge", 2: "central", 3: "text-before-edge"}
_MTEXT_ANCHOR = {1: "start", 2: "middle", 0: "end"}  # attachment point % 3
_MTEXT_BASELINE = {0: "text-before-edge", 1: "central", 2: "text-after-edge"}


class _Flattener:
    def __init__(self, drawing: Drawing) -> None:
        self.drawing = drawing
        self.out = Flattened()
        self.count = 0

    def colour(self, entity: Entity, inherited: str) -> str:
        index = entity.int(62, BYLAYER)
        if index == BYBLOCK:
            return inherited
        if index == BYLAYER:
            index = self.drawing.layers.get(entity.text(8, "0").strip(), 7)
        return ACI_COLOURS.get(abs(index), DEFAULT_COLOUR)

    def emit(self, primitive: Primitive, line: int) -> None:
        self.count += 1
        if self.count > MAX_PRIMITIVES:
            raise DxfError(line, f"the drawing expands to more than {MAX_PRIMITIVES} elements")
        for value in _numbers(primitive):
            if not math.isfinite(value):
                raise DxfError(line, "coordinates out of range after transformation")
        self.out.primitives.append(primitive)

    def entities(
        self, entities: list[Entity], m: Matrix, depth: int, colour: str, stack: tuple[str, ...]
    ) -> None:
        for entity in entities:
            self.entity(entity, m, depth, colour, stack)

    def entity(
        self, e: Entity, m: Matrix, depth: int, inherited: str, stack: tuple[str, ...]
    ) -> None:
        kind = e.type
        colour = self.colour(e, inherited)
        ext = (e.float(210, 0.0), e.float(220, 0.0), e.float(230, 1.0))
        if depth == 0:
            self.out.entities[kind] += 1
        if kind == "LINE":
            start = (e.float(10), e.float(20))
            end = (e.float(11), e.float(21))
            self.emit(Line(m.point(start), m.point(end), colour), e.line)
        elif kind in ("CIRCLE", "ARC"):
            ocs = m @ ocs_matrix(ext, e.float(30, 0.0))
            centre, radius = (e.float(10), e.float(20)), e.float(40)
            if radius <= 0:
                # Degenerate (LibreCAD's parts library has such arcs): nothing to draw.
                self.out.skipped[f"{kind}(radius <= 0)"] += 1
                return
            if kind == "CIRCLE":
                arc = EllipticArc(centre, (radius, 0.0), (0.0, radius), 0.0, math.tau, colour)
            else:
                arc = _arc(centre, radius, e.float(50, 0.0), e.float(51, 360.0), colour)
            self.emit(arc.transformed(ocs), e.line)
        elif kind == "ELLIPSE":
            self.ellipse(e, m, colour)
        elif kind == "LWPOLYLINE":
            self.lwpolyline(e, m @ ocs_matrix(ext, e.float(38, 0.0)), colour)
        elif kind == "POLYLINE":
            self.polyline(e, m, ext, colour)
        elif kind == "TEXT":
            self.text(e, m @ ocs_matrix(ext, e.float(30, 0.0)), colour)
        elif kind == "MTEXT":
            self.mtext(e, m, colour)
        elif kind == "POINT":
            p = m.point((e.float(10), e.float(20)))
            self.emit(Line(p, p, colour), e.line)
        elif kind == "INSERT":
            self.insert(e, m, ext, depth, colour, stack)
        elif kind == "HATCH":
            self.hatch(e, m @ ocs_matrix(ext, e.float(30, 0.0)), colour)
        elif kind in ("SOLID", "TRACE"):
            self.solid(e, m @ ocs_matrix(ext, e.float(30, 0.0)), colour)
        elif kind == "3DFACE":
            corners = [(e.float(10 + k), e.float(20 + k)) for k in range(4)]
            pieces = [Line(m.point(a), m.point(b), colour) for a, b in _ring(corners)]
            self.emit(Path(tuple(pieces), True, colour), e.line)
        else:
            self.out.skipped[kind] += 1

    def ellipse(self, e: Entity, m: Matrix, colour: str) -> None:
        centre = (e.float(10), e.float(20))
        major = (e.float(11), e.float(21))
        ratio = e.float(40)
        if not 0 < ratio <= 1 + EPS or math.hypot(*major) < EPS:
            raise DxfError(e.line, "ELLIPSE needs a non-zero major axis and 0 < ratio <= 1")
        # ELLIPSE points are WCS; its minor axis is N x major (N = extrusion).
        sign = -1.0 if e.float(230, 1.0) < 0 else 1.0
        minor = (-major[1] * ratio * sign, major[0] * ratio * sign)
        t0, t1 = e.float(41, 0.0), e.float(42, math.tau)
        if abs((t1 - t0) - math.tau) > EPS:
            t0, t1 = t0 % math.tau, t1 % math.tau
            if t1 <= t0:
                t1 += math.tau
        else:
            t0, t1 = 0.0, math.tau
        arc = EllipticArc(centre, major, minor, t0, t1, colour)
        self.emit(arc.transformed(m), e.line)

    def _pieces(
        self, vertices: list[tuple[Point, float]], closed: bool, colour: str
    ) -> tuple[Line | EllipticArc, ...]:
        pieces: list[Line | EllipticArc] = []
        count = len(vertices) if closed else len(vertices) - 1
        for i in range(max(count, 0)):
            (p1, bulge), (p2, _) = vertices[i], vertices[(i + 1) % len(vertices)]
            pieces.append(_bulge_piece(p1, p2, bulge, colour))
        return tuple(pieces)

    def _emit_path(
        self, vertices: list[tuple[Point, float]], closed: bool, m: Matrix, colour: str, line: int
    ) -> None:
        if len(vertices) < 2:
            return
        pieces = tuple(
            Line(m.point(p.start), m.point(p.end), colour)
            if isinstance(p, Line)
            else p.transformed(m)
            for p in self._pieces(vertices, closed, colour)
        )
        self.emit(Path(pieces, closed, colour), line)

    def lwpolyline(self, e: Entity, m: Matrix, colour: str) -> None:
        vertices: list[tuple[Point, float]] = []
        x: float | None = None
        for tag in e.tags:
            if tag.code == 10:
                x = tag.float()
            elif tag.code == 20:
                if x is None:
                    raise DxfError(tag.line, "LWPOLYLINE y coordinate without x")
                vertices.append(((x, tag.float()), 0.0))
                x = None
            elif tag.code == 42 and vertices:
                vertices[-1] = (vertices[-1][0], tag.float())
        self._emit_path(vertices, bool(e.int(70, 0) & 1), m, colour, e.line)

    def polyline(self, e: Entity, m: Matrix, ext: tuple[float, float, float], colour: str) -> None:
        flags = e.int(70, 0)
        if flags & (16 | 64):  # polygon and polyface meshes: surfaces, not outlines
            self.out.skipped["POLYLINE(mesh)"] += 1
            return
        is_3d = bool(flags & 8)
        vertices: list[tuple[Point, float]] = []
        for v in e.children:
            if v.int(70, 0) & 16:  # spline frame control point: not on the curve
                continue
            vertices.append(((v.float(10), v.float(20)), 0.0 if is_3d else v.float(42, 0.0)))
        ocs = m if is_3d else m @ ocs_matrix(ext, e.float(30, 0.0))
        self._emit_path(vertices, bool(flags & 1), ocs, colour, e.line)

    def text(self, e: Entity, m: Matrix, colour: str) -> None:
        halign, valign = e.int(72, 0), e.int(73, 0)
        first = (e.float(10, 0.0), e.float(20, 0.0))
        aligned = (halign, valign) != (0, 0) and halign not in (3, 5)
        where = (e.float(11, first[0]), e.float(21, first[1])) if aligned else first
        self._text(
            e,
            m,
            where,
            e.float(50, 0.0),
            _text_plain(e.text(1)),
            _HALIGN.get(halign, "start"),
            _VALIGN.get(valign, "auto"),
            colour,
        )

    def mtext(self, e: Entity, m: Matrix, colour: str) -> None:
        raw = "".join(t.value for t in e.tags if t.code == 3) + e.text(1)
        if e.first(11) is not None:
            rotation = math.degrees(math.atan2(e.float(21, 0.0), e.float(11)))
        else:
            rotation = e.float(50, 0.0)
        attach = e.int(71, 1)
        if not 1 <= attach <= 9:
            raise DxfError(e.line, f"MTEXT attachment point {attach} is not 1..9")
        self._text(
            e,
            m,
            (e.float(10), e.float(20)),
            rotation,
            _mtext_plain(raw),
            _MTEXT_ANCHOR[attach % 3],
            _MTEXT_BASELINE[(attach - 1) // 3],
            colour,
        )

    def _text(
        self,
        e: Entity,
        m: Matrix,
        where: Point,
        rotation: float,
        text: str,
        anchor: str,
        baseline: str,
        colour: str,
    ) -> None:
        height = e.float(40, 1.0)
        direction = m.vector((math.cos(math.radians(rotation)), math.sin(math.radians(rotation))))
        up = m.vector((-math.sin(math.radians(rotation)), math.cos(math.radians(rotation))))
        world_rotation = math.degrees(math.atan2(direction[1], direction[0]))
        world_height = abs(height) * math.hypot(*up)
        self.emit(
            Text(m.point(where), world_height, world_rotation, text, anchor, baseline, colour),
            e.line,
        )

    def solid(self, e: Entity, m: Matrix, colour: str) -> None:
        # SOLID and TRACE list their corners as 1, 2, 4, 3 (a "Z" order).
        c = [(e.float(10 + k, 0.0), e.float(20 + k, 0.0)) for k in range(4)]
        corners = [c[0], c[1], c[3], c[2]] if e.first(13) is not None else c[:3]
        pieces = tuple(Line(m.point(a), m.point(b), colour) for a, b in _ring(corners))
        if pieces:
            self.emit(Hatch((Path(pieces, True, colour),), True, colour), e.line)

    def hatch(self, e: Entity, m: Matrix, colour: str) -> None:
        reader = _HatchReader(e, colour)
        loops = [
            Path(
                tuple(
                    Line(m.point(p.start), m.point(p.end), colour)
                    if isinstance(p, Line)
                    else p.transformed(m)
                    for p in loop.pieces
                ),
                True,
                colour,
            )
            for loop in reader.loops()
        ]
        if reader.unsupported:
            self.out.skipped["HATCH(spline edge)"] += reader.unsupported
        if loops:
            self.emit(Hatch(tuple(loops), e.int(70, 0) == 1, colour), e.line)

    def insert(
        self,
        e: Entity,
        m: Matrix,
        ext: tuple[float, float, float],
        depth: int,
        colour: str,
        stack: tuple[str, ...],
    ) -> None:
        name = e.text(2).strip()
        block = self.drawing.blocks.get(name.upper())
        if block is None:
            raise DxfError(e.line, f"INSERT of undefined block {name!r}")
        if name.upper() in stack:
            raise DxfError(e.line, f"block {name!r} inserts itself")
        if depth >= MAX_NESTING:
            raise DxfError(e.line, f"blocks nested deeper than {MAX_NESTING} levels")
        sx, sy = e.float(41, 1.0), e.float(42, 1.0)
        columns, rows = e.int(70, 1), e.int(71, 1)
        if columns < 1 or rows < 1:
            columns, rows = max(columns, 1), max(rows, 1)
        if columns * rows > MAX_PRIMITIVES:
            raise DxfError(e.line, "MINSERT array is too large")
        dx, dy = e.float(44, 0.0), e.float(45, 0.0)
        placed = (
            m
            @ ocs_matrix(ext, 0.0)
            @ Matrix.translate(e.float(10, 0.0), e.float(20, 0.0))
            @ Matrix.rotate(e.float(50, 0.0))
        )
        after = Matrix.scale(sx, sy) @ Matrix.translate(-block.base[0], -block.base[1])
        for row in range(rows):
            for column in range(columns):
                cell = placed @ Matrix.translate(column * dx, row * dy) @ after
                self.entities(block.entities, cell, depth + 1, colour, (*stack, name.upper()))


def _ring(points: list[Point]) -> list[tuple[Point, Point]]:
    """Consecutive pairs of a closed outline, without zero-length edges."""
    pairs = zip(points, points[1:] + points[:1], strict=True)
    return [(a, b) for a, b in pairs if a != b]


class _HatchReader:
    """Reads a HATCH's boundary paths, whose group codes repeat in order.

    Layout: ``91`` path count, then per path ``92`` flags and either a
    polyline (``72`` has-bulge, ``73`` closed, ``93`` count, ``10/20[/42]``
    per vertex) or ``93`` edges, each ``72`` type: 1 line, 2 arc, 3 ellipse,
    4 spline; then ``97`` + ``330`` source objects.  Pattern data and seed
    points follow and are ignored.  Arc and ellipse edges store a clockwise
    edge as complementary angles (360 - a), swapped.
    """

    def __init__(self, entity: Entity, colour: str) -> None:
        self.entity = entity
        self.tags = entity.tags
        self.colour = colour
        self.unsupported = 0
        self.i = next((k for k, t in enumerate(self.tags) if t.code == 91), len(self.tags))

    def _take(self, code: int) -> Tag:
        if self.i >= len(self.tags):
            raise DxfError(self.entity.line, f"HATCH ends where group code {code} was due")
        tag = self.tags[self.i]
        if tag.code != code:
            raise DxfError(tag.line, f"HATCH: expected group code {code}, got {tag.code}")
        self.i += 1
        return tag

    def _peek(self) -> int | None:
        return self.tags[self.i].code if self.i < len(self.tags) else None

    def loops(self) -> list[Path]:
        if self.i >= len(self.tags):
            return []
        count = self._take(91).int()
        out: list[Path] = []
        for _ in range(max(count, 0)):
            if self._peek() != 92:
                break
            flags = self._take(92).int()
            path = self._polyline() if flags & 2 else self._edges()
            if path is not None and path.pieces:
                out.append(path)
            while self._peek() in (97, 330):
                self.i += 1
        return out

    def _polyline(self) -> Path:
        has_bulge = count = 0
        while self._peek() in (72, 73, 93):
            tag = self.tags[self.i]
            self.i += 1
            if tag.code == 72:
                has_bulge = tag.int()
            elif tag.code == 93:
                count = tag.int()
        vertices: list[tuple[Point, float]] = []
        for _ in range(max(count, 0)):
            x = self._take(10).float()
            y = self._take(20).float()
            bulge = self._take(42).float() if has_bulge and self._peek() == 42 else 0.0
            vertices.append(((x, y), bulge))
        pieces = []
        for k, (p1, bulge) in enumerate(vertices):
            p2 = vertices[(k + 1) % len(vertices)][0]
            if p1 != p2:
                pieces.append(_bulge_piece(p1, p2, bulge, self.colour))
        return Path(tuple(pieces), True, self.colour)

    def _edges(self) -> Path | None:
        count = self._take(93).int()
        pieces: list[Line | EllipticArc] = []
        for _ in range(max(count, 0)):
            kind = self._take(72).int()
            if kind == 1:
                start = (self._take(10).float(), self._take(20).float())
                end = (self._take(11).float(), self._take(21).float())
                pieces.append(Line(start, end, self.colour))
            elif kind in (2, 3):
                pieces.append(self._arc_edge(kind))
            else:
                # Spline edges (or unknown types): skip this boundary path.
                self.unsupported += 1
                while self._peek() not in (92, 75, None):
                    self.i += 1
                return None
        return Path(tuple(pieces), True, self.colour)

    def _arc_edge(self, kind: int) -> EllipticArc:
        centre = (self._take(10).float(), self._take(20).float())
        if kind == 2:
            radius = self._take(40).float()
            major, ratio = (radius, 0.0), 1.0
        else:
            major = (self._take(11).float(), self._take(21).float())
            ratio = self._take(40).float()
            if not 0 < ratio <= 1 + EPS or math.hypot(*major) < EPS:
                raise DxfError(self.entity.line, "HATCH ellipse edge with a bad axis or ratio")
        start, end = self._take(50).float(), self._take(51).float()
        ccw = self._take(73).int() != 0 if self._peek() == 73 else True
        if not ccw:
            start, end = 360.0 - end, 360.0 - start
        minor = (-major[1] * ratio, major[0] * ratio)
        t0 = math.atan2(math.sin(math.radians(start)) / ratio, math.cos(math.radians(start)))
        t1 = math.atan2(math.sin(math.radians(end)) / ratio, math.cos(math.radians(end)))
        if abs(end - start) >= 360.0 - EPS:
            t0, t1 = 0.0, math.tau
        elif t1 <= t0:
            t1 += math.tau
        return EllipticArc(centre, major, minor, t0, t1, self.colour, reverse=not ccw)


def _numbers(p: Primitive) -> Iterator[float]:
    if isinstance(p, Line):
        yield from (*p.start, *p.end)
    elif isinstance(p, EllipticArc):
        yield from (*p.centre, *p.a, *p.b)
    elif isinstance(p, Path):
        for piece in p.pieces:
            yield from _numbers(piece)
    elif isinstance(p, Hatch):
        for loop in p.loops:
            yield from _numbers(loop)
    else:
        yield from (*p.position, p.height, p.rotation)


def flatten(drawing: Drawing) -> Flattened:
    """Expand model space, blocks included, into world-space primitives.

    Raises DxfError for a missing entity coordinate, an undefined or
    recursive block, or a drawing that expands beyond MAX_PRIMITIVES.
    """
    f = _Flattener(drawing)
    f.entities(drawing.entities, Matrix(), 0, DEFAULT_COLOUR, ())
    return f.out


# --------------------------------------------------------------------------- SVG


def principal_axes(arc: EllipticArc) -> tuple[float, float, float, float]:
    """Return (rx, ry, rotation in radians, t shift) of an arc's ellipse.

    ``centre + a*cos(t) + b*sin(t)`` equals ``centre + u*cos(t - s) + v*sin(t - s)``
    with u, v perpendicular, |u| = rx, |v| = ry and u at ``rotation``.
    """
    (ax, ay), (bx, by) = arc.a, arc.b
    aa, bb, ab = ax * ax + ay * ay, bx * bx + by * by, ax * bx + ay * by
    s = 0.5 * math.atan2(2.0 * ab, aa - bb)
    ux, uy = ax * math.cos(s) + bx * math.sin(s), ay * math.cos(s) + by * math.sin(s)
    vx, vy = -ax * math.sin(s) + bx * math.cos(s), -ay * math.sin(s) + by * math.cos(s)
    return math.hypot(ux, uy), math.hypot(vx, vy), math.atan2(uy, ux), s


def _extent_points(p: Primitive) -> Iterator[Point]:
    if isinstance(p, Line):
        yield p.start
        yield p.end
    elif isinstance(p, EllipticArc):
        yield p.at(p.t0)
        yield p.at(p.t1)
        # x(t) and y(t) peak where their derivatives vanish.
        for ka, kb in ((p.a[0], p.b[0]), (p.a[1], p.b[1])):
            base = math.atan2(kb, ka)
            for peak in (base, base + math.pi):
                t = p.t0 + (peak - p.t0) % math.tau
                if t <= p.t1:
                    yield p.at(t)
    elif isinstance(p, Path):
        for piece in p.pieces:
            yield from _extent_points(piece)
    elif isinstance(p, Hatch):
        for loop in p.loops:
            yield from _extent_points(loop)
    else:
        # A rough box: 0.6 em per character, one line height per line.
        lines = p.text.split("\n")
        width = 0.6 * p.height * max((len(s) for s in lines), default=0)
        r = math.radians(p.rotation)
        along = (math.cos(r), math.sin(r))
        up = (-math.sin(r), math.cos(r))
        x, y = p.position
        for w in (0.0, width):
            for h in (p.height, -p.height * 1.25 * (len(lines) - 1)):
                yield (x + along[0] * w + up[0] * h, y + along[1] * w + up[1] * h)


def _fmt(value: float, precision: int) -> str:
    text = f"{value:.{precision}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


class _SvgWriter:
    def __init__(self, precision: int) -> None:
        self.p = precision

    def n(self, value: float) -> str:
        return _fmt(value, self.p)

    def pt(self, point: Point) -> str:
        return f"{self.n(point[0])},{self.n(-point[1])}"

    def arc_command(self, arc: EllipticArc) -> str:
        rx, ry, rot, _ = principal_axes(arc)
        # In SVG coordinates (y down) t runs from a to b; sweep-flag 1 is the
        # positive-angle direction there, i.e. cross(a_svg, b_svg) > 0.
        cross = arc.a[0] * -arc.b[1] - -arc.a[1] * arc.b[0]
        sweep = (cross > 0) != arc.reverse
        large = arc.t1 - arc.t0 > math.pi
        end = arc.at(arc.t0 if arc.reverse else arc.t1)
        return (
            f"A{self.n(rx)},{self.n(ry)} {self.n(-math.degrees(rot))} "
            f"{int(large)},{int(sweep)} {self.pt(end)}"
        )

    def arc_element(self, arc: EllipticArc) -> str:
        colour = f' stroke="{arc.colour}"'
        if arc.full:
            rx, ry, rot, _ = principal_axes(arc)
            if abs(rx - ry) <= EPS * max(rx, 1.0):
                return (
                    f'<circle cx="{self.n(arc.centre[0])}" cy="{self.n(-arc.centre[1])}" '
                    f'r="{self.n(rx)}"{colour}/>'
                )
            cx, cy = self.n(arc.centre[0]), self.n(-arc.centre[1])
            return (
                f'<ellipse cx="{cx}" cy="{cy}" rx="{self.n(rx)}" ry="{self.n(ry)}" '
                f'transform="rotate({self.n(-math.degrees(rot))} {cx} {cy})"{colour}/>'
            )
        start = arc.at(arc.t0)
        return f'<path d="M{self.pt(start)} {self.arc_command(arc)}"{colour}/>'

    def path_data(self, p: Path) -> str:
        """SVG path data of a polyline; a piece not starting where the last ended moves."""
        d: list[str] = []
        here: Point | None = None
        for piece in p.pieces:
            if isinstance(piece, Line):
                start, end = piece.start, piece.end
            else:
                start = piece.at(piece.t1 if piece.reverse else piece.t0)
                end = piece.at(piece.t0 if piece.reverse else piece.t1)
            if here is None or math.dist(here, start) > EPS * max(1.0, *map(abs, start)):
                d.append(f"M{self.pt(start)}")
            d.append(f"L{self.pt(end)}" if isinstance(piece, Line) else self.arc_command(piece))
            here = end
        if p.closed:
            d.append("Z")
        return " ".join(d)

    def element(self, p: Primitive) -> str:
        if isinstance(p, Line):
            if p.start == p.end:
                return (
                    f'<circle class="point" cx="{self.n(p.start[0])}" '
                    f'cy="{self.n(-p.start[1])}" r="0.5" fill="{p.colour}" stroke="none"/>'
                )
            return (
                f'<line x1="{self.n(p.start[0])}" y1="{self.n(-p.start[1])}" '
                f'x2="{self.n(p.end[0])}" y2="{self.n(-p.end[1])}" stroke="{p.colour}"/>'
            )
        if isinstance(p, EllipticArc):
            return self.arc_element(p)
        if isinstance(p, Path):
            return f'<path d="{self.path_data(p)}" stroke="{p.colour}"/>'
        if isinstance(p, Hatch):
            d = " ".join(self.path_data(loop) for loop in p.loops)
            opacity = "" if p.solid else f' fill-opacity="{PATTERN_OPACITY}"'
            return (
                f'<path class="hatch" d="{d}" fill="{p.colour}"{opacity} '
                'fill-rule="evenodd" stroke="none"/>'
            )
        x, y = self.n(p.position[0]), self.n(-p.position[1])
        lines = p.text.split("\n")
        if len(lines) == 1:
            body = escape(p.text)
        else:
            body = "".join(
                f'<tspan x="{x}" dy="{self.n(0 if i == 0 else p.height * 1.25)}">'
                f"{escape(s)}</tspan>"
                for i, s in enumerate(lines)
            )
        return (
            f'<text x="{x}" y="{y}" font-size="{self.n(p.height)}" '
            f'transform="rotate({self.n(-p.rotation)} {x} {y})" text-anchor="{p.anchor}" '
            f'dominant-baseline="{p.baseline}" fill="{p.colour}" stroke="none">{body}</text>'
        )


def extents(primitives: list[Primitive]) -> tuple[float, float, float, float] | None:
    """Return (min x, min y, max x, max y) of the primitives in world units, or None."""
    xs: list[float] = []
    ys: list[float] = []
    for p in primitives:
        for x, y in _extent_points(p):
            xs.append(x)
            ys.append(y)
    if not xs:
        return None
    return min(xs), min(ys), max(xs), max(ys)


def to_svg(flat: Flattened, precision: int = 6) -> str:
    """Return an SVG document drawing ``flat``'s primitives, Y axis flipped.

    The viewBox is the extents plus a 2 % margin; strokes do not scale.
    """
    box = extents(flat.primitives)
    if box is None:
        box = (0.0, 0.0, 1.0, 1.0)
    x0, y0, x1, y1 = box
    size = max(x1 - x0, y1 - y0, 1e-6)
    pad = size * MARGIN
    w = _SvgWriter(precision)
    view = f"{w.n(x0 - pad)} {w.n(-y1 - pad)} {w.n(x1 - x0 + 2 * pad)} {w.n(y1 - y0 + 2 * pad)}"
    body = "\n".join(w.element(p) for p in flat.primitives)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="{view}">\n'
        '<g fill="none" stroke-width="1" vector-effect="non-scaling-stroke" '
        'stroke-linecap="round" stroke-linejoin="round">\n'
        f"{body}\n</g>\n</svg>\n"
    )


def convert(data: bytes, precision: int = 6) -> tuple[str, Flattened]:
    """Return (SVG text, flattened drawing) for the bytes of a DXF file.

    Raises DxfError (a ValueError) with the line number for malformed input.
    """
    flat = flatten(read_drawing(decode(data)))
    return to_svg(flat, precision), flat


def run(params: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
    """Service entry point: ``data`` is the DXF file; params ``{"precision": 0..12}``.

    Returns ({"entities": {type: n}, "skipped": {type: n}, "elements": n,
    "extents": [x0, y0, x1, y1] or None}, SVG bytes).  Raises ValueError for
    malformed DXF (with its line number) or bad parameters.
    """
    precision = params.get("precision", 6)
    if not isinstance(precision, int) or isinstance(precision, bool) or not 0 <= precision <= 12:
        raise ValueError("precision must be an integer from 0 to 12")
    if not data:
        raise ValueError("no DXF data given")
    svg, flat = convert(data, precision)
    box = extents(flat.primitives)
    result = {
        "entities": dict(sorted(flat.entities.items())),
        "skipped": dict(sorted(flat.skipped.items())),
        "elements": len(flat.primitives),
        "extents": list(box) if box else None,
    }
    return result, svg.encode("utf-8")
