"""Loader nodes: XSR_LoadModels (RFA + I2T weights) and XSR_LoadReferenceDB."""

from __future__ import annotations

import logging
import os
import threading

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..xsr_core.models.i2t import load_i2t
from ..xsr_core.models.rfa import RFA
from ..xsr_core.refdb import RefDBError, ReferenceDB, db_signature
from ..xsr_core.paths import PathConfinementError, confine, env_roots
from ..xsr_core.weights import (
    XSRWeightsError,
    check_against_header,
    check_config_values,
    config_from_dict,
    describe,
    load_model,
    registered_classes,
)
from .common import (
    REFDB_FOLDER,
    LoadedXSR,
    WholeModelPatcher,
    XSRModels,
    XSRRefDB,
    choice_input,
    refdb_names,
    xsr_file_input,
    xsr_file_path,
    xsr_files,
    xsr_schema,
)
from .validation import check_folder_name, collect, folder_roots, schema_problems, verdict

logger = logging.getLogger(__name__)


def _patcher(module):
    """A ModelPatcher for an XSR stage-1 model, in fp16 where ComfyUI would run fp16 on the load device.

    fp16 halves what the RFA and I2T keep resident during sampling (their nodes cast inputs to the
    weights' dtype); ComfyUI's model management then loads / frees them like any other model.
    """
    device = comfy.model_management.get_torch_device()
    if comfy.model_management.should_use_fp16(device, prioritize_performance=False):
        module = module.half()
    return WholeModelPatcher(
        module,
        load_device=device,
        offload_device=comfy.model_management.unet_offload_device(),
    )


# which stage-1 models each XSR_OFFLOAD policy hands back to ComfyUI's offload device once their node is done
OFFLOADED = {"none": (), "rfa": ("rfa",), "stage1": ("rfa", "i2t")}
OFFLOAD_POLICIES = tuple(OFFLOADED)
DEFAULT_OFFLOAD = "rfa"


def offload_policy() -> str:
    """``XSR_OFFLOAD`` of the server's environment (read per call). ``rfa`` (default) hands the RFA (101 MiB) back
    to ComfyUI's offload device once XSR_Retrieve has its query, so it is not resident while the sampler and
    the VAE run; it is loaded again for the next image from its pinned host copy (``WholeModelPatcher``).
    ``stage1`` also hands back the I2T (211 MiB) once XSR_Enhance has its output (its reload also recaptures the
    caption decode's CUDA graph). ``none`` keeps both loaded until ComfyUI's model management needs the room
    (it evicts them like any model). Time for VRAM, measured side by side by bench/bench_fixed_cost.py and
    bench/bench_e2e.py --offload-check (figures in bench/README.md)."""
    value = (os.environ.get("XSR_OFFLOAD") or DEFAULT_OFFLOAD).strip().lower()
    if value not in OFFLOADED:
        logger.warning("XSR_OFFLOAD=%r is not one of %s; using %r", value, OFFLOAD_POLICIES, DEFAULT_OFFLOAD)
        return DEFAULT_OFFLOAD
    return value


def offload_after_use(patcher, which: str) -> bool:
    """Unload the stage-1 model ``which`` (``"rfa"`` or ``"i2t"``; its ModelPatcher) from the GPU through ComfyUI's
    model management, as ``comfy.model_management.free_memory`` does for the models it evicts, when ``XSR_OFFLOAD``
    asks for it. Returns True when it was unloaded. Nothing happens on the CPU, for a model ComfyUI does not hold,
    or for one under ComfyUI's Dynamic VRAM (0.33+: its weights are streamed on demand already)."""
    if which not in OFFLOADED[offload_policy()] or patcher.load_device.type == "cpu":
        return False
    if getattr(patcher, "is_dynamic", lambda: False)():
        return False
    models = comfy.model_management.current_loaded_models
    for i, loaded in enumerate(models):
        if loaded.model is patcher:
            if loaded.model_unload():
                models.pop(i)
                return True
            return False
    return False


