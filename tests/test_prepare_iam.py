"""prepare_iam.py on a tiny fake IAM database written in the real XML schema."""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCALE, MARGIN = 0.5, 8

# form -> [(line id, XML-escaped text, segmentation, [(word, x, y, w, h)])]
FORMS = {
    "a01-000u": [
        ("a01-000u-00", "A MOVE to stop", "ok", [("A", 100, 100, 60, 50), ("MOVE", 200, 95, 220, 60)]),
        ("a01-000u-01", "&quot;Tom &amp; Jerry&apos;s&quot; day", "ok", [("Tom", 120, 250, 180, 55)]),
        ("a01-000u-02", "tomorrow .", "err", [("tomorrow", 90, 400, 300, 70)]),
    ],
    "a01-001": [("a01-001-00", "Hello world", "ok", [("Hello", 150, 120, 200, 60), ("world", 400, 118, 210, 64)])],
    "b02-000": [("b02-000-00", "It is 1961", "ok", [("It", 100, 300, 80, 60), ("1961", 250, 300, 160, 60)])],
    "a01-002": [("a01-002-00", "no image here", "ok", [("no", 100, 100, 80, 50)])],  # XML but no PNG
}
SPLITS = {"train": ["a01-000u", "a01-002"], "validation": ["a01-001"], "test": ["b02-000", "c03-000"]}
BROKEN = "c03-000"  # listed, XML truncated, no PNG


def form_xml(form: str, lines) -> str:
    out = [f'<?xml version="1.0" encoding="ISO-8859-1"?>\n<form created="2000-06-10" height="800" id="{form}" '
           f'writer-id="000" width="1000">\n<machine-printed-part>\n<machine-print-line text="x"/>\n'
           f'</machine-printed-part>\n<handwritten-part>']
    for lid, text, seg, words in lines:
        out.append(f'<line asx="1" asy="2" dsx="3" dsy="4" id="{lid}" lbx="0" lby="0" segmentation="{seg}" '
                   f'text="{text}" threshold="160" uby="0">')
        for k, (word, x, y, w, h) in enumerate(words):
            out.append(f'<word id="{lid}-{k:02d}" tag="NN" text="{word}">\n'
                       f'<cmp height="{h}" width="{w}" x="{x}" y="{y}"/>\n</word>')
        out.append("</line>")
    out.append("</handwritten-part>\n</form>\n")
    return "\n".join(out)


def form_png(lines) -> np.ndarray:
    img = np.full((800, 1000), 250, np.uint8)
    for _, _, _, words in lines:
        for word, x, y, w, h in words:
            cv2.putText(img, word, (x, y + h - 5), cv2.FONT_HERSHEY_SIMPLEX, h / 40, 20, 3)
    return img


def lines_txt_row(lid: str, text: str, seg: str, words) -> str:
    x0, y0 = min(w[1] for w in words), min(w[2] for w in words)
    x1, y1 = max(w[1] + w[3] for w in words), max(w[2] + w[4] for w in words)
    plain = text.replace("&quot;", '"').replace("&amp;", "&").replace("&apos;", "'")
    return f"{lid} {seg} 160 {len(words)} {x0} {y0} {x1 - x0} {y1 - y0} {plain.replace(' ', '|')}"


@pytest.fixture
def iam(tmp_path: Path) -> Path:
    forms, xml = tmp_path / "forms" / "formsA-D", tmp_path / "xml"
    forms.mkdir(parents=True), xml.mkdir()
    for form, lines in FORMS.items():
        (xml / f"{form}.xml").write_bytes(form_xml(form, lines).encode("latin-1"))
        if form != "a01-002":
            cv2.imwrite(str(forms / f"{form}.png"), form_png(lines))
    (xml / f"{BROKEN}.xml").write_text(form_xml(BROKEN, FORMS["b02-000"])[:300])
    for name, ids in {"splits": SPLITS, "line_splits": {
            "train": ["a01-000u-00", "a01-000u-02"], "validation": ["a01-001-00"], "test": ["b02-000-00"]}}.items():
        (tmp_path / name).mkdir()
        for split, forms_ in ids.items():
            (tmp_path / name / f"{split}.uttlist").write_text("\n".join(forms_) + "\n")
    rows = [lines_txt_row(*line) for lines in FORMS.values() for line in lines]
    (tmp_path / "lines.txt").write_text("# comment line\n" + "\n".join(rows) + "\n")
    return tmp_path


