"""transcribe.py: prepare_pages -> train tiny -> transcribe the same PAGE/ALTO pages; line images; bad input; the
XML writers of pagexml.py."""
import csv
import io
import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import prepare_pages
import transcribe
from conftest import INK, PAPER, ROOT, TINY, WORDS, render_line
from htr.decoding import greedy_decode, line_confidence
from htr.images import load_for_inference
from htr.inference import line_log_probs, load_model
from htr.pagexml import local_name, read_page, set_line_text, write_page
from test_prepare_pages import H, NS, W, alto_xml, base, box, equiv, page_xml
from htr.training import Trainer
from utils import UserError, load_config

CONFIG = ROOT / "config.yaml"
YS = (100, 200, 300, 400)                          # baselines of the drawn lines


def draw(path, texts, ys=YS) -> None:
    """A page image with one drawn word per baseline."""
    img = np.full((H, W), PAPER, np.uint8)
    for text, y in zip(texts, ys):
        cv2.putText(img, text, (70, y), cv2.FONT_HERSHEY_SIMPLEX, 1.2, INK, 3)
    cv2.imwrite(str(path), img)


def page_lines(texts, ys=YS) -> list:
    return [(box(y), base(y), equiv(t), "") for t, y in zip(texts, ys)]


def alto_lines(texts, ys=YS) -> list:
    return [(y, "LT1", f'<String CONTENT="{t}"/>' if t else "") for t, y in zip(texts, ys)]


