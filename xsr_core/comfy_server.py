"""Run a real ComfyUI headless and talk to it over HTTP (no ComfyUI import: a separate process).

Used by the live-server tests, the README's demo job and ``xsr eval run``. The server is started
from a ComfyUI folder with ``--base-directory`` pointing at a folder that holds ``custom_nodes/``,
``models/``, ``input/``, ``output/``, ``temp/`` and ``user/``; it is always stopped by its own PID
(its whole process group), and every failure message carries the tail of the server log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class ComfyError(RuntimeError):
    """A ComfyUI server or prompt failure; the message includes the relevant log/error text."""


def _detach_and_die_with_parent() -> None:
    """In the server child: own process group (stopped as a group), and SIGKILL when the parent dies
    (Linux prctl PR_SET_PDEATHSIG), so a killed test or batch run never leaves a server behind."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_comfyui(repo_root: str | Path | None = None) -> Path:
    """The ComfyUI folder: ``$COMFYUI_PATH``, else the ComfyUI whose ``custom_nodes/`` holds this pack,
    else the one ``scripts/setup.sh`` recorded in the venv."""
    env = os.environ.get("COMFYUI_PATH")
    candidates = [Path(env)] if env else []
    root = Path(repo_root) if repo_root else Path(__file__).resolve().parents[1]
    for pack in (root, root.resolve()):  # a custom_nodes install (a clone or a symlink into it)
        if pack.parent.name == "custom_nodes":
            candidates.append(pack.parent.parent)
    recorded = root / ".venv" / "comfyui_path"
    if recorded.is_file():
        candidates.append(Path(recorded.read_text().strip()))
    candidates.append(root / ".comfyui" / "ComfyUI")
    for c in candidates:
        if (c / "main.py").is_file() and (c / "nodes.py").is_file():
            return c
    raise ComfyError(
        "No ComfyUI found: set COMFYUI_PATH to a ComfyUI folder or run scripts/setup.sh "
        f"(looked in: {', '.join(str(c) for c in candidates)})"
    )


def comfyui_version(comfy_dir: str | Path) -> str:
    """The ``__version__`` in a ComfyUI folder's ``comfyui_version.py`` ("unknown" when absent)."""
    f = Path(comfy_dir) / "comfyui_version.py"
    text = f.read_text() if f.is_file() else ""
    m = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
    return m.group(1) if m else "unknown"


@dataclass(frozen=True)
class ComfyInstall:
    """One ComfyUI of the test matrix: its folder, version and the extra import path its server needs.

    ``pythonpath`` holds folders put in front of the venv for that server only (scripts/setup.sh installs
    each ComfyUI's pinned frontend/templates/docs packages there, so one venv serves several versions).
    """

    version: str
    path: Path
    pythonpath: tuple[str, ...] = ()


def comfyui_matrix(matrix_file: str | Path | None = None, repo_root: str | Path | None = None) -> list[ComfyInstall]:
    """The ComfyUIs to test against.

    ``matrix_file`` (or ``$XSR_COMFYUI_MATRIX``), a JSON list of ``{"version", "path", "pythonpath"}``
    written by scripts/setup.sh, when given; else the single ComfyUI of :func:`find_comfyui`
    (``$COMFYUI_PATH`` or the one recorded by setup). A listed folder that is not a ComfyUI raises.
    """
    matrix_file = matrix_file or os.environ.get("XSR_COMFYUI_MATRIX")
    if not matrix_file:
        comfy = find_comfyui(repo_root)
        return [ComfyInstall(comfyui_version(comfy), comfy)]
    try:
        entries = json.loads(Path(matrix_file).read_text())
    except (OSError, ValueError) as e:
        raise ComfyError(f"cannot read the ComfyUI test matrix {matrix_file}: {e} (re-run scripts/setup.sh)") from None
    out = []
    for e in entries:
        path = Path(e["path"])
        if not ((path / "main.py").is_file() and (path / "nodes.py").is_file()):
            raise ComfyError(
                f"{matrix_file}: {path} (ComfyUI {e.get('version')}) is not a ComfyUI folder; re-run scripts/setup.sh"
            )
        out.append(ComfyInstall(e.get("version") or comfyui_version(path), path, tuple(e.get("pythonpath", ()))))
    return out


def prepare_base_dir(base: str | Path, pack_dir: str | Path | None = None, extra_nodes: list[str | Path] = ()) -> Path:
    """Create a ComfyUI base directory with this pack (symlinked) in ``custom_nodes/``."""
    base = Path(base)
    for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    pack = Path(pack_dir) if pack_dir else Path(__file__).resolve().parents[1]
    link = base / "custom_nodes" / "comfyui-xsr"
    if not link.exists():
        link.symlink_to(pack, target_is_directory=True)
    for extra in extra_nodes:
        extra = Path(extra)
        dst = base / "custom_nodes" / extra.name
        if not dst.exists():
            dst.symlink_to(extra.resolve(), target_is_directory=True)
    return base


