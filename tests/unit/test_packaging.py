"""The pack installs as users expect: runtime dependencies = what the nodes import, in pyproject.toml and
requirements.txt alike; `comfy node pack` leaves out the development folders (.comfyignore)."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
# imported by the nodes but provided by ComfyUI itself (its own modules, and the torch it runs on)
COMFY_PROVIDED = {
    "comfy",
    "comfy_api",
    "comfy_execution",
    "folder_paths",
    "node_helpers",
    "server",
    "nodes",
    "torch",
    "torchvision",
    "triton",
}


def _runtime_requirements() -> list[Requirement]:
    return [Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = [handler.type] if not isinstance(handler.type, ast.Tuple) else list(handler.type.elts)
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


def _node_imports() -> set[str]:
    """Top-level third-party modules imported (anywhere, also inside functions) by __init__.py, nodes/
    and every xsr_core module reachable from them through relative imports; imports guarded by
    ``except ImportError`` (optional features with their own install hint) do not count."""
    todo = [("", REPO / "__init__.py")] + [("nodes", p) for p in sorted((REPO / "nodes").glob("*.py"))]
    seen, external = set(), set()
    while todo:
        pkg, path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text())
        optional = {
            id(n)
            for t in ast.walk(tree)
            if isinstance(t, ast.Try) and any(_catches_import_error(h) for h in t.handlers)
            for stmt in t.body
            for n in ast.walk(stmt)
        }  # `try: import x / except ImportError: <fix>`
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                external |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    external.add(node.module.split(".")[0])
                    continue
                parts = pkg.split(".") if pkg else []
                parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                target = ".".join(parts + ([node.module] if node.module else []))
                names = [target] + [f"{target}.{a.name}" for a in node.names]
                for name in names:
                    f = _module_file(name)
                    if f is not None:
                        todo.append((name if f.name == "__init__.py" else name.rpartition(".")[0], f))
    return {m for m in external if m not in sys.stdlib_module_names and m != "__future__"}


def test_requirements_txt_equals_pyproject_dependencies():
    lines = [ln.strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln and not ln.startswith("#")]
    assert sorted(map(str, reqs)) == sorted(map(str, _runtime_requirements()))


def test_runtime_dependencies_are_exactly_what_the_nodes_import():
    dists = importlib.metadata.packages_distributions()
    needed = set()
    for mod in _node_imports() - COMFY_PROVIDED:
        assert mod in dists, f"the nodes import {mod!r}, which no installed distribution provides"
        needed |= {d.lower().replace("_", "-") for d in dists[mod]}
    listed = {r.name.lower().replace("_", "-") for r in _runtime_requirements()}
    assert needed == listed, f"imported but not listed: {needed - listed}; listed but not imported: {listed - needed}"
    assert not listed & {"torch", "comfy-cli"}, "torch comes with ComfyUI; comfy-cli is a tool (test extra)"


@pytest.mark.slow
def test_comfy_node_pack_leaves_out_tests_and_bench(tmp_path):
    comfy = shutil.which("comfy") or str(Path(sys.executable).with_name("comfy"))
    if not os.path.isfile(comfy):
        pytest.fail("comfy-cli is not installed: it is in the [test] extra (pip install -e '.[test]')", pytrace=False)
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    work = tmp_path / "pack"
    for f in files:
        if (REPO / f).is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, work / f)
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run(["git", "add", "-A"], cwd=work, check=True)
    env = dict(os.environ, HOME=str(tmp_path / "home"))
    r = subprocess.run(
        [comfy, "--skip-prompt", "--no-enable-telemetry", "node", "pack"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    names = zipfile.ZipFile(work / "node.zip").namelist()
    tops = {n.split("/")[0] for n in names}
    assert {"__init__.py", "nodes", "xsr_core", "web", "pyproject.toml", "requirements.txt", "LICENSE"} <= tops
    assert {"example_workflows", "workflows"} <= tops
    assert not tops & {"tests", "bench", "scripts", ".ci"}, sorted(tops)
    assert not any(n.endswith((".pyc", ".safetensors")) for n in names)


def test_zoo_command_tells_that_the_tiny_models_need_the_test_support_node(tmp_path, capsys):
    from xsr_core.testing.zoo import main

    assert main(["--out", str(tmp_path / "models"), "--no-diffusers"]) == 0
    out = capsys.readouterr().out
    assert "tests/comfy/support/xsr_test_support" in out and "custom_nodes" in out