class XSRLoadModels(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = xsr_files()
        return xsr_schema(
            "XSR_LoadModels",
            "XSR Load Models (RFA + I2T)",
            "Loads the XSR stage-1 weights from models/xsr: the Reference-Finding Aligner and the "
            "I2T embedding enhancer with its distilled GPT-2 caption decoder (tokenizer inside the file).",
            inputs=[
                xsr_file_input(
                    "rfa_name",
                    "rfa.safetensors",
                    "RFA weights (.safetensors in models/xsr): predicts the HR CLIP embedding used for retrieval",
                    files,
                ),
                xsr_file_input(
                    "i2t_name",
                    "i2t.safetensors",
                    "I2T weights (.safetensors in models/xsr): embedding enhancer + caption decoder",
                    files,
                ),
            ],
            outputs=[XSRModels.Output("xsr_models", display_name="xsr_models")],
        )

    @classmethod
    def validate_inputs(cls, **kw) -> bool | str:
        problems = schema_problems(cls, kw, skip=("rfa_name", "i2t_name"))
        for input_name, want in (("rfa_name", "RFA"), ("i2t_name", "I2T")):
            if kw.get(input_name) is not None:
                collect(problems, check_weights_file, "XSR_LoadModels", input_name, kw[input_name], want)
        return verdict(problems)

    @classmethod
    def execute(cls, rfa_name: str, i2t_name: str) -> io.NodeOutput:
        rfa_path = xsr_file_path("XSR_LoadModels", "rfa_name", rfa_name)
        i2t_path = xsr_file_path("XSR_LoadModels", "i2t_name", i2t_name)
        try:
            rfa = load_model(rfa_path, expected=RFA)
            i2t, tokenizer = load_i2t(i2t_path)
        except XSRWeightsError as e:
            raise ValueError(f"XSR_LoadModels: {e}") from None
        if rfa.config.clip_dim != i2t.config.clip_dim:
            raise ValueError(
                f"XSR_LoadModels: {rfa_name} was trained on {rfa.config.clip_dim}-d CLIP tokens but {i2t_name} on "
                f"{i2t.config.clip_dim}-d; use an RFA and an I2T trained with the same CLIP vision encoder."
            )
        loaded = LoadedXSR(_patcher(rfa), _patcher(i2t), tokenizer, {"rfa": rfa_name, "i2t": i2t_name})
        return io.NodeOutput(loaded)


def check_weights_file(node: str, input_name: str, name: str, expected: str) -> str:
    """Queue-time check of an XSR weights file from its header only: present, inside models/xsr,
    an XSR file of the ``expected`` class with a sane config. Returns its path; raises ValueError."""
    path = xsr_file_path(node, input_name, name)
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"{node}: {input_name} '{name}' cannot be read ({e.strerror or e})") from None
    key = (path, st.st_mtime_ns, st.st_size, expected)
    if key in _CHECKED_FILES:  # queueing the same graph again re-checks nothing
        return path
    try:
        cls_name, cfg = describe(path)
        if cls_name != expected:
            raise XSRWeightsError(f"{path} holds a {cls_name} model, but a {expected} file is needed here")
        check_config_values(cfg, source=str(path))
        model_cls = registered_classes().get(cls_name)
        if model_cls is None:
            raise XSRWeightsError(
                f"{path}: model class {cls_name!r} is unknown to this XSR version; update the node pack"
            )
        # the declared model, built on the meta device, against the header's tensor shapes (no allocation)
        check_against_header(model_cls, config_from_dict(model_cls.config_class, cfg, source=str(path)), path)
    except (XSRWeightsError, TypeError) as e:
        raise ValueError(f"{node}: {input_name}: {e}") from None
    if len(_CHECKED_FILES) > 256:
        _CHECKED_FILES.clear()
    _CHECKED_FILES.add(key)
    return path


_CHECKED_FILES: set[tuple] = set()  # (path, mtime_ns, size, class) of weight files that passed the check


def node_read_roots() -> list[str]:
    """Where a DB opened by a node may read source images (paths mode): ComfyUI's input and output
    folders, the reference-DB folders, and ``XSR_ALLOWED_ROOTS``."""
    return [
        folder_paths.get_input_directory(),
        folder_paths.get_output_directory(),
        *folder_roots(REFDB_FOLDER),
        *env_roots(),
    ]


_DB_CACHE: dict[str, ReferenceDB] = {}
_DB_LOCK = threading.Lock()


def open_refdb(path: str) -> ReferenceDB:
    """Open (or reuse) a reference DB; reopened only when its files changed on disk."""
    with _DB_LOCK:
        db = _DB_CACHE.get(path)
        if db is not None and not db.is_stale():
            return db
        if db is not None:
            db.close()
        db = ReferenceDB.open(path, allowed_roots=node_read_roots())
        _DB_CACHE[path] = db
        return db


def refdb_path(name: str) -> str:
    """The folder of DB ``name`` in models/xsr_refdb, resolved and confined to those folders."""
    check_folder_name("XSR_LoadReferenceDB", "db_name", name, f"models/{REFDB_FOLDER}")
    for root in folder_paths.get_folder_paths(REFDB_FOLDER):
        p = os.path.join(root, name)
        if os.path.isdir(p):
            try:
                return confine(p, [*folder_roots(REFDB_FOLDER), *env_roots()], what="XSR_LoadReferenceDB: db_name")
            except PathConfinementError as e:
                raise ValueError(str(e)) from None
    raise ValueError(
        f"XSR_LoadReferenceDB: no reference DB '{name}' in models/{REFDB_FOLDER} "
        f"({', '.join(folder_paths.get_folder_paths(REFDB_FOLDER))}); build one with XSR_BuildReferenceDB or "
        "`python -m xsr_core.refdb build`."
    )


class XSRLoadReferenceDB(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return xsr_schema(
            "XSR_LoadReferenceDB",
            "XSR Load Reference DB",
            "Opens a reference database (faiss index + metadata) from models/xsr_refdb. "
            "Cached; reloaded when its files change.",
            inputs=[
                choice_input(
                    "db_name",
                    refdb_names(),
                    None,
                    "a DB folder in models/xsr_refdb (built by XSR_BuildReferenceDB or the CLI)",
                )
            ],
            outputs=[XSRRefDB.Output("refdb", display_name="refdb")],
        )

    @classmethod
    def fingerprint_inputs(cls, db_name: str):
        try:
            return db_signature(refdb_path(db_name))
        except ValueError:
            return db_name

    @classmethod
    def validate_inputs(cls, **kw) -> bool | str:
        problems = schema_problems(cls, kw, skip=("db_name",))
        if kw.get("db_name") is not None:
            path = collect(problems, refdb_path, kw["db_name"])
            if path is not None:
                try:
                    open_refdb(path)  # validated and cached: execution reuses it
                except RefDBError as e:
                    problems.append(f"XSR_LoadReferenceDB: {e}")
        return verdict(problems)

    @classmethod
    def execute(cls, db_name: str) -> io.NodeOutput:
        path = refdb_path(db_name)
        try:
            db = open_refdb(path)
        except RefDBError as e:
            raise ValueError(f"XSR_LoadReferenceDB: {e}") from None
        return io.NodeOutput(db)
