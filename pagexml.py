"""Read PAGE-XML and ALTO page files into one model of text lines (used by prepare_pages.py).

    page = read_page(Path("page.xml"))     # Page(dialect, image_name, size, lines, tree); PageXmlError if unusable

The dialect is detected per file from the root element: PAGE `<PcGts>` (2010, 2013, 2019 schemas) or ALTO
`<alto>` (v2-v4); the namespace is taken from the root as found, never hard-coded. Coordinates stay as written,
in the XML's page size (PAGE imageWidth/imageHeight, ALTO Page WIDTH/HEIGHT, whatever ALTO's MeasurementUnit):
the caller scales them to the real image. Each Line keeps its XML element and the Page its tree, so recognised text
can be written back into the same file.

Line text: PAGE takes the TextEquiv that is a direct child of the TextLine (lowest @index, else the first), not
the Word ones; ALTO joins the String CONTENTs of the line with single spaces (SP elements are these spaces) and
appends a HYP's CONTENT to the word before it. XML entities are decoded by the parser; no other normalisation.
Line types: PAGE @type and `custom="structure {type:X;}"`, ALTO TAGREFS -> Tags/*Tag/@LABEL, of the line and of
its region/block (so a filter on either matches).
"""
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
STRUCTURE_TYPE = re.compile(r"structure\s*\{[^}]*?\btype\s*:\s*([^;}]+)")


class PageXmlError(ValueError):
    """A file that cannot be read as PAGE or ALTO; `kind` is "malformed XML" or "unknown dialect", the message
    names the file."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Line:
    id: str                           # the TextLine's XML id ("" if it has none)
    text: str                         # as written (entities decoded), may be empty
    polygon: np.ndarray | None        # (n, 2) float x, y from Coords / Shape/Polygon; n may be < 3 in bad files
    baseline: np.ndarray | None       # (n, 2) float x, y, in the file's order
    box: tuple | None                 # ALTO HPOS/VPOS/WIDTH/HEIGHT as (x0, y0, x1, y1); None for PAGE
    types: frozenset                  # type labels of the line and its region/block
    element: ET.Element = field(repr=False)


@dataclass
class Page:
    path: Path
    dialect: str                      # "page" or "alto"
    image_name: str | None            # the image file the XML names, as written
    size: tuple | None                # (width, height) the XML gives the page, in its coordinate units
    lines: list                       # [Line] in document order
    tree: ET.ElementTree = field(repr=False)


def local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_points(text: str | None) -> np.ndarray | None:
    """'x,y x,y ...' (PAGE) or 'x y x y ...' (ALTO) -> (n, 2) float; None if there are no numbers."""
    numbers = [float(v) for v in NUMBER.findall(text or "")]
    if len(numbers) < 2:
        return None
    return np.array(numbers[:len(numbers) // 2 * 2]).reshape(-1, 2)


def _size(width: str | None, height: str | None) -> tuple | None:
    try:
        size = (float(width), float(height))
    except (TypeError, ValueError):
        return None
    return size if min(size) > 0 else None


def read_page(path: Path) -> Page:
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise PageXmlError("malformed XML", f"{path}: malformed XML ({e})") from None
    root = tree.getroot()
    ns = root.tag[:-len(local_name(root.tag))]                          # "{namespace}" or ""
    name = local_name(root.tag)
    if name == "PcGts":
        return _read_page_xml(path, tree, ns)
    if name.lower() == "alto":
        return _read_alto(path, tree, ns)
    raise PageXmlError("unknown dialect", f"{path}: unknown XML dialect, root element <{name}> "
                                          f"(expected PAGE <PcGts> or ALTO <alto>)")


# ------------------------------------------------------------------------------------------------------- PAGE

def _page_points(element: ET.Element | None, ns: str) -> np.ndarray | None:
    if element is None:
        return None
    if element.get("points") is not None:
        return parse_points(element.get("points"))
    return parse_points(" ".join(f"{p.get('x')},{p.get('y')}" for p in element.findall(f"{ns}Point")))  # PAGE 2009


def _page_types(element: ET.Element) -> set:
    found = set(STRUCTURE_TYPE.findall(element.get("custom", "")))
    return {t.strip() for t in found | {element.get("type", "")} if t.strip()}


def _page_text(line: ET.Element, ns: str) -> str:
    equivs = line.findall(f"{ns}TextEquiv")
    if not equivs:
        return ""

    def rank(k_equiv):
        k, equiv = k_equiv
        index = equiv.get("index", "")
        return (int(index), k) if index.lstrip("-").isdigit() else (float("inf"), k)

    return min(enumerate(equivs), key=rank)[1].findtext(f"{ns}Unicode") or ""


def _read_page_xml(path: Path, tree: ET.ElementTree, ns: str) -> Page:
    page = tree.getroot().find(f"{ns}Page")
    if page is None:
        raise PageXmlError("malformed XML", f"{path}: PAGE file without a <Page> element")
    lines = []
    for region in page.iter(f"{ns}TextRegion"):
        region_types = _page_types(region)
        for el in region.findall(f"{ns}TextLine"):
            lines.append(Line(el.get("id", ""), _page_text(el, ns), _page_points(el.find(f"{ns}Coords"), ns),
                              _page_points(el.find(f"{ns}Baseline"), ns), None,
                              frozenset(region_types | _page_types(el)), el))
    return Page(path, "page", page.get("imageFilename"), _size(page.get("imageWidth"), page.get("imageHeight")),
                lines, tree)


# ------------------------------------------------------------------------------------------------------- ALTO

def _alto_box(el: ET.Element) -> tuple | None:
    try:
        x, y, w, h = (float(el.get(k)) for k in ("HPOS", "VPOS", "WIDTH", "HEIGHT"))
    except (TypeError, ValueError):
        return None
    return (x, y, x + w, y + h)


def _alto_baseline(el: ET.Element, box: tuple | None) -> np.ndarray | None:
    """ALTO v4 BASELINE is a point list; v2/v3 a single y, taken as a horizontal line across the line's box."""
    points = parse_points(el.get("BASELINE"))
    if points is not None:
        return points
    numbers = NUMBER.findall(el.get("BASELINE") or "")
    if len(numbers) == 1 and box is not None:
        return np.array([[box[0], float(numbers[0])], [box[2], float(numbers[0])]])
    return None


