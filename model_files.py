"""The official bundle layout: what the loader needs, verification, and download.

Standard library only at import time, so ``start_api_container.sh`` can verify a model
directory on a host that has nothing but ``python3``. Download clients (huggingface_hub,
modelscope) are imported when a download is asked for.

Usage::

    python model_files.py download --model-path models [--source huggingface|modelscope] [--with-awq]
    python model_files.py verify   --model-path models [--variants base,awq]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

EDITX_DIR = "Step-Audio-EditX"
TOKENIZER_DIR = "Step-Audio-Tokenizer"
AWQ_DIR = "Step-Audio-EditX-AWQ-4bit"
BNB_DIR = "Step-Audio-EditX-bnb-4bit"
VOCODER_DIR = "CosyVoice-300M-25Hz"
FUNASR_MODEL_ID = "dengcunqin/speech_paraformer-large_asr_nat-zh-cantonese-en-16k-vocab8501-online"

# Where each bundle directory is published (the same ids on Hugging Face and ModelScope).
REPO_IDS: dict[str, str] = {
    EDITX_DIR: "stepfun-ai/Step-Audio-EditX",
    TOKENIZER_DIR: "stepfun-ai/Step-Audio-Tokenizer",
    AWQ_DIR: "stepfun-ai/Step-Audio-EditX-AWQ-4bit",
}

VOCODER_FILES = (
    f"{VOCODER_DIR}/cosyvoice.yaml",
    f"{VOCODER_DIR}/flow.pt",
    f"{VOCODER_DIR}/hift.pt",
    f"{VOCODER_DIR}/campplus.onnx",
)
LLM_FILES = ("config.json", "tokenizer.model", "tokenizer_config.json")
FUNASR_FILES = ("config.yaml", "model.pt", "am.mvn", "tokens.json")
TOKENIZER_FILES = ("linguistic_tokenizer.npy", "speech_tokenizer_v1.onnx")

# What a download fetches (glob patterns per repository): everything the loader reads, nothing
# else (the hubs also hold README assets, examples, the remote modelling code we never run, and
# an 8 MB seg_dict the encoder does not use).
DOWNLOAD_PATTERNS: dict[str, list[str]] = {
    EDITX_DIR: [*LLM_FILES, "*.safetensors", "model.safetensors.index.json", *VOCODER_FILES],
    TOKENIZER_DIR: [
        *TOKENIZER_FILES,
        *(f"{FUNASR_MODEL_ID}/{name}" for name in (*FUNASR_FILES, "configuration.json")),
    ],
    AWQ_DIR: [*LLM_FILES, "*.safetensors", "model.safetensors.index.json", "recipe.yaml"],
}


@dataclass(frozen=True)
class LayoutProblem:
    """One missing or unusable file, as a path relative to the bundle root where possible."""

    path: str
    reason: str = "missing"

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


def _missing(base: Path, names: Iterable[str], shown_as: str) -> list[LayoutProblem]:
    problems = []
    for name in names:
        f = base / name
        if not f.is_file():
            problems.append(LayoutProblem(f"{shown_as}/{name}"))
        elif f.stat().st_size == 0:
            problems.append(LayoutProblem(f"{shown_as}/{name}", "empty file"))
    return problems


def _weights_problems(llm_dir: Path, shown_as: str) -> list[LayoutProblem]:
    """The safetensors shards: every shard the index names, or at least one shard without index."""
    index = llm_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            return [LayoutProblem(f"{shown_as}/model.safetensors.index.json", "unreadable index")]
        return _missing(llm_dir, shards, shown_as)
    if not any(llm_dir.glob("*.safetensors")):
        return [LayoutProblem(f"{shown_as}/*.safetensors", "no weights")]
    return []


def check_llm_dir(llm_dir: Path, shown_as: str, *, with_vocoder: bool) -> list[LayoutProblem]:
    if not llm_dir.is_dir():
        return [LayoutProblem(shown_as, "directory missing")]
    problems = _missing(llm_dir, LLM_FILES, shown_as) + _weights_problems(llm_dir, shown_as)
    if with_vocoder:
        problems += _missing(llm_dir, VOCODER_FILES, shown_as)
    return problems


def check_tokenizer_dir(tok_dir: Path, shown_as: str, funasr_model_id: str = FUNASR_MODEL_ID) -> list[LayoutProblem]:
    if not tok_dir.is_dir():
        return [LayoutProblem(shown_as, "directory missing")]
    return _missing(tok_dir, TOKENIZER_FILES, shown_as) + _missing(
        tok_dir / funasr_model_id, FUNASR_FILES, f"{shown_as}/{funasr_model_id}"
    )


def verify_layout(
    model_path: Path,
    *,
    tokenizer_dir: Path | None = None,
    funasr_model_id: str = FUNASR_MODEL_ID,
    variants: Sequence[str] = ("base",),
    awq_dir: Path | None = None,
    bnb_dir: Path | None = None,
) -> list[LayoutProblem]:
    """Every file the loader needs, checked before any model is loaded; [] when complete.

    ``model_path`` is the bundle root or the ``Step-Audio-EditX`` directory itself (the two
    forms the seed deployment uses); in the second form the tokenizer directory comes from
    ``tokenizer_dir`` or sits beside it.
    """
    model_path = Path(model_path)
    if (model_path / "config.json").is_file() and not (model_path / EDITX_DIR).is_dir():
        editx, root = model_path, model_path.parent
    else:
        editx, root = model_path / EDITX_DIR, model_path
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else root / TOKENIZER_DIR
    problems = check_llm_dir(editx, EDITX_DIR, with_vocoder=True)
    problems += check_tokenizer_dir(tok, TOKENIZER_DIR if tokenizer_dir is None else str(tok), funasr_model_id)
    if "awq" in variants:
        d = awq_dir or root / AWQ_DIR
        problems += check_llm_dir(d, AWQ_DIR if awq_dir is None else str(d), with_vocoder=False)
    if "bnb" in variants and bnb_dir is not None:
        # without a pre-quantised directory, bnb quantises the base weights at load time
        problems += check_llm_dir(bnb_dir, str(bnb_dir), with_vocoder=False)
    return problems


def format_problems(problems: Sequence[LayoutProblem], model_path: Path) -> str:
    lines = [f"The model directory {model_path} is incomplete; missing or unusable:"]
    lines += [f"  - {p}" for p in problems]
    lines.append(f"Fetch the weights with: python model_files.py download --model-path {model_path}")
    return "\n".join(lines)


Downloader = Callable[..., str]


def _hf_downloader() -> Downloader:
    from huggingface_hub import snapshot_download

    return snapshot_download


def _modelscope_downloader() -> Downloader:
    try:
        from modelscope import snapshot_download
    except ImportError as exc:  # the extra is optional
        raise ImportError("ModelScope downloads need the 'modelscope' extra: pip install '.[modelscope]'") from exc

    def download(*, repo_id: str, local_dir: str, allow_patterns: list[str]) -> str:
        return snapshot_download(model_id=repo_id, local_dir=local_dir, allow_patterns=allow_patterns)

    return download


def download_repo(name: str, root: Path, source: str = "huggingface", downloader: Downloader | None = None) -> Path:
    """Fetch one bundle directory (``Step-Audio-EditX`` ...) into ``root/name``: only the files
    the loader reads. Resumable: the hub clients skip complete files and continue partial ones.
    """
    if downloader is None:
        downloader = _modelscope_downloader() if source == "modelscope" else _hf_downloader()
    local = Path(root) / name
    print(f"fetching {REPO_IDS[name]} from {source} -> {local}", file=sys.stderr)
    downloader(repo_id=REPO_IDS[name], local_dir=str(local), allow_patterns=DOWNLOAD_PATTERNS[name])
    return local


def download_models(
    model_path: Path,
    *,
    source: str = "huggingface",
    with_awq: bool = False,
    downloader: Downloader | None = None,
) -> list[LayoutProblem]:
    """Fetch the official repositories into the official layout under ``model_path``.

    Returns the layout problems left afterwards ([] on success).
    """
    model_path = Path(model_path)
    model_path.mkdir(parents=True, exist_ok=True)
    for name in [EDITX_DIR, TOKENIZER_DIR] + ([AWQ_DIR] if with_awq else []):
        download_repo(name, model_path, source, downloader)
    return verify_layout(model_path, variants=("base", "awq") if with_awq else ("base",))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="model_files.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="fetch the official weights into the official layout")
    dl.add_argument("--model-path", type=Path, default=Path(__file__).resolve().parent / "models")
    dl.add_argument("--source", choices=["huggingface", "modelscope"], default="huggingface")
    dl.add_argument("--with-awq", action="store_true", help="also fetch the AWQ 4-bit variant")
    ver = sub.add_parser("verify", help="check that a model directory holds a complete bundle")
    ver.add_argument("--model-path", type=Path, required=True)
    ver.add_argument("--tokenizer-dir", type=Path, default=None)
    ver.add_argument("--variants", default="base", help="comma-separated: base,awq,bnb")
    args = parser.parse_args(argv)

    if args.command == "download":
        problems = download_models(args.model_path, source=args.source, with_awq=args.with_awq)
    else:
        problems = verify_layout(args.model_path, tokenizer_dir=args.tokenizer_dir, variants=args.variants.split(","))
    if problems:
        print(format_problems(problems, args.model_path), file=sys.stderr)
        return 1
    print(f"{args.model_path}: complete bundle.")
    if args.command == "download":
        print(f"Next: ./start_api_container.sh --models {args.model_path.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
