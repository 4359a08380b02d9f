"""The launcher runs a script as __main__ with its own arguments after install() (no process
group needed: the script here only reports what it sees)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "muon_megatron.megatron.launch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_launcher_installs_then_runs_the_script_with_its_arguments(tmp_path):
    pytest.importorskip("megatron.training.training")
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import sys
        from megatron.training import arguments, training
        parser = arguments.add_megatron_arguments(__import__("argparse").ArgumentParser(allow_abbrev=False))
        print("ARGV", sys.argv[1:], __name__)
        print("FLAG", "--muon-ns-dtype" in parser._option_string_actions)
        print("PATCHED", training.get_megatron_optimizer.__module__)
    """))
    out = _run([str(script), "--optimizer", "muon"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ARGV ['--optimizer', 'muon'] __main__" in out.stdout
    assert "FLAG True" in out.stdout
    assert "PATCHED muon_megatron.megatron.install" in out.stdout


def test_launcher_without_a_script_prints_usage_and_fails(tmp_path):
    out = _run([], tmp_path)
    assert out.returncode == 2 and "launch" in out.stdout


def test_launcher_names_a_missing_script(tmp_path):
    out = _run(["no_such_script.py"], tmp_path)
    assert out.returncode != 0 and "no_such_script.py" in out.stderr
