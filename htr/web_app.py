"""The web demo behind serve.py: a FastAPI app with plain HTML forms where one uploads a line image (with a model
trained with arch.audio, and its spoken reading: a file, or recorded from the microphone), or a page image and its
PAGE or ALTO XML, and sees the transcription with its low-confidence characters highlighted (and a
page's XML with the recognised text to download). Pages are cut as htr/page_lines.py cuts them and written as
htr/transcription.py writes them. serve.py is the command (its docstring describes the settings).
"""
import base64
import html
import io
import logging
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dataset import AudioBatch
from htr.audio import AudioError, read_audio
from htr.decoding import char_confidences, line_confidence
from htr.images import fit_warning, read_image, to_tensor
from htr.inference import line_log_probs
from htr.onnx_runtime import load_recognizer
from htr.page_lines import LineCutter, PageProblem, load_image
from htr.pagexml import PageXmlError, read_page, set_line_text, write_page
from htr.transcription import model_input, word_confidences
from utils import UserError, autocast_dtype, resolve_device

log = logging.getLogger("htr")
PREVIEW_WIDTH = 1200              # px: the line image shown back in the page is scaled down to this width


class Refused(Exception):
    """An upload the page declines: HTTP status and the message shown in the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Reading:
    chars: list                   # [(char, confidence)] along the best path; their join is the transcription
    confidence: float             # decoding.line_confidence

    @property
    def text(self) -> str:
        return "".join(c for c, _ in self.chars)


class Recognizer:
    """The model and its settings, as demo.py runs it: line images (grey uint8) -> Readings."""

    def __init__(self, cfg):
        self.cfg = cfg
        device = resolve_device(cfg.device)
        self.model, self.charset = load_recognizer(cfg, cfg.resume, cfg.runtime, device, channels_last=True)
        self.dtype = autocast_dtype(cfg.eval.mixed_precision, device)

    @property
    def hears(self) -> bool:
        """Whether the model has the audio branch (arch.audio): the line form then takes a reading too."""
        return getattr(self.model, "has_audio", False)

    def read(self, lines: list, audio=None) -> list:
        """Readings of grey line images; `audio` (a (samples,) array at 16 kHz) goes with a single line."""
        h, w = self.cfg.preproc.image_height, self.cfg.preproc.image_width
        batch = int(self.cfg.eval.batch_size)
        readings = []
        for i in range(0, len(lines), batch):
            x = torch.stack([to_tensor(model_input(img, h, w)) for img in lines[i:i + batch]])
            heard = None if audio is None else AudioBatch.of([audio])
            readings += [Reading(char_confidences(lp, self.charset), line_confidence(lp))
                         for lp in line_log_probs(self.model, x, True, self.dtype, heard)]
        return readings


# ------------------------------------------------------------------------------------------------------ uploads

def check_image(data: bytes, name: str, max_megapixels: float) -> None:
    """Refused unless `data` is an image (its header, read without decoding) of at most max_megapixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError:
        w = h = float("inf")
    except (UnidentifiedImageError, OSError, ValueError):
        raise Refused(400, f"{name} is not an image (png, jpg, tif, bmp, webp ...)") from None
    if w * h > max_megapixels * 1e6:
        size = f"{w}x{h} px ({w * h / 1e6:.0f} megapixels)" if w < float("inf") else "far too large"
        raise Refused(413, f"{name} is {size}: the limit is {max_megapixels:g} megapixels (serve.max_megapixels)")


