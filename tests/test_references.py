"""What the project's texts cite exists: every `fastgan.` module (or a name in one) that a docstring, comment
or page names, and every file of the project they point to (bench/…, docs/…, tests/…, fastgan/…). A module that
moved or a file that was renamed must take its citations along. bench/RESULTS.md is left out: it records measurements
at past commits, in the paths of their day; tests/mutants/ plants such citations as bugs."""
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = re.compile(r"(?<![\w/.-])fastgan(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
FILE = re.compile(r"(?<![\w/.-])((?:bench|docs|tests|fastgan)/[\w/.-]*\w\.(?:py|md|png|jpg|toml|sh)"
                  r"|DESIGN\.md|STYLE\.md)")
# names that look like modules and are not meant as ones
NOT_MODULES = {"fastgan.planted": "the __name__ the no-host-sync test gives code it plants"}


def texts() -> list[Path]:
    found = [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("tests/*.md"), *ROOT.glob("bench/*.py"),
             *ROOT.glob("fastgan/**/*.py"), *ROOT.glob("tests/**/*.py"), ROOT / "pyproject.toml", ROOT / ".ci" / "run"]
    # bench/RESULTS.md records past commits; tests/mutants/ plants stale names on purpose
    return sorted(p for p in found if p.is_file() and p.name != "RESULTS.md" and "mutants" not in p.parts)


def names_something(reference: str) -> bool:
    """Whether the longest importable prefix of `reference` has the rest as attributes."""
    parts = reference.split(".")
    for k in range(len(parts), 0, -1):
        name = ".".join(parts[:k])
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            continue
        if spec is None:
            continue
        thing = importlib.import_module(name)
        for attribute in parts[k:]:
            if not hasattr(thing, attribute):
                return False
            thing = getattr(thing, attribute)
        return True
    return False


@pytest.mark.parametrize("path", texts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_and_file_a_text_cites_exists(path):
    text = path.read_text()
    missing = [m for m in sorted(set(MODULE.findall(text))) if m not in NOT_MODULES and not names_something(m)]
    missing += [f for f in sorted(set(FILE.findall(text))) if not (ROOT / f).exists()]
    assert not missing, f"{path.relative_to(ROOT)} cites what the project does not have: {', '.join(missing)}"
