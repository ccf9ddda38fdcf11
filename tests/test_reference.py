"""README.md's option tables are made from the config models; this fails when they drift apart."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.reference import rewrite, tables

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_option_tables_are_current() -> None:
    text = README.read_text()
    assert rewrite(text) == text, "README.md's option tables are stale: run `make docs`"


def test_every_option_is_described() -> None:
    for name, table in tables().items():
        rows = [line for line in table.splitlines()[2:]]
        assert rows, name
        assert all(not line.endswith("|  |") for line in rows), f"{name}: an option has no description"


def test_a_missing_block_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"options:\w+"):
        rewrite("no tables here")