def run(iam: Path, *args: str, splits: str = "splits", out: str = "out") -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "prepare_iam.py"), str(iam / "forms"), str(iam / "xml"), str(iam / splits),
           str(iam / out), "--workers", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def read_gt(path: Path) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in path.read_text(encoding="utf-8").splitlines())


def test_xml_split_crops_and_summary(iam: Path):
    r = run(iam)
    assert r.returncode == 0, r.stderr
    out = iam / "out"
    train, val, test = (read_gt(out / s / "gt.txt") for s in ("train", "val", "test"))
    assert train == {"a01-000u-00": "A MOVE to stop", "a01-000u-01": "\"Tom & Jerry's\" day",
                     "a01-000u-02": "tomorrow ."}
    assert val == {"a01-001-00": "Hello world"} and test == {"b02-000-00": "It is 1961"}
    assert not (out / "validation").exists()
    for split, gt in (("train", train), ("val", val), ("test", test)):
        for lid in gt:
            words = next(ws for lines in FORMS.values() for i, _, _, ws in lines if i == lid)
            w = max(x + ww for _, x, _, ww, _ in words) - min(x for _, x, _, _, _ in words) + 2 * MARGIN
            h = max(y + hh for _, _, y, _, hh in words) - min(y for _, _, y, _, _ in words) + 2 * MARGIN
            img = cv2.imread(str(out / split / f"{lid}.png"), cv2.IMREAD_GRAYSCALE)
            assert abs(img.shape[1] - w * SCALE) <= 2 and abs(img.shape[0] - h * SCALE) <= 2
            assert img.min() < 100 and np.median(img) > 200  # dark ink on light paper
    assert "a01-002" in r.stdout and "missing" in r.stdout
    assert f"{BROKEN}.xml" in r.stdout and "broken" in r.stdout
    assert "segmentation-error lines: 1 (kept)" in r.stdout


def test_rerun_is_idempotent(iam: Path):
    assert run(iam).returncode == 0
    gts = {s: (iam / "out" / s / "gt.txt").read_bytes() for s in ("train", "val", "test")}
    png = iam / "out" / "train" / "a01-000u-00.png"
    mtime = png.stat().st_mtime_ns
    assert run(iam).returncode == 0
    assert gts == {s: (iam / "out" / s / "gt.txt").read_bytes() for s in ("train", "val", "test")}
    assert png.stat().st_mtime_ns == mtime


def test_drop_seg_errors(iam: Path):
    r = run(iam, "--drop-seg-errors")
    assert r.returncode == 0 and "segmentation-error lines: 1 (dropped)" in r.stdout
    assert "a01-000u-02" not in read_gt(iam / "out" / "train" / "gt.txt")


def test_line_id_split_lists(iam: Path):
    assert run(iam, splits="line_splits").returncode == 0
    assert set(read_gt(iam / "out" / "train" / "gt.txt")) == {"a01-000u-00", "a01-000u-02"}
    assert set(read_gt(iam / "out" / "val" / "gt.txt")) == {"a01-001-00"}


def test_lines_txt_source(iam: Path):
    r = run(iam, "--lines-txt", str(iam / "lines.txt"))
    assert r.returncode == 0, r.stderr
    train = read_gt(iam / "out" / "train" / "gt.txt")
    assert train["a01-000u-01"] == "\"Tom & Jerry's\" day" and len(train) == 3
    img = cv2.imread(str(iam / "out" / "test" / "b02-000-00.png"), cv2.IMREAD_GRAYSCALE)
    assert abs(img.shape[1] - (310 + 2 * MARGIN) * SCALE) <= 2
    assert "a01-002" in r.stdout


def test_missing_dir_is_a_clear_error(iam: Path):
    r = run(iam, splits="nope")
    assert r.returncode != 0 and "nope" in r.stderr and "Traceback" not in r.stderr
