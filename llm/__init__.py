"""The Step1 LLM stage: our own model (``config``, ``model``), text tokenizer, prompts, generation.

Importing the package registers Step1 with transformers' Auto classes, so ``AutoConfig`` and
``AutoModelForCausalLM.from_pretrained`` load an official ``Step-Audio-EditX`` directory with this
implementation and never with the ``modeling_step1.py`` shipped beside the weights.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from llm.config import MODEL_TYPE, Step1Config
from llm.model import Step1ForCausalLM, Step1Model, alibi_slopes

AutoConfig.register(MODEL_TYPE, Step1Config, exist_ok=True)
AutoModelForCausalLM.register(Step1Config, Step1ForCausalLM, exist_ok=True)

__all__ = ["Step1Config", "Step1ForCausalLM", "Step1Model", "alibi_slopes"]
