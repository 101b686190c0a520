"""Try a recognizer in the browser: python serve.py config.yaml resume=MODEL [serve.port=7860 serve.host=127.0.0.1]

A local web page (FastAPI, plain HTML forms, no JavaScript) where one uploads a line image, or a page image and its
PAGE or ALTO XML, and sees the transcription with the characters whose confidence is under serve.low_confidence
highlighted; a page's XML comes back as a download with the recognised text in place of its lines' text (written
as transcribe.py --overwrite writes it). resume= takes a checkpoint, a model folder or a Hub id
(htr.inference.load_model). Bound to 127.0.0.1 unless serve.host says otherwise (there is no authentication). Uploads
over serve.max_upload_mb or images over serve.max_megapixels are refused with a message in the page, as is anything
that is not an image or not PAGE/ALTO; nothing is kept after the answer.
"""
from htr.web_app import serve
from utils import config_from_cli, run_main


def main(argv=None):
    cfg, _ = config_from_cli(argv, "serve.py", need_resume=True)
    serve(cfg)


if __name__ == "__main__":
    run_main(main)
