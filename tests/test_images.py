"""Image input: read_image on colour, transparent, palette, 16-bit and white-on-black files (each must read like its
grey version, and a trained model must transcribe it alike), its errors, and the demo's aspect-ratio warnings."""
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import INK, PAPER, ROOT, TINY, WORDS, coverage, in_colour, render_line
from htr.images import fit_warning, pad_center, preprocess, read_image, to_tensor


def on_white(grey: np.ndarray) -> np.ndarray:
    """The render_line image with its paper made white: what a transparent background must read as."""
    return np.rint(255 + (INK - 255) * coverage(grey)[..., 0]).astype(np.uint8)


def write_variants(grey: np.ndarray, d) -> dict:
    """Write one line in other formats into d: {path: the grey image it must read as}."""
    alpha = np.rint(255 * coverage(grey)[..., 0]).astype(np.uint8)
    ink = np.full_like(grey, INK)
    files = {
        "colour.png": in_colour(grey),
        "colour.jpg": in_colour(grey),
        "rgba.png": np.dstack([ink] * 3 + [alpha]),                             # transparent background
        "grey16.png": grey.astype(np.uint16) * 16,                              # a 12-bit scan in 16 bits
        "white_on_black.png": 255 - grey,
    }
    for name, img in files.items():
        cv2.imwrite(str(d / name), img)
    Image.fromarray(np.dstack([ink, alpha]), "LA").save(d / "grey_alpha.png")
    palette = Image.fromarray(grey, "P")
    palette.putpalette([v for i in range(256) for v in (i, i, i)])
    palette.save(d / "palette.png", transparency=PAPER)                     # the paper entry transparent
    expect = {"rgba.png": on_white(grey), "grey_alpha.png": on_white(grey),
              "palette.png": np.where(grey == PAPER, 255, grey).astype(np.uint8)}
    return {d / name: expect.get(name, grey) for name in [*files, "grey_alpha.png", "palette.png"]}


def test_variants_read_like_their_grey_version(tmp_path):
    grey = render_line("cab")
    variants = write_variants(grey, tmp_path)
    colour = cv2.imread(str(tmp_path / "colour.png")).astype(int)
    assert np.ptp(colour, axis=2).max() > 100                               # really coloured
    for path, want in variants.items():
        got = read_image(path)
        assert got.shape == want.shape and np.abs(got.astype(int) - want).mean() < 1.0, path.name
        diff = np.abs(preprocess(got, 128, 1024).astype(int) - preprocess(want, 128, 1024)).mean() / 255
        assert diff < 0.005, path.name


def test_16_bit_full_range_and_dark_margins(tmp_path):
    grey = render_line("bad")
    cv2.imwrite(str(tmp_path / "full16.png"), grey.astype(np.uint16) * 257)
    np.testing.assert_array_equal(read_image(tmp_path / "full16.png"), grey)
    margins = cv2.copyMakeBorder(grey, 6, 6, 10, 10, cv2.BORDER_CONSTANT, value=0)   # black scanner margins
    noisy = np.clip(np.full((40, 300), 128.0) + np.random.default_rng(0).normal(0, 20, (40, 300)), 0, 255)
    for name, img in [("margins.png", margins), ("noise.png", noisy.astype(np.uint8))]:
        cv2.imwrite(str(tmp_path / name), img)
        np.testing.assert_array_equal(read_image(tmp_path / name), img)              # polarity kept


def test_jpeg_exif_orientation_is_applied(tmp_path):
    photo = Image.fromarray(render_line("ab"))
    exif = photo.getexif()
    exif[0x0112] = 6                                                                # "rotate 90 degrees to view"
    photo.save(tmp_path / "photo.jpg", exif=exif)
    assert read_image(tmp_path / "photo.jpg").shape == render_line("ab").shape[::-1]


@pytest.mark.parametrize("content,message", [(None, "image file not found"), (b"", "unreadable or corrupt"),
                                             (b"\x89PNG\r\n\x1a\n garbage", "unreadable or corrupt")])
def test_bad_files_raise_value_error(tmp_path, content, message):
    path = tmp_path / "line.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_image(path)


@pytest.mark.parametrize("h,w,problem", [(120, 1800, None), (900, 700, "taller than wide"),
                                         (110, 200, "single word"), (40, 2400, "only 17 px high")])
def test_fit_warning(h, w, problem):
    warning = fit_warning(h, w, 128, 1024)
    if problem is None:
        assert warning is None
    else:
        assert problem in warning and f"aspect ratio {w / h:.1f}" in warning and "128x1024 canvas" in warning


# ------------------------------------------------------------------------------------------ the demo, transcribing

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model trains and runs fastest on one thread, above all on a busy machine (two were 5x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """A tiny recognizer trained (in a few seconds) until it reads the training words, on grey and on white paper;
    (overrides, checkpoint)."""
    from htr.decoding import greedy_decode
    from models import HTRNet, ctc_loss
    from utils import Charset, load_config, save_checkpoint, to_plain
    cfg = load_config(ROOT / "config.yaml", TINY)
    charset = Charset("abcd")
    torch.manual_seed(0)
    model = HTRNet(cfg.arch, len(charset))
    h, w = cfg.preproc.image_height, cfg.preproc.image_width
    lines, texts = [render_line(t) for t in WORDS] + [on_white(render_line(t)) for t in WORDS], WORDS * 2
    images = torch.stack([to_tensor(pad_center(preprocess(line, h, w), h, w)) for line in lines])
    targets = torch.tensor([c for t in texts for c in charset.encode(t)])
    lengths = torch.tensor([len(t) for t in texts])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(1, 801):
        loss = ctc_loss(model.train()(images).logits, targets, lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            with torch.no_grad():
                logits = model.eval()(images).logits.log_softmax(-1).transpose(0, 1).numpy()
            if [greedy_decode(lp, charset) for lp in logits] == texts:
                break
    else:
        pytest.fail("the tiny recognizer did not learn its training words")
    ckpt = tmp_path_factory.mktemp("reader") / "best.pt"
    save_checkpoint({"model": model.state_dict(), "charset": charset.chars, "arch": to_plain(cfg.arch),
                     "preproc": to_plain(cfg.preproc)}, ckpt)
    return TINY, ckpt


def demo(capsys, overrides, ckpt, *paths) -> list:
    """demo.py's main in this process -> [(file, transcription)]."""
    import demo as demo_script
    demo_script.main([str(ROOT / "config.yaml"), *overrides, f"resume={ckpt}", *map(str, paths)])
    return [tuple(line.split("\t")[:2]) for line in capsys.readouterr().out.splitlines()]


def test_demo_reads_every_variant_like_the_grey_line(reader, tmp_path, capsys, caplog):
    overrides, ckpt = reader
    for text in ["cab", "bad"]:
        d = tmp_path / text
        d.mkdir()
        grey = render_line(text)
        cv2.imwrite(str(d / "grey.png"), grey)
        cv2.imwrite(str(d / "grey_on_white.png"), on_white(grey))
        variants = write_variants(grey, d)
        with caplog.at_level("WARNING", logger="htr"):
            out = dict(demo(capsys, overrides, ckpt, d / "grey.png", d / "grey_on_white.png", *variants))
        assert out[str(d / "grey.png")] == out[str(d / "grey_on_white.png")] == text
        assert {path.name: out[str(path)] for path in variants} == {path.name: text for path in variants}
        assert f"{d / 'grey.png'}: aspect ratio" in caplog.text and "single word" in caplog.text
