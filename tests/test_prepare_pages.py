"""prepare_pages.py on tiny PAGE 2013 / PAGE 2019 / ALTO 4 pages with drawn text, written into tmp_path."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import prepare_pages
from conftest import write_split
from htr.decoding import CharNgramLM
from htr.evaluation import build_lm
from htr.corpus_licence import corpus_licence, data_licence, licence_id
from htr.model_card import data_licence_line
from htr import page_lines as pp
from dataset import LineDataset
from htr.pagexml import read_page
from utils import Charset, UserError, load_config

ROOT = Path(__file__).resolve().parents[1]
W, H, SPACING = 800, 700, 100            # page size; baselines are SPACING apart
PAD = max(2, round(pp.DILATE * SPACING))  # polygon dilation on these pages
NS = {2013: "http://schema.primaresearch.org/PAGE/gts/pagecontent/2013-07-15",
      2019: "http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15"}
BLOB = (400, 200, 650, 222)              # x0, y0, x1, y1: ink outside the L-shaped polygon of a2013's line 2


def box(y: int, x0: int = 60, x1: int = 600) -> list:
    """The normal polygon of a line with its baseline at y: 45 px above to 15 px below."""
    return [(x0, y - 45), (x1, y - 45), (x1, y + 15), (x0, y + 15)]


def base(y: int, x0: int = 60, x1: int = 600) -> list:
    return [(x0, y), (x1, y)]


def equiv(text: str, index=None) -> str:
    attribute = "" if index is None else f' index="{index}"'
    return f"<TextEquiv{attribute}><Unicode>{text}</Unicode></TextEquiv>"


def draw_page(path: Path, ys, blob=None) -> None:
    """A page with a line of ink on each baseline y (image coordinates), optionally a dark blob."""
    img = np.full((H, W), 230, np.uint8)
    for y in ys:
        cv2.putText(img, "minimum", (70, y), cv2.FONT_HERSHEY_SIMPLEX, 1.2, 20, 3)
    if blob:
        img[blob[1]:blob[3], blob[0]:blob[2]] = 20
    cv2.imwrite(str(path), img)


def page_xml(year: int, image: str, lines, scale: int = 1) -> str:
    """lines: [(polygon or None, baseline or None, TextEquiv XML, custom)]; coordinates times scale."""
    def pts(points):
        return " ".join(f"{x * scale},{y * scale}" for x, y in points)

    rows = [f'<?xml version="1.0" encoding="UTF-8"?>\n<PcGts xmlns="{NS[year]}"><Metadata/>',
            f'<Page imageFilename="{image}" imageWidth="{W * scale}" imageHeight="{H * scale}">',
            '<TextRegion id="r1" type="paragraph"><Coords points="0,0 10,0 10,10"/>']
    for k, (poly, bl, text, custom) in enumerate(lines, 1):
        rows.append(f'<TextLine id="l{k}" custom="{custom}">')
        rows += [f'<Coords points="{pts(poly)}"/>'] if poly is not None else []
        rows += [f'<Baseline points="{pts(bl)}"/>'] if bl is not None else []
        rows.append(f"{text}</TextLine>")
    return "\n".join(rows + ["</TextRegion></Page></PcGts>\n"])


def alto_xml(image: str, lines) -> str:
    """lines: [(y, tag id, inner XML of the TextLine)]."""
    rows = ['<?xml version="1.0" encoding="UTF-8"?>\n<alto xmlns="http://www.loc.gov/standards/alto/ns-v4#">',
            f"<Description><MeasurementUnit>pixel</MeasurementUnit><sourceImageInformation><fileName>{image}"
            "</fileName></sourceImageInformation></Description>",
            '<Tags><OtherTag ID="LT1" LABEL="handwritten"/><OtherTag ID="LT2" LABEL="printed"/>'
            '<OtherTag ID="BT1" LABEL="Main"/></Tags>',
            f'<Layout><Page WIDTH="{W}" HEIGHT="{H}" ID="p1"><PrintSpace>'
            '<TextBlock ID="b1" TAGREFS="BT1">']
    for k, (y, tag, inner) in enumerate(lines, 1):
        poly = " ".join(f"{x} {v}" for x, v in box(y))
        rows.append(f'<TextLine ID="t{k}" TAGREFS="{tag}" BASELINE="60 {y} 600 {y}" HPOS="60" VPOS="{y - 45}" '
                    f'WIDTH="540" HEIGHT="60"><Shape><Polygon POINTS="{poly}"/></Shape>{inner}</TextLine>')
    return "\n".join(rows + ["</TextBlock></PrintSpace></Page></Layout></alto>\n"])


def write_corpus(root: Path) -> Path:
    """Three good dialects, a name with spaces, malformed XML, unknown dialect, no image, wrong image size,
    unreadable image, a page in no split list."""
    root.mkdir(parents=True)
    ell = [(60, 150), (700, 150), (700, 185), (300, 185), (300, 215), (60, 215)]   # L: lower right is outside
    (root / "a2013.xml").write_text(page_xml(2013, "a2013.jpg", [
        (box(100), base(100), equiv("Tom &amp; &quot;Jerry&quot;"), ""),
        (ell, base(200, x1=290), equiv("mask \n  test"), ""),
        ([(60, 292), (600, 292), (600, 298), (60, 298)], base(300), equiv("thin strip"), ""),
        ([(60, 355), (600, 415)], base(400), equiv("two points"), ""),
        (box(500), base(500), equiv("   "), ""),
        (box(600), base(600), equiv("second", 1) + equiv("first", 0), ""),
    ]), encoding="utf-8")
    draw_page(root / "a2013.jpg", [100, 200, 300, 400, 500, 600], blob=BLOB)
    (root / "b2019.xml").write_text(page_xml(2019, "scan_0042.tif", [
        ([(x + W, y) for x, y in box(100)], base(100), equiv("off page"), ""),
        (box(600), base(200), equiv("off baseline"), ""),
        ([(60, 255), (600, 315)], None, equiv("box only"), ""),
        (box(400), base(400), equiv("Cafe\u0301"), "structure {type:heading;}"),
    ]), encoding="utf-8")
    draw_page(root / "b2019.png", [100, 200, 300, 400])
    (root / "c_alto.xml").write_text(alto_xml("c_alto.jpg", [
        (100, "LT1", '<String CONTENT="Hello"/><SP/><String CONTENT="wor"/><HYP CONTENT="-"/>'),
        (200, "LT2", '<String CONTENT="Printed"/><SP/><String CONTENT="line"/>'),
        (300, "LT1", '<String CONTENT="a &amp; b"/>'),
    ]), encoding="utf-8")
    draw_page(root / "imp_c_alto.jpg", [100, 200, 300])
    (root / "d page (1).xml").write_text(page_xml(2013, "d page (1).jpg", [
        (box(100), base(100), equiv("one"), ""), (box(200), base(200), equiv("two"), "")], scale=2),
        encoding="utf-8")
    draw_page(root / "d page (1).jpg", [100, 200])
    (root / "broken.xml").write_text(page_xml(2013, "broken.jpg", [(box(100), base(100), equiv("x"), "")])[:-30])
    draw_page(root / "broken.jpg", [100])
    (root / "foo.xml").write_text("<foo><bar/></foo>\n")
    (root / "noimg.xml").write_text(page_xml(2013, "nothing.jpg", [(box(100), base(100), equiv("lost"), "")]))
    (root / "e_size.xml").write_text(page_xml(2013, "e_size.png", [(box(100), base(100), equiv("e"), "")]))
    cv2.imwrite(str(root / "e_size.png"), np.full((H // 2, W), 230, np.uint8))
    (root / "f_bad.xml").write_text(page_xml(2013, "f_bad.jpg", [(box(100), base(100), equiv("f"), "")]))
    (root / "f_bad.jpg").write_bytes(b"not a jpeg")
    (root / "extra.xml").write_text(page_xml(2013, "extra.jpg", [(box(100), base(100), equiv("extra"), "")]))
    draw_page(root / "extra.jpg", [100])
    return root


def write_splits(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "train.txt").write_text("a2013\nd page (1)\nc_alto\nbroken\nfoo\ne_size\nf_bad\n", encoding="utf-8")
    (root / "val.txt").write_text("b2019\nnoimg\n", encoding="utf-8")
    (root / "test.txt").write_text("ghost\n", encoding="utf-8")
    return root


def run(xml_dir: Path, out: Path, *extra) -> dict:
    prepare_pages.main([str(xml_dir), str(out), "--workers", "1", *map(str, extra)])
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def gt(out: Path, split: str) -> dict:
    rows = (out / split / "gt.txt").read_text(encoding="utf-8").splitlines()
    return dict(row.split(" ", 1) for row in rows)


def png(out: Path, split: str, line_id: str) -> np.ndarray:
    return cv2.imread(str(out / split / f"{line_id}.png"), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pages")
    corpus, splits = write_corpus(tmp / "corpus"), write_splits(tmp / "splits")
    return tmp / "out", run(corpus, tmp / "out", "--splits", splits), corpus, splits


def test_lines_per_split_and_gt(done):
    out, summary, _, _ = done
    assert summary["pages"] == {"train": 3, "val": 1, "test": 0}
    assert summary["lines"] == {"train": 10, "val": 4, "test": 0}
    assert gt(out, "train") == {
        "a2013_001": 'Tom & "Jerry"', "a2013_002": "mask test", "a2013_003": "thin strip", "a2013_004": "two points",
        "a2013_006": "first", "c_alto_001": "Hello wor-", "c_alto_002": "Printed line", "c_alto_003": "a & b",
        "d_page_1_001": "one", "d_page_1_002": "two"}
    assert gt(out, "val") == {"b2019_001": "off page", "b2019_002": "off baseline", "b2019_003": "box only",
                              "b2019_004": "Caf\u00e9"}
    assert list(gt(out, "train")) == sorted(gt(out, "train"))
    assert (out / "test" / "gt.txt").read_text() == ""
    assert summary["characters"]["val"] == sum(map(len, gt(out, "val").values()))
    assert summary["rare_characters"]["&"] == 2 and "é" in summary["not_in_train"]


def test_polygon_mask_paints_background_outside(done):
    out = done[0]
    crop = png(out, "train", "a2013_002")                   # L polygon, box x 60..700, y 150..215
    assert crop.ndim == 2 and crop.dtype == np.uint8
    assert crop.shape == (215 - 150 + 2 * PAD + 1, 700 - 60 + 2 * PAD + 1)
    x0, y0, x1, y1 = BLOB[0] - (60 - PAD), BLOB[1] - (150 - PAD), BLOB[2] - (60 - PAD), BLOB[3] - (150 - PAD)
    assert crop[y0:y1, x0:x1].min() >= 200                  # the blob is painted paper grey
    assert crop[:, :300].min() < 60                         # the line's own ink stays


def test_fallbacks_counted_and_recorded(done):
    out, summary = done[0], done[1]
    assert summary["fallbacks"] == {
        "baseline band (fewer than 3 points)": 1, "baseline band (off its baseline)": 1,
        "baseline band (off the page)": 1, "baseline band (thin)": 1, "bounding box (fewer than 3 points)": 1}
    band = round((pp.BAND_UP + pp.BAND_DOWN) * SPACING) + 2 * PAD
    for split, line_id in (("train", "a2013_003"), ("train", "a2013_004"), ("val", "b2019_001"),
                           ("val", "b2019_002")):
        crop = png(out, split, line_id)
        assert abs(crop.shape[0] - band) <= 2 and crop.min() < 60, line_id   # the whole line's ink, not a strip
    assert png(out, "val", "b2019_003").shape == (315 - 255 + 2 * PAD + 1, 600 - 60 + 2 * PAD + 1)
    sidecar = json.loads((out / "pages" / "a2013.json").read_text(encoding="utf-8"))
    assert [ln[2:] for ln in sidecar["lines"][:3]] == [["l1", None], ["l2", None], ["l3", "baseline band (thin)"]]


def test_rescaled_coordinates(done):
    crop = png(done[0], "train", "d_page_1_001")             # XML at twice the image size
    assert crop.shape == (60 + 2 * PAD + 1, 540 + 2 * PAD + 1) and crop.min() < 60


def test_skips_and_problems_reported(done):
    summary, corpus = done[1], done[2].resolve()
    assert summary["skipped_lines"] == {"empty text": 1}
    pages = summary["skipped_pages"]
    assert set(pages) == {"malformed XML", "unknown dialect", "no image", "image size mismatch", "unreadable image",
                          "in no split list"}
    assert pages["image size mismatch"] == [f"{corpus / 'e_size.xml'}: image e_size.png is 800x350, "
                                            "the XML's page 800x700"]
    assert pages["unreadable image"] == [f"{corpus / 'f_bad.jpg'}: unreadable image"]
    assert len(pages["malformed XML"]) == 1 and str(corpus / "broken.xml") in pages["malformed XML"][0]
    assert pages["unknown dialect"] == [f"{corpus / 'foo.xml'}: unknown XML dialect, root element <foo> "
                                        "(expected PAGE <PcGts> or ALTO <alto>)"]
    assert str(corpus / "noimg.xml") in pages["no image"][0] and "nothing.jpg" in pages["no image"][0]
    assert pages["in no split list"] == [str(corpus / "extra.xml")]
    assert summary["listed_but_not_found"] == ["ghost"]


def test_image_name_fallbacks(done):
    assert done[1]["images_found_by"] == {"XML file name": 1, "name with a prefix or suffix": 1}
    sidecar = json.loads((done[0] / "pages" / "c_alto.json").read_text(encoding="utf-8"))
    assert Path(sidecar["image"]).name == "imp_c_alto.jpg"


def test_dataset_loads_output(done):
    data = LineDataset(done[0], "train", 64, 512, cache=False)
    assert len(data) == 10 and not data.skipped
    image, text, line_id = data[0]
    assert tuple(image.shape) == (1, 64, 512) and text == gt(done[0], "train")[line_id]


def test_rerun_is_idempotent(done, tmp_path):
    out, _, corpus, splits = done
    shutil.copytree(out, tmp_path / "out")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.png")}
    gts = [(tmp_path / "out" / s / "gt.txt").read_bytes() for s in pp.SPLITS]
    assert run(corpus, tmp_path / "out", "--splits", splits) == done[1]
    assert [(tmp_path / "out" / s / "gt.txt").read_bytes() for s in pp.SPLITS] == gts
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.png")} == before


def test_changed_split_moves_the_page(done, tmp_path):
    out, _, corpus, splits = done
    shutil.copytree(out, tmp_path / "out")
    moved = write_splits(tmp_path / "splits")
    (moved / "train.txt").write_text("a2013\nd page (1)\n")
    (moved / "test.txt").write_text("c_alto\n")
    summary = run(corpus, tmp_path / "out", "--splits", moved)
    assert summary["lines"] == {"train": 7, "val": 4, "test": 3}
    assert not list((tmp_path / "out" / "train").glob("c_alto_*.png"))
    assert "c_alto_001" not in gt(tmp_path / "out", "train") and len(gt(tmp_path / "out", "test")) == 3


def test_line_type_filter(done, tmp_path):
    corpus = tmp_path / "two"
    corpus.mkdir()
    for name in ("c_alto.xml", "imp_c_alto.jpg", "b2019.xml", "b2019.png"):
        shutil.copy(done[2] / name, corpus / name)
    summary = run(corpus, tmp_path / "out", "--line-type", "handwritten", "--line-type", "heading")
    assert set(gt(tmp_path / "out", "train")) == {"b2019_004", "c_alto_001", "c_alto_003"}
    assert summary["skipped_lines"] == {"filtered by line type": 4}
    run(corpus, tmp_path / "all", "--line-type", "paragraph", "--line-type", "Main")   # region / block types
    assert len(gt(tmp_path / "all", "train")) == 7


def write_plain_pages(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for k in range(n):
        lines = [(box(100), base(100), equiv(f"p{k}"), "")]
        (root / f"p{k:02d}.xml").write_text(page_xml(2013, f"p{k:02d}.png", lines))
        draw_page(root / f"p{k:02d}.png", [100])
    return root


def test_seeded_split_is_deterministic(tmp_path):
    corpus = write_plain_pages(tmp_path / "plain", 10)
    first, again = run(corpus, tmp_path / "a"), run(corpus, tmp_path / "b")
    assert first["pages"] == {"train": 8, "val": 1, "test": 1} and first == again
    assert all(gt(tmp_path / "a", s) == gt(tmp_path / "b", s) for s in pp.SPLITS)
    run(corpus, tmp_path / "c", "--seed", 1)
    assert any(gt(tmp_path / "a", s) != gt(tmp_path / "c", s) for s in ("val", "test"))


def test_bad_usage_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("x\n")
    with pytest.raises(UserError, match="XML folder not found"):
        prepare_pages.main([str(tmp_path / "missing"), str(tmp_path / "out")])
    with pytest.raises(UserError, match="no \\*.xml files"):
        prepare_pages.main([str(tmp_path / "empty"), str(tmp_path / "out")])
    write_plain_pages(tmp_path / "plain", 1)
    with pytest.raises(UserError, match="lacks val.txt, test.txt"):
        prepare_pages.main([str(tmp_path / "plain"), str(tmp_path / "out"), "--splits", str(tmp_path / "lists")])


def test_cli_round_trip(tmp_path):
    corpus = write_plain_pages(tmp_path / "plain", 3)
    ok = subprocess.run([sys.executable, "prepare_pages.py", str(corpus), str(tmp_path / "out"), "--workers", "2"],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "train: 1 pages, 1 lines" in ok.stdout and (tmp_path / "out" / "summary.json").is_file()
    assert "licence: unknown: none given" in ok.stdout and "--licence ID" in ok.stdout
    given = subprocess.run([sys.executable, "prepare_pages.py", str(corpus), str(tmp_path / "out"),
                            "--licence", "CC-BY-SA-4.0"], cwd=ROOT, capture_output=True, text=True)
    assert "licence: CC-BY-SA-4.0 (from --licence)" in given.stdout, given.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["licence"] == {"licence": "CC-BY-SA-4.0", "found_in": "--licence"}
    bad = subprocess.run([sys.executable, "prepare_pages.py", str(corpus), str(tmp_path / "out"),
                          "--splits", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [f"error: --splits {tmp_path} lacks train.txt, val.txt, test.txt "
                                       "(one page id per line each)"]


def test_pagexml_alto_v2_and_page_2010(tmp_path):
    (tmp_path / "v2.xml").write_text(
        '<alto xmlns="http://www.loc.gov/standards/alto/ns-v2#"><Description><sourceImageInformation><fileName>'
        ' x.tif </fileName></sourceImageInformation></Description><Layout><Page WIDTH="100" HEIGHT="50"><PrintSpace>'
        '<TextBlock ID="b"><TextLine HPOS="10" VPOS="20" WIDTH="30" HEIGHT="10" BASELINE="28"><String CONTENT="a"/>'
        '<SP/><String CONTENT="b"/></TextLine></TextBlock></PrintSpace></Page></Layout></alto>')
    page = read_page(tmp_path / "v2.xml")
    line = page.lines[0]
    assert (page.dialect, page.image_name, page.size, line.text) == ("alto", "x.tif", (100, 50), "a b")
    assert line.polygon is None and line.box == (10, 20, 40, 30) and line.baseline.tolist() == [[10, 28], [40, 28]]
    (tmp_path / "p2010.xml").write_text(
        '<PcGts xmlns="http://schema.primaresearch.org/PAGE/gts/pagecontent/2010-03-19"><Page imageFilename="y.png" '
        'imageWidth="10" imageHeight="10"><TextRegion id="r"><TextLine id="l"><Coords><Point x="1" y="2"/>'
        '<Point x="3" y="4"/><Point x="5" y="6"/></Coords></TextLine></TextRegion></Page></PcGts>')
    page = read_page(tmp_path / "p2010.xml")
    assert page.dialect == "page" and page.lines[0].polygon.tolist() == [[1, 2], [3, 4], [5, 6]]
    assert page.lines[0].text == "" and page.lines[0].baseline is None


def test_images_beside_the_xml_folder_or_under_images(tmp_path):
    xml_dir = write_plain_pages(tmp_path / "set" / "alto", 1)
    (tmp_path / "set" / "jpg").mkdir()
    (xml_dir / "p00.png").rename(tmp_path / "set" / "jpg" / "p00.png")     # alto/ + jpg/ side by side
    assert run(xml_dir, tmp_path / "a")["lines"]["train"] == 1
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "set" / "jpg" / "p00.png").rename(tmp_path / "elsewhere" / "p00.png")
    assert run(xml_dir, tmp_path / "b")["skipped_pages"]["no image"][0].startswith(str(xml_dir.resolve() / "p00.xml"))
    assert run(xml_dir, tmp_path / "c", "--images", tmp_path / "elsewhere")["lines"]["train"] == 1


@pytest.mark.parametrize("text, spdx", [
    ("CC BY 4.0\n\n# Description", "CC-BY-4.0"),                                  # Copiste-d-un-jour's README
    ("licensed under CC-BY-NC-SA 4.0.", "CC-BY-NC-SA-4.0"),
    ("a Creative Commons Attribution-ShareAlike 4.0 International License", "CC-BY-SA-4.0"),
    ("Creative Commons Attribution 4.0 International", "CC-BY-4.0"),
    ("MIT License\n\nCopyright (c) 2023", "MIT"),
    ("Ground truth for a Kraken model. Images reproduced with permission.", None),  # JosephHookerHTR's README
])
def test_licence_names_are_read_as_ids(text, spdx):
    assert licence_id(text) == spdx


def test_corpus_licence_comes_from_the_corpus_files_or_the_command_line(tmp_path):
    corpus = tmp_path / "repo" / "data"
    corpus.mkdir(parents=True)
    assert corpus_licence(corpus) == {"licence": "unknown", "found_in": None}
    (tmp_path / "repo" / "README.md").write_text("# Corpus\nThis work is under CC BY-SA 4.0.\n")
    assert corpus_licence(corpus) == {"licence": "CC-BY-SA-4.0", "found_in": str(tmp_path / "repo" / "README.md")}
    (corpus / "htr-united.yml").write_text("title: x\nlicense:\n- name: CC-BY 4.0\n"
                                           "  url: https://creativecommons.org/licenses/by/4.0/\n")
    assert corpus_licence(corpus)["licence"] == "CC-BY-4.0"                     # the catalogue file comes first
    assert corpus_licence(corpus, "etalab-2.0") == {"licence": "etalab-2.0", "found_in": "--licence"}
    (corpus / "htr-united.yml").write_text("license: CC BY-NC 4.0\n")          # one entry, not a list
    assert corpus_licence(corpus)["licence"] == "CC-BY-NC-4.0"
    (corpus / "htr-united.yml").write_text("license: [unclosed\n")             # unreadable: the next source
    assert corpus_licence(corpus)["found_in"].endswith("README.md")


def test_a_dataset_joined_by_linked_splits_reads_both_and_joins_their_licences(tmp_path, monkeypatch):
    """data/fr/train/shard-a -> data/a/train (and b): the split (and the character LM's text) is the union of both,
    and the licence record lists each source's, a source without one as unknown."""
    for name, texts in (("a", ["ab", "ba"]), ("b", ["cd"]), ("c", ["dc"])):
        d = write_split(tmp_path / name, "train", texts)
        for png in d.glob("*.png"):                                       # ids of another corpus: <name>-NNN
            png.rename(d / png.name.replace("train", name))
        (d / "gt.txt").write_text((d / "gt.txt").read_text().replace("train", name))
    (tmp_path / "a" / "summary.json").write_text(json.dumps({"licence": {"licence": "CC-BY-4.0", "found_in": "A"}}))
    (tmp_path / "b" / "summary.json").write_text(json.dumps({"licence": {"licence": "CC-BY-SA-4.0", "found_in": "B"}}))
    joined = tmp_path / "joined" / "train"
    joined.mkdir(parents=True)
    for name in ("a", "b"):
        (joined / f"shard-{name}").symlink_to(tmp_path / name / "train")
    assert sorted(LineDataset(tmp_path / "joined", "train", 32, 256, cache=False).texts) == ["ab", "ba", "cd"]
    fitted = []                                                         # and the beam search's LM reads both
    monkeypatch.setattr(CharNgramLM, "fit", lambda self, lines, text_file=None: fitted.extend(lines) or 0)
    build_lm(load_config(ROOT / "config.yaml", [f"data.path={tmp_path / 'joined'}"]), Charset.from_texts(["abcd"]),
             tmp_path / "lm.json.gz")
    assert sorted(fitted) == ["ab", "ba", "cd"]
    assert data_licence(tmp_path / "joined") == {
        "licence": "CC-BY-4.0 AND CC-BY-SA-4.0", "found_in": f"{tmp_path / 'a'}: A; {tmp_path / 'b'}: B"}
    (joined / "shard-c").symlink_to(tmp_path / "c" / "train")
    assert data_licence(tmp_path / "joined")["licence"] == "CC-BY-4.0 AND CC-BY-SA-4.0 AND unknown"
    assert "some lines' licence is unknown" in data_licence_line(data_licence(tmp_path / "joined"))
    assert data_licence(tmp_path / "c") is None and data_licence(tmp_path / "a")["licence"] == "CC-BY-4.0"
