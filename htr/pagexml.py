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

Writing (transcribe.py): `set_line_text` puts recognised text into a line's element where its schema wants it and
`write_page` writes the tree with the file's own namespace prefixes (also declared-but-unused ones) and its
comments and processing instructions inside the root; a DOCTYPE and comments before the root are not kept.
- PAGE: a line-level TextEquiv (Unicode, conf) after the line's AlternativeImage/Coords/Baseline/Word/TextEquiv
  children. TextEquivs with text are kept unless `overwrite` (empty ones are replaced): from PAGE 2016 on, which
  allows several with an `index` (lowest = main text), the new one is added with the next index (kept ones without
  an index get one first, in the order they ranked in), so the existing text stays the main one; PAGE 2010/2013
  allow one TextEquiv per line, so there a line with text keeps it. PAGE 2010 gets PlainText too and no conf.
- ALTO: the line's String/SP/HYP children are replaced by one String (CONTENT, WC) per word with SP between, after
  the Shape; positions are estimated from the line's box (or polygon bounds) in proportion to the characters. A line
  with text keeps it unless `overwrite` (ALTERNATIVE is per word, and the new words need not match the old ones).
"""
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
STRUCTURE_TYPE = re.compile(r"structure\s*\{[^}]*?\btype\s*:\s*([^;}]+)")
PAGE_YEAR = re.compile(r"/(\d{4})-\d\d-\d\d")
PAGE_BEFORE_TEXT = {"AlternativeImage", "Coords", "Baseline", "Word", "TextEquiv"}   # TextLine children before ours
ALTO_TEXT = {"String", "SP", "HYP"}


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
    namespaces: dict = field(default_factory=dict, repr=False)   # prefix ("" = default) -> URI, as declared


class _TreeBuilder(ET.TreeBuilder):
    """Keeps comments and processing instructions and records the namespace prefixes the file declares."""

    def __init__(self):
        super().__init__(insert_comments=True, insert_pis=True)
        self.namespaces = {}

    def start_ns(self, prefix: str, uri: str) -> None:
        self.namespaces.setdefault(prefix, uri)


def local_name(tag) -> str:
    """The tag without its namespace; "" for comments and processing instructions (whose tag is a function)."""
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


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
    builder = _TreeBuilder()
    try:
        tree = ET.parse(path, ET.XMLParser(target=builder))
    except ET.ParseError as e:
        raise PageXmlError("malformed XML", f"{path}: malformed XML ({e})") from None
    root = tree.getroot()
    ns = root.tag[:-len(local_name(root.tag))]                          # "{namespace}" or ""
    name = local_name(root.tag)
    if name == "PcGts":
        page = _read_page_xml(path, tree, ns)
    elif name.lower() == "alto":
        page = _read_alto(path, tree, ns)
    else:
        raise PageXmlError("unknown dialect", f"{path}: unknown XML dialect, root element <{name}> "
                                              f"(expected PAGE <PcGts> or ALTO <alto>)")
    page.namespaces = builder.namespaces
    return page


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


def _index(equiv: ET.Element) -> int | None:
    index = equiv.get("index", "")
    return int(index) if index.lstrip("-").isdigit() else None


def _by_rank(equivs: list) -> list:
    """TextEquivs main first: by @index, those without one after the indexed, in document order."""
    def rank(k_equiv):
        k, equiv = k_equiv
        return (float("inf") if _index(equiv) is None else _index(equiv), k)

    return [equiv for _, equiv in sorted(enumerate(equivs), key=rank)]


def _unicode(equiv: ET.Element, ns: str) -> str:
    unicode = equiv.find(f"{ns}Unicode")
    return "" if unicode is None else "".join(unicode.itertext())       # text around comments too


def _page_text(line: ET.Element, ns: str) -> str:
    equivs = _by_rank(line.findall(f"{ns}TextEquiv"))
    return _unicode(equivs[0], ns) if equivs else ""


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


# ---------------------------------------------------------------------------------------------------- writing

def set_line_text(page: Page, line: Line, text: str, confidence: float, word_confidences: list | None = None,
                  overwrite: bool = False) -> bool:
    """Write recognised `text` into the line's element (see the module docstring for where and when) -> False if
    the line kept its existing text instead. `word_confidences`: one per whitespace-separated word of `text`
    (ALTO WC), else the line's `confidence` for each."""
    root = page.tree.getroot()
    ns = root.tag[:-len(local_name(root.tag))]
    if page.dialect == "page":
        year = int(m[1]) if (m := PAGE_YEAR.search(ns)) else 9999
        return _set_page_text(line.element, ns, text, confidence, overwrite, year)
    words = [(m.start(), m.group()) for m in re.finditer(r"\S+", text)]
    confs = word_confidences if word_confidences is not None else [confidence] * len(words)
    return _set_alto_text(line.element, ns, words, confs, confidence, _bounds(line), len(text), overwrite)


