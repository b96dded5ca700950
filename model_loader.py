"""The one shared loader: torch policy (TF32, device, dtype), bundle paths, LLM variants, registry.

Everything that reads weights from disk goes through here, once per process: ``ModelRegistry``
memoises each component, so the HTTP API, the engine and any UI share one copy (the seed's
"unified deployment" halved GPU memory this way). Problems surface at load time as
``errors.ModelLoadError`` naming the component or variant and the reason, never at request time.

Bundle layout (docs/model.md §1.1): ``<root>/Step-Audio-EditX`` (LLM, text tokenizer,
``CosyVoice-300M-25Hz/`` vocoder), ``<root>/Step-Audio-Tokenizer`` (audio tokenizer), optional
``<root>/Step-Audio-EditX-AWQ-4bit`` and ``<root>/Step-Audio-EditX-bnb-4bit``. ``model_path`` may
be that root or the ``Step-Audio-EditX`` directory itself (the seed's two forms).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from errors import ModelLoadError
from model_files import (
    AWQ_DIR,
    BNB_DIR,
    EDITX_DIR,
    REPO_IDS,
    TOKENIZER_DIR,
    VOCODER_DIR,
    download_repo,
    format_problems,
    verify_layout,
)

if TYPE_CHECKING:  # the stages themselves are imported lazily, when a bundle is loaded
    from llm.model import Step1ForCausalLM
    from llm.text_tokenizer import StepTextTokenizer
    from token_cache import TokenCache
    from tokenizer import StepAudioTokenizer
    from vocoder.frontend import SpeakerEncoder
    from vocoder.token2wav import Token2Wav

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"

VARIANTS = ("base", "awq", "bnb")
MODEL_SOURCES = ("auto", "local", "huggingface", "modelscope")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

T = TypeVar("T")


# --- torch policy -------------------------------------------------------------------------------


def enable_tf32() -> bool:
    """Allow TF32 in CUDA matmuls and cuDNN convolutions (Ampere+: ~free speed for fp32 parts).

    Logs ``TF32 acceleration enabled`` (operators grep for it); returns False without CUDA.
    """
    if not torch.cuda.is_available():
        return False
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9 API; the allow_tf32 flags are deprecated
        matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"  # type: ignore[attr-defined]  # torch >= 2.9, untyped
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    logger.info("TF32 acceleration enabled")
    return True


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` -> a usable device."""
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise ModelLoadError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ModelLoadError(f"device {spec!r} is not supported (use auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise ModelLoadError(f"device {spec!r} was requested but CUDA is not available here")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` = bfloat16 on CUDA, float32 on CPU; else float32/bfloat16/float16 (or fp32/bf16/fp16)."""
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if text not in DTYPES:
        raise ModelLoadError(f"torch dtype {spec!r} is not one of auto, float32, bfloat16, float16")
    return DTYPES[text]


# --- bundle paths ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundlePaths:
    """Where each part of the bundle lives; ``awq``/``bnb`` are where those variants are looked for."""

    root: Path
    editx: Path
    tokenizer: Path
    vocoder: Path
    awq: Path
    bnb: Path


def _is_model_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file()


def _editx_and_root(model_path: Path) -> tuple[Path, Path] | None:
    """(editx, root) for either form of ``model_path``; None when neither is present."""
    if _is_model_dir(model_path / EDITX_DIR):
        return model_path / EDITX_DIR, model_path
    if _is_model_dir(model_path):
        return model_path, model_path.parent
    return None


def _tokenizer_dir(tokenizer_model_id: str, root: Path) -> Path | None:
    """An existing path (absolute or relative to the working dir), else a sub-path of ``root``."""
    for candidate in (Path(tokenizer_model_id).expanduser(), root / tokenizer_model_id):
        if candidate.is_dir():
            return candidate
    return None


def download_snapshot(repo_id: str, local_dir: Path, source: str) -> Path:
    """Download one model repository into ``local_dir`` (the only network call of the service).

    Only the files the loader reads are fetched (``model_files.DOWNLOAD_PATTERNS``). Kept as one
    small function so tests replace it at this boundary.
    """
    name = next((n for n, r in REPO_IDS.items() if r == repo_id), None)
    if name is None or Path(local_dir).name != name:
        raise ModelLoadError(f"{repo_id} is not a bundle repository, or {local_dir} is not its place")
    try:
        return download_repo(name, Path(local_dir).parent, source)
    except ImportError as exc:
        raise ModelLoadError(f"model source {source!r}: {exc}") from exc


def fetch_bundle(
    model_path: Path,
    source: str = "auto",
    tokenizer_model_id: str = TOKENIZER_DIR,
    variants: Iterable[str] = ("base",),
) -> None:
    """Download the bundle parts missing under ``model_path`` when ``source`` allows it.

    ``local`` never downloads. ``auto`` means local when the path holds a bundle, else Hugging
    Face. A remote source downloads only what is not already local, into the root form
    (``model_path/Step-Audio-EditX`` ...): the LLM, the audio tokenizer when
    ``tokenizer_model_id`` does not name an existing directory, and AWQ when requested.
    """
    if source not in MODEL_SOURCES:
        raise ModelLoadError(f"model source {source!r} is not one of {', '.join(MODEL_SOURCES)}")
    model_path = Path(model_path).expanduser()
    found = _editx_and_root(model_path)
    if source == "local":
        return
    hub = "huggingface" if source == "auto" else source
    root = found[1] if found else model_path
    wanted: list[str] = []
    if found is None:
        if source == "auto" and model_path.exists() and any(model_path.iterdir()):
            return  # a local directory that is not a bundle: resolve_bundle explains what is missing
        wanted.append(EDITX_DIR)
    if _tokenizer_dir(tokenizer_model_id, root) is None and tokenizer_model_id == TOKENIZER_DIR:
        wanted.append(TOKENIZER_DIR)
    if "awq" in variants and not _is_model_dir(root / AWQ_DIR):
        wanted.append(AWQ_DIR)
    for name in wanted:
        logger.info("Downloading %s from %s into %s", REPO_IDS[name], hub, root / name)
        try:
            download_snapshot(REPO_IDS[name], root / name, hub)
        except ModelLoadError:
            raise
        except Exception as exc:  # network, auth, disk: any failure is a load failure
            raise ModelLoadError(f"downloading {REPO_IDS[name]} from {hub} failed: {exc}") from exc


def resolve_bundle(
    model_path: Path | str,
    tokenizer_model_id: str = TOKENIZER_DIR,
    *,
    awq_path: Path | str | None = None,
    bnb_path: Path | str | None = None,
    require_tokenizer: bool = True,
) -> BundlePaths:
    """Locate every part of a local bundle from either form of ``model_path``.

    The tokenizer directory is ``tokenizer_model_id`` when that is an existing path, else
    ``<root>/<tokenizer_model_id>`` (root = the parent of ``Step-Audio-EditX``). The vocoder is
    always ``<Step-Audio-EditX>/CosyVoice-300M-25Hz``, whichever LLM variant runs.
    """
    model_path = Path(model_path).expanduser()
    found = _editx_and_root(model_path)
    if found is None:
        raise ModelLoadError(
            f"no Step1 model at {model_path}: expected {model_path / EDITX_DIR / CONFIG_NAME} "
            f"or {model_path / CONFIG_NAME}"
        )
    editx, root = found
    tokenizer = _tokenizer_dir(tokenizer_model_id, root)
    if tokenizer is None:
        if require_tokenizer:
            raise ModelLoadError(
                f"audio tokenizer directory {tokenizer_model_id!r} not found (as a path, or under {root})"
            )
        tokenizer = root / tokenizer_model_id
    return BundlePaths(
        root=root,
        editx=editx,
        tokenizer=tokenizer,
        vocoder=editx / VOCODER_DIR,
        awq=Path(awq_path).expanduser() if awq_path else root / AWQ_DIR,
        bnb=Path(bnb_path).expanduser() if bnb_path else root / BNB_DIR,
    )


def verify_bundle(bundle: BundlePaths, funasr_model_id: str, variants: Iterable[str] = ("base",)) -> None:
    """Name every missing file before any weight is read (the check the start script runs too)."""
    problems = verify_layout(
        bundle.editx,
        tokenizer_dir=bundle.tokenizer,
        funasr_model_id=funasr_model_id,
        variants=tuple(variants),
        awq_dir=bundle.awq,
        bnb_dir=bundle.bnb if bundle.bnb.is_dir() else None,  # absent: NF4 from the base weights
    )
    if problems:
        raise ModelLoadError(format_problems(problems, bundle.root))


# --- LLM variants ---------------------------------------------------------------------------------


def _quant_method(model_dir: Path) -> str | None:
    """``quantization_config.quant_method`` of a checkpoint dir, None when unquantised."""
    config = json.loads((model_dir / CONFIG_NAME).read_text())
    quant = config.get("quantization_config") or {}
    return quant.get("quant_method")


def _bnb_config(dtype: torch.dtype) -> Any:
    """Runtime NF4 quantisation as the upstream loader does it (docs/model.md §1.5)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
    )


def _require(module: str, variant: str, package: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ModelLoadError(
            f"model variant {variant!r} needs the {package} package (install the 'quant' extra): {exc}"
        ) from exc


def _bnb_cpu_fallback(model: torch.nn.Module) -> None:
    """Route 4-bit layers whose shapes bitsandbytes' AVX512-bf16 CPU repack rejects to its generic path.

    That repack asserts ``out % 32 == 0`` and ``in % blocksize == 0`` (true for the official
    model, not for tiny ones); the generic kernel computes the same product.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state  # type: ignore[attr-defined]  # bitsandbytes Params4bit
            blocksize = getattr(state, "blocksize", 64)
            if module.out_features % 32 or module.in_features % blocksize:
                module.support_avx512bf16_for_cpu = False


def load_llm(
    base_dir: Path, variant: str, device: torch.device, dtype: torch.dtype, *, quantized_dir: Path | None = None
) -> Step1ForCausalLM:
    """Load one Step1 variant with our implementation (never remote code), in eval mode, warmed up.

    base: ``base_dir`` (bf16 safetensors) at ``dtype``. awq: the compressed-tensors checkpoint at
    ``quantized_dir`` (weights decompressed to ``dtype`` on first use). bnb: the pre-quantised
    ``quantized_dir`` when it exists, else NF4 quantisation of ``base_dir`` while loading.
    Any failure, including the one-token warm-up forward, is a ModelLoadError naming the variant.
    """
    import llm  # noqa: F401 - registers Step1 with transformers' Auto classes
    from llm.model import Step1ForCausalLM

    if variant not in VARIANTS:
        raise ModelLoadError(f"model variant {variant!r} is not one of {', '.join(VARIANTS)}")
    kwargs: dict[str, Any] = {"dtype": dtype, "output_loading_info": True}
    if device.type == "cuda":
        kwargs["device_map"] = str(device)
    source = Path(base_dir)
    if variant == "awq":
        _require("compressed_tensors", variant, "compressed-tensors")
        if quantized_dir is None or not _is_model_dir(quantized_dir):
            raise ModelLoadError(f"model variant 'awq': no checkpoint at {quantized_dir}")
        if _quant_method(quantized_dir) != "compressed-tensors":
            raise ModelLoadError(f"model variant 'awq': {quantized_dir} is not a compressed-tensors checkpoint")
        source = quantized_dir
    elif variant == "bnb":
        _require("bitsandbytes", variant, "bitsandbytes")
        _require("accelerate", variant, "accelerate")
        kwargs["device_map"] = str(device)
        if quantized_dir is not None and _is_model_dir(quantized_dir):
            if _quant_method(quantized_dir) != "bitsandbytes":
                raise ModelLoadError(f"model variant 'bnb': {quantized_dir} is not a bitsandbytes checkpoint")
            source = quantized_dir
        else:
            kwargs["quantization_config"] = _bnb_config(dtype)
    if not _is_model_dir(source):
        raise ModelLoadError(f"model variant {variant!r}: no config.json in {source}")
    start = time.perf_counter()
    try:
        loaded: Any = Step1ForCausalLM.from_pretrained(source, **kwargs)  # (model, info): output_loading_info
        model, info = loaded
    except Exception as exc:  # unreadable files, wrong shapes, quantiser refusing this device
        raise ModelLoadError(f"model variant {variant!r} cannot be loaded from {source}: {exc}") from exc
    bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ModelLoadError(f"model variant {variant!r}: checkpoint {source} does not match Step1: {bad}")
    model.eval()
    if device.type != "cuda" and variant != "bnb":
        model.to(device)
    if variant == "bnb" and device.type == "cpu":
        _bnb_cpu_fallback(model)
    try:
        with torch.inference_mode():
            model(torch.tensor([[model.config.bos_token_id or 1]], device=device), use_cache=False)
    except Exception as exc:  # e.g. kernels missing for this device
        raise ModelLoadError(f"model variant {variant!r} does not run on {device}: {exc}") from exc
    logger.info(
        "Loaded Step1 variant %s from %s on %s (%s) in %.1fs",
        variant,
        source,
        device,
        str(dtype).removeprefix("torch."),
        time.perf_counter() - start,
    )
    return model


# --- registry -------------------------------------------------------------------------------------


class ModelRegistry:
    """Loads each component once per process and hands the same object to every caller.

    Thread-safe: concurrent first calls for one key load it once (others wait); different keys
    load independently. A failed load is remembered and its ModelLoadError raised again, so a
    broken variant costs one attempt, at startup. Components are keyed ``"llm:<variant>"``; the
    engine adds its stages with ``get_or_load("tokenizer", ...)`` / ``get_or_load("vocoder", ...)``.
    """

    def __init__(self, bundle: BundlePaths, device: torch.device, dtype: torch.dtype) -> None:
        self.bundle = bundle
        self.device = device
        self.dtype = dtype
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._loaded: dict[str, Any] = {}
        self._failed: dict[str, ModelLoadError] = {}
        if device.type == "cuda":
            enable_tf32()

    def get_or_load(self, key: str, load: Callable[[], T]) -> T:
        """The component under ``key``, calling ``load()`` the first time only."""
        with self._lock:
            if key in self._loaded:
                return self._loaded[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            if key in self._loaded:
                return self._loaded[key]
            if key in self._failed:
                raise self._failed[key]
            try:
                value = load()
            except ModelLoadError as exc:
                self._failed[key] = exc
                raise
            with self._lock:
                self._loaded[key] = value
            return value

    def get_llm(self, variant: str = "base") -> Step1ForCausalLM:
        """The Step1 model of ``variant`` (base, awq, bnb), loaded on first use."""
        quantized = {"awq": self.bundle.awq, "bnb": self.bundle.bnb}.get(variant)
        return self.get_or_load(
            f"llm:{variant}",
            lambda: load_llm(self.bundle.editx, variant, self.device, self.dtype, quantized_dir=quantized),
        )

    def load_llms(self, variants: Iterable[str]) -> dict[str, Step1ForCausalLM]:
        """Load every variant in ``variants`` now (startup); the first failure raises."""
        return {variant: self.get_llm(variant) for variant in variants}

    @property
    def loaded(self) -> list[str]:
        """Keys of the components loaded so far, e.g. ``["llm:base"]``."""
        with self._lock:
            return list(self._loaded)

    # --- the other stages (added for the engine) ------------------------------------------------

    def get_text_tokenizer(self) -> StepTextTokenizer:
        """The Step1 text tokenizer (``tokenizer.model`` of the base directory; variants share it)."""
        from llm.text_tokenizer import load_text_tokenizer

        return self.get_or_load("text_tokenizer", lambda: load_text_tokenizer(self.bundle.editx))

    def get_tokenizer(
        self,
        funasr_model_id: str,
        *,
        dither: float = 0.0,
        onnx_threads: int = 1,
    ) -> StepAudioTokenizer:
        """The audio tokenizer (``wav2token``)."""
        return self.get_or_load(
            f"tokenizer:{funasr_model_id}:{dither}:{onnx_threads}",
            lambda: load_tokenizer(
                self.bundle.tokenizer, funasr_model_id, self.device, dither=dither, onnx_threads=onnx_threads
            ),
        )

    def get_prompt_cache(self, cache_dir: Path | None, max_bytes: int, fingerprint: str) -> TokenCache | None:
        """The disk cache of prompt records under ``cache_dir`` (None without a directory or budget).

        One object per directory, budget and fingerprint, so engines built on one registry share it.
        """
        return self.get_or_load(
            f"prompt_cache:{cache_dir}:{max_bytes}:{fingerprint}",
            lambda: load_prompt_cache(cache_dir, max_bytes, fingerprint),
        )

    def get_vocoder(self, onnx_threads: int = 1) -> VocoderStage:
        """Token2Wav (flow + HiFT, fp32 on the device) and the CAM++ speaker encoder."""
        return self.get_or_load("vocoder", lambda: load_vocoder(self.bundle.vocoder, self.device, onnx_threads))


# --- audio tokenizer and vocoder --------------------------------------------------------------------


@dataclass(frozen=True)
class VocoderStage:
    """The vocoder's two loaded parts: ``token2wav`` (vocoder.token2wav.Token2Wav) and
    ``speaker_encoder`` (vocoder.frontend.SpeakerEncoder, CAM++ on CPU)."""

    token2wav: Token2Wav
    speaker_encoder: SpeakerEncoder


def load_tokenizer(
    tokenizer_dir: Path,
    funasr_model_id: str,
    device: torch.device,
    *,
    dither: float = 0.0,
    onnx_threads: int = 1,
) -> StepAudioTokenizer:
    """StepAudioTokenizer from ``tokenizer_dir``."""
    from tokenizer import StepAudioTokenizer

    try:
        tokenizer = StepAudioTokenizer(
            tokenizer_dir, funasr_model_id, device=str(device), dither=dither, onnx_threads=onnx_threads
        )
    except ModelLoadError:
        raise
    except PermissionError as exc:
        if exc.filename is not None and os.sep not in str(exc.filename):  # a program looked up on PATH
            raise ModelLoadError(f"audio tokenizer: {program_search_refused(str(exc.filename))}") from exc
        raise ModelLoadError(f"audio tokenizer cannot be loaded from {tokenizer_dir}: {exc}") from exc
    except Exception as exc:  # unreadable configs or weights in a bundle we did not write
        raise ModelLoadError(f"audio tokenizer cannot be loaded from {tokenizer_dir}: {exc}") from exc
    return tokenizer


def program_search_refused(program: str) -> str:
    """Why running ``program`` failed with EACCES: the PATH entries this user may not search.

    funasr runs ``ffmpeg -version`` when it is imported and lets everything but "not found"
    escape. Where ffmpeg is not installed, a PATH directory the server's user may not enter (a
    root-only one kept by ``sudo``/``runuser``, or an empty entry, the working directory, that
    is not searchable) turns the search into "[Errno 13] Permission denied: 'ffmpeg'", which
    names neither the directory nor the setting.
    """
    refused = []
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        directory = entry or "."  # an empty entry is the working directory
        candidate = os.path.join(directory, program)
        if (os.path.isdir(directory) and not os.access(directory, os.X_OK)) or (
            os.path.isfile(candidate) and not os.access(candidate, os.X_OK)
        ):
            refused.append(entry or "'' (the working directory)")
    where = ", ".join(refused) if refused else "a directory on PATH"
    return (
        f"running {program!r} (funasr looks for it when imported) was refused: the PATH environment variable"
        f" names {where}, which this user (uid {os.getuid()}) may not search or run. Remove it from PATH, or"
        f" install {program} in a directory on PATH."
    )


def load_prompt_cache(cache_dir: Path | None, max_bytes: int, fingerprint: str) -> TokenCache | None:
    """A TokenCache under ``cache_dir`` (None when there is no directory or the budget is 0).

    A directory that cannot be written does not stop the load: the cache then misses and skips
    its writes until it can (the server's start-up check has said which directory and setting).
    """
    from token_cache import TokenCache

    if cache_dir is None or max_bytes <= 0:
        return None
    return TokenCache(Path(cache_dir), max_bytes, fingerprint)


def load_vocoder(vocoder_dir: Path, device: torch.device, onnx_threads: int = 1) -> VocoderStage:
    """The vocoder of ``CosyVoice-300M-25Hz/``: cosyvoice.yaml + flow.pt + hift.pt, campplus.onnx."""
    from vocoder.frontend import SpeakerEncoder
    from vocoder.token2wav import Token2Wav

    start = time.perf_counter()
    try:
        token2wav = Token2Wav.from_dir(vocoder_dir, device)
        speaker_encoder = SpeakerEncoder(vocoder_dir / "campplus.onnx", threads=onnx_threads)
    except ModelLoadError:
        raise
    except Exception as exc:  # missing or damaged files
        raise ModelLoadError(f"vocoder cannot be loaded from {vocoder_dir}: {exc}") from exc
    logger.info("Loaded the vocoder from %s on %s in %.1fs", vocoder_dir, device, time.perf_counter() - start)
    return VocoderStage(token2wav, speaker_encoder)
