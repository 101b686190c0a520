"""A corpus's licence as prepare_pages.py records it in summary.json: given on the command line (--licence), else read
from the corpus's own files in XML_DIR or its parent (HTR-United's htr-united.yml, a LICENSE or COPYING file, a
README), else unknown, which the summary says with what to do. The trainer copies it into run_info.json and the model
card lists it."""
import json
import re
from pathlib import Path

import yaml

UNKNOWN = "unknown"
LICENCE_FILES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE", "LICENCE.md", "COPYING")
READMES = ("README.md", "README.rst", "README.txt", "README")
CC_SHORT = re.compile(r"\bCC[ -]?BY((?:[ -](?:NC|SA|ND))*)[ -]?(\d\.\d)", re.I)       # CC BY-SA 4.0, CC-BY 4.0
CC_WORDS = re.compile(r"Creative Commons Attribution((?:[ -](?:NonCommercial|ShareAlike|NoDerivatives|"
                      r"NoDerivs))*)[ -](\d\.\d)", re.I)
CC_PARTS = {"noncommercial": "NC", "sharealike": "SA", "noderivatives": "ND", "noderivs": "ND"}
NAMED = ((re.compile(r"\bCC0\b|CC Zero|Public Domain Dedication", re.I), "CC0-1.0"),
         (re.compile(r"\bMIT License\b", re.I), "MIT"),
         (re.compile(r"\bApache License,? Version 2\.0", re.I), "Apache-2.0"),
         (re.compile(r"Licence Ouverte|Etalab Open Licen[cs]e", re.I), "etalab-2.0"))


def licence_id(text: str) -> str | None:
    """The first licence named in `text`, as an SPDX-style id (CC-BY-SA-4.0, MIT, ...); None if none is."""
    found = []
    for m in (*CC_SHORT.finditer(text), *CC_WORDS.finditer(text)):
        parts = [CC_PARTS.get(p.lower(), p.upper()) for p in re.split(r"[ -]", m.group(1)) if p]   # NC, SA, ND
        found.append((m.start(), "-".join(["CC", "BY", *parts, m.group(2)])))
    found += [(m.start(), spdx) for pattern, spdx in NAMED for m in pattern.finditer(text)]
    return min(found)[1] if found else None


def from_htr_united(path: Path) -> str | None:
    """The `license:` names of an HTR-United catalogue file (a list of {name, url}), joined with ' AND '."""
    try:
        meta = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    entries = meta.get("license") if isinstance(meta, dict) else None
    entries = [entries] if isinstance(entries, (str, dict)) else entries or []                # one entry, not a list
    names = [str(e.get("name", "")) if isinstance(e, dict) else str(e) for e in entries]
    ids = [licence_id(n) or n for n in names if n.strip()]
    return " AND ".join(ids) or None


def corpus_licence(xml_dir: Path, given: str | None = None) -> dict:
    """{"licence": id or "unknown", "found_in": where it came from (None when unknown)}."""
    if given:
        return {"licence": given, "found_in": "--licence"}
    for folder in (xml_dir, xml_dir.parent):
        if (folder / "htr-united.yml").is_file() and (found := from_htr_united(folder / "htr-united.yml")):
            return {"licence": found, "found_in": str(folder / "htr-united.yml")}
        for name in (*LICENCE_FILES, *READMES):
            path = folder / name
            if path.is_file() and (found := licence_id(path.read_text(encoding="utf-8", errors="replace"))):
                return {"licence": found, "found_in": str(path)}
    return {"licence": UNKNOWN, "found_in": None}


def describe(record: dict) -> str:
    """The licence line of prepare_pages.py's summary."""
    if record["licence"] != UNKNOWN:
        return f"{record['licence']} (from {record['found_in']})"
    return ("unknown: none given and none found in htr-united.yml, a LICENSE file or the README; find the corpus's "
            "terms before sharing the lines or a model trained on them, and record them with --licence ID "
            "(e.g. --licence CC-BY-4.0)")


def data_licence(data_path: str | Path) -> dict | None:
    """The licence record of a line dataset written by prepare_pages.py (its summary.json); for a dataset that joins
    others by linking their split folders in as shards (train/shard-<name> -> OTHER/train), the records of those
    datasets joined (licences "A AND B", each with where it was found; a source without one counts as unknown); None
    for other data."""
    own = summary_licence(Path(data_path))
    if own is not None:
        return own
    roots = dict.fromkeys(shard.resolve().parent for shard in sorted((Path(data_path) / "train").glob("shard-*"))
                          if shard.is_symlink())
    if not roots:
        return None
    records = [summary_licence(root) or {"licence": UNKNOWN, "found_in": f"no licence in {root / 'summary.json'}"}
               for root in roots]
    return {"licence": " AND ".join(dict.fromkeys(r["licence"] for r in records)),
            "found_in": "; ".join(f"{root}: {r['found_in']}" for root, r in zip(roots, records))}


def summary_licence(root: Path) -> dict | None:
    """The licence record in root/summary.json, or None."""
    try:
        record = json.loads((root / "summary.json").read_text(encoding="utf-8")).get("licence")
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) and "licence" in record else None