def _alto_text(line: ET.Element) -> str:
    words = []
    for child in line:
        kind = local_name(child.tag)
        if kind == "String":
            words.append(child.get("CONTENT", ""))
        elif kind == "HYP" and words:
            words[-1] += child.get("CONTENT", "")
        elif kind == "HYP":
            words.append(child.get("CONTENT", ""))
    return " ".join(words)


def _read_alto(path: Path, tree: ET.ElementTree, ns: str) -> Page:
    root = tree.getroot()
    labels = {tag.get("ID"): tag.get("LABEL") for tag in root.findall(f"{ns}Tags/*") if tag.get("LABEL")}

    def types(el):
        return {labels[ref] for ref in el.get("TAGREFS", "").split() if ref in labels}

    lines = []
    for block in root.iter(f"{ns}TextBlock"):
        block_types = types(block)
        for el in block.findall(f"{ns}TextLine"):
            polygon = el.find(f"{ns}Shape/{ns}Polygon")
            box = _alto_box(el)
            lines.append(Line(el.get("ID", ""), _alto_text(el),
                              parse_points(polygon.get("POINTS")) if polygon is not None else None,
                              _alto_baseline(el, box), box, frozenset(block_types | types(el)), el))
    page = root.find(f"{ns}Layout/{ns}Page")
    size = _size(page.get("WIDTH"), page.get("HEIGHT")) if page is not None else None
    name = root.findtext(f"{ns}Description/{ns}sourceImageInformation/{ns}fileName")
    return Page(path, "alto", name.strip() if name and name.strip() else None, size, lines, tree)
