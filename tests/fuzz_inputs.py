"""Inputs for the reader fuzz tests (tests/test_fuzz_readers.py): hypothesis strategies that
mutate real and generated files, and structured generators for CSV and JSON files.

A :class:`Seed` is one valid file: its ``payload`` (for a gzip file, the decompressed bytes),
the header fields worth setting to odd values (byte offset + struct format), and how the
payload becomes the file (:func:`gzip_bytes`, :func:`fix_png_crcs`). :func:`mutated` draws a
seed, applies a few edits to its payload (bit flips, random bytes, a header field set to an
extreme or NaN, truncation, insertion, deletion, a duplicated chunk), wraps it, and sometimes
edits the wrapped bytes too (a corrupt gzip stream, a bad CRC).
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import math
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

INTERESTING_INTS = (0, 1, -1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 127, 128, 255, 256, 1023, 4096, 32767,
                    -32768, 65535, 65536, 2**24, 2**31 - 1, -(2**31), 2**32 - 1, 2**53, 2**63 - 1, -(2**63))
INTERESTING_FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e-30, 255.0, 65535.0, 1e10, 3.4e38, -3.4e38, 1e308,
                      math.nan, math.inf, -math.inf)
HUGE = (4096, 9500, 13000, 2**15 - 1, 2**16 - 1, 46341, 10**5, 2**20, 2**24, 2**31 - 1, 2**32 - 1)
"""Dimensions for the "huge" edit: large but plausible sizes (9,500 and 13,000 squared are just
under Pillow's warning and error thresholds), the largest values of 16- and 32-bit fields, and
sizes whose products overflow 32 bits."""
INTERESTING_TEXT = ("0", "1", "-1", "65536", "1e999", "-1e999", "NaN", "inf", "-0", "1\\2", "\\", "abc", "",
                    "9" * 16, "0.000001", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5", "MONOCHROME1", "RGB",
                    "PALETTE COLOR", "YBR_FULL", "SIGMOID", "LINEAR_EXACT")


@dataclass(frozen=True)
class Field:
    """A header field: ``offset`` in the payload and a :mod:`struct` format (``"<h"``, ``">I"``, ``"<f"``;
    ``"8s"``: text of that many bytes, padded with spaces). ``size``: an image dimension (the
    "huge" edit sets all of a file's dimensions at once)."""

    name: str
    offset: int
    fmt: str
    size: bool = False


@dataclass(frozen=True)
class Seed:
    """A valid file to mutate: ``payload`` -> file bytes through ``wrap``."""

    name: str
    payload: bytes
    suffix: str
    fields: tuple[Field, ...] = ()
    wrap: Callable[[bytes], bytes] | None = None

    def file_bytes(self, payload: bytes | None = None) -> bytes:
        data = self.payload if payload is None else payload
        return self.wrap(data) if self.wrap else data


class Mutant:
    """A mutated file: its bytes, the seed it came from, the edits made (a failing input is
    reported by its seed and edits, which say more than its bytes)."""

    __slots__ = ("data", "edits", "seed", "suffix")

    def __init__(self, data: bytes, seed: str, suffix: str, edits: tuple[str, ...] = ()) -> None:
        self.data, self.seed, self.suffix, self.edits = data, seed, suffix, edits

    def __repr__(self) -> str:
        return f"Mutant(seed={self.seed!r}, edits={list(self.edits)}, {len(self.data)} bytes)"


def gzip_bytes(data: bytes) -> bytes:
    """Deterministic gzip (mtime 0): the same payload gives the same file."""
    return gzip.compress(data, compresslevel=1, mtime=0)


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute the CRC of every whole chunk of a PNG, so that a mutated chunk is decoded
    rather than refused at its checksum; bytes past the last whole chunk are kept as they are."""
    out = bytearray(data)
    pos = 8
    while pos + 12 <= len(out):
        (length,) = struct.unpack(">I", out[pos: pos + 4])
        end = pos + 8 + length
        if end + 4 > len(out):
            break
        out[end: end + 4] = struct.pack(">I", zlib.crc32(out[pos + 4: end]) & 0xFFFFFFFF)
        pos = end + 4
    return bytes(out)


def png_fields() -> tuple[Field, ...]:
    """IHDR's fields (always at the same offsets)."""
    return (Field("width", 16, ">I", True), Field("height", 20, ">I", True), Field("bit_depth", 24, ">B"),
            Field("colour_type", 25, ">B"), Field("interlace", 28, ">B"))


def jpeg_fields(data: bytes) -> tuple[Field, ...]:
    """The first start-of-frame segment's precision, height, width and component count."""
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        i = data.find(marker)
        if i >= 0:
            return (Field("precision", i + 4, ">B"), Field("height", i + 5, ">H", True),
                    Field("width", i + 7, ">H", True),
                    Field("components", i + 9, ">B"))
    return ()


NIFTI1_FIELDS = (("sizeof_hdr", 0, "i"), *((f"dim[{i}]", 40 + 2 * i, "h") for i in range(8)),
                 ("datatype", 70, "h"), ("bitpix", 72, "h"), *((f"pixdim[{i}]", 76 + 4 * i, "f") for i in range(8)),
                 ("vox_offset", 108, "f"), ("scl_slope", 112, "f"), ("scl_inter", 116, "f"), ("qform_code", 252, "h"),
                 ("sform_code", 254, "h"), ("quatern_b", 256, "f"), ("quatern_c", 260, "f"), ("quatern_d", 264, "f"),
                 *((f"srow_{a}[{i}]", 280 + 16 * k + 4 * i, "f") for k, a in enumerate("xyz") for i in range(4)))


def nifti_fields(payload: bytes) -> tuple[Field, ...]:
    """The NIfTI-1 header fields that shape the data (dims, type, offset, scaling, affine)."""
    endian = "<" if struct.unpack("<i", payload[:4])[0] == 348 else ">"
    return tuple(Field(name, off, endian + fmt, name in ("dim[1]", "dim[2]", "dim[3]", "dim[4]"))
                 for name, off, fmt in NIFTI1_FIELDS)


def tiff_fields(data: bytes) -> tuple[Field, ...]:
    """Size, layout and offset tags of every page (tifffile gives where their values are)."""
    import tifffile

    wanted = {256: "width", 257: "height", 258: "bits", 259: "compression", 262: "photometric", 273: "strip_offset",
              277: "samples", 278: "rows_per_strip", 279: "strip_bytes", 322: "tile_width", 323: "tile_height",
              324: "tile_offset", 325: "tile_bytes"}
    out = []
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        for i, page in enumerate(tif.pages):
            for tag in page.tags.values():
                if tag.code in wanted:
                    fmt = {4: "I", 9: "i", 3: "H", 8: "h", 16: "Q"}.get(int(tag.dtype), "B")
                    out.append(Field(f"page{i}.{wanted[tag.code]}", tag.valueoffset, tif.byteorder + fmt,
                                     tag.code in (256, 257, 322, 323)))
    return tuple(out)


def dicom_fields(data: bytes) -> tuple[Field, ...]:
    """The image attributes of a DICOM file (where pydicom found their values) and their
    length fields: sizes, bit layout, photometric interpretation, frames, rescale, window,
    transfer syntax, and Pixel Data's length."""
    import pydicom

    keywords = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
                "PlanarConfiguration", "PhotometricInterpretation", "NumberOfFrames", "RescaleSlope",
                "RescaleIntercept", "WindowCenter", "WindowWidth", "VOILUTFunction", "PixelPaddingValue",
                "PixelData", "TransferSyntaxUID")
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    out = []
    for kw in keywords:
        tag = pydicom.datadict.tag_for_keyword(kw)
        owner = ds.file_meta if kw == "TransferSyntaxUID" else ds
        if tag not in owner:
            continue
        raw = owner.get_item(tag)
        tell = getattr(raw, "value_tell", None)
        if tell is None:
            continue
        end = "<" if raw.is_little_endian else ">"
        vr = raw.VR or pydicom.datadict.dictionary_VR(tag)  # implicit VR files do not store it
        if vr in ("US", "SS") and raw.length == 2:
            out.append(Field(kw, tell, end + ("H" if vr == "US" else "h"), kw in ("Rows", "Columns")))
        elif vr in ("IS", "DS", "CS", "UI") and 0 < raw.length <= 64:
            out.append(Field(kw, tell, f"{raw.length}s"))
        long_length = raw.is_implicit_VR or vr in ("OB", "OW", "OF", "SQ", "UT", "UN", "OB or OW")
        out.append(Field(f"{kw}.length", tell - (4 if long_length else 2), end + ("I" if long_length else "H")))
    return tuple(out)


def _set_field(buf: bytearray, f: Field, value: float | str) -> str:
    size = struct.calcsize(f.fmt)
    if f.offset + size > len(buf):
        return f"{f.name}: past the end"
    code = f.fmt[-1]
    if code == "s":
        packed = str(value).encode("latin-1", "replace")[:size].ljust(size)
    elif code in "fd":
        try:
            packed = struct.pack(f.fmt, value)
        except OverflowError:  # past float32's range: the infinity of that sign
            packed = struct.pack(f.fmt, math.copysign(math.inf, value))
    else:
        bits = 8 * size
        v = int(value) if math.isfinite(value) else 0
        v &= (1 << bits) - 1
        if code.islower() and v >= 1 << (bits - 1):
            v -= 1 << bits
        packed = struct.pack(f.fmt, v)
    buf[f.offset: f.offset + size] = packed
    return f"{f.name}={value!r}"


def _edit(draw: st.DrawFn, buf: bytearray, fields: Sequence[Field], header: int) -> str:
    """Apply one random edit to ``buf`` in place; return what it did. (A plain function
    taking ``draw``, not a strategy: hypothesis would describe a strategy by its arguments,
    the whole buffer.)"""
    n = len(buf)
    kinds = ["flip", "bytes", "truncate", "insert", "delete", "repeat"] + ["field"] * (3 if fields else 0)
    kinds += ["huge"] if any(f.size for f in fields) else []
    kind = draw(st.sampled_from(kinds))
    # positions: half of them in the header, where one byte changes the meaning of the rest
    pos = draw(st.one_of(st.integers(0, max(0, min(n, header) - 1)), st.integers(0, max(0, n - 1))))
    if kind == "huge":
        return ",".join(_set_field(buf, f, draw(st.one_of(st.sampled_from(HUGE), st.integers(1, 2**32 - 1))))
                        for f in fields if f.size)
    if kind == "field":
        f = draw(st.sampled_from(list(fields)))
        if f.fmt[-1] == "s":
            value: float | str = draw(st.one_of(st.sampled_from(INTERESTING_TEXT), st.text(max_size=8)))
        elif f.fmt[-1] in "fd":
            value = draw(st.one_of(st.sampled_from(INTERESTING_FLOATS), st.floats(width=32, allow_nan=True)))
        else:
            value = draw(st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(-(2**31), 2**32)))
        return _set_field(buf, f, value)
    if n == 0:
        buf.extend(draw(st.binary(min_size=1, max_size=16)))
        return "grow"
    if kind == "flip":
        bit = draw(st.integers(0, 7))
        buf[pos] ^= 1 << bit
        return f"flip@{pos}.{bit}"
    if kind == "bytes":
        new = draw(st.binary(min_size=1, max_size=8))
        buf[pos: pos + len(new)] = new
        return f"bytes@{pos}={new.hex()}"
    if kind == "truncate":
        del buf[pos:]
        return f"truncate@{pos}"
    if kind == "insert":
        new = draw(st.binary(min_size=1, max_size=64))
        buf[pos:pos] = new
        return f"insert@{pos}+{len(new)}"
    if kind == "delete":
        k = draw(st.integers(1, 64))
        del buf[pos: pos + k]
        return f"delete@{pos}-{k}"
    k = draw(st.integers(1, 256))
    buf[pos:pos] = buf[pos: pos + k]
    return f"repeat@{pos}x{k}"


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[Seed], *, max_edits: int = 4, header: int = 1024) -> Mutant:
    """A file made from one of ``seeds`` by 0 to ``max_edits`` edits of its payload (0: the
    seed itself, whose read must succeed), then, for wrapped seeds, sometimes an edit of the
    file bytes themselves."""
    seed = draw(st.sampled_from(list(seeds)))
    buf = bytearray(seed.payload)
    edits = [_edit(draw, buf, seed.fields, header) for _ in range(draw(st.integers(0, max_edits)))]
    data = seed.file_bytes(bytes(buf))
    if seed.wrap is not None and draw(st.integers(0, 3)) == 0:
        outer = bytearray(data)
        edits.append("file:" + _edit(draw, outer, (), 64))
        data = bytes(outer)
    return Mutant(data, seed.name, seed.suffix, tuple(edits))


