"""Which megatron-core releases muon-megatron is tested with, and the start-up check."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# Inclusive (major, minor) range of tested megatron-core releases.
TESTED = ((0, 16), (0, 19))


def megatron_core_version() -> tuple[int, int]:
    """(major, minor) of the installed megatron-core; ImportError with the fix when absent."""
    try:
        from importlib.metadata import version

        text = version("megatron-core")
    except Exception as err:  # PackageNotFoundError, or a source checkout without metadata
        try:
            import megatron.core as mc

            text = mc.__version__
        except Exception:
            raise ImportError(
                "muon_megatron.megatron needs megatron-core (pip install 'megatron-core>=0.16,<0.20')"
            ) from err
    parts = text.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def check_megatron_version(allow_untested: bool = False) -> tuple[int, int]:
    """Raise RuntimeError when megatron-core is outside :data:`TESTED` (unless ``allow_untested``,
    which logs a warning instead). Returns the version."""
    found = megatron_core_version()
    lo, hi = TESTED
    if not lo <= found <= hi:
        message = (
            f"megatron-core {found[0]}.{found[1]} is outside the releases muon-megatron is tested with "
            f"({lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}); install one of those, or set "
            "MUON_MEGATRON_ALLOW_UNTESTED=1 to try anyway"
        )
        if not allow_untested:
            import os

            if os.environ.get("MUON_MEGATRON_ALLOW_UNTESTED") != "1":
                raise RuntimeError(message)
        logger.warning(message)
    return found
