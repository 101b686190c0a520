"""The configuration reference, generated from config.yaml's own comments, and the config keys a Markdown text names.

config.yaml's comment convention (what `rows` reads): a key's comment follows its value on the key's line
(`key: value  # what it does`); comment-only lines right after it whose `#` is in the same column continue it
(arch's note). Other comment lines (the file's header) belong to no key. Values are written on the key's line
(flow style for lists).

Also an MkDocs hook (mkdocs.yml `hooks:`): on_page_markdown replaces MARKER (docs/configuration.md) with one table
per top-level section. MkDocs loads this file on its own, so it imports nothing of the project.
"""
import html
import re
from pathlib import Path
from typing import NamedTuple

import yaml

CONFIG = Path(__file__).resolve().parents[1] / "config.yaml"
MARKER = "<!-- config-reference -->"
# `export.py`, `model.onnx`: file names, not keys, although their first part is a section's name
FILE_SUFFIXES = {"py", "md", "yaml", "yml", "json", "jsonl", "onnx", "pt", "safetensors", "gguf", "csv", "txt",
                 "png", "jpg", "jpeg", "tif", "tiff", "xml", "html", "gz", "npz", "zip", "log", "sh", "toml"}
DOTTED = re.compile(r"(?<![\w./-])[A-Za-z_]\w*(?:\.\w+)+")      # train.lr, llm.lora.r (not cfg's tail, not a path)
FENCED = re.compile(r"^ *(```|~~~).*?^ *\1 *$", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"(`+)(.+?)\1", re.DOTALL)
UNKNOWN_KEY_ERROR = "unknown config key"                            # utils.load_config's message
TRAILING = re.compile(r":?\s*(?:#\s?(.*?))?\s*$")                 # what may follow a key (and its value) on its line


class Row(NamedTuple):
    key: str            # dotted: train.lr, arch.mobilevit.dim
    default: str        # the value as written in the YAML; "" when empty, and for a section
    comment: str        # "" when the key has none
    section: bool       # a mapping of further keys


def rows(path=CONFIG) -> list:
    """Every key of the YAML file (sections too), in file order, with its default and its comment."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    root = yaml.compose("\n".join(lines), Loader=yaml.SafeLoader)
    out = []
    _walk(root, "", lines, out)
    return out


def _walk(node, prefix: str, lines: list, out: list) -> None:
    for key_node, value in node.value:
        key, line = prefix + key_node.value, key_node.start_mark.line
        section = isinstance(value, yaml.MappingNode)
        empty = isinstance(value, yaml.ScalarNode) and value.value == "" and value.style is None
        if section or empty:
            default, rest = "", lines[line][key_node.end_mark.column:]
        elif value.start_mark.line == line == value.end_mark.line:
            default = lines[line][value.start_mark.column:value.end_mark.column]
            rest = lines[line][value.end_mark.column:]
        else:
            raise ValueError(f"{key} (line {line + 1}): write its value on the key's line (flow style for lists)")
        match = TRAILING.fullmatch(rest)
        if match is None:
            raise ValueError(f"{key} (line {line + 1}): unexpected text after the value: {rest.strip()!r}")
        comment = [match[1]] if match[1] else []
        if comment:                                          # aligned comment-only lines below continue it
            column = len(lines[line]) - len(rest) + rest.index("#")
            for below in lines[line + 1:]:
                if not re.fullmatch(r" {%d}#.*" % column, below):
                    break
                comment.append(below[column + 1:].strip())
        out.append(Row(key, default, " ".join(comment), section))
        if section:
            _walk(value, key + ".", lines, out)


def sections(table: list) -> set:
    """The top-level sections' names (data, train, ...) of rows()."""
    return {r.key for r in table if r.section and "." not in r.key}


def named_keys(markdown: str, section_names) -> list:
    """(line number, name) of each dotted name in the code (inline or fenced) of a Markdown text whose first part
    is one of section_names: `train.lr`, `train.lr=1e-3`, `python trainer.py config.yaml llm.name=DIR`. Code that
    quotes the error for an unknown key (UNKNOWN_KEY_ERROR) names a wrong key on purpose and is skipped."""
    spans = [(m.start(), m.group()) for m in FENCED.finditer(markdown)]
    outside = FENCED.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), markdown)   # same offsets, fences blanked
    spans += [(m.start(2), m.group(2)) for m in INLINE.finditer(outside)]
    found = []
    for start, code in spans:
        if UNKNOWN_KEY_ERROR in code:
            continue
        for m in DOTTED.finditer(code):
            if _names_key(m.group(), section_names):
                found.append((markdown.count("\n", 0, start + m.start()) + 1, m.group()))
    return sorted(found)


def _names_key(name: str, section_names) -> bool:
    parts = name.split(".")
    return parts[0] in section_names and parts[-1] not in FILE_SUFFIXES


def _code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}"


def _text(comment: str, section_names) -> str:
    """A comment as a table cell: the keys it names as code, the rest escaped for Markdown and HTML."""
    def escape(s):
        return re.sub(r"([\\`*_\[\]|])", r"\\\1", html.escape(s, quote=False))
    out, last = [], 0
    for m in DOTTED.finditer(comment):
        if _names_key(m.group(), section_names):
            out += [escape(comment[last:m.start()]), _code(m.group())]
            last = m.end()
    return "".join(out) + escape(comment[last:])


def _table(table_rows: list, names) -> list:
    lines = ["| Key | Default | Meaning |", "| --- | --- | --- |"]
    for r in table_rows:
        default = "" if r.section else _code(r.default) if r.default else "*empty*"
        lines.append(f"| {_code(r.key)} | {default} | {_text(r.comment, names)} |")
    return lines + [""]


def render(table: list) -> str:
    """Markdown: the top-level keys' table, then per top-level section a heading, its comment and its keys' table."""
    names = sections(table)
    top = [r for r in table if "." not in r.key and not r.section]
    out = ["### Top-level keys", "", *_table(top, names)] if top else []
    for head in (r for r in table if r.key in names):
        inside = [r for r in table if r.key.startswith(head.key + ".")]
        out += [f"### {_code(head.key)}", "", _text(head.comment, names), "", *_table(inside, names)]
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files):
    """MkDocs hook: MARKER in a page becomes the reference of config.yaml."""
    return markdown.replace(MARKER, render(rows())) if MARKER in markdown else markdown
