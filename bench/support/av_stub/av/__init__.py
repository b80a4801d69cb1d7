"""BENCH-ONLY stand-in for PyAV (``av``), for bench/bench_vram_modes.py on a machine without the wheel.

ComfyUI 0.33 imports ``av`` at start-up for its video/audio types (comfy_api.latest), and the real
cp312 wheel (~40 MB, bundled FFmpeg) does not fit the device run's transfer limit beside the models'
code. The x16 graph decodes/encodes no video or audio, so this package only has to satisfy imports and
annotations: every attribute is a placeholder class; calling anything video-related raises. Never
install it where video nodes are used. Results written with it say so.
"""


class _Meta(type):
    def __getattr__(cls, name):  # enum members and nested names (ColorTrc.ARIB_STD_B67, ...)
        if name.startswith("__"):
            raise AttributeError(name)
        return _make(f"{cls.__name__}.{name}")


class _Stub(metaclass=_Meta):
    def __init__(self, *a, **k):
        raise RuntimeError("PyAV is stubbed for this benchmark (bench/support/av_stub): no video/audio support")


def _make(name):
    return _Meta(name, (_Stub,), {"__module__": __name__})


_SUBMODULES = {
    "audio",
    "codec",
    "container",
    "error",
    "filter",
    "logging",
    "stream",
    "subtitles",
    "video",
    "frame",
    "resampler",
    "reformatter",
}


def __getattr__(name):
    if name.startswith("__") or name in _SUBMODULES:  # submodules are imported, never stubbed
        raise AttributeError(name)
    cls = _make(name)
    globals()[name] = cls
    return cls


__version__ = "0+xsr.bench.stub"
time_base = 1000000

from . import audio, codec, container, error, filter, logging, stream, subtitles, video  # noqa: E402,F401  (as PyAV does)
from .audio import frame as _af, resampler as _ar, stream as _as  # noqa: E402,F401
from .subtitles import stream as _ss  # noqa: E402,F401
from .video import frame as _vf, reformatter as _vr, stream as _vs  # noqa: E402,F401
