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
AsrBackend = Literal["faster-whisper", "openai-whisper"]


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
    variants: list[Variant] = Field(["base"], description="LLM variants to load (base, awq, bnb).")
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
    llm_max_batch_rows: int = Field(
        16,
        ge=2,
        description="Most KV-cache rows in one LLM decode step (continuous batching); a request takes "
        "one row, two when its intensity is not 1.0. Beyond this, requests wait.",
    )
    llm_kv_cache_mib: int = Field(
        4096,
        ge=1,
        description="KV-cache budget of each LLM variant's running batch, in MiB, for the worst case of every "
        "admitted request running to its length limit; beyond it, requests wait. 4096 fits the base "
        "variant in bf16 on one 24 GB GPU beside its ~7 GB of weights and the vocoder.",
    )
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
    enable_auto_transcribe: bool = Field(False, description="Fill a missing transcript with Whisper.")
    asr_backend: AsrBackend = Field(
        "faster-whisper",
        description="Whisper implementation: faster-whisper (CTranslate2, built in) or openai-whisper "
        "(PyTorch .pt checkpoints; install the openai-whisper extra).",
    )
    whisper_model: str = Field(
        "base",
        description="Whisper size name (tiny.en, base, ...), or a local model: a CTranslate2 directory "
        "for faster-whisper, a .pt checkpoint file for openai-whisper.",
    )

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
    ui: bool = Field(
        True,
        description="Serve the web UI at /ui (/ redirects there); --no-ui serves the HTTP API alone. "
        "With --api-key the UI asks for the key.",
    )
    default_response_format: ResponseFormat = Field("wav", description="Format when a request names none.")
    max_input_chars: int = Field(
        4096,
        ge=1,
        description="Longest accepted free text, in characters: input, instructions, prompt_text, audio_text, "
        "each edit's text, a voice's transcript.",
    )
    segment_max_tokens: int = Field(
        80,
        ge=8,
        description="A clone's text is cut into segments of at most this many LLM text tokens (about 20 s of "
        "speech; docs/long-text.md), generated side by side and joined in order.",
    )
    segments_in_flight: int = Field(
        8,
        ge=1,
        le=16,
        description="Most segments of one request generating at once: a long text takes at most this many rows "
        "(half the default batch) of the LLM batch, so other requests get in beside it; lower favours many "
        "concurrent users, higher the fastest long answers.",
    )
    segment_pause_ms: int = Field(250, ge=0, le=2000, description="Silence between two segments' audio.")
    ws_idle_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A speech WebSocket (/v1/audio/speech/stream) with no message for this long is closed "
        "(an open utterance holds an inference worker while it waits for text).",
    )
    max_upload_bytes: int = Field(25 * 1024**2, ge=1, description="Largest accepted audio upload.")
    max_body_bytes: int | None = Field(
        None,
        ge=1,
        description="Largest accepted request body, refused (413) before it is read. Default: derived from "
        "--max-upload-bytes, --max-input-chars and --max-chain-steps (one base64 clip and every text field at "
        "its limit; about 36 MB with the defaults, docs/api.md).",
    )
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
        8,
        ge=1,
        le=64,
        description="Requests in flight at once (worker threads): their prompt tokenization, vocoding and "
        "encoding overlap, and their generations share each LLM variant's decode steps (continuous "
        "batching, up to --llm-max-batch-rows rows). More requests wait in the queue.",
    )
    allow_audio_urls: bool = Field(False, description="Accept *_audio_url inputs (public hosts only).")
    url_timeout_s: float = Field(10.0, gt=0, description="Time limit for fetching an audio URL.")
    voices_dir: Path | None = Field(None, description="Registered voices (default: <cache-dir>/voices).")
    store_url: str | None = Field(
        None,
        pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/-]*)?$",
        description="Keep the voices and a shared level of the prompt cache in an S3-compatible object store, "
        "s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL_S3, credentials from the environment), so every "
        "replica of a scaled-out deployment sees them (docs/scale-out.md). Unset: voices in --voices-dir.",
    )
    log_level: str = Field("INFO", description="Python logging level.")

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None) -> Settings:
        """Parse ``argv`` (default: ``sys.argv[1:]``) over environment and defaults."""
        return CliApp.run(cls, cli_args=list(argv) if argv is not None else None)