# -- structured text --------------------------------------------------------------------------
_NASTY = ("", " ", "\t", '"', '""', '"unterminated', ",", "\n", "\r\n", "\r", "\0", "\ufeff", "é", "\u202e",
          "..", "../../etc/passwd", "/abs/path", "C:\\x", "a\\b", "NaN", "nan", "inf", "-1", "1e309", "0x10",
          "\x85", "x" * 300, "𝔘𝔫𝔦𝔠𝔬𝔡𝔢")


def cells(plausible: Sequence[str] = ()) -> st.SearchStrategy[str]:
    """A CSV cell: a plausible value, a nasty one, or any text."""
    options = [st.sampled_from(_NASTY), st.text(max_size=20)]
    if plausible:
        options.insert(0, st.sampled_from(list(plausible)))
    return st.one_of(*options)


@st.composite
def csv_text(draw: st.DrawFn, header: Sequence[str], plausible: Sequence[Sequence[str]] = (), *,
             max_rows: int = 8) -> str:
    """CSV text: usually ``header``'s row then rows of cells (a column's cells drawn from its
    ``plausible`` values or nasty ones), with rows of the wrong width, odd quoting, odd line
    ends, a byte-order mark, a huge field or an unterminated quote now and then. Half the
    texts (when ``plausible`` values are given) are clean: the header, rows of the right width
    of plausible values only, properly quoted, nothing extra; the reader must read most of them."""
    cols = list(header)
    clean = bool(plausible) and draw(st.booleans())
    rows: list[list[str]] = []
    if clean or draw(st.integers(0, 7)):
        rows.append(cols if clean or draw(st.integers(0, 5)) else draw(st.lists(cells(cols), max_size=len(cols) + 2)))
    for _ in range(draw(st.integers(0, max_rows))):
        if clean:
            rows.append([draw(st.sampled_from(list(plausible[i]))) if i < len(plausible) and plausible[i] else ""
                         for i in range(len(cols))])
            continue
        width = len(cols) + draw(st.sampled_from((0, 0, 0, 0, -1, 1, -len(cols))))
        rows.append([draw(cells(plausible[i] if i < len(plausible) else ())) for i in range(max(0, width))])
    quote = draw(st.sampled_from(("minimal", "all") if clean else ("minimal", "all", "none")))
    end = draw(st.sampled_from(("\n", "\r\n", "\r", "\n")))
    lines = []
    for row in rows:
        if quote == "all":
            lines.append(",".join('"' + c.replace('"', '""') + '"' for c in row))
        elif quote == "minimal":
            lines.append(",".join('"' + c.replace('"', '""') + '"' if any(ch in c for ch in ',"\r\n') else c
                                  for c in row))
        else:
            lines.append(",".join(row))
    text = end.join(lines) + draw(st.sampled_from(("", end)))
    extra = "none" if clean else draw(st.sampled_from(("none", "none", "bom", "huge", "unterminated", "nul")))
    if extra == "bom":
        text = "\ufeff" + text
    elif extra == "huge":  # one field longer than the csv module's default limit (131,072 characters)
        text += end + "a" * 140_000 + "," + "b" + end
    elif extra == "unterminated":
        text = text[: len(text) // 2] + '"' + text[len(text) // 2:]
    elif extra == "nul":
        text = text.replace(",", "\0,", 1)
    return text


@st.composite
def text_bytes(draw: st.DrawFn, text: st.SearchStrategy[str]) -> bytes:
    """``text`` encoded as UTF-8 (mostly), Latin-1 or UTF-16, or with a byte flipped."""
    t = draw(text)
    enc = draw(st.sampled_from(("utf-8", "utf-8", "utf-8", "latin-1", "utf-16", "flip")))
    if enc == "flip":
        data = bytearray(t.encode("utf-8", "surrogatepass"))
        if data:
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    return t.encode(enc, "replace")


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON value (NaN and infinities included, as Python's json writes them)."""
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                        st.sampled_from(_NASTY), st.text(max_size=10))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=max_leaves)


