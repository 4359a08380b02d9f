"""Which megatron-core releases muon-megatron is tested with, and the start-up check.

- :data:`TESTED`: the release lines CI runs the adapter's test suites on (PyPI releases).
- :data:`CHECKED`: lines not on PyPI yet whose development snapshot was checked by hand with the
  same suites (see ``docs/patches.md``); accepted with a logged note saying what was checked.
- Anything else is refused unless ``MUON_MEGATRON_ALLOW_UNTESTED=1`` (the adapter builds on
  megatron-core's ``DistributedOptimizer`` internals, which change between releases).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# Inclusive (major, minor) range of tested megatron-core releases.
TESTED = ((0, 16), (0, 19))

#: (major, minor) -> what was checked. Megatron-LM's main branch reports 0.20.0 while 0.20 is in
#: development; the CPU suites (tests/megatron, tests/models) and pretrain_gpt.py's mini example ran
#: against this commit.
CHECKED = {
    (0, 20): "Megatron-LM main at d98e8a64ddf3 (2026-08-22), by hand, not in CI",
}

_NOTED: set = set()


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as ``0.19.2`` or ``0.20.0rc1``."""
    parts = text.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def megatron_core_version() -> tuple[int, int]:
    """(major, minor) of the megatron-core that ``import megatron.core`` loads (its
    ``package_info``, which is right for a source checkout on ``PYTHONPATH`` too), else of the
    installed distribution; ImportError with the fix when absent."""
    try:
        from megatron.core import package_info

        return parse_version(str(package_info.__version__))
    except Exception as err:  # no megatron.core, or a tree without package_info
        try:
            from importlib.metadata import version

            return parse_version(version("megatron-core"))
        except Exception:
            raise ImportError(
                "muon_megatron.megatron needs megatron-core (pip install 'megatron-core>=0.16,<0.21')"
            ) from err


def check_megatron_version(allow_untested: bool = False) -> tuple[int, int]:
    """Raise RuntimeError when megatron-core is neither in :data:`TESTED` nor in :data:`CHECKED`
    (unless ``allow_untested`` or ``MUON_MEGATRON_ALLOW_UNTESTED=1``, which log a warning instead).
    A :data:`CHECKED` line is accepted with a note, logged once. Returns the version."""
    found = megatron_core_version()
    lo, hi = TESTED
    if lo <= found <= hi:
        return found
    if found in CHECKED:
        if found not in _NOTED:
            _NOTED.add(found)
            logger.warning(
                "muon-megatron: megatron-core %d.%d is not a release CI tests (%d.%d to %d.%d); it was checked "
                "against %s", found[0], found[1], lo[0], lo[1], hi[0], hi[1], CHECKED[found],
            )
        return found
    checked = "".join(f"; {v[0]}.{v[1]} checked against {what}" for v, what in sorted(CHECKED.items()))
    message = (
        f"megatron-core {found[0]}.{found[1]} is outside the releases muon-megatron is tested with "
        f"({lo[0]}.{lo[1]} to {hi[0]}.{hi[1]} in CI{checked}); install one of those, or set "
        "MUON_MEGATRON_ALLOW_UNTESTED=1 to try anyway (the adapter relies on megatron-core's "
        "DistributedOptimizer internals, which change between releases)"
    )
    if not allow_untested:
        import os

        if os.environ.get("MUON_MEGATRON_ALLOW_UNTESTED") != "1":
            raise RuntimeError(message)
    logger.warning(message)
    return found
