"""The model descriptions, the sizing and the analysis import no engine: megatron only inside
``megatron_config``'s functions."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_models_sizing_and_analysis_load_no_engine():
    code = (
        "import sys\n"
        "import muon_megatron.models, muon_megatron.models.megatron_config, muon_megatron.models.torch_model\n"
        "import muon_megatron.sizing, muon_megatron.analysis\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'deepspeed', 'transformer_engine'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
