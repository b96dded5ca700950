"""The audio tokenizer stage (``wav2token``): a prompt waveform to Step-Audio's two token streams.

Reference: ``StepAudioTokenizer`` of stepfun-ai/Step-Audio-EditX (docs/model.md §2).

* **Preprocessing** (docs/model.md §2.2): resample to 16 kHz with the shared sinc resampler, energy
  normalisation, and the reference's silence trim (librosa ``effects.trim``, then a fixed
  lead-in and a frame-aligned length).
* **vq02** (§2.3), 16.67 Hz, 1024 codes: the pip ``funasr`` streaming Paraformer encoder
  (``SANMEncoderChunkOpt`` behind ``WavFrontendOnline``) run chunk by chunk exactly as the
  reference's vendored ``infer_encoder`` does, then the nearest k-means centre of
  ``linguistic_tokenizer.npy``. Only the encoder is loaded: the decoder and CIF predictor
  weights of ``model.pt`` are never read.
* **vq06** (§2.4), 25 Hz, 4096 codes: Whisper's 128-bin log-mel (computed here in torch, no
  ``openai-whisper``) fed to ``speech_tokenizer_v1.onnx`` in 30 s pieces.
* **Interleave** (§2.5): groups of 2 vq02 + 3 vq06 codes, LLM ids offset by 65536 (+1024 for
  vq06), and the ``<audio_N>`` string the prompts embed.

Deliberate deviations (documented in the README): the fbank dither defaults to 0 (the
reference's 1.0 makes vq02 random run to run, so uncacheable); inputs below 16 kHz are
resampled up instead of crashing; bad input raises ``audio.AudioError`` instead of asserting.

``wav2token`` always encodes and logs ``[FunASR Encoding] time=…s``; caching is the engine's
(``engine/tts.py`` keeps one record per prompt: tokens, prompt mel and speaker embedding).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import threading
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import librosa
import numpy as np
import torch
import yaml

from audio import TOKENIZER_SR, AudioError, resample, to_mono
from audio_codes import AUDIO_ID_OFFSET, GROUP_SECONDS, VQ02_CODES, VQ02_PER_GROUP, VQ06_PER_GROUP
from errors import ModelLoadError
from model_files import FUNASR_MODEL_ID

logger = logging.getLogger(__name__)

DEFAULT_FUNASR_MODEL_ID = FUNASR_MODEL_ID
VQ02_CODEBOOK_FILE = "linguistic_tokenizer.npy"
VQ06_ONNX_FILE = "speech_tokenizer_v1.onnx"
FUNASR_CONFIG_FILE = "config.yaml"
FUNASR_WEIGHTS_FILE = "model.pt"
FUNASR_CMVN_FILE = "am.mvn"

# --- token ids (§2.5) ------------------------------------------------------------------------

# --- preprocessing (§2.2) --------------------------------------------------------------------
ENERGY_NORM_FLOOR = 0.01  # peaks below this are not scaled up to full range
ENERGY_NORM_PEAK = 0.999
TRIM_TOP_DB = 20
TRIM_FRAME_LENGTH = 512
TRIM_HOP_LENGTH = 128
TRIM_HOP_SIZE = 240  # the kept span is a whole number of 15 ms frames
TRIM_KEEP_LEFT = int(0.05 * TOKENIZER_SR)  # 800 samples of lead-in before the speech
TRIM_KEEP_TOTAL = int((0.05 + 0.22) * TOKENIZER_SR)  # 4320: lead-in + 220 ms tail

# --- input checks (ours; the reference asserts or crashes instead) ---------------------------
SILENCE_PEAK = 1e-3  # -60 dBFS: a prompt whose loudest sample is below this is silence
MIN_PROMPT_SECONDS = GROUP_SECONDS  # shorter input cannot hold one token group

# --- vq02: streaming Paraformer encoder (§2.3) -------------------------------------------------
VQ02_CHUNK_SIZE = (0, 4, 5)  # (left pad, new LFR frames per chunk, overlap frames)
VQ02_ENCODER_LOOK_BACK = 4  # chunks of K/V cache each SAN-M layer attends to
SAMPLES_PER_LFR_FRAME = 960  # 6 fbank frames x 10 ms at 16 kHz
VQ02_CHUNK_SAMPLES = VQ02_CHUNK_SIZE[1] * SAMPLES_PER_LFR_FRAME  # 3840 = 240 ms
VQ02_MIN_FINAL_SAMPLES = 480  # a final chunk this short yields no frame; the reference skips it

# --- vq06: Whisper log-mel + S3 tokenizer (§2.4) -----------------------------------------------
N_FFT = 400
HOP_LENGTH = 160  # 10 ms
N_MELS = 128
VQ06_PIECE_SAMPLES = 30 * TOKENIZER_SR  # 480000: the S3 encoder's 30 s window
VQ06_MIN_PIECE_SAMPLES = 480  # shorter trailing pieces are dropped, as the reference does

# --- fingerprint -------------------------------------------------------------------------------
TOKENS_FORMAT_VERSION = 1  # bump when anything here changes which tokens a prompt gets


# ==============================================================================================
# Tokens
# ==============================================================================================


@dataclass(frozen=True)
class AudioTokens:
    """The raw codes of both streams; every other form is derived from them.

    ``vq02``: int64 ``(n02,)`` in [0, 1024); ``vq06``: int64 ``(n06,)`` in [0, 4096).
    Streams keep their full length; groups use the common prefix (extra codes are dropped).
    """

    vq02: np.ndarray
    vq06: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "vq02", np.asarray(self.vq02, dtype=np.int64).reshape(-1))
        object.__setattr__(self, "vq06", np.asarray(self.vq06, dtype=np.int64).reshape(-1))

    @property
    def n_groups(self) -> int:
        """Whole 2 + 3 groups: ``min(len(vq02) // 2, len(vq06) // 3)``."""
        return min(len(self.vq02) // VQ02_PER_GROUP, len(self.vq06) // VQ06_PER_GROUP)

    @property
    def prompt_codes(self) -> np.ndarray:
        """Interleaved mixed codes ``(5 * n_groups,)``: vq02 as is, vq06 + 1024 (the flow's prompt tokens)."""
        g = self.n_groups
        vq02 = self.vq02[: g * VQ02_PER_GROUP].reshape(g, VQ02_PER_GROUP)
        vq06 = self.vq06[: g * VQ06_PER_GROUP].reshape(g, VQ06_PER_GROUP) + VQ02_CODES
        return np.concatenate([vq02, vq06], axis=1).reshape(-1)

    @property
    def speech_ids(self) -> np.ndarray:
        """The LLM ids ``(5 * n_groups,)``: ``prompt_codes + 65536``."""
        return self.prompt_codes + AUDIO_ID_OFFSET

    @property
    def token_str(self) -> str:
        """``"<audio_N>..."`` with N = the mixed code; the form prompts embed."""
        return "".join(f"<audio_{int(c)}>" for c in self.prompt_codes)


# ==============================================================================================
# Preprocessing
# ==============================================================================================


def energy_norm(wav: torch.Tensor) -> torch.Tensor:
    """Scale so the peak is 0.999, but never by more than 0.999 / 0.01 (the reference's rule)."""
    return wav / torch.clamp(wav.abs().max(), min=ENERGY_NORM_FLOOR) * ENERGY_NORM_PEAK


def trim_silence(wav: np.ndarray) -> np.ndarray:
    """The reference's trim of 16 kHz audio ``(n,)``: 50 ms before the speech, 220 ms after.

    The speech span ``[s, e)`` is librosa's (frames within 20 dB of the loudest); the output
    starts 800 samples before ``s`` (zero-padded when the span starts earlier) and is
    ``ceil((e - s) / 240) * 240 + 4320`` samples long (truncated or zero-padded).
    """
    _, (start, end) = librosa.effects.trim(
        wav, top_db=TRIM_TOP_DB, frame_length=TRIM_FRAME_LENGTH, hop_length=TRIM_HOP_LENGTH
    )
    n_frames = math.ceil((end - start) / TRIM_HOP_SIZE)
    first = start - TRIM_KEEP_LEFT
    out = wav[first:] if first > 0 else np.pad(wav, (-first, 0))
    out_len = n_frames * TRIM_HOP_SIZE + TRIM_KEEP_TOTAL
    return out[:out_len] if len(out) >= out_len else np.pad(out, (0, out_len - len(out)))


def _warm_up_trim() -> None:
    """librosa's trim JIT-compiles on first use (~4 s): pay that at load, not on a request."""
    trim_silence(np.zeros(TRIM_FRAME_LENGTH * 2, dtype=np.float32))


def preprocess_wav(wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Prompt ``(1, n)`` at ``sample_rate`` to the tokenizers' input ``(1, m)`` at 16 kHz."""
    x = energy_norm(resample(wav.to(torch.float32), sample_rate, TOKENIZER_SR))
    trimmed = trim_silence(x[0].cpu().numpy())
    return torch.from_numpy(np.ascontiguousarray(trimmed, dtype=np.float32))[None]


def check_prompt(wav: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Validate a prompt and return it as a CPU float32 ``(1, n)`` tensor.

    Raises ``AudioError`` for a bad rate, no samples, NaN/inf, audio shorter than one token
    group (120 ms), or silence (peak below -60 dBFS, ``SILENCE_PEAK``; the reference would
    tokenise amplified noise floor).
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer) or sample_rate <= 0:
        raise AudioError(f"invalid sample rate {sample_rate!r}", param="sample_rate")
    x = to_mono(wav.detach().cpu() if isinstance(wav, torch.Tensor) else wav)
    if x.numel() == 0:
        raise AudioError("the audio is empty (no samples)")
    if not torch.isfinite(x).all():
        raise AudioError("the audio holds non-finite samples (NaN or infinity)")
    seconds = x.shape[-1] / sample_rate
    if seconds < MIN_PROMPT_SECONDS:
        raise AudioError(
            f"the audio is too short ({seconds * 1000:.0f} ms); at least "
            f"{MIN_PROMPT_SECONDS * 1000:.0f} ms (one token group) is needed"
        )
    peak = float(x.abs().max())
    if peak < SILENCE_PEAK:
        raise AudioError(f"the audio is silent (peak {peak:.2e}, below {SILENCE_PEAK:g} = -60 dBFS)")
    return x


# ==============================================================================================
# vq06: Whisper log-mel + S3 tokenizer ONNX
# ==============================================================================================


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = N_MELS) -> torch.Tensor:
    """Slaney mel filterbank ``(n_mels, 201)``; equal to openai-whisper's ``mel_filters.npz``."""
    return torch.from_numpy(librosa.filters.mel(sr=TOKENIZER_SR, n_fft=N_FFT, n_mels=n_mels))


def log_mel_spectrogram(audio: torch.Tensor, n_mels: int = N_MELS) -> torch.Tensor:
    """Whisper's log-mel of 16 kHz audio ``(n,)`` -> ``(n_mels, n // 160)``.

    Centred reflect-padded STFT (Hann 400, hop 160), power with the last frame dropped,
    log10 clamped at 1e-10, floored at max - 8, then ``(x + 4) / 4``.
    """
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = mel_filters(n_mels).to(audio.device) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


class S3Tokenizer:
    """``speech_tokenizer_v1.onnx`` (CosyVoice v1 S3 tokenizer) behind onnxruntime.

    Inputs are taken by position: float32 log-mel ``(1, 128, T)`` and int32 ``[T]``; the output
    holds ``ceil(ceil(T / 2) / 2)`` codes (25 Hz). Runs on CUDA when ``device`` is CUDA and the
    CUDA provider is installed, else on CPU with ``threads`` intra-op threads.
    """

    def __init__(self, onnx_path: Path, device: str = "cpu", threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = max(1, int(threads))
        providers: list[Any] = ["CPUExecutionProvider"]
        dev = torch.device(device)
        if dev.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": dev.index or 0}))
        try:
            self.session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelLoadError(f"cannot load {onnx_path}: {exc}") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 2:
            raise ModelLoadError(f"{onnx_path} must take (feats, feats_length); it takes {len(inputs)} inputs")
        self.feats_name, self.length_name = inputs[0].name, inputs[1].name
        self.device = dev

    def __call__(self, audio: torch.Tensor) -> np.ndarray:
        """16 kHz audio ``(n,)`` -> int64 codes; 30 s pieces tokenised independently."""
        return np.concatenate([self.encode_mel(mel) for mel in self.mels(audio)] or [np.zeros(0, np.int64)])

    def mels(self, audio: torch.Tensor) -> list[torch.Tensor]:
        """Log-mel ``(128, T)`` of each 30 s piece; pieces under 480 samples are dropped."""
        audio = audio.to(self.device, torch.float32)
        pieces = torch.split(audio, VQ06_PIECE_SAMPLES)
        return [log_mel_spectrogram(p) for p in pieces if p.numel() >= VQ06_MIN_PIECE_SAMPLES]

    def encode_mel(self, mel: torch.Tensor) -> np.ndarray:
        """One piece's log-mel ``(128, T)`` -> int64 codes ``(ceil(T / 4),)``."""
        feats = mel[None].cpu().numpy()
        length = np.array([feats.shape[2]], dtype=np.int32)
        out = self.session.run(None, {self.feats_name: feats, self.length_name: length})[0]
        return np.asarray(out, dtype=np.int64).reshape(-1)


# ==============================================================================================
# vq02: streaming Paraformer encoder + k-means
# ==============================================================================================


_FUNASR_IMPORT_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def import_funasr() -> None:
    """Import ``funasr`` once, with what it prints and warns kept out of the server's output.

    Importing it prints a notice that ffmpeg is missing and pydub warns the same; both are about
    audio file loading, which we never ask funasr to do (it only gets waveforms), so to an operator
    they are false alarms. They go to this module's debug log instead. Every funasr import in the
    project goes through here, so the first one is always the quiet one.
    """
    with _FUNASR_IMPORT_LOCK:
        # stdout only: stderr must stay the real one, since funasr's first ``logging.debug`` call
        # can make the root logger create its handler (bound to whatever sys.stderr is then).
        out = io.StringIO()
        with contextlib.redirect_stdout(out), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # the package's __init__ registers its classes; load_utils prints the ffmpeg notice
            import funasr.utils.load_utils  # noqa: F401
    noise = [out.getvalue().strip()] if out.getvalue().strip() else []
    noise += [f"{w.category.__name__}: {w.message}" for w in caught]
    if noise:
        logger.debug("funasr import output (silenced): %s", " | ".join(noise))


@dataclass(frozen=True)
class Vq02Encoding:
    """What the streaming encoder saw and produced for one utterance.

    ``hidden``: ``(T, D)`` encoder output (new frames of every chunk, concatenated);
    ``features``: ``(T, 560)`` LFR + CMVN features fed to it; ``chunk_frames``: frames per chunk.
    """

    hidden: torch.Tensor
    features: torch.Tensor
    chunk_frames: list[int]


class ParaformerEncoder:
    """The encoder half of FunASR's ``ParaformerStreaming``, run the way the reference runs it.

    Built from the model folder's ``config.yaml`` with funasr's own registered classes (frontend
    and encoder), so the numerics are funasr's; only the ``encoder.*`` tensors of ``model.pt``
    are read (memory-mapped), the decoder and predictor never leave the disk.
    """

    def __init__(self, model_dir: Path, device: str = "cpu", dither: float = 0.0) -> None:
        import_funasr()
        from funasr.register import tables

        conf = _read_yaml(model_dir / FUNASR_CONFIG_FILE)
        frontend_cls = tables.frontend_classes.get(conf.get("frontend"))
        encoder_cls = tables.encoder_classes.get(conf.get("encoder"))
        if frontend_cls is None or encoder_cls is None:
            raise ModelLoadError(
                f"{model_dir / FUNASR_CONFIG_FILE}: unknown frontend {conf.get('frontend')!r} "
                f"or encoder {conf.get('encoder')!r} for this funasr"
            )
        if conf.get("normalize"):
            raise ModelLoadError(f"{model_dir / FUNASR_CONFIG_FILE}: feature normalize layers are not supported")
        frontend_conf = {**(conf.get("frontend_conf") or {}), "dither": float(dither)}
        frontend_conf["cmvn_file"] = str(model_dir / FUNASR_CMVN_FILE)
        self.frontend = frontend_cls(**frontend_conf)
        self.frontend_conf = frontend_conf
        self.encoder_conf = dict(conf.get("encoder_conf") or {})
        try:
            self.encoder = encoder_cls(input_size=self.frontend.output_size(), **self.encoder_conf)
        except TypeError as exc:
            raise ModelLoadError(f"{model_dir / FUNASR_CONFIG_FILE}: bad encoder_conf ({exc})") from exc
        try:
            self.encoder.load_state_dict(_load_encoder_state(model_dir / FUNASR_WEIGHTS_FILE), strict=True)
        except RuntimeError as exc:  # missing/unexpected keys or shapes that disagree with config.yaml
            raise ModelLoadError(f"{model_dir / FUNASR_WEIGHTS_FILE} does not fit {FUNASR_CONFIG_FILE}: {exc}") from exc
        self.device = torch.device(device)
        self.encoder.to(self.device).eval().requires_grad_(False)
        self.output_size = int(self.encoder.output_size())

    @property
    def dither(self) -> float:
        return float(self.frontend.dither)

    def _new_stream_cache(self) -> dict[str, Any]:
        """The per-utterance state ``SANMEncoderChunkOpt.forward_chunk`` reads and updates.

        Same keys and values as ``ParaformerStreaming.init_cache`` builds for the encoder
        (position counter, overlap frames, per-layer look-back caches under ``opt``).
        """
        feats_dim = self.frontend.output_size()
        overlap = VQ02_CHUNK_SIZE[0] + VQ02_CHUNK_SIZE[2]
        return {
            "encoder": {
                "start_idx": 0,
                "chunk_size": list(VQ02_CHUNK_SIZE),
                "encoder_chunk_look_back": VQ02_ENCODER_LOOK_BACK,
                "last_chunk": False,
                "opt": None,
                "feats": torch.zeros((1, overlap, feats_dim), device=self.device),
                "tail_chunk": False,
            },
        }

    @torch.inference_mode()
    def encode(self, audio: torch.Tensor, *, layer_major: bool = True) -> Vq02Encoding:
        """16 kHz audio ``(n,)`` -> encoder output of every 60 ms frame.

        The reference loop: ``n // 3840 + 1`` chunks of 3840 samples, the last one final; a
        final chunk that is empty or yields no frame (under 480 samples) ends the loop; from
        each chunk's output only the new frames (the last ``frames`` rows) are kept.

        ``layer_major`` (default) runs the same per-chunk computation in another order: all
        chunks through layer 1, then all through layer 2, ... Each layer's streaming state
        (its K/V look-back and nothing else) only depends on that layer's earlier chunks, so
        every operation sees bit-identical inputs and shapes, while each layer's weights are
        read from memory once per utterance instead of once per chunk (the chunk-major loop
        is memory-bound: ~0.6 GB of weights for 9 frames). ``False`` runs funasr's own
        ``forward_chunk`` chunk by chunk (the reference order; the tests compare both).
        """
        features, lens = self.features(audio)
        if not features:
            empty = torch.zeros((0, self.output_size))
            return Vq02Encoding(empty, torch.zeros((0, self.frontend.output_size())), [])
        cache = self._new_stream_cache()
        if layer_major:
            outs = self._encode_layer_major(features, cache)
        else:
            outs = [self._encode_chunk(f.clone(), n, cache) for f, n in zip(features, lens, strict=True)]
        hidden = torch.cat([out[0, -int(n[0]) :] for out, n in zip(outs, lens, strict=True)])
        chunk_frames = [int(n[0]) for n in lens]
        return Vq02Encoding(hidden.float().cpu(), torch.cat([f[0] for f in features]).cpu(), chunk_frames)

    def features(self, audio: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """LFR + CMVN features ``(1, frames, 560)`` and lengths of each 3840-sample chunk, on device.

        funasr 1.4 returns no frame where the reference's 1.0.8 frontend raised and the
        reference skipped the chunk (a final chunk under 480 samples): the loop ends there.
        """
        import_funasr()
        from funasr.utils.load_utils import extract_fbank

        audio = audio.detach().to("cpu", torch.float32).reshape(-1)
        frontend_cache: dict[str, Any] = {}
        n_chunks = audio.numel() // VQ02_CHUNK_SAMPLES + 1
        features, lens = [], []
        for i in range(n_chunks):
            final = i == n_chunks - 1
            piece = audio[i * VQ02_CHUNK_SAMPLES : (i + 1) * VQ02_CHUNK_SAMPLES]
            if final and piece.numel() == 0:
                break
            feats, n = extract_fbank(
                [piece], data_type="sound", frontend=self.frontend, cache=frontend_cache, is_final=final
            )
            frames = int(n[0]) if feats.numel() else 0
            if frames == 0:
                if final:
                    break
                continue
            features.append(feats[:, :frames].to(self.device))
            lens.append(n.to(self.device))
        return features, lens

    def _encode_chunk(self, feats: torch.Tensor, lens: torch.Tensor, cache: dict[str, Any]) -> torch.Tensor:
        """One chunk ``(1, frames, 560)`` -> ``(1, overlap + frames, D)`` via funasr's ``forward_chunk``."""
        out, _, _ = self.encoder.forward_chunk(feats, lens, cache=cache["encoder"])
        return out[0] if isinstance(out, tuple) else out

    def _encode_layer_major(self, features: list[torch.Tensor], cache: dict[str, Any]) -> list[torch.Tensor]:
        """``SANMEncoderChunkOpt.forward_chunk`` for every chunk, layers outermost.

        features: per chunk ``(1, frames, 560)`` -> per chunk ``(1, overlap + frames, D)``.
        Same steps as funasr's method: scale by sqrt(D), streaming position encoding, prepend
        the previous chunk's overlap frames, the SAN-M layers with their look-back caches,
        ``after_norm``.
        """
        enc = self.encoder
        state = cache["encoder"]
        xs = []
        for feats in features:  # embedding and overlap carry state across chunks only
            x = feats * enc.output_size() ** 0.5
            if enc.embed is not None:
                x = enc.embed(x, state)
            xs.append(enc._add_overlap_chunk(x, state))
        for layer in [*enc.encoders0, *enc.encoders]:
            layer_cache = None  # this layer's K/V of the last look-back chunks
            for i, x in enumerate(xs):
                xs[i], layer_cache = layer.forward_chunk(
                    x, layer_cache, state["chunk_size"], state["encoder_chunk_look_back"]
                )
        return [enc.after_norm(x) for x in xs] if enc.normalize_before else xs


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        conf = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(conf, dict):
        raise ModelLoadError(f"{path} is not a YAML mapping")
    return conf


def _load_encoder_state(path: Path) -> dict[str, torch.Tensor]:
    """The ``encoder.*`` tensors of a funasr ``model.pt``, prefix stripped.

    Memory-mapped where the file is a zip checkpoint, so the ~0.7 GB of decoder and predictor
    weights of the official file are never read into memory.
    """
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) checkpoints cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"cannot load {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    encoder: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        if name.startswith("encoder."):
            encoder[name.removeprefix("encoder.")] = value
    if not encoder:
        raise ModelLoadError(f"{path} holds no encoder.* weights")
    return encoder


# ==============================================================================================
# Fingerprint
# ==============================================================================================


def tokenizer_files(tokenizer_dir: Path, funasr_model_id: str = DEFAULT_FUNASR_MODEL_ID) -> dict[str, Path]:
    """Every file whose content changes the tokens, by role."""
    tokenizer_dir = Path(tokenizer_dir)
    model_dir = tokenizer_dir / funasr_model_id
    return {
        "funasr_config": model_dir / FUNASR_CONFIG_FILE,
        "funasr_weights": model_dir / FUNASR_WEIGHTS_FILE,
        "funasr_cmvn": model_dir / FUNASR_CMVN_FILE,
        "vq02_codebook": tokenizer_dir / VQ02_CODEBOOK_FILE,
        "vq06_onnx": tokenizer_dir / VQ06_ONNX_FILE,
    }


def tokenizer_fingerprint(
    tokenizer_dir: Path, funasr_model_id: str = DEFAULT_FUNASR_MODEL_ID, *, dither: float = 0.0
) -> str:
    """Hash of everything that decides the tokens: model files, dither, preprocessing, format.

    Files go through ``token_cache.fingerprint_of``: whole-file sha256 up to 64 MiB (config,
    CMVN, codebook), and for the two big files (model.pt ~0.9 GB, the ONNX ~0.5 GB) size +
    mtime + sha256 of the first and last 4 MiB, memoised per file identity. A start therefore
    reads ~20 MB instead of 1.4 GB; re-trained or re-exported weights change the hashed bytes,
    and an in-place replacement changes the mtime (a copied bundle may miss once, never serve
    stale tokens). The preprocessing constants are part of the hash, so changing one here
    invalidates old entries even without a ``TOKENS_FORMAT_VERSION`` bump.

    Callers that need it before loading the tokenizer use this; it equals
    ``StepAudioTokenizer(...).fingerprint`` for the same arguments.
    """
    from token_cache import fingerprint_of

    files = tokenizer_files(tokenizer_dir, funasr_model_id)
    _check_files(files)
    return fingerprint_of(
        [files[role] for role in sorted(files)],
        stage="wav2token",
        tokens_format=TOKENS_FORMAT_VERSION,
        dither=float(dither),
        preprocess=[
            TOKENIZER_SR,
            ENERGY_NORM_FLOOR,
            ENERGY_NORM_PEAK,
            TRIM_TOP_DB,
            TRIM_FRAME_LENGTH,
            TRIM_HOP_LENGTH,
            TRIM_HOP_SIZE,
            TRIM_KEEP_LEFT,
            TRIM_KEEP_TOTAL,
        ],
        vq02=[list(VQ02_CHUNK_SIZE), VQ02_ENCODER_LOOK_BACK, VQ02_CHUNK_SAMPLES, VQ02_MIN_FINAL_SAMPLES],
        vq06=[N_FFT, HOP_LENGTH, N_MELS, VQ06_PIECE_SAMPLES, VQ06_MIN_PIECE_SAMPLES],
    )


def _check_files(files: dict[str, Path]) -> None:
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ModelLoadError("audio tokenizer files missing: " + ", ".join(missing))


# ==============================================================================================
# The stage
# ==============================================================================================


class StepAudioTokenizer:
    """``wav2token``: a prepared prompt to vq02 + vq06 codes.

    ``tokenizer_dir`` is the ``Step-Audio-Tokenizer`` folder; the Paraformer lives in
    ``tokenizer_dir / funasr_model_id``. ``dither`` is the fbank dither (0 = deterministic; the
    reference's 1.0 draws from the global torch RNG). ``fingerprint`` names everything that
    decides the tokens, for a cache of them to key on. Safe to call from several threads: all
    per-call state is local.
    """

    def __init__(
        self,
        tokenizer_dir: Path,
        funasr_model_id: str = DEFAULT_FUNASR_MODEL_ID,
        *,
        device: str = "cpu",
        dither: float = 0.0,
        onnx_threads: int = 1,
    ) -> None:
        if dither < 0 or not math.isfinite(dither):
            raise ValueError(f"dither must be a finite number >= 0, got {dither}")
        self.tokenizer_dir = Path(tokenizer_dir)
        self.funasr_model_id = funasr_model_id
        files = tokenizer_files(self.tokenizer_dir, funasr_model_id)
        _check_files(files)
        start = time.perf_counter()
        self.vq02_encoder = ParaformerEncoder(files["funasr_config"].parent, device=device, dither=dither)
        self.codebook = _load_codebook(files["vq02_codebook"], self.vq02_encoder.output_size)
        self.vq06_tokenizer = S3Tokenizer(files["vq06_onnx"], device=device, threads=onnx_threads)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer_dir, funasr_model_id, dither=dither)
        _warm_up_trim()
        logger.info(
            "Audio tokenizer loaded from %s in %.2fs (device %s, dither %g, fingerprint %s…)",
            self.tokenizer_dir,
            time.perf_counter() - start,
            device,
            dither,
            self.fingerprint[:8],
        )

    def wav2token(self, wav: np.ndarray | torch.Tensor, sample_rate: int) -> AudioTokens:
        """Tokens of a prepared prompt (``audio.prepare_prompt`` output, ``(1, n)`` at its own rate).

        Raises ``AudioError`` for unusable audio (empty, non-finite, silent, under 120 ms).
        """
        x = check_prompt(wav, sample_rate)
        start = time.perf_counter()
        tokens = self.encode(x, int(sample_rate))
        logger.info("[FunASR Encoding] time=%.3fs", time.perf_counter() - start)
        return tokens

    def encode(self, wav: torch.Tensor, sample_rate: int) -> AudioTokens:
        """The uncached path: preprocess, both streams, checks. ``wav``: checked ``(1, n)``."""
        audio16k = preprocess_wav(wav, sample_rate)[0]
        tokens = AudioTokens(self.vq02(audio16k), self.vq06_tokenizer(audio16k))
        if tokens.n_groups == 0:
            raise AudioError("the audio is too short to give one token group")
        return tokens

    def vq02(self, audio16k: torch.Tensor) -> np.ndarray:
        """vq02 codes of preprocessed 16 kHz audio ``(n,)``: nearest k-means centre per frame."""
        return quantize(self.vq02_encoder.encode(audio16k).hidden, self.codebook)


def quantize(hidden: torch.Tensor, codebook: torch.Tensor) -> np.ndarray:
    """Nearest centre (Euclidean, ``torch.cdist`` on CPU as the reference) of each row ``(T, D)``."""
    if hidden.shape[0] == 0:
        return np.zeros(0, np.int64)
    return torch.cdist(hidden.float().cpu(), codebook).argmin(dim=1).numpy().astype(np.int64)


def _load_codebook(path: Path, dim: int) -> torch.Tensor:
    try:
        codebook = np.load(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load {path}: {exc}") from exc
    if codebook.ndim != 2 or codebook.shape[1] != dim or codebook.shape[0] > VQ02_CODES:
        raise ModelLoadError(
            f"{path}: expected a codebook (<= {VQ02_CODES}, {dim}) matching the encoder, got {codebook.shape}"
        )
    return torch.from_numpy(np.ascontiguousarray(codebook, dtype=np.float32))