def saved(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def page_readings(recognizer: Recognizer, image: Path, xml: Path, names: dict) -> tuple:
    """Cut the lines of a page as prepare_pages.py and transcribe.py do and read them: (Page, [(Line in the XML's
    units, Reading or None)]); `names` maps the temp files to the uploads' names for messages."""
    try:
        page = read_page(xml)
        grey, lines = load_image(page, image)
    except (PageXmlError, PageProblem) as e:
        message = str(e)
        for path, name in names.items():
            message = message.replace(str(path), name)
        raise Refused(400, message) from None
    cutter = LineCutter.of_page(grey, lines)
    crops = [cutter.crop(line)[0] for line in lines]                        # lines in the image's pixels
    readings = iter(recognizer.read([crop for crop in crops if crop is not None]))
    return page, [(line, None if crop is None else next(readings)) for line, crop in zip(page.lines, crops)]


def write_text(page, results: list) -> bytes:
    """The page's XML with the readings in place of the lines' text (pagexml.set_line_text, as transcribe.py
    --overwrite writes it: PAGE TextEquiv with conf, ALTO String/SP with WC)."""
    for line, reading in results:
        if reading is not None:
            set_line_text(page, line, reading.text, reading.confidence, word_confidences(reading.chars), True)
    out = io.BytesIO()
    write_page(page, out)
    return out.getvalue()


# --------------------------------------------------------------------------------------------------------- page

# The line form's Record button: microphone samples (Web Audio) written as a 16-bit mono WAV into the audio field.
RECORDER = """(() => {
const button = document.getElementById('line-record'), field = document.getElementById('line-audio'),
      said = document.getElementById('line-recorded');
let take = null;
button.onclick = async () => {
  if (take === null) {
    const stream = await navigator.mediaDevices.getUserMedia({audio: true}), context = new AudioContext();
    const source = context.createMediaStreamSource(stream), tap = context.createScriptProcessor(4096, 1, 1);
    take = {stream, context, source, tap, chunks: []};
    tap.onaudioprocess = e => take.chunks.push(new Float32Array(e.inputBuffer.getChannelData(0)));
    source.connect(tap); tap.connect(context.destination);
    button.textContent = 'Stop'; said.textContent = 'recording...';
    return;
  }
  const {stream, context, source, tap, chunks} = take;
  take = null; tap.disconnect(); source.disconnect(); stream.getTracks().forEach(t => t.stop());
  const n = chunks.reduce((a, c) => a + c.length, 0), rate = context.sampleRate, v = new DataView(new ArrayBuffer(44 + 2 * n));
  const text = (at, s) => [...s].forEach((c, i) => v.setUint8(at + i, c.charCodeAt(0)));
  text(0, 'RIFF'); v.setUint32(4, 36 + 2 * n, true); text(8, 'WAVEfmt '); v.setUint32(16, 16, true);
  v.setUint16(20, 1, true); v.setUint16(22, 1, true); v.setUint32(24, rate, true); v.setUint32(28, 2 * rate, true);
  v.setUint16(32, 2, true); v.setUint16(34, 16, true); text(36, 'data'); v.setUint32(40, 2 * n, true);
  let at = 44;
  for (const c of chunks) for (const x of c) { v.setInt16(at, Math.max(-1, Math.min(1, x)) * 32767, true); at += 2; }
  const files = new DataTransfer();
  files.items.add(new File([v.buffer], 'recording.wav', {type: 'audio/wav'}));
  field.files = files.files; context.close();
  button.textContent = 'Record again'; said.textContent = `recorded ${(n / rate).toFixed(1)} s`;
};
})();"""

STYLE = """body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}
form{border:1px solid #ccc;padding:1em;margin:1em 0}label{margin-right:1em}
.text{font-family:serif;font-size:1.6em;white-space:pre-wrap}mark{background:#ffb347}
.error{color:#b00;font-weight:bold}.note{color:#666}img{max-width:100%;border:1px solid #ddd}
table{border-collapse:collapse}td{border-bottom:1px solid #eee;padding:.3em .6em}"""


def highlighted(reading: Reading, threshold: float) -> str:
    """The transcription as HTML; characters under `threshold` confidence in <mark> with their confidence."""
    return "".join(f'<mark title="{conf:.2f}">{html.escape(c)}</mark>' if conf < threshold else html.escape(c)
                   for c, conf in reading.chars)


def png_data_url(img: np.ndarray) -> str:
    if img.shape[1] > PREVIEW_WIDTH:
        img = cv2.resize(img, (PREVIEW_WIDTH, max(1, round(img.shape[0] * PREVIEW_WIDTH / img.shape[1]))),
                         interpolation=cv2.INTER_AREA)
    return "data:image/png;base64," + base64.b64encode(cv2.imencode(".png", img)[1].tobytes()).decode()


class Pages:
    """The HTML of the one page: the forms, and the result or the message of the last upload."""

    def __init__(self, cfg, model_name: str, hears: bool = False):
        self.cfg, self.model_name, self.hears = cfg, model_name, hears

    def render(self, body: str = "") -> str:
        s = self.cfg.serve
        return f"""<!doctype html><html><head><meta charset="utf-8"><title>HTR demo</title>
<style>{STYLE}</style></head><body><h1>Handwritten text recognition</h1>
<p class="note">Model <code>{html.escape(self.model_name)}</code>. Characters read with a confidence under
{s.low_confidence:g} are <mark>highlighted</mark>. Uploads: up to {s.max_upload_mb:g} MB and
{s.max_megapixels:g} megapixels.</p>
<form id="line-form" action="line" method="post" enctype="multipart/form-data"><h2>A line image</h2>
<input type="file" id="line-image" name="image" accept="image/*" required>{self.audio_field()}
<button id="line-submit" type="submit">Transcribe</button></form>
<form id="page-form" action="page" method="post" enctype="multipart/form-data"><h2>A page and its PAGE / ALTO XML</h2>
<label>image <input type="file" id="page-image" name="image" accept="image/*" required></label>
<label>XML <input type="file" id="page-xml" name="xml" accept=".xml,application/xml,text/xml" required></label>
<button id="page-submit" type="submit">Transcribe the lines</button></form>
<section id="result">{body}</section></body></html>"""

    def audio_field(self) -> str:
        """With the audio branch: a reading of the line, uploaded or recorded from the microphone (as a WAV)."""
        if not self.hears:
            return ""
        return """<label>its reading (optional) <input type="file" id="line-audio" name="audio" accept="audio/*"
capture></label><button type="button" id="line-record">Record</button> <span id="line-recorded" class="note">
</span><script>""" + RECORDER + "</script>"

    def error(self, message: str) -> str:
        return self.render(f'<p id="error" class="error">{html.escape(message)}</p>')

    def line(self, name: str, image: np.ndarray, reading: Reading, heard: str | None = None) -> str:
        problem = fit_warning(*image.shape, self.cfg.preproc.image_height, self.cfg.preproc.image_width)
        warning = f'<p id="warning" class="note">{html.escape(problem)}</p>' if problem else ""
        audio = f'<p id="heard" class="note">read with its audio, {html.escape(heard)}</p>' if heard else ""
        return self.render(f"""<h2>{html.escape(name)}</h2><img id="line-preview" alt="the uploaded line"
src="{png_data_url(image)}"><p id="text" class="text">{highlighted(reading, self.cfg.serve.low_confidence)}</p>
<p id="confidence">confidence {reading.confidence:.3f}</p>{audio}{warning}""")

    def page(self, name: str, xml_name: str, results: list, xml: bytes) -> str:
        threshold = self.cfg.serve.low_confidence
        rows = "".join(f'<tr><td>{html.escape(line.id)}</td><td class="text">{highlighted(r, threshold)}</td>'
                       f'<td>{r.confidence:.3f}</td></tr>' if r else
                       f'<tr><td>{html.escape(line.id)}</td><td class="note">no usable geometry: kept as it was'
                       f'</td><td></td></tr>' for line, r in results)
        read = sum(r is not None for _, r in results)
        href = "data:application/xml;base64," + base64.b64encode(xml).decode()
        return self.render(f"""<h2>{html.escape(name)}</h2><p id="summary">{read} of {len(results)} lines read.
<a id="download" download="{html.escape(Path(xml_name).stem)}.recognised.xml" href="{href}">Download the XML with
the recognised text</a> (in place of the lines' text).</p><table id="lines">{rows}</table>""")


# ---------------------------------------------------------------------------------------------------------- app

def make_app(cfg, recognizer: Recognizer):
    """The FastAPI app: GET / (the forms), POST line and page (the forms' uploads, answered with the page)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    pages = Pages(cfg, str(cfg.resume), recognizer.hears)
    max_bytes = int(cfg.serve.max_upload_mb * 2**20)

    async def uploads(request: Request, *fields, optional=()) -> list:
        """[(file name, bytes)] of the form's file fields, then of the `optional` ones ((None, b"") when not
        chosen); Refused for a body over the limit or a missing file."""
        length = request.headers.get("content-length", "")
        if not length.isdigit() or int(length) > max_bytes:
            async for _ in request.stream():                             # read it, so the browser gets the page
                pass
            size = f"{int(length) / 2**20:.1f} MB" if length.isdigit() else "of unknown size"
            raise Refused(413, f"upload {size} refused: the limit is {cfg.serve.max_upload_mb:g} MB "
                               f"(serve.max_upload_mb)")
        n = len(fields) + len(optional)
        try:
            form = await request.form(max_files=n, max_fields=n)
        except HTTPException as e:
            raise Refused(400, f"not a form upload: {e.detail}") from None
        files = [form.get(f) for f in fields]
        if not all(isinstance(f, UploadFile) and f.filename for f in files):
            raise Refused(400, f"choose a file for each of: {', '.join(fields)}")
        extra = [form.get(f) for f in optional]
        return [(f.filename, await f.read()) if isinstance(f, UploadFile) and f.filename else (None, b"")
                for f in files + extra]

    def answer(work):
        async def endpoint(request: Request):
            try:
                return HTMLResponse(await work(request))
            except Refused as e:
                return HTMLResponse(pages.error(str(e)), status_code=e.status)
            except Exception as e:                     # anything else: a message in the page, details in the log
                log.exception("%s failed", request.url.path)
                return HTMLResponse(pages.error(f"internal error ({type(e).__name__}: {e}); the server's log has "
                                                f"the details"), status_code=500)
        return endpoint

    async def line(request: Request) -> str:
        (name, data), (audio_name, audio) = await uploads(request, "image", optional=("audio",))
        check_image(data, name, cfg.serve.max_megapixels)
        return await run_in_threadpool(read_line, name, data, audio_name, audio)

    def read_line(name: str, data: bytes, audio_name: str | None, audio: bytes) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                image = read_image(saved(Path(tmp) / "image", data))
                wave = read_audio(saved(Path(tmp) / "audio", audio)) if audio_name and recognizer.hears else None
            except ValueError as e:
                raise Refused(400, f"{name}: {e}") from None
            except AudioError as e:
                raise Refused(400, str(e).replace(str(Path(tmp) / "audio"), audio_name)) from None
        return pages.line(name, image, recognizer.read([image], wave)[0], audio_name if wave is not None else None)

    async def page(request: Request) -> str:
        (name, data), (xml_name, xml) = await uploads(request, "image", "xml")
        check_image(data, name, cfg.serve.max_megapixels)
        return await run_in_threadpool(read_page_upload, name, data, xml_name, xml)

    def read_page_upload(name: str, data: bytes, xml_name: str, xml: bytes) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            image_path, xml_path = saved(Path(tmp) / "image", data), saved(Path(tmp) / "page.xml", xml)
            doc, results = page_readings(recognizer, image_path, xml_path, {xml_path: xml_name, image_path: name})
        return pages.page(name, xml_name, results, write_text(doc, results))

    app.add_api_route("/", lambda: HTMLResponse(pages.render()), methods=["GET"])
    app.add_api_route("/line", answer(line), methods=["POST"])
    app.add_api_route("/page", answer(page), methods=["POST"])
    return app


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound here so that a taken port is one clear error (port 0: any free one)."""
    try:
        sock = socket.create_server((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; set serve.port=N "
                        f"(or serve.port=0 for any free port)") from None
    return sock


def serve(cfg) -> None:
    """Load the recognizer of cfg.resume and answer on serve.host:serve.port until Ctrl+C."""
    import uvicorn
    recognizer = Recognizer(cfg)
    sock = listen(cfg.serve.host, int(cfg.serve.port))
    host, port = sock.getsockname()[:2]
    print(f"serving {cfg.resume} on http://{host}:{port}/ (Ctrl+C stops)", flush=True)
    uvicorn.Server(uvicorn.Config(make_app(cfg, recognizer), log_level="warning")).run(sockets=[sock])
