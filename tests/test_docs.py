"""The configuration reference is generated from config.yaml's comments: every key has one, the docs name only keys
that exist, and the generated page lists every key. (`mkdocs build --strict` itself runs in CI, not here.)"""
import re
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from htr.config_reference import CONFIG, MARKER, UNKNOWN_KEY_ERROR, named_keys, on_page_markdown, render, rows, sections
from utils import UserError, load_config

ROOT = Path(__file__).resolve().parents[1]


def leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, DictConfig):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def test_every_config_key_has_a_comment():
    missing = [r.key for r in rows() if not r.comment]
    assert not missing, f"config.yaml keys without a comment (`key: value  # what it does`): {', '.join(missing)}"


def test_docs_name_only_existing_keys():
    table = rows()
    keys, names = {r.key for r in table}, sections(table)
    unknown = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        unknown += [f"{path.relative_to(ROOT)}:{line}: {name}"
                    for line, name in named_keys(path.read_text(encoding="utf-8"), names) if name not in keys]
    assert not unknown, "config keys named in the docs that config.yaml lacks:\n" + "\n".join(unknown)


def test_config_comments_name_only_existing_keys():
    table = rows()
    keys, names = {r.key for r in table}, sections(table)
    comments = "\n".join(f"`{r.comment}`" for r in table)
    unknown = sorted({name for _, name in named_keys(comments, names)} - keys)
    assert not unknown, f"config.yaml comments name keys it lacks: {', '.join(unknown)}"


def test_reference_lists_every_key():
    listed = set(re.findall(r"^\| `([^`]+)` \| [^|]", render(rows()), re.MULTILINE))
    section_rows = {r.key for r in rows() if r.section}
    assert listed - section_rows == set(leaves(OmegaConf.load(CONFIG)))


def test_hook_fills_the_configuration_page():
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page.startswith("# Configuration\n") and MARKER in page
    rendered = on_page_markdown(page, page=None, config=None, files=None)
    assert MARKER not in rendered
    assert "| `train.lr` | `1e-3` | " in rendered and "### `decode`" in rendered
    assert on_page_markdown("# Other\n", page=None, config=None, files=None) == "# Other\n"


def test_rows_read_trailing_comments_and_their_continuations(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# header, no key's\n"
                    "top:            # a top-level key\n"
                    "sec:            # a section,\n"
                    "                # continued\n"
                    "  name: 'a # b' # quoted value\n"
                    "  list: [1, 2]\n"
                    "  # a note of nobody's\n")
    assert [tuple(r) for r in rows(path)] == [("top", "", "a top-level key", False),
                                              ("sec", "", "a section, continued", True),
                                              ("sec.name", "'a # b'", "quoted value", False),
                                              ("sec.list", "[1, 2]", "", False)]


def test_named_keys_finds_the_keys_in_code():
    text = ("Set `train.lr=1e-3` or `llm.name`; `export.py` and `model.onnx` are files, `cfg.train.lr` code,\n"
            "train.lr outside code is prose.\n"
            "```bash\npython trainer.py config.yaml data.path=./data/x decode.mode=beam\n```\n"
            "```\nerror: unknown config key 'train.lrr'; did you mean train.lr?\n```\n")
    assert named_keys(text, {"train", "llm", "export", "model", "data", "decode"}) == [
        (1, "llm.name"), (1, "train.lr"), (4, "data.path"), (4, "decode.mode")]


def test_the_unknown_key_error_is_the_one_skipped_in_docs():
    with pytest.raises(UserError, match=UNKNOWN_KEY_ERROR):
        load_config(CONFIG, ["train.lrr=1e-3"])
