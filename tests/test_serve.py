"""serve.py in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright): a line image read as
demo.py reads it, a page + PAGE XML read and downloaded, refusals shown in the page; plus the XML writers. Skipped
where no Chromium is installed (.ci/run installs it). Screenshots go to tests/artifacts/ (git-ignored)."""
import base64
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import conftest
from conftest import PAPER, ROOT, render_line
from htr.decoding import char_confidences
from htr.images import load_for_inference
from htr.inference import line_log_probs
from htr.pagexml import read_page
from htr.speech_writer import write_speech
from htr.training import Trainer
from utils import load_checkpoint, load_config

from htr import web_app

CONFIG = ROOT / "config.yaml"
CHROMIUM = "/usr/bin/chromium"
TAB = "\t"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]   # a beeping microphone
ARTIFACTS = ROOT / "tests" / "artifacts"
PAGE_NS = "http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15"
ALTO_NS = "http://www.loc.gov/standards/alto/ns-v4#"
browser_test = pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                  reason=f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny model after one training step, with the CTC blank's output bias pushed down so that every frame reads
    a character: a non-empty transcription, many characters of low confidence. (overrides incl. resume, data root)"""
    tmp = tmp_path_factory.mktemp("serve")
    root, overrides = conftest.tiny_setup(tmp, "serve")
    Trainer(load_config(CONFIG, overrides + ["train.num_epochs=1", "train.max_steps=1"])).fit()
    ckpt = load_checkpoint(tmp / "runs" / "serve" / "last.pt")
    ckpt["model"]["head.fc.3.bias"][0] = -30.0                              # the logits' layer, blank = class 0
    torch.save(ckpt, tmp / "no_blank.pt")
    return overrides + [f"resume={tmp / 'no_blank.pt'}"], root


def write_page(tmp: Path, texts: list, dialect: str = "page") -> tuple:
    """A page image with render_line lines one under the other and its PAGE or ALTO XML: (image, xml)."""
    lines = [render_line(t) for t in texts]
    width, height = max(img.shape[1] for img in lines) + 100, 60 * len(lines) + 100
    page = np.full((height, width), PAPER, np.uint8)
    xml_lines = []
    for i, img in enumerate(lines):
        x, y, (h, w) = 50, 50 + 60 * i, img.shape
        page[y:y + h, x:x + w] = img
        if dialect == "page":
            xml_lines.append(f'<TextLine id="l{i}"><Coords points="{x},{y} {x + w},{y} {x + w},{y + h} {x},{y + h}"/>'
                             f'<Baseline points="{x},{y + h - 12} {x + w},{y + h - 12}"/>'
                             f'<TextEquiv><Unicode>old</Unicode></TextEquiv></TextLine>')
        else:
            xml_lines.append(f'<TextLine ID="l{i}" HPOS="{x}" VPOS="{y}" WIDTH="{w}" HEIGHT="{h}" '
                             f'BASELINE="{y + h - 12}"><String CONTENT="old"/></TextLine>')
    if dialect == "page":
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><PcGts xmlns="{PAGE_NS}"><Page imageFilename="page.png" '
               f'imageWidth="{width}" imageHeight="{height}"><TextRegion id="r0"><Coords points="0,0 {width},0 '
               f'{width},{height} 0,{height}"/>{"".join(xml_lines)}</TextRegion></Page></PcGts>')
    else:
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><alto xmlns="{ALTO_NS}"><Layout><Page WIDTH="{width}" '
               f'HEIGHT="{height}"><PrintSpace><TextBlock ID="b0">{"".join(xml_lines)}</TextBlock></PrintSpace>'
               f'</Page></Layout></alto>')
    cv2.imwrite(str(tmp / "page.png"), page)
    (tmp / f"page.{dialect}.xml").write_text(xml, encoding="utf-8")
    return tmp / "page.png", tmp / f"page.{dialect}.xml"


def expected_reading(overrides: list, image: Path) -> tuple:
    """(text, number of characters under the threshold) as the model reads `image` in this process."""
    cfg = load_config(CONFIG, overrides)
    recognizer = web_app.Recognizer(cfg)
    x = load_for_inference(image, cfg.preproc.image_height, cfg.preproc.image_width)
    chars = char_confidences(line_log_probs(recognizer.model, x[None], True, recognizer.dtype)[0], recognizer.charset)
    return "".join(c for c, _ in chars), sum(conf < cfg.serve.low_confidence for _, conf in chars)


@pytest.mark.parametrize("dialect", ["page", "alto"])
def test_recognised_text_is_written_into_the_xml(model, tmp_path, dialect):
    overrides, _ = model
    image, xml = write_page(tmp_path, ["ab", "cab", "dab"], dialect)
    doc, results = web_app.page_readings(web_app.Recognizer(load_config(CONFIG, overrides)), image, xml, {})
    assert len(results) == 3 and all(r is not None for _, r in results)
    out = tmp_path / "out.xml"
    out.write_bytes(web_app.write_text(doc, results))
    assert [line.text for line in read_page(out).lines] == [" ".join(r.text.split()) for _, r in results]
    assert ET.parse(out).getroot().tag.startswith("{" + (PAGE_NS if dialect == "page" else ALTO_NS))


def test_bad_xml_is_refused_naming_the_upload(model, tmp_path):
    overrides, _ = model
    image, _ = write_page(tmp_path, ["ab"])
    bad = tmp_path / "page.xml"
    bad.write_text("<PcGts><Page", encoding="utf-8")
    with pytest.raises(web_app.Refused, match="^mine.xml: malformed XML"):
        web_app.page_readings(web_app.Recognizer(load_config(CONFIG, overrides)), image, bad, {bad: "mine.xml"})


@pytest.fixture(scope="module")
def server(model):
    """serve.py on a free port (serve.port=0) with a 1 MB upload limit: its base URL."""
    yield from serving(model[0])


@pytest.fixture(scope="module")
def audio_model(tmp_path_factory):
    """A tiny model with the audio branch after one training step on lines with espeak-ng readings."""
    tmp = tmp_path_factory.mktemp("serve_audio")
    root, overrides = conftest.tiny_setup(tmp, "audio")
    write_speech(root, ["train", "val", "test"], ["en"], ["clean"], 0.0, workers=1)
    overrides += ["arch.audio.enabled=true", "arch.audio.channels=8", "arch.audio.hidden=16", "arch.audio.heads=2"]
    Trainer(load_config(CONFIG, overrides + ["train.num_epochs=1", "train.max_steps=1"])).fit()
    return overrides + [f"resume={tmp / 'runs' / 'audio' / 'last.pt'}"], root


@pytest.fixture(scope="module")
def audio_server(audio_model):
    yield from serving(audio_model[0])


def serving(overrides):
    """serve.py of these overrides on a free port (serve.port=0) with a 1 MB upload limit: yields its base URL."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), str(CONFIG), *overrides, "serve.port=0",
                             "serve.max_upload_mb=1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("serving "):
            break
    watchdog.cancel()
    assert proc.poll() is None, "".join(output)
    threading.Thread(target=proc.stdout.read, daemon=True).start()          # keep draining its output
    yield line.split(" on ", 1)[1].split()[0]
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A page in a fresh headless Chromium profile."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")),
                                                       executable_path=CHROMIUM, headless=True, args=FLAGS,
                                                       accept_downloads=True)
        yield context.new_page()
        context.close()


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def upload(page, url: str, form: str, files: dict):
    page.goto(url)
    for field, path in files.items():
        page.set_input_files(f"#{form}-{field}", str(path))
    page.click(f"#{form}-submit")
    page.wait_for_selector("#result > *")


