"""The Step1 text tokenizer: the official SentencePiece model, read directly (no remote code).

The reference encodes every prompt piece with ``AutoTokenizer`` (``LlamaTokenizerFast``,
``legacy=false``, ``add_bos_token`` left at its default ``true``). For the texts prompts are made
of, that is exactly the raw SentencePiece encoding of the model file plus a leading BOS:

* the model's normalizer is ``identity`` with ``add_dummy_prefix`` and without
  ``remove_extra_whitespaces``, so ``encode("\\n") == [1, 324, 78]`` (``<s> ▁ <0x0A>``) and runs
  of spaces survive (the paralinguistic instruction's two spaces);
* ``<audio_N>`` are USER_DEFINED pieces (id 65536 + N), matched as single tokens anywhere in the
  text; ``<s>``, ``</s>``, ``<|EOT|>``, ``<|BOT|>`` are CONTROL pieces and never come out of text
  (prompts insert their ids directly), so user text cannot smuggle in a turn marker;
* unknown characters fall back to byte pieces (``<0x00>``..``<0xFF>``).

The fixtures confirm this on every reference prompt (ids equal to the reference's, fast and
slow). transformers 5's own ``LlamaTokenizer`` does *not* reproduce them from these files (no BOS,
``"\\n"`` -> ``[324, 78]``, turn markers parsed out of user text), which is why the model file is
read with SentencePiece directly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from audio_codes import AUDIO_ID_OFFSET, N_MIXED_CODES
from errors import ModelLoadError

logger = logging.getLogger(__name__)

TOKENIZER_MODEL_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

PAD_ID = 0  # <unk>, also the pad id of the Step1 config
BOS_ID = 1  # <s>: every encode() call prepends it, as the reference's tokenizer does
EOS_ID = 2  # </s>: not a stop token upstream; generation treats it as one anyway (hardening)
EOT_ID = 3  # <|EOT|>: end of turn, the model's EOS
BOT_ID = 4  # <|BOT|>: begin of turn

N_AUDIO_CODES = N_MIXED_CODES  # the <audio_N> pieces: one per mixed code
AUDIO_ID_END = AUDIO_ID_OFFSET + N_AUDIO_CODES  # 70656: first id past the codes the vocoder accepts

_REQUIRED_PIECES = {
    "<unk>": PAD_ID,
    "<s>": BOS_ID,
    "</s>": EOS_ID,
    "<|EOT|>": EOT_ID,
    "<|BOT|>": BOT_ID,
    "<0x0A>": None,  # byte fallback must exist; its id differs between models
    "<audio_0>": AUDIO_ID_OFFSET,
    f"<audio_{N_AUDIO_CODES - 1}>": AUDIO_ID_END - 1,
}


def audio_token(n: int) -> str:
    """The prompt string of mixed audio code ``n`` (0..5119): ``<audio_n>`` = id 65536 + n."""
    return f"<audio_{n}>"


class StepTextTokenizer:
    """SentencePiece encode/decode with the reference's BOS convention.

    Thread-safe: SentencePiece's encode and decode do not mutate the processor.
    """

    def __init__(self, model_file: Path, *, add_bos: bool = True, add_eos: bool = False) -> None:
        model_file = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot read the SentencePiece model {model_file}: {exc}") from exc
        self.model_file = model_file
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.vocab_size: int = self.sp.get_piece_size()
        self._check_pieces()

    def _check_pieces(self) -> None:
        """Refuse a model whose special or audio pieces are not where the LLM expects them."""
        problems = []
        for piece, want in _REQUIRED_PIECES.items():
            got = self.sp.piece_to_id(piece)
            if (got == PAD_ID and piece != "<unk>") or (want is not None and got != want):
                problems.append(f"{piece} is id {got}, expected {want if want is not None else 'present'}")
        if problems:
            raise ModelLoadError(f"{self.model_file} is not a Step1 tokenizer: " + "; ".join(problems))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` exactly as the reference's ``tokenizer.encode(text)``: BOS first."""
        ids: list[int] = self.sp.encode(text)
        if self.add_bos:
            ids = [BOS_ID, *ids]
        if self.add_eos:
            ids.append(EOS_ID)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; control ids (BOS, turn markers) decode to nothing, audio ids to ``<audio_N>``."""
        return str(self.sp.decode([int(i) for i in ids]))

    def id_to_piece(self, token_id: int) -> str:
        return str(self.sp.id_to_piece(int(token_id)))

    def pieces(self, text: str) -> list[str]:
        """The SentencePiece pieces of ``text`` (without BOS), for logs and tests."""
        return list(self.sp.encode(text, out_type=str))


def load_text_tokenizer(editx_dir: Path) -> StepTextTokenizer:
    """Load ``tokenizer.model`` (+ ``tokenizer_config.json`` when present) from an EditX directory.

    Only the config's ``add_bos_token`` / ``add_eos_token`` change encoding; both are absent from
    the official file, so the Llama defaults apply (BOS yes, EOS no), as in the reference.
    """
    editx_dir = Path(editx_dir)
    model_file = editx_dir / TOKENIZER_MODEL_FILE
    if not model_file.is_file():
        raise ModelLoadError(f"no {TOKENIZER_MODEL_FILE} in {editx_dir}")
    config: dict[str, object] = {}
    config_file = editx_dir / TOKENIZER_CONFIG_FILE
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot parse {config_file}: {exc}") from exc
        if not isinstance(config, dict):
            raise ModelLoadError(f"{config_file} is not a JSON object")
    tokenizer_class = config.get("tokenizer_class")
    if tokenizer_class not in (None, "LlamaTokenizer", "LlamaTokenizerFast"):
        logger.warning(
            "%s names tokenizer_class %r; reading %s as a Llama SentencePiece model anyway",
            config_file,
            tokenizer_class,
            model_file,
        )
    tok = StepTextTokenizer(
        model_file,
        add_bos=bool(config.get("add_bos_token", True)),
        add_eos=bool(config.get("add_eos_token", False)),
    )
    logger.info("Loaded the text tokenizer %s (%d pieces)", model_file, tok.vocab_size)
    return tok