def _insert(parent: ET.Element, position: int, child: ET.Element) -> None:
    """Insert, indented like its siblings if the file is indented (the whitespace before the first child)."""
    indent = parent.text if parent.text and not parent.text.strip() else None
    before = parent[position - 1] if position else None
    child.tail = before.tail if before is not None else indent
    if before is not None:
        before.tail = indent
    parent.insert(position, child)


def _remove(parent: ET.Element, child: ET.Element) -> None:
    """Remove, keeping the whitespace that followed it (the indentation of what comes next)."""
    k = list(parent).index(child)
    if k:
        parent[k - 1].tail = child.tail
    else:
        parent.text = child.tail
    parent.remove(child)


def _number(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}".rstrip("0").rstrip(".")


def _set_page_text(element: ET.Element, ns: str, text: str, confidence: float, overwrite: bool, year: int) -> bool:
    equivs = element.findall(f"{ns}TextEquiv")
    kept = [] if overwrite else [e for e in _by_rank(equivs) if _unicode(e, ns).strip()]
    if kept and year < 2016:                           # PAGE 2010/2013: at most one TextEquiv per line
        return False
    for equiv in equivs:
        if equiv not in kept:
            _remove(element, equiv)
    new = ET.Element(f"{ns}TextEquiv")
    if kept:                                           # the unindexed kept ones, then ours: the next indices
        index = max((_index(e) for e in kept if _index(e) is not None), default=-1) + 1
        for equiv in [e for e in kept if _index(e) is None] + [new]:
            equiv.set("index", str(index))
            index += 1
    if year >= 2013:
        new.set("conf", _number(confidence, 4))
    else:
        ET.SubElement(new, f"{ns}PlainText").text = text
    ET.SubElement(new, f"{ns}Unicode").text = text
    _insert(element, max((k + 1 for k, child in enumerate(element) if local_name(child.tag) in PAGE_BEFORE_TEXT),
                         default=0), new)
    return True


def _bounds(line: Line) -> tuple | None:
    """(x0, y0, x1, y1) of an ALTO line in the file's units: its HPOS/VPOS/WIDTH/HEIGHT, else its polygon's."""
    if line.box is not None:
        return line.box
    if line.polygon is not None:
        return (*line.polygon.min(0), *line.polygon.max(0))
    return None


def _set_alto_text(element: ET.Element, ns: str, words: list, confidences: list, line_confidence: float,
                   bounds: tuple | None, length: int, overwrite: bool) -> bool:
    """words: [(character offset, word)] of a line of `length` characters; positions in proportion to them."""
    old = [child for child in element if local_name(child.tag) in ALTO_TEXT]
    if not overwrite and any(c.get("CONTENT", "").strip() for c in old if local_name(c.tag) != "SP"):
        return False
    for child in old:
        _remove(element, child)

    def add(tag, start, end, **attributes):
        child = ET.Element(f"{ns}{tag}", attributes)
        if bounds is not None:
            x0, y0, x1, y1 = bounds
            step = (x1 - x0) / max(length, 1)
            child.attrib.update(HPOS=_number(x0 + start * step), VPOS=_number(y0),
                                WIDTH=_number((end - start) * step), HEIGHT=_number(y1 - y0))
        _insert(element, len(element), child)

    for k, ((start, word), conf) in enumerate(zip(words, confidences, strict=True)):
        if k:
            add("SP", words[k - 1][0] + len(words[k - 1][1]), start)
        add("String", start, start + len(word), CONTENT=word, WC=_number(conf, 4))
    if not words:                                       # ALTO wants at least one String per line
        add("String", 0, length, CONTENT="", WC=_number(line_confidence, 4))
    return True


def write_page(page: Page, file) -> None:
    """Write the page's tree (UTF-8, with an XML declaration) to a binary file object, with the namespace
    prefixes the file declared; declared prefixes that no tag or attribute uses stay declared on the root (their
    names may occur in attribute values, e.g. xsi:type)."""
    root = page.tree.getroot()
    used = {tag[1:].split("}")[0] for el in root.iter() for tag in (el.tag, *el.attrib)
            if isinstance(tag, str) and tag.startswith("{")}
    for prefix, uri in page.namespaces.items():
        if re.fullmatch(r"ns\d+", prefix):             # ElementTree's own prefix names: it picks new ones
            continue
        ET.register_namespace(prefix, uri)
        if uri not in used and prefix and root.get(f"xmlns:{prefix}") is None:
            root.set(f"xmlns:{prefix}", uri)
    page.tree.write(file, encoding="UTF-8", xml_declaration=True)
