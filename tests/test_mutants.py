"""tests/mutants.py stays in step with the code: every planted bug's text is still where the
mutant expects it (exactly once), and every test it names still exists."""

from __future__ import annotations

import re

import pytest
from mutants import MUTANTS, ROOT


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_applies_and_names_existing_tests(mutant, tmp_path) -> None:
    target = tmp_path / mutant.file
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text((ROOT / mutant.file).read_text())
    mutant.apply(tmp_path)
    assert target.read_text() != (ROOT / mutant.file).read_text()
    for node in mutant.tests:
        path, _, name = node.partition("::")
        function = re.sub(r"\[.*\]$", "", name)
        assert re.search(rf"^def {function}\(", (ROOT / path).read_text(), re.M), node


def test_mutant_names_are_unique() -> None:
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
