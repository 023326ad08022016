"""Offline speech synthesis with eSpeak NG, driven through ctypes.

The PyPI package ``espeakng-loader`` ships the eSpeak NG shared library and its voice data; no
system installation is needed. The library is initialised once per process in synchronous mode
and returns 16-bit PCM at 22,050 Hz through a callback.

eSpeak NG keeps state from one utterance to the next (e.g. the phase of its pitch flutter), so
the same request gives slightly different samples depending on what was said before in the
process. :func:`synthesize_many` therefore runs a whole list of requests in a fresh process:
the same list always gives the same samples.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from benchmark.errors import UsageError

SAMPLE_RATE = 22050

# espeak_AUDIO_OUTPUT / espeak_PARAMETER / espeak_POSITION_TYPE values of speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4
_POS_CHARACTER = 1
_CHARS_UTF8 = 1

# English accents shipped with eSpeak NG, and voice variants (speaker characteristics).
LANGUAGES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
             "en-029", "en-us-nyc")
VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "croak",
            "klatt", "klatt2", "klatt3", "whisper", "Andy", "Denis", "edward", "iven", "linda",
            "steph", "quincy", "robert")

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Engine:
    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError:
            raise UsageError("av-digits needs the package espeakng-loader; pip install espeakng-loader") from None
        try:
            lib = ctypes.CDLL(espeakng_loader.get_library_path())
            data = espeakng_loader.get_data_path()
        except (OSError, RuntimeError) as exc:
            raise UsageError(f"cannot load eSpeak NG from espeakng-loader ({exc}); reinstall espeakng-loader") \
                from None
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), 0)
        if rate != SAMPLE_RATE:
            raise UsageError(f"eSpeak NG did not initialise (returned {rate}); reinstall espeakng-loader")
        self.lib = lib
        self.chunks: list[np.ndarray] = []

        def collect(wav: ctypes.POINTER(ctypes.c_short), n: int, events: ctypes.c_void_p) -> int:
            if n > 0 and wav:
                self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._callback = _CALLBACK(collect)  # kept referenced while the library may call it
        lib.espeak_SetSynthCallback(self._callback)

    def say(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> np.ndarray:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise UsageError(f"eSpeak NG has no voice {voice!r}; choose one of its languages[+variant]")
        self.lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
        self.lib.espeak_SetParameter(_PARAM_RANGE, int(pitch_range), 0)
        self.lib.espeak_SetParameter(_PARAM_VOLUME, 100, 0)
        self.chunks = []
        buf = text.encode() + b"\0"
        status = self.lib.espeak_Synth(buf, len(buf), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != 0:
            raise RuntimeError(f"eSpeak NG synthesis failed with status {status}")
        self.lib.espeak_Synchronize()
        if not self.chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(self.chunks)


_engine: _Engine | None = None
_lock = threading.Lock()


def synthesize(text: str, voice: str = "en", rate: int = 175, pitch: int = 50,
               pitch_range: int = 50) -> np.ndarray:
    """``text`` spoken by eSpeak NG ``voice`` ("language" or "language+variant"): float32 in
    [-1, 1] at :data:`SAMPLE_RATE`. ``rate`` is in words per minute, ``pitch`` and
    ``pitch_range`` in 0-100."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = _Engine()
        pcm = _engine.say(text, voice, rate, pitch, pitch_range)
    return pcm.astype(np.float32) / 32768.0


def voice_name(language: str, variant: str) -> str:
    return f"{language}+{variant}" if variant else language


def synthesize_many(requests: list[tuple[str, str, int, int, int]]) -> list[np.ndarray]:
    """:func:`synthesize` for each (text, voice, rate, pitch, pitch_range), run in a fresh Python
    process (which imports only this module) so that the result depends on the list only."""
    package_root = str(Path(__file__).resolve().parents[2])
    runner = "import runpy, sys; sys.path.insert(0, sys.argv[1]); runpy.run_path(sys.argv[2], run_name='__main__')"
    with tempfile.TemporaryDirectory(prefix="bmb-espeak-") as tmp:
        out = Path(tmp) / "speech.npz"
        proc = subprocess.run([sys.executable, "-c", runner, package_root, str(Path(__file__).resolve()), str(out)],
                              input=json.dumps([list(r) for r in requests]), capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise UsageError(f"eSpeak NG synthesis failed ({last}); check that espeakng-loader is installed")
        with np.load(out) as saved:
            samples, lengths = saved["samples"], saved["lengths"]
    return np.split(samples, np.cumsum(lengths)[:-1])


def _worker(out: str) -> None:
    requests = json.load(sys.stdin)
    synthesize("")  # initialise, then fix the seeds of the noise sources (eSpeak seeds libc's rand by the clock)
    assert _engine is not None
    try:
        ctypes.CDLL(None).srand(12345)
    except (OSError, AttributeError):  # no process-wide libc handle (Windows): eSpeak's own seed only
        pass
    if hasattr(_engine.lib, "espeak_ng_SetRandSeed"):
        _engine.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        _engine.lib.espeak_ng_SetRandSeed(12345)
    waves = [synthesize(text, voice, int(rate), int(pitch), int(span)) for text, voice, rate, pitch, span in requests]
    np.savez(out, samples=np.concatenate(waves) if waves else np.zeros(0, np.float32),
             lengths=np.array([len(w) for w in waves], dtype=np.int64))


if __name__ == "__main__":
    _worker(sys.argv[-1])