def write_corpus(root):
    """PAGE 2019 and 2013 pages and an ALTO page, all with ground truth, plus a PAGE 2019 page with empty
    TextEquivs; split lists for prepare_pages."""
    root.mkdir(parents=True)
    pages = {"p1": (2019, WORDS[0:4]), "p2": (2019, WORDS[4:8]), "p3": (2013, WORDS[6:10]), "p5": (2019, WORDS[1:5])}
    for name, (year, texts) in pages.items():
        (root / f"{name}.xml").write_text(page_xml(year, f"{name}.png", page_lines(texts)), encoding="utf-8")
        draw(root / f"{name}.png", texts)
    (root / "a1.xml").write_text(alto_xml("a1.png", alto_lines(WORDS[2:6])), encoding="utf-8")
    draw(root / "a1.png", WORDS[2:6])
    (root / "p4.xml").write_text(page_xml(2019, "p4.png", page_lines(["", " "])), encoding="utf-8")
    draw(root / "p4.png", WORDS[3:5])
    splits = root.parent / "splits"
    splits.mkdir()
    for split, names in (("train", "p1 p2 p3 a1"), ("val", "p5"), ("test", "p4")):
        (splits / f"{split}.txt").write_text("\n".join(names.split()) + "\n")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The corpus cut by prepare_pages, a tiny model trained on it: (tmp, corpus, lines, overrides with resume)."""
    tmp = tmp_path_factory.mktemp("transcribe")
    corpus = write_corpus(tmp / "corpus")
    prepare_pages.main([str(corpus), str(tmp / "lines"), "--workers", "1", "--splits", str(tmp / "splits")])
    overrides = TINY + [f"data.path={tmp / 'lines'}", f"model.save_dir={tmp / 'runs'}", "model.run_name=t",
                        "train.num_epochs=3", "eval.mixed_precision=no", "eval.batch_size=3"]
    Trainer(load_config(CONFIG, overrides)).fit()
    return tmp, corpus, tmp / "lines", overrides + [f"resume={tmp / 'runs' / 't' / 'best.pt'}"]


def run(overrides, *args) -> dict:
    """transcribe.main in this process -> summary.json of its --out folder."""
    transcribe.main([str(CONFIG), *overrides, *map(str, args)])
    out = args[list(map(str, args)).index("--out") + 1]
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def direct(overrides, lines_dir) -> dict:
    """{(page, XML line id): (text, confidence)} from the prepare_pages line images, run through the model directly."""
    cfg = load_config(CONFIG, overrides)
    model, charset, _ = load_model(cfg, cfg.resume)
    keys, images = [], []
    for sidecar in (lines_dir / "pages").glob("*.json"):
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        for line_id, _, xml_id, _ in record["lines"]:
            keys.append((record["page"], xml_id))
            images.append(load_for_inference(lines_dir / record["split"] / f"{line_id}.png", 32, 256))  # (1, H, W)
    log_probs = line_log_probs(model, torch.stack(images))
    return {key: (greedy_decode(lp, charset), line_confidence(lp)) for key, lp in zip(keys, log_probs)}


def text_equivs(line):
    return line.element.findall(f"{line.element.tag.split('}')[0]}}}TextEquiv")


@pytest.fixture(scope="module")
def overwritten(trained, tmp_path_factory):
    tmp, corpus, _, overrides = trained
    out = tmp_path_factory.mktemp("over") / "out"
    return out, run(overrides, corpus, "--out", out, "--overwrite")


def test_round_trip_every_line_gets_its_own_text(trained, overwritten):
    _, corpus, lines_dir, overrides = trained
    out, summary = overwritten
    assert summary["pages"] == {"written": 6, "of": 6} and not summary["problems"]
    assert summary["lines"] == {"transcribed": 22, "kept their text": 0, "no usable geometry": 0}
    expected = direct(overrides, lines_dir)
    for xml in sorted(corpus.glob("*.xml")):
        before, after = read_page(xml), read_page(out / xml.name)
        assert [ln.id for ln in after.lines] == [ln.id for ln in before.lines]
        for old, new in zip(before.lines, after.lines):
            assert np.array_equal(old.polygon, new.polygon) and np.array_equal(old.baseline, new.baseline)
            if after.dialect == "page":
                (equiv_el,) = text_equivs(new)                     # --overwrite: ours replaced the ground truth
                conf = float(equiv_el.get("conf"))
                assert 0 <= conf <= 1 and equiv_el.get("index") is None
            if (xml.stem, old.id) in expected:                     # the line's own text: no line mix-up
                text, direct_conf = expected[xml.stem, old.id]
                assert new.text == " ".join(text.split()) if after.dialect == "alto" else new.text == text
                assert after.dialect == "alto" or conf == pytest.approx(direct_conf, abs=2e-4)


def test_existing_text_is_kept_as_the_schema_allows(trained, tmp_path):
    _, corpus, _, overrides = trained
    summary = run(overrides, corpus, "--out", tmp_path)
    assert summary["lines"] == {"transcribed": 14, "kept their text": 8, "no usable geometry": 0}
    p1 = read_page(tmp_path / "p1.xml")                            # PAGE 2019: ground truth stays the main text
    assert [ln.text for ln in p1.lines] == WORDS[0:4]
    for line in p1.lines:
        old, new = text_equivs(line)
        assert (old.get("index"), new.get("index")) == ("0", "1") and new.get("conf") is not None
    assert [ln.text for ln in read_page(tmp_path / "p3.xml").lines] == WORDS[6:10]     # PAGE 2013: one TextEquiv
    assert all(len(text_equivs(ln)) == 1 for ln in read_page(tmp_path / "p3.xml").lines)
    assert [ln.text for ln in read_page(tmp_path / "a1.xml").lines] == WORDS[2:6]      # ALTO: kept
    assert all(len(text_equivs(ln)) == 1 for ln in read_page(tmp_path / "p4.xml").lines)  # empty ones replaced


def test_line_images_tsv_and_bad_files(trained, tmp_path):
    _, _, lines_dir, overrides = trained
    folder = tmp_path / "lines"
    folder.mkdir()
    for k in range(4):
        cv2.imwrite(str(folder / f"l{k}.png"), render_line(" ".join(WORDS[k:k + 3])))
    (folder / "broken.png").write_text("not an image")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image either")
    tall = tmp_path / "tall.png"
    cv2.imwrite(str(tall), np.full((300, 40), PAPER, np.uint8))
    summary = run(overrides, folder, notes, tall, "--out", tmp_path / "out")
    with open(tmp_path / "out" / "transcriptions.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert [r["path"] for r in rows] == [str(folder / f"l{k}.png") for k in range(4)] + [str(tall)]
    assert all(0 <= float(r["confidence"]) <= 1 for r in rows)
    assert summary["line_images"] == {"transcribed": 5, "of": 7}
    bad = summary["problems"]["not a line image"]
    assert bad == [f"{folder / 'broken.png'}: unreadable or corrupt image", f"{notes}: unreadable or corrupt image"]
    assert len(summary["warnings"]) == 1 and "taller than wide" in summary["warnings"][0]


def test_bad_pages_are_reported_and_skipped(trained, tmp_path):
    _, corpus, _, overrides = trained
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(corpus / "p1.xml", bad / "ok.xml")
    shutil.copy(corpus / "p1.png", bad / "ok.png")
    (bad / "noimage.xml").write_text(page_xml(2019, "nothing.png", page_lines(["ab"])))
    (bad / "broken.xml").write_text(page_xml(2019, "ok.png", page_lines(["ab"]))[:-40])
    outside = [([(x + 2 * W, y) for x, y in box(100)], [(x + 2 * W, y) for x, y in base(100)], "", "")]
    (bad / "outside.xml").write_text(page_xml(2019, "ok.png", outside + page_lines(["ab"], ys=(200,))))
    (bad / "garbled.png").write_bytes(b"\x89PNG garbage")
    (bad / "garbled.xml").write_text(page_xml(2019, "garbled.png", page_lines(["ab"])))
    summary = run(overrides, bad, "--out", tmp_path / "out")
    assert summary["pages"] == {"written": 2, "of": 5}
    problems = summary["problems"]
    assert set(problems) == {"no image", "malformed XML", "unreadable image",
                             "lines without usable geometry, left without text"}
    assert problems["lines without usable geometry, left without text"] == [f"{bad / 'outside.xml'}: line l1"]
    assert summary["lines"] == {"transcribed": 5, "kept their text": 0, "no usable geometry": 1}
    written = read_page(tmp_path / "out" / "outside.xml").lines
    assert [len(text_equivs(ln)) for ln in written] == [0, 2]     # the line off the image gets nothing
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.xml", "outside.xml", "summary.json"]


OTHER_TOOL = """<?xml version="1.0" encoding="UTF-8"?>
<!-- before the root: not kept -->
<pc:PcGts xmlns:pc="{ns}" xmlns:tk="http://example.org/toolkit" xmlns:unused="http://example.org/unused"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:schemaLocation="{ns} {ns}/pagecontent.xsd">
  <pc:Metadata><pc:Creator>other tool</pc:Creator><tk:Job tk:id="42">settings</tk:Job></pc:Metadata>
  <pc:Page imageFilename="p1.png" imageWidth="{w}" imageHeight="{h}">
    <!-- a comment inside -->
    <pc:TextRegion id="r1" tk:score="0.9"><pc:Coords points="0,0 10,0 10,10"/>
      <pc:TextLine id="l1"><pc:Coords points="{poly}"/><pc:Baseline points="{bl}"/>
        <pc:TextStyle fontSize="12"/>
      </pc:TextLine>
    </pc:TextRegion>
  </pc:Page>
