"""The start-up version check: CI-tested lines pass silently, the hand-checked 0.20 development line
passes with one note saying what was checked, anything else is refused naming
MUON_MEGATRON_ALLOW_UNTESTED (which turns the refusal into a warning)."""

from __future__ import annotations

import logging

import pytest

from muon_megatron.megatron import version


@pytest.fixture
def found(monkeypatch):
    monkeypatch.delenv("MUON_MEGATRON_ALLOW_UNTESTED", raising=False)
    monkeypatch.setattr(version, "_NOTED", set())

    def use(v):
        monkeypatch.setattr(version, "megatron_core_version", lambda: v)

    return use


@pytest.mark.parametrize("text,expected", [("0.19.2", (0, 19)), ("0.20.0", (0, 20)), ("0.20.0rc1", (0, 20)),
                                           ("0.21.0.dev0", (0, 21)), ("1.0", (1, 0))])
def test_parse_version_reads_major_and_minor(text, expected):
    assert version.parse_version(text) == expected


@pytest.mark.parametrize("v", [(0, 16), (0, 19)])
def test_tested_lines_pass_without_a_note(found, caplog, v):
    found(v)
    with caplog.at_level(logging.INFO, logger=version.__name__):
        assert version.check_megatron_version() == v
    assert caplog.records == []


def test_megatron_core_0_20_development_passes_with_one_note_naming_the_checked_commit(found, caplog):
    found((0, 20))
    with caplog.at_level(logging.INFO, logger=version.__name__):
        assert version.check_megatron_version() == (0, 20)
        assert version.check_megatron_version() == (0, 20)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "d98e8a64ddf3" in notes[0] and "not a release CI tests" in notes[0]


@pytest.mark.parametrize("v", [(0, 15), (0, 21), (1, 0)])
def test_other_lines_are_refused_naming_the_override(found, v, monkeypatch, caplog):
    found(v)
    with pytest.raises(RuntimeError, match=rf"{v[0]}\.{v[1]} is outside.*MUON_MEGATRON_ALLOW_UNTESTED=1"):
        version.check_megatron_version()
    monkeypatch.setenv("MUON_MEGATRON_ALLOW_UNTESTED", "1")
    with caplog.at_level(logging.WARNING, logger=version.__name__):
        assert version.check_megatron_version() == v
    assert any("is outside" in r.getMessage() for r in caplog.records)


def test_version_is_read_from_the_imported_megatron_core():
    """A source checkout on PYTHONPATH wins over an installed wheel's metadata: the version is the
    code's own package_info."""
    package_info = pytest.importorskip("megatron.core.package_info")
    assert version.megatron_core_version() == version.parse_version(package_info.__version__)