def deep_json(depth: int) -> str:
    """JSON nested ``depth`` levels deep (past Python's recursion limit for large ``depth``)."""
    return "[" * depth + "]" * depth


def dumps(value: Any) -> str:
    """``json.dumps`` that keeps NaN/Infinity (Python's JSON dialect) and lone surrogates."""
    return json.dumps(value, ensure_ascii=False, allow_nan=True)



_NASTY_JSON: tuple[Any, ...] = (None, True, False, 0, -1, 1, 2**31, 2**64, 10**400, -(10**400), 0.5, -0.0, 1e-320,
                                1e308, math.nan, math.inf, -math.inf, "", "0", "ok", "../..", "a/b", "\0", "x" * 300,
                                [], {}, [[]], {"": None})
"""JSON values that break careless readers: big integers (past float's range too), non-finite
floats, empty and path-like strings, empty containers."""


def _json_slots(doc: Any, holder: list[Any]) -> list[tuple[Any, Any]]:
    """Every (container, key) of a JSON tree, the root's own slot (``holder``, 0) first."""
    slots: list[tuple[Any, Any]] = [(holder, 0)]
    todo = [doc]
    while todo:
        node = todo.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            slots.append((node, key))
            todo.append(value)
    return slots


def _json_edit(draw: st.DrawFn, holder: list[Any]) -> str:
    """One edit of the JSON tree in ``holder[0]``, in place; return what it did."""
    slots = _json_slots(holder[0], holder)
    # the root's slot rarely: replacing the whole document is what json_values() does anyway
    parent, key = slots[draw(st.integers(1, len(slots) - 1))] if len(slots) > 1 and draw(st.integers(0, 15)) \
        else slots[0]
    kind = draw(st.sampled_from(("replace", "nasty", "nasty", "delete", "add", "duplicate", "wrap", "stringify")))
    where = f"{type(parent).__name__}[{key!r}]"[:60]
    if kind == "replace":
        parent[key] = draw(json_values(max_leaves=6))
    elif kind == "nasty":
        parent[key] = copy.deepcopy(draw(st.sampled_from(_NASTY_JSON)))  # a copy: later edits may change it
    elif kind == "delete" and parent is not holder:
        del parent[key]
    elif kind == "add":
        value = copy.deepcopy(draw(st.sampled_from(_NASTY_JSON)))
        if isinstance(parent, dict):
            parent[draw(st.one_of(st.sampled_from(list(parent) or [""]), st.text(max_size=8)))] = value
        else:
            parent.insert(key, value)
    elif kind == "duplicate" and isinstance(parent, list) and parent is not holder:
        parent.insert(key, json.loads(json.dumps(parent[key])))
    elif kind == "wrap":
        parent[key] = [parent[key]]
    else:
        parent[key] = dumps(parent[key]) if not isinstance(parent[key], str) else parent[key] + "x"
    return f"{kind}@{where}"