</pc:PcGts>
"""


def test_other_tools_namespaces_prefixes_and_comments_are_kept(trained, tmp_path):
    _, corpus, _, overrides = trained
    folder = tmp_path / "in"
    folder.mkdir()
    points = " ".join(f"{x},{y}" for x, y in box(100))
    xml = OTHER_TOOL.format(ns=NS[2019], w=W, h=H, poly=points, bl=" ".join(f"{x},{y}" for x, y in base(100)))
    (folder / "tool.xml").write_text(xml, encoding="utf-8")
    shutil.copy(corpus / "p1.png", folder / "p1.png")
    run(overrides, folder / "tool.xml", "--out", tmp_path / "out")
    text = (tmp_path / "out" / "tool.xml").read_text(encoding="utf-8")
    for kept in ('xmlns:pc="', 'xmlns:tk="http://example.org/toolkit"', 'xmlns:unused="http://example.org/unused"',
                 '<tk:Job tk:id="42">settings</tk:Job>', 'tk:score="0.9"', "<!-- a comment inside -->",
                 f'xsi:schemaLocation="{NS[2019]} {NS[2019]}/pagecontent.xsd"'):
        assert kept in text
    assert "ns0" not in text
    line = read_page(tmp_path / "out" / "tool.xml").lines[0]
    assert [c.tag.split("}")[1] for c in line.element] == ["Coords", "Baseline", "TextEquiv", "TextStyle"]


def test_beam_search_with_lm_and_onnx_runtime(trained, tmp_path):
    import export
    _, corpus, _, overrides = trained
    beam = run(overrides, corpus / "p1.xml", "--out", tmp_path / "beam", "decode.mode=beam", "decode.build_lm=true",
               "decode.lm_order=3", f"decode.lm_path={tmp_path / 'lm.json.gz'}")
    assert beam["settings"]["decoding"] == "beam" and beam["settings"]["lm"] == str(tmp_path / "lm.json.gz")
    assert beam["lines"]["transcribed"] == 4
    export.main([str(CONFIG), *overrides, str(tmp_path / "m.onnx")])
    torch_run = run(overrides, corpus / "p1.xml", "--out", tmp_path / "torch", "--overwrite")
    onnx_run = run(overrides, corpus / "p1.xml", "--out", tmp_path / "onnx", "--overwrite", "runtime=onnx",
                   f"resume={tmp_path / 'm.onnx'}")
    assert onnx_run["settings"]["runtime"] == "onnx" and onnx_run["lines"] == torch_run["lines"]
    assert [ln.text for ln in read_page(tmp_path / "onnx" / "p1.xml").lines] == \
           [ln.text for ln in read_page(tmp_path / "torch" / "p1.xml").lines]


def test_usage_errors_are_user_errors(trained, tmp_path):
    _, corpus, _, overrides = trained
    with pytest.raises(UserError, match="no output folder: add --out DIR"):
        transcribe.main([str(CONFIG), *overrides, str(corpus)])
    with pytest.raises(UserError, match="input not found: .*nowhere"):
        transcribe.main([str(CONFIG), *overrides, str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    with pytest.raises(UserError, match="would overwrite the input"):
        transcribe.main([str(CONFIG), *overrides, str(corpus / "p1.xml"), "--out", str(corpus)])
    with pytest.raises(UserError, match="tune with evaluate.py"):
        transcribe.main([str(CONFIG), *overrides, str(corpus), "--out", str(tmp_path), "decode.tune=true"])


def test_cli_round_trip(trained, tmp_path):
    _, corpus, _, overrides = trained
    proc = subprocess.run([sys.executable, str(ROOT / "transcribe.py"), str(CONFIG), *overrides, str(corpus),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("pages: 6 of 6 written; lines: 14 transcribed, 8 kept their text")
    assert "lines/s" in proc.stdout and "pages/min" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").glob("*.xml")) == sorted(p.name for p in corpus.glob("*.xml"))
    bad = subprocess.run([sys.executable, str(ROOT / "transcribe.py"), str(CONFIG), *overrides, str(corpus)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: no output folder: add --out DIR"]


# ------------------------------------------------------------------------------------------------- writers

def written(page) -> str:
    f = io.BytesIO()
    write_page(page, f)
    return f.getvalue().decode("utf-8")


def test_page_2010_gets_plain_text_and_no_conf(tmp_path):
    (tmp_path / "old.xml").write_text(
        '<PcGts xmlns="http://schema.primaresearch.org/PAGE/gts/pagecontent/2010-03-19"><Page imageFilename="y.png" '
        'imageWidth="10" imageHeight="10"><TextRegion id="r"><TextLine id="l"><Coords points="1,2 3,4 5,6"/>'
        '</TextLine></TextRegion></Page></PcGts>')
    page = read_page(tmp_path / "old.xml")
    assert set_line_text(page, page.lines[0], "a b", 0.5)
    assert '<TextEquiv><PlainText>a b</PlainText><Unicode>a b</Unicode></TextEquiv>' in written(page)


def test_alto_words_get_positions_and_word_confidences(tmp_path):
    (tmp_path / "a.xml").write_text(alto_xml("a.png", [(100, "LT1", "")]), encoding="utf-8")
    page = read_page(tmp_path / "a.xml")
    assert set_line_text(page, page.lines[0], "ab  cde", 0.7, [0.9, 0.25])    # box: x 60..600, y 55..115
    words = [(local_name(c.tag), c.attrib) for c in page.lines[0].element if local_name(c.tag) != "Shape"]
    step = 540 / 7
    assert words == [
        ("String", {"CONTENT": "ab", "WC": "0.9", "HPOS": "60", "VPOS": "55", "WIDTH": f"{2 * step:.2f}",
                    "HEIGHT": "60"}),
        ("SP", {"HPOS": f"{60 + 2 * step:.2f}", "VPOS": "55", "WIDTH": f"{2 * step:.2f}", "HEIGHT": "60"}),
        ("String", {"CONTENT": "cde", "WC": "0.25", "HPOS": f"{60 + 4 * step:.2f}", "VPOS": "55",
                    "WIDTH": f"{3 * step:.2f}".rstrip("0"), "HEIGHT": "60"})]
    assert not set_line_text(page, page.lines[0], "new", 0.5)                  # has text now: kept
    assert set_line_text(page, page.lines[0], "", 0.5, overwrite=True)
    assert [(local_name(c.tag), c.get("CONTENT")) for c in page.lines[0].element] == [("Shape", None),
                                                                                     ("String", "")]
