"""A project-made stand-in for the official Step1 ``tokenizer.model`` (no training, no download).

The SentencePiece ``ModelProto`` is built directly, with the official file's structure so the
same code paths run as with the real one:

* unigram model, byte fallback, ``identity`` normalizer with the dummy prefix and without
  whitespace folding (the official normalizer settings);
* 74752 pieces: ``<unk>`` 0, CONTROL ``<s>`` 1, ``</s>`` 2, ``<|EOT|>`` 3, ``<|BOT|>`` 4, reserved
  CONTROL pieces up to 67, the 256 byte pieces at 68..323 (``<0x0A>`` = 78 as in the official
  model), ``▁`` at 324, normal pieces up to 65535 and USER_DEFINED ``<audio_N>`` = 65536 + N;
* the normal pieces: the words of every prompt template and edit option (with and without
  ``▁``, whole words score best), printable ASCII characters, lowercase letter pairs and triples,
  then CJK ideographs and Hangul syllables as filler. English prompts therefore tokenise into
  plausible word pieces, and anything else still round-trips through the byte pieces.

``tokenizer_config.json`` carries the official file's keys and values.
"""

from __future__ import annotations

import itertools
import json
import re
import string
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from llm import prompts
from llm.text_tokenizer import AUDIO_ID_OFFSET, TOKENIZER_CONFIG_FILE, TOKENIZER_MODEL_FILE

VOCAB_SIZE = 74752  # official Step1 vocabulary (ids >= 65536 are <audio_N>)
N_AUDIO_PIECES = VOCAB_SIZE - AUDIO_ID_OFFSET  # 9216, as in the official model
SPECIAL_PIECES = ("<unk>", "<s>", "</s>", "<|EOT|>", "<|BOT|>")
FIRST_BYTE_ID = 68  # official layout: <0x00> = 68, so <0x0A> = 78
SPACE = "\u2581"  # SentencePiece's whitespace marker

# unigram log-probabilities: fewer, longer pieces win; words beat letter n-grams
WORD_SCORE = -6.0
TRIGRAM_SCORE = -11.0
BIGRAM_SCORE = -11.5
CHAR_SCORE = -12.0
FILLER_SCORE = -14.0

# the official tokenizer_config.json (no add_bos_token: the Llama default, true, applies)
TOKENIZER_CONFIG = {
    "bos_token": "<s>",
    "clean_up_tokenization_spaces": False,
    "eos_token": "</s>",
    "legacy": False,
    "model_max_length": 65536,
    "pad_token": "<unk>",
    "padding_side": "left",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": "<unk>",
    "use_default_system_prompt": False,
}

COMMON_WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from or"
    " had by word but what some we can out other were all there when up use your how said an each she"
    " which do their time if will way about many then them write would like so these her long make thing"
    " see him two has look more day could go come did number sound no most people my over know water than"
    " call first who may down side been now find any new work part take get place made live where after"
    " back little only round man year came show every good me give our under name very through just form"
    " sentence great think say help low line differ turn cause much mean before move right boy old too"
    " same tell does set three want air well also play small end put home read hand port large spell add"
    " even land here must big high such follow act why ask men change went light kind off need house"
    " picture try us again animal point mother world near build self earth father hello test quick brown"
    " fox jumps lazy dog morning lovely walk park please bring things Stella"
)


def _words() -> list[str]:
    """Words of the prompt templates, the edit catalogue and a common-English list, in order."""
    texts = [
        prompts.EDIT_SYSTEM_PROMPT,
        prompts.CLONE_SYSTEM_PROMPT_TEMPLATE,
        prompts.DENOISE_INSTRUCTION,
        prompts.VAD_INSTRUCTION,
        prompts.edit_instruction("emotion", "happy", "x"),
        prompts.edit_instruction("emotion", "remove", "x"),
        prompts.edit_instruction("style", "serious", "x"),
        prompts.edit_instruction("style", "remove", "x"),
        prompts.edit_instruction("paralinguistic", None, "x", "x"),
        "system human assistant speaker_start speaker_end clone",
        " ".join(o for options in prompts.EDIT_OPTIONS.values() for o in options),
        " ".join(prompts.PARALINGUISTIC_TAGS),
        COMMON_WORDS,
    ]
    seen: dict[str, None] = {}
    for word in re.findall(r"[A-Za-z]+", " ".join(texts)):
        for form in (word, word.lower(), word.capitalize()):
            seen.setdefault(form, None)
    return list(seen)