@st.composite
def json_mutated(draw: st.DrawFn, doc: Any, *, max_edits: int = 3) -> tuple[Any, tuple[str, ...]]:
    """A copy of the JSON value ``doc`` with 1 to ``max_edits`` edits at random places of its
    tree (a value replaced by any JSON value or a nasty one, a key or item deleted, added or
    duplicated, a value wrapped in an array or turned into a string), and the edits made."""
    holder = [json.loads(json.dumps(doc))]
    edits = tuple(_json_edit(draw, holder) for _ in range(draw(st.integers(1, max_edits))))
    return holder[0], edits


# -- ASAP annotation XML ----------------------------------------------------------------------
_XML_NUMBERS = ("0", "12.5", "1,5", "-3", "1e300", "-1e300", "1e309", "nan", "inf", "", " 7 ", "0x10", "9" * 30,
                "1.7976931348623157e308", "abc", "&#49;", "&lt;")


@st.composite
def asap_text(draw: st.DrawFn) -> str:
    """An ASAP annotation document: annotations of plausible and odd groups, with coordinates
    whose X, Y and Order are plausible numbers, odd ones (comma decimals, huge, NaN, empty,
    text) or missing; sometimes elements out of place or an odd root."""
    from xml.sax.saxutils import quoteattr

    clean = draw(st.booleans())  # half the documents have only good numbers and known groups: they are read
    number = st.floats(-1e4, 2e5, allow_nan=False).map(lambda v: f"{v:.3f}")
    groups = st.sampled_from(("Tumor", "_0", "_1", "_2", "Exclusion", "None", "", "metastases", "normal"))
    if not clean:
        number = st.one_of(number, st.sampled_from(_XML_NUMBERS))
        groups = st.one_of(groups, st.just("Other"), st.text(max_size=6))
    root = draw(st.sampled_from(("ASAP_Annotations",) * 6 + ("Annotations", "asap_annotations", "x")))
    lines = ['<?xml version="1.0"?>', f"<{root}>", "<Annotations>"]
    for i in range(draw(st.integers(0, 4))):
        attrs = f"Name={quoteattr(f'Annotation {i}')} Type=\"Polygon\""
        if draw(st.integers(0, 7)):
            attrs += f" PartOfGroup={quoteattr(draw(groups))}"
        lines += [f"<Annotation {attrs}>", "<Coordinates>"]
        for j in range(draw(st.integers(0, 7))):
            parts = []
            for name, default in (("Order", str(j)), ("X", None), ("Y", None)):
                if clean or draw(st.integers(0, 9)):  # now and then an attribute is missing
                    value = default if default is not None and draw(st.booleans()) else draw(number)
                    parts.append(f"{name}={quoteattr(value)}")
            lines.append(f"<Coordinate {' '.join(parts)} />")
        lines += ["</Coordinates>", "</Annotation>"]
    lines += ["</Annotations>", f"</{root}>", ""]
    return "\n".join(lines)