@browser_test
def test_line_upload_shows_what_demo_prints(model, server, browser):
    overrides, root = model
    image = root / "test" / "test-002.png"
    demo = subprocess.run([sys.executable, str(ROOT / "demo.py"), str(CONFIG), *overrides, str(image)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert demo.returncode == 0, demo.stderr[-2000:]
    printed = demo.stdout.splitlines()[0].split(TAB)[1]
    upload(browser, server, "line", {"image": image})
    screenshot(browser, "serve_line.png")
    text, low = expected_reading(overrides, image)
    assert browser.inner_text("#text") == printed == text and printed
    assert browser.locator("#text mark").count() == low
    assert browser.inner_text("#confidence") == f"confidence {demo.stdout.splitlines()[0].split(TAB)[2]}"
    assert "single word" in browser.inner_text("#warning")


@browser_test
def test_page_and_xml_upload_downloads_the_recognised_xml(model, server, browser, tmp_path):
    image, xml = write_page(tmp_path, ["ab", "cab", "dab"])
    upload(browser, server, "page", {"image": image, "xml": xml})
    screenshot(browser, "serve_page.png")
    assert browser.inner_text("#summary").startswith("3 of 3 lines read.")
    shown = [cell.inner_text() for cell in browser.locator("#lines td.text").all()]
    with browser.expect_download() as download:
        browser.click("#download")
    assert download.value.suggested_filename == "page.page.recognised.xml"
    saved = tmp_path / "recognised.xml"
    download.value.save_as(saved)
    assert [line.text for line in read_page(saved).lines] == shown


@browser_test
@pytest.mark.parametrize("name, content, message", [
    ("notes.png", b"not an image at all", "notes.png is not an image"),
    ("huge.png", None, "huge.png is 10000x5000 px (50 megapixels): the limit is 40 megapixels"),
    ("big.tif", bytes(2 * 2**20), "MB refused: the limit is 1 MB (serve.max_upload_mb)"),
])
def test_bad_uploads_are_a_message_in_the_page(server, browser, tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        cv2.imwrite(str(path), np.zeros((5000, 10000), np.uint8))         # 50 MP, a few kB as PNG
    else:
        path.write_bytes(content)
    upload(browser, server, "line", {"image": path})
    assert message in browser.inner_text("#error")
    assert "Traceback" not in browser.content() and browser.is_visible("#line-form")
    if content is None:
        screenshot(browser, "serve_refused.png")


@browser_test
def test_a_line_is_read_with_its_uploaded_or_recorded_audio(audio_model, audio_server, browser, tmp_path):
    """The audio model's line form takes a reading: an uploaded file gives what demo.py --audio prints; the Record
    button records the (fake) microphone into a WAV; a file that is not audio is a message."""
    overrides, root = audio_model
    image, wav = root / "test" / "test-002.png", root / "test" / "test-002.wav"
    demo = subprocess.run([sys.executable, str(ROOT / "demo.py"), str(CONFIG), *overrides, str(image), "--audio",
                           str(wav)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert demo.returncode == 0, demo.stderr[-2000:]
    upload(browser, audio_server, "line", {"image": image, "audio": wav})
    assert browser.inner_text("#text") == demo.stdout.splitlines()[0].split(TAB)[1]
    assert "test-002.wav" in browser.inner_text("#heard")
    browser.goto(audio_server)
    browser.set_input_files("#line-image", str(image))
    browser.click("#line-record")
    browser.wait_for_timeout(1500)
    browser.click("#line-record")
    browser.wait_for_function("document.getElementById('line-recorded').textContent.startsWith('recorded')")
    browser.click("#line-submit")
    browser.wait_for_selector("#result > *")
    screenshot(browser, "serve_line_audio.png")
    assert "recording.wav" in browser.inner_text("#heard") and browser.is_visible("#confidence")
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"RIFF, but no audio")
    upload(browser, audio_server, "line", {"image": image, "audio": bad})
    assert "noise.wav is not audio" in browser.inner_text("#error")


def test_base64_download_link_is_the_xml(model, tmp_path):
    """The page's download link carries the written XML byte for byte (no browser needed)."""
    overrides, _ = model
    image, xml = write_page(tmp_path, ["ab"])
    cfg = load_config(CONFIG, overrides)
    doc, results = web_app.page_readings(web_app.Recognizer(cfg), image, xml, {})
    written = web_app.write_text(doc, results)
    html = web_app.Pages(cfg, "m").page("page.png", "page.xml", results, written)
    href = html.split('href="data:application/xml;base64,', 1)[1].split('"', 1)[0]
    assert base64.b64decode(href) == written
