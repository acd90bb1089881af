"""What make run installs covers what the contract's commands import: a fresh `make run` then
`python stress_test.py` must not meet a ModuleNotFoundError that make test's extra packages hid."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys

from scripts.processes import REPO

ENTRY_POINTS = ["web_server.py", "model_server.py", "stress_test.py", "settings.py", *sorted(REPO.glob("serving/*.py"))]
RUN_REQUIREMENTS = ["requirements.txt", "requirements-web.txt", "requirements-load.txt"]
LOCAL = {"serving", "settings", "scripts", "bench", "tests"}
# Imported only on the backend a user installs for it (KERAS_BACKEND=torch); the README says how.
OPTIONAL = {"torch"}


def imported_modules(path: str) -> set[str]:
    """Top-level names of every module the file imports, inside functions too (matplotlib is imported late)."""
    tree = ast.parse((REPO / path).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - LOCAL - {"__future__"}


def installed_with_pins() -> set[str]:
    """The pinned distributions and everything they require (Flask brings Werkzeug), as installed here."""
    text = "\n".join((REPO / name).read_text() for name in RUN_REQUIREMENTS)
    todo = [normal(m.group(1)) for m in re.finditer(r"^([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==", text, re.M)]
    found: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            try:
                requires = importlib.metadata.requires(name) or []
            except importlib.metadata.PackageNotFoundError:  # a requirement for other platforms (a marker)
                continue
            todo += [normal(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in requires if "extra ==" not in r]
    return found


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_module_the_commands_import_is_pinned_for_make_run():
    distributions, installed = importlib.metadata.packages_distributions(), installed_with_pins()
    missing = {
        (str(path), module)
        for path in ENTRY_POINTS
        for module in imported_modules(str(path)) - OPTIONAL
        if not {normal(d) for d in distributions.get(module, [module])} & installed
    }
    assert not missing, f"imported but not in {RUN_REQUIREMENTS}: {sorted(missing)}"
