"""The suite's own scheduling (tests/conftest.py): files with slow tests are collected first, so that pytest-xdist's
`--dist loadfile` starts them first and the two CI workers end together."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import pytest_collection_modifyitems, pytest_configure


@dataclass
class Item:
    path: Path
    name: str
    markers: dict[str, dict] = field(default_factory=dict)  # name -> the marker's keyword arguments

    def get_closest_marker(self, name: str) -> pytest.Mark | None:
        return getattr(pytest.mark, name)(**self.markers[name]).mark if name in self.markers else None


def test_files_with_a_slow_test_come_first_with_their_tests_together_and_in_order() -> None:
    a, b, c = Path("test_a.py"), Path("test_b.py"), Path("test_c.py")
    items = [Item(a, "a1"), Item(b, "b1"), Item(b, "b2", {"slow": {}}), Item(c, "c1", {"slow": {}}), Item(a, "a2")]
    pytest_collection_modifyitems(None, items)
    assert [item.name for item in items] == ["b1", "b2", "c1", "a1", "a2"]


def test_slow_files_with_a_start_come_first_in_its_order() -> None:
    a, b, c, d = (Path(f"test_{x}.py") for x in "abcd")
    items = [
        Item(a, "a1", {"slow": {}}),
        Item(b, "b1"),
        Item(b, "b2", {"slow": {"start": 1}}),
        Item(c, "c1"),
        Item(d, "d1", {"slow": {"start": 0}}),
        Item(d, "d2"),
    ]
    pytest_collection_modifyitems(None, items)
    assert [item.name for item in items] == ["d1", "d2", "b1", "b2", "a1", "c1"]


def test_xdist_keeps_the_collection_order(pytestconfig: pytest.Config) -> None:
    class Option:
        loadscopereorder = True

    class Config:
        option = Option()

    pytest_configure(Config())
    assert Config.option.loadscopereorder is False
    assert pytestconfig.getoption("loadscopereorder", default=False) is False  # this run's own setting
