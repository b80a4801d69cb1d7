"""Shared test fixtures: the tiny model zoo (generated once per session, never committed) and the
ComfyUI test matrix.

Every test that uses ``comfy_dir`` or the live ``comfy`` server runs once per ComfyUI of the matrix
(``$XSR_COMFYUI_MATRIX``, written by scripts/setup.sh: ComfyUI 0.3.75 and 0.33.0; without it the one
ComfyUI of ``$COMFYUI_PATH``), with the version in its test id: ``test_x[comfyui-0.33.0]``. pytest
groups the tests by that session-scoped parameter, so one server runs at a time.
``--comfyui VERSION`` (repeatable) keeps only the given versions.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xsr_core.comfy_server import ComfyError, ComfyServer, comfyui_matrix, prepare_base_dir

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core box: intra-op threads oversubscribe and run several times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_addoption(parser):
    parser.addoption(
        "--comfyui",
        action="append",
        default=[],
        metavar="VERSION",
        help="run the ComfyUI tests only on this version of the test matrix (repeatable)",
    )


def _matrix(config):
    if not hasattr(config, "_xsr_matrix"):
        try:
            matrix = comfyui_matrix(repo_root=REPO)
        except ComfyError as e:
            config._xsr_matrix = e
            return e
        wanted = config.getoption("--comfyui")
        if wanted:
            unknown = set(wanted) - {m.version for m in matrix}
            if unknown:
                raise pytest.UsageError(
                    f"--comfyui {', '.join(sorted(unknown))}: not in the test matrix "
                    f"({', '.join(m.version for m in matrix)})"
                )
            matrix = [m for m in matrix if m.version in wanted]
        config._xsr_matrix = matrix
    return config._xsr_matrix


def pytest_report_header(config):
    matrix = _matrix(config)
    if isinstance(matrix, ComfyError):
        return [f"ComfyUI: none ({matrix})"]
    return [
        "ComfyUI test matrix: "
        + "; ".join(
            f"{m.version} at {m.path}" + (f" (+{', '.join(m.pythonpath)})" if m.pythonpath else "") for m in matrix
        )
    ]


def pytest_generate_tests(metafunc):
    if "comfy_install" in metafunc.fixturenames:
        matrix = _matrix(metafunc.config)
        if isinstance(matrix, ComfyError):
            matrix = [pytest.param(matrix, id="comfyui-missing")]  # fails in the fixture, with the fix
        else:
            matrix = [pytest.param(m, id=f"comfyui-{m.version}") for m in matrix]
        metafunc.parametrize("comfy_install", matrix, indirect=True, scope="session")


@pytest.fixture(scope="session")
def comfy_install(request):
    """One ComfyUI of the test matrix (a ``ComfyInstall``); tests using it run once per version."""
    if isinstance(request.param, ComfyError):
        pytest.fail(str(request.param), pytrace=False)
    return request.param


@pytest.fixture(scope="session")
def comfy_version(comfy_install) -> str:
    return comfy_install.version


@pytest.fixture(scope="session")
def comfy_dir(comfy_install) -> Path:
    return comfy_install.path


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> dict[str, Path]:
    """The tiny zoo in a ComfyUI models/ layout (name -> path; 'root' is the models folder).

    CLIP's tokenizer files for the diffusers copy come from ComfyUI's sd1_tokenizer when a ComfyUI
    is around (unit tests do not need it).
    """
    from xsr_core.comfy_server import find_comfyui
    from xsr_core.testing.zoo import write_zoo

    try:
        tok = find_comfyui(REPO) / "comfy" / "sd1_tokenizer"
    except ComfyError:
        tok = None
    root = tmp_path_factory.mktemp("models")
    paths = write_zoo(root, seed=0, clip_tokenizer_dir=tok)
    paths["root"] = root
    return paths


# --- live ComfyUI server (shared by tests/comfy and tests/browser) --------------------------------
SUPPORT = REPO / "tests" / "comfy" / "support" / "xsr_test_support"


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, comfy_install, tiny_zoo):
    """A running ComfyUI server (one per ComfyUI version of the matrix); stopped by PID at the end,
    its log copied to out/ when it holds a traceback."""
    base = prepare_base_dir(tmp_path_factory.mktemp(f"comfy_base_{comfy_install.version}"), REPO, extra_nodes=[SUPPORT])
    models = base / "models"

    # real per-server folders holding hard links of the zoo's files: what a server writes (a DB built by a
    # node, ...) stays in its own base, so the next ComfyUI of the matrix starts from the same zoo; hard
    # links (not symlinks) because XSR refuses model files that resolve outside their models folder
    def _link(src: Path, dst: Path) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for entry in Path(tiny_zoo["root"]).iterdir():
        dst = models / entry.name
        if entry.is_dir():
            dst.mkdir(exist_ok=True)
            for child in entry.iterdir():
                if not (dst / child.name).exists():
                    if child.is_dir():
                        shutil.copytree(child, dst / child.name, copy_function=_link)
                    else:
                        _link(child, dst / child.name)
        elif not dst.exists():
            _link(entry, dst)
    server = ComfyServer(comfy_dir=comfy_install.path, base_dir=base, pythonpath=comfy_install.pythonpath)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        log = server.log_text()
        if "Traceback" in log:
            (REPO / "out").mkdir(exist_ok=True)
            shutil.copy(server.log_path, REPO / "out" / f"comfyui-{comfy_install.version}-{server.log_path.name}")


@pytest.fixture
def write_png(tmp_path):
    """write_png(array HxWxC uint8 or (w,h,mode), name) -> path of a PNG in tmp."""

    def _write(spec, name="img.png"):
        if isinstance(spec, tuple):
            w, h, mode = spec
            rng = np.random.default_rng(0)
            arr = rng.integers(0, 256, (h, w, len(mode) if mode != "L" else 1), dtype=np.uint8)
            img = Image.fromarray(arr.squeeze(-1) if mode == "L" else arr, mode)
        else:
            img = Image.fromarray(spec)
        p = tmp_path / name
        img.save(p)
        return p

    return _write
