"""Make the helper modules of this folder (``_harness``, ``_model``, ``_scenarios``) importable."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
