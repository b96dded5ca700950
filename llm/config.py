"""Step1 hyperparameters, read from the official ``config.json`` keys.

The official bundle ships ``configuration_step1.py`` for ``trust_remote_code``; we never run it.
This class accepts the same keys (``num_attention_groups``, ``max_seq_len``, ...) so the official
``config.json`` loads unchanged through ``AutoConfig`` once ``llm`` is imported.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

MODEL_TYPE = "step1"


class Step1Config(PretrainedConfig):
    """Step1 (Step-Audio-EditX LLM) configuration; defaults are the official 3.5 B model.

    ``tie_word_embeddings`` is forced to False: the checkpoint stores ``lm_head`` separately and
    transformers >= 4.54 would otherwise tie it to the embeddings (silent audio, docs/model.md §3.6).
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # noqa: RUF012 - transformers class attribute
    # Generic names some transformers utilities look up, mapped onto the official keys.
    attribute_map = {  # noqa: RUF012 - transformers class attribute
        "num_key_value_heads": "num_attention_groups",
        "max_position_embeddings": "max_seq_len",
    }

    vocab_size: int = 74752
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 48
    num_attention_groups: int = 4
    max_seq_len: int = 32768
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 3
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs.pop("tie_word_embeddings", None)
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def __setattr__(self, name: str, value: object) -> None:
        # from_pretrained(..., tie_word_embeddings=True) sets attributes after __init__: refuse here.
        if name == "tie_word_embeddings" and value:
            logger.warning("Step1: ignoring tie_word_embeddings=true; lm_head is a separate weight")
            value = False
        super().__setattr__(name, value)

    @property
    def head_dim(self) -> int:
        """Width of one attention head (64 in the official model)."""
        return self.hidden_size // self.num_attention_heads

    def validate_architecture(self) -> None:
        """Reject shapes the attention cannot split (ValueError; the loader reports it as ModelLoadError)."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_groups <= 0 or self.num_attention_heads % self.num_attention_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_attention_groups {self.num_attention_groups}"
            )