@dataclass
class ComfyServer:
    """A ComfyUI process on 127.0.0.1; use as a context manager or call start()/stop()."""

    comfy_dir: Path
    base_dir: Path
    port: int = 0
    python: str = sys.executable
    extra_args: list[str] = field(default_factory=list)
    # folders put in front of PYTHONPATH for this server (a ComfyUI version's own frontend packages)
    pythonpath: tuple[str, ...] = ()
    # False: run on the GPU with the given extra_args (bench/); True: --cpu (tests, demo)
    cpu: bool = True
    startup_timeout: float = 180.0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def version(self) -> str:
        return comfyui_version(self.comfy_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ComfyServer":
        if not self.port:
            self.port = free_port()
        self.log_path = Path(self.base_dir) / f"comfyui-{self.port}.log"
        log = open(self.log_path, "w")
        cmd = [
            self.python,
            "main.py",
            *(["--cpu"] if self.cpu else []),
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-auto-launch",
            "--disable-api-nodes",
            "--base-directory",
            str(self.base_dir),
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join([*map(str, self.pythonpath), *filter(None, [env.get("PYTHONPATH")])])
        logger.info("starting ComfyUI: %s", " ".join(cmd))
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.comfy_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_detach_and_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited during startup (code {self.proc.returncode}):\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_tail(self, n: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # ---- HTTP -----------------------------------------------------------------------------
    def _request(self, path: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 60) -> bytes:
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()

    def get_json(self, path: str, timeout: float = 60) -> Any:
        return json.loads(self._request(path, timeout=timeout))

    def post_json(self, path: str, payload: Any, timeout: float = 60) -> Any:
        body = json.dumps(payload).encode()
        try:
            return json.loads(self._request(path, body, {"Content-Type": "application/json"}, timeout) or b"null")
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise ComfyError(f"POST {path} -> HTTP {e.code}: {detail}") from None

    def object_info(self, node: str | None = None) -> dict:
        return self.get_json("/object_info" + (f"/{node}" if node else ""))

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """Queue an API-format prompt; returns its prompt_id (validation errors raise ComfyError)."""
        res = self.post_json("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        if res.get("node_errors"):
            raise ComfyError(f"prompt rejected: {json.dumps(res['node_errors'])[:2000]}")
        return res["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Poll /history until the prompt finished; returns its history entry (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            hist = self.get_json(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.25)
        raise ComfyError(f"prompt {prompt_id} did not finish in {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue and wait; raises ComfyError with the node's message if execution failed."""
        entry = self.wait(self.queue(prompt), timeout)
        err = execution_error(entry)
        if err is not None:
            raise ComfyError(
                f"node {err.get('node_type')} ({err.get('node_id')}) failed: "
                f"{err.get('exception_message', '').strip()}\n--- server log ---\n{self.log_tail(40)}"
            )
        return entry

    def view(self, image: dict) -> bytes:
        q = urllib.parse.urlencode(
            {
                "filename": image["filename"],
                "subfolder": image.get("subfolder", ""),
                "type": image.get("type", "output"),
            }
        )
        return self._request(f"/view?{q}")

    def output_images(self, entry: dict, node_id: str | None = None) -> list[bytes]:
        imgs = []
        for nid, out in entry.get("outputs", {}).items():
            if node_id is None or nid == str(node_id):
                imgs += [self.view(i) for i in out.get("images", [])]
        return imgs

    def upload_image(
        self, path: str | Path, name: str | None = None, overwrite: bool = True, subfolder: str = ""
    ) -> str:
        """Upload a file to ComfyUI's input folder (or a subfolder of it); returns the name LoadImage takes."""
        path = Path(path)
        boundary = uuid.uuid4().hex
        name = name or path.name
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + path.read_bytes()
            + b"\r\n",
            f'--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\n'
            f"{str(overwrite).lower()}\r\n".encode(),
            f'--{boundary}\r\nContent-Disposition: form-data; name="subfolder"\r\n\r\n{subfolder}\r\n'.encode(),
            f"--{boundary}--\r\n".encode(),
        ]
        res = json.loads(
            self._request(
                "/upload/image", b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}
            )
        )
        return (res.get("subfolder") + "/" if res.get("subfolder") else "") + res["name"]

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})


def execution_error(entry: dict) -> dict | None:
    """The ``execution_error`` message of a history entry, or None when it ran."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None
