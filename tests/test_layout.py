"""The layout rule: the top-level *.py files are commands (argument parsing plus a call into the library), except the
design card's models.py, dataset.py and utils.py; no module imports a command, and a command holds no logic of its
own (no classes, no functions beyond main and its argument parsing)."""
import ast
from pathlib import Path

from conftest import ROOT

LIBRARY_AT_TOP = {"models", "dataset", "utils"}
SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py") if p.stem not in LIBRARY_AT_TOP)
LIBRARY = sorted([ROOT / f"{m}.py" for m in LIBRARY_AT_TOP] + list((ROOT / "htr").glob("*.py")))
PARSING = {"main", "parse_args"}


def imported_modules(path: Path) -> set:
    """Top-level names of every module `path` imports, at any depth of its code (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_commands_are_the_expected_ones():
    assert {"trainer", "evaluate", "demo", "prepare_iam", "transcribe", "serve", "export"} <= set(SCRIPTS)
    assert (ROOT / "htr" / "__init__.py").is_file()


def test_no_module_imports_a_command():
    offenders = {}
    for path in [ROOT / f"{s}.py" for s in SCRIPTS] + LIBRARY:
        bad = imported_modules(path) & set(SCRIPTS)
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"these modules import commands (move the shared code into htr/): {offenders}"


def test_commands_are_thin():
    logic = {}
    for script in SCRIPTS:
        tree = ast.parse((ROOT / f"{script}.py").read_text())
        own = [n.name for n in tree.body if isinstance(n, ast.ClassDef)
               or isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name not in PARSING]
        if own:
            logic[script] = own
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), f"{script}.py has no main"
    assert not logic, f"commands holding logic that belongs in htr/: {logic}"
