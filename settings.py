"""The one settings object of the service.

Every option is a field here, settable three ways with the usual precedence
(CLI flag > environment variable > default): ``--model-path /m`` or
``STEP_AUDIO_MODEL_PATH=/m``. Stages never read this object themselves: the
loader and the engine hand them the plain values they need, so a stage can be
used (and tested) without a settings object at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from model_files import FUNASR_MODEL_ID

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_FUNASR_MODEL_ID = FUNASR_MODEL_ID

ModelSource = Literal["auto", "local", "huggingface", "modelscope"]
Variant = Literal["base", "awq", "bnb"]
ResponseFormat = Literal["wav", "mp3", "opus", "aac", "flac", "pcm"]


class Settings(BaseSettings):
    """Service options. Field descriptions double as ``--help`` text."""

    model_config = SettingsConfigDict(
        env_prefix="STEP_AUDIO_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="api_server.py",
        extra="ignore",
    )

    # --- model bundle -----------------------------------------------------------------
    model_path: Path = Field(
        REPO_ROOT / "models",
        description="Bundle root holding Step-Audio-EditX/ and Step-Audio-Tokenizer/, "
        "or the Step-Audio-EditX directory itself (then set --tokenizer-model-id).",
    )
    model_source: ModelSource = Field(
        "auto", description="Where weights come from; download only when the path is not local."
    )
    tokenizer_model_id: str = Field(
        "Step-Audio-Tokenizer",
        description="Audio tokenizer directory: an existing path, or a sub-path under the bundle root.",
    )
    funasr_model_id: str = Field(
        DEFAULT_FUNASR_MODEL_ID, description="Paraformer folder inside the tokenizer directory."
    )
    variants: list[Variant] = Field(
        default_factory=lambda: ["base"], description="LLM variants to load (base, awq, bnb)."
    )
    awq_model_path: Path | None = Field(
        None, description="AWQ checkpoint dir (default: <model-path>/Step-Audio-EditX-AWQ-4bit)."
    )
    bnb_model_path: Path | None = Field(
        None,
        description="Pre-quantised bnb dir (default: <model-path>/Step-Audio-EditX-bnb-4bit; "
        "runtime NF4 quantisation of base when absent).",
    )

    # --- compute ------------------------------------------------------------------------
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="LLM dtype; auto = bfloat16 on CUDA, float32 on CPU."
    )
    onnx_threads: int = Field(1, ge=1, description="intra-op threads of the vq06 ONNX session.")
    funasr_dither: float = Field(
        0.0,
        ge=0.0,
        description="FunASR fbank dither. The reference uses 1.0, which makes vq02 tokens random; "
        "0 (our default) makes them deterministic and cacheable.",
    )

    # --- token cache --------------------------------------------------------------------
    cache_dir: Path = Field(REPO_ROOT / "cache", description="Directory of the persistent caches.")
    cache_max_bytes: int = Field(2 * 1024**3, ge=0, description="Byte budget of the wav2token cache (LRU eviction).")

    # --- transcription ------------------------------------------------------------------
    enable_auto_transcribe: bool = Field(False, description="Fill a missing transcript with Whisper (faster-whisper).")
    whisper_model: str = Field("base", description="faster-whisper model name or a local CTranslate2 model directory.")

    # --- HTTP ---------------------------------------------------------------------------
    api_host: str = Field("0.0.0.0", description="Address to bind.")
    api_port: int = Field(8003, ge=1, le=65535, description="Port to bind.")
    api_key: SecretStr | None = Field(
        None, description="When set, every endpoint but /healthz needs 'Authorization: Bearer <key>'."
    )
    demo: bool = Field(
        False,
        description="Generate a tiny random-weight bundle under the cache dir and serve it "
        "(the audio is noise; for trying the API without weights).",
    )
    default_response_format: ResponseFormat = Field("wav", description="Format when a request names none.")
    max_input_chars: int = Field(4096, ge=1, description="Longest accepted input text.")
    max_upload_bytes: int = Field(25 * 1024**2, ge=1, description="Largest accepted audio upload.")
    max_audio_seconds: float = Field(30.0, gt=0, description="Longest accepted prompt/input audio.")
    max_edit_iter: int = Field(4, ge=1, le=8, description="Most edit iterations per step.")
    max_chain_steps: int = Field(
        8, ge=1, description="Most edit steps in one request (step_audio.edits, instructions, inline tags)."
    )
    max_chain_generations: int = Field(
        16,
        ge=1,
        description="Most LLM generations in one request: the clone plus every edit iteration of every step.",
    )
    queue_size: int = Field(16, ge=1, description="Requests waiting beyond this answer 429.")
    inference_workers: int = Field(
        1,
        ge=1,
        le=8,
        description="Threads running requests; 2 lets one request use the LLM while another is in "
        "the tokenizer or vocoder (the engine locks each stage).",
    )
    allow_audio_urls: bool = Field(False, description="Accept *_audio_url inputs (public hosts only).")
    url_timeout_s: float = Field(10.0, gt=0, description="Time limit for fetching an audio URL.")
    voices_dir: Path | None = Field(None, description="Registered voices (default: <cache-dir>/voices).")
    log_level: str = Field("INFO", description="Python logging level.")

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None) -> Settings:
        """Parse ``argv`` (default: ``sys.argv[1:]``) over environment and defaults."""
        return CliApp.run(cls, cli_args=list(argv) if argv is not None else None)