def _normal_pieces() -> list[tuple[str, float]]:
    """The normal pieces for ids 324..65535 (``▁`` first) with their scores, no duplicates."""
    n_normal = AUDIO_ID_OFFSET - (FIRST_BYTE_ID + 256)  # 65212 pieces at ids 324..65535
    out: dict[str, float] = {SPACE: -3.0}

    def add(piece: str, score: float) -> None:
        if len(out) < n_normal:
            out.setdefault(piece, score)

    for word in _words():
        add(SPACE + word, WORD_SCORE)
        add(word, WORD_SCORE - 0.5)
    printable = [c for c in string.printable if not c.isspace()]
    for c in printable:
        add(c, CHAR_SCORE)
        add(SPACE + c, CHAR_SCORE + 0.5)
    for n, score in ((3, TRIGRAM_SCORE), (2, BIGRAM_SCORE)):
        for letters in itertools.product(string.ascii_lowercase, repeat=n):
            piece = "".join(letters)
            add(SPACE + piece, score + 0.25)
            add(piece, score)
    fillers = itertools.chain(range(0x4E00, 0xA000), range(0xAC00, 0xD7A4))  # CJK, Hangul
    for code in fillers:
        if len(out) >= n_normal:
            break
        add(chr(code), FILLER_SCORE)
    if len(out) != n_normal:
        raise RuntimeError(f"built {len(out)} normal pieces, need {n_normal}")
    return list(out.items())


def build_model_proto() -> sp_pb2.ModelProto:
    """The SentencePiece model as a protobuf, ids laid out like the official one."""
    Piece = sp_pb2.ModelProto.SentencePiece
    model = sp_pb2.ModelProto()

    def append(piece: str, kind: int, score: float = 0.0) -> None:
        p = model.pieces.add()
        p.piece, p.type, p.score = piece, kind, score

    append(SPECIAL_PIECES[0], Piece.UNKNOWN)
    for piece in SPECIAL_PIECES[1:]:
        append(piece, Piece.CONTROL)
    for i in range(len(SPECIAL_PIECES), FIRST_BYTE_ID):
        append(f"<|reserved_{i}|>", Piece.CONTROL)
    for b in range(256):
        append(f"<0x{b:02X}>", Piece.BYTE)
    for piece, score in _normal_pieces():
        append(piece, Piece.NORMAL, score)
    for n in range(N_AUDIO_PIECES):
        append(f"<audio_{n}>", Piece.USER_DEFINED)
    if len(model.pieces) != VOCAB_SIZE:
        raise RuntimeError(f"built {len(model.pieces)} pieces, need {VOCAB_SIZE}")

    spec = model.trainer_spec
    spec.model_prefix = "step1_project_tokenizer"
    spec.model_type = sp_pb2.TrainerSpec.UNIGRAM
    spec.vocab_size = VOCAB_SIZE
    spec.byte_fallback = True
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.precompiled_charsmap = b""
    norm.add_dummy_prefix = True
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model


def write_text_tokenizer(editx_dir: Path) -> None:
    """Write ``tokenizer.model`` and ``tokenizer_config.json`` into ``editx_dir`` (created if needed)."""
    editx_dir = Path(editx_dir)
    editx_dir.mkdir(parents=True, exist_ok=True)
    (editx_dir / TOKENIZER_MODEL_FILE).write_bytes(build_model_proto().SerializeToString())
    (editx_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
