"""Dependencies point one way (DESIGN.md): the core imports torch only; the distributed layer imports
the core; each engine adapter imports the core, the distributed layer and its own engine, never the
other engine. Checked on the source (AST, every import statement including lazy ones inside
functions) so it holds before an adapter can even be imported; a subpackage not written yet is
skipped. A subprocess also checks what importing the package really loads."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "muon_megatron"
STDLIB = set(sys.stdlib_module_names)
ENGINES = {"megatron", "deepspeed"}
# Packages the engines drag in; the core must not reach them either.
ENGINE_COMPANIONS = {"transformer_engine", "apex", "emerging_optimizers"}


def imported_modules(path: pathlib.Path) -> set[str]:
    """Absolute dotted names of every module imported anywhere in ``path`` (relative ones resolved)."""
    package = ".".join(path.relative_to(ROOT).parent.parts)  # the package holding ``path``
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.add(module)
            # `from . import x` may import a submodule x
            names.update(f"{module}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def python_files(subpackage: str) -> list[pathlib.Path]:
    folder = PACKAGE / subpackage
    if not folder.is_dir():
        pytest.skip(f"muon_megatron/{subpackage} does not exist yet")
    files = sorted(folder.rglob("*.py"))
    assert files, f"muon_megatron/{subpackage} holds no Python file"
    return files


def top(name: str) -> str:
    return name.split(".")[0]


def test_core_imports_torch_and_the_standard_library_only():
    files = python_files("core") + [PACKAGE / "__init__.py"]
    for path in files:
        for name in imported_modules(path):
            if top(name) == "muon_megatron":
                assert name.startswith("muon_megatron.core") or name in ("muon_megatron", "muon_megatron.core"), (
                    f"{path.relative_to(ROOT)} imports {name}: the core imports nothing above it"
                )
            else:
                assert top(name) in STDLIB | {"torch"}, f"{path.relative_to(ROOT)} imports {name}"


def test_distributed_layer_imports_no_engine_and_no_adapter():
    for path in python_files("distributed"):
        for name in imported_modules(path):
            assert top(name) not in ENGINES | ENGINE_COMPANIONS, f"{path.relative_to(ROOT)} imports {name}"
            assert not name.startswith(("muon_megatron.megatron", "muon_megatron.deepspeed")), (
                f"{path.relative_to(ROOT)} imports the adapter {name}"
            )


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_adapter_never_imports_the_other_engine(engine):
    (other,) = ENGINES - {engine}
    for path in python_files(engine):
        for name in imported_modules(path):
            assert top(name) != other, f"{path.relative_to(ROOT)} ({engine} adapter) imports {name}"
            assert not name.startswith(f"muon_megatron.{other}"), (
                f"{path.relative_to(ROOT)} ({engine} adapter) imports the {other} adapter {name}"
            )


def test_the_checker_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """Guards the checks above against passing vacuously."""
    fake_root = tmp_path
    pkg = fake_root / "muon_megatron" / "megatron"
    pkg.mkdir(parents=True)
    source = pkg / "thing.py"
    source.write_text("from ..core import newton_schulz\n\ndef f():\n    import deepspeed.runtime\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    names = imported_modules(source)
    assert "deepspeed.runtime" in names
    assert "muon_megatron.core" in names


def test_importing_the_package_loads_no_engine():
    code = (
        "import sys, muon_megatron, muon_megatron.core\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(ENGINES | ENGINE_COMPANIONS)!r})\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
