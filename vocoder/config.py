"""Read ``CosyVoice-300M-25Hz/cosyvoice.yaml`` into our modules, without hyperpyyaml or reference code.

The official file is HyperPyYAML: ``!new:<module path>.<Class>`` tags name the reference's
classes and their mappings are constructor keyword arguments. We parse it with plain PyYAML and
custom constructors that record each tag, then build only the three keys the vocoder uses
(``mel_conf``, ``flow``, ``hift``) by mapping each tag's class name to our class
(:data:`CLASS_TAGS`). ``!ref <key>`` references to top-level keys are resolved; any other tag,
or a class we do not implement, fails with a :class:`~errors.ModelLoadError` that names it.
Unused top-level keys are never built, so whatever they hold cannot break loading.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from errors import ModelLoadError
from vocoder.dit import DiT
from vocoder.encoder import DualCodebookEmbedding, UpsampleConformerEncoderV2
from vocoder.flow import CausalConditionalCFM, CausalMaskedDiffWithXvec
from vocoder.frontend import MelConfig
from vocoder.hift import ConvRNNF0Predictor, HiFTGenerator, load_hift_state_dict
from vocoder.weights import load_strict

logger = logging.getLogger(__name__)

YAML_NAME = "cosyvoice.yaml"
FLOW_NAME = "flow.pt"
HIFT_NAME = "hift.pt"
CAMPPLUS_NAME = "campplus.onnx"
USED_KEYS = ("mel_conf", "flow", "hift")

# Upstream class name (last component of the !new: path) -> our implementation.
CLASS_TAGS: dict[str, Callable[..., nn.Module]] = {
    "CausalMaskedDiffWithXvec": CausalMaskedDiffWithXvec,
    "DualCodebookEmbedding": DualCodebookEmbedding,
    "UpsampleConformerEncoderV2": UpsampleConformerEncoderV2,
    "CausalConditionalCFM": CausalConditionalCFM,
    "DiT": DiT,
    "HiFTGenerator": HiFTGenerator,
    "ConvRNNF0Predictor": ConvRNNF0Predictor,
}


@dataclass(frozen=True)
class Tagged:
    """A YAML node carrying a non-standard tag, kept unbuilt: ``tag`` as written, ``value`` plain data."""

    tag: str
    value: Any


@dataclass
class VocoderParts:
    """What ``cosyvoice.yaml`` + the checkpoints describe: the mel settings and the two loaded models."""

    directory: Path
    mel_conf: MelConfig
    flow: CausalMaskedDiffWithXvec
    hift: HiFTGenerator

    @property
    def campplus_path(self) -> Path:
        return self.directory / CAMPPLUS_NAME


class _TagLoader(yaml.SafeLoader):
    """SafeLoader that keeps every ``!tag`` as :class:`Tagged` instead of failing or executing it."""


def _construct_tagged(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return Tagged(tag=f"!{tag_suffix}" if not tag_suffix.startswith("tag:") else tag_suffix, value=value)


_TagLoader.add_multi_constructor("!", _construct_tagged)
_TagLoader.add_multi_constructor("tag:yaml.org,2002:python/", _construct_tagged)


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse ``cosyvoice.yaml`` into plain data with :class:`Tagged` placeholders (nothing built)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_TagLoader)  # a SafeLoader subclass: tags are only recorded
    except yaml.YAMLError as exc:
        raise ModelLoadError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a mapping at the top level")
    return data


class _Builder:
    """Instantiates tagged nodes bottom-up; ``!ref <key>`` resolves to the built top-level ``key``."""

    def __init__(self, top: Mapping[str, Any], source: Path) -> None:
        self.top = top
        self.source = source
        self.built: dict[str, Any] = {}
        self.stack: list[str] = []

    def top_level(self, key: str) -> Any:
        if key in self.built:
            return self.built[key]
        if key not in self.top:
            raise ModelLoadError(f"{self.source}: required key {key!r} is missing")
        if key in self.stack:
            raise ModelLoadError(f"{self.source}: circular !ref through {key!r}")
        self.stack.append(key)
        self.built[key] = self.build(self.top[key], key)
        self.stack.pop()
        return self.built[key]

    def build(self, value: Any, where: str) -> Any:
        if isinstance(value, dict):
            return {k: self.build(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.build(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, Tagged):
            return value
        if value.tag == "!ref":
            ref = str(value.value).strip()
            if not (ref.startswith("<") and ref.endswith(">")):
                raise ModelLoadError(
                    f"{self.source}: {where}: only plain '!ref <key>' references are supported, got {ref!r}"
                )
            return self.top_level(ref[1:-1])
        if not value.tag.startswith("!new:"):
            raise ModelLoadError(
                f"{self.source}: {where}: unsupported tag {value.tag!r} (only !new: and !ref are understood)"
            )
        path = value.tag[len("!new:") :]
        class_name = path.rsplit(".", 1)[-1]
        cls = CLASS_TAGS.get(class_name)
        if cls is None:
            raise ModelLoadError(
                f"{self.source}: {where}: unknown class tag !new:{path} (known: {', '.join(sorted(CLASS_TAGS))})"
            )
        args = self.build(value.value, where)
        try:
            if isinstance(args, dict):
                return cls(**args)
            if isinstance(args, list):
                return cls(*args)
            if args in (None, ""):
                return cls()
        except ModelLoadError:
            raise
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{self.source}: {where}: cannot build {class_name}: {exc}") from exc
        raise ModelLoadError(f"{self.source}: {where}: !new:{path} needs a mapping of arguments")


def _mel_config(raw: Any, source: Path) -> MelConfig:
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{source}: mel_conf must be a mapping")
    try:
        return MelConfig.from_mapping(raw)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{source}: mel_conf is malformed: {exc!r}") from exc


def build_from_yaml(path: Path) -> tuple[MelConfig, CausalMaskedDiffWithXvec, HiFTGenerator]:
    """Build (unloaded, randomly initialised) modules from ``cosyvoice.yaml``."""
    path = Path(path)
    builder = _Builder(read_yaml(path), path)
    mel_conf = _mel_config(builder.top_level("mel_conf"), path)
    flow = builder.top_level("flow")
    hift = builder.top_level("hift")
    if not isinstance(flow, CausalMaskedDiffWithXvec):
        raise ModelLoadError(f"{path}: 'flow' must be a !new:...CausalMaskedDiffWithXvec")
    if not isinstance(hift, HiFTGenerator):
        raise ModelLoadError(f"{path}: 'hift' must be a !new:...HiFTGenerator")
    return mel_conf, flow, hift


def load_flow_state_dict(flow: CausalMaskedDiffWithXvec, state_dict: Mapping[str, torch.Tensor] | Path) -> None:
    """Strictly load ``flow.pt`` (a path or a state dict); names missing/unexpected keys on mismatch."""
    load_strict(flow, state_dict, "flow.pt")


def load_cosyvoice(vocoder_dir: Path, device: str | torch.device = "cpu") -> VocoderParts:
    """Build the vocoder from ``<vocoder_dir>/cosyvoice.yaml`` and load ``flow.pt``/``hift.pt`` strictly.

    The models run in fp32 (as the reference builds them), in eval mode, on ``device``.
    """
    vocoder_dir = Path(vocoder_dir)
    for name in (YAML_NAME, FLOW_NAME, HIFT_NAME):
        if not (vocoder_dir / name).is_file():
            raise ModelLoadError(f"vocoder directory {vocoder_dir} lacks {name}")
    mel_conf, flow, hift = build_from_yaml(vocoder_dir / YAML_NAME)
    load_flow_state_dict(flow, vocoder_dir / FLOW_NAME)
    load_hift_state_dict(hift, vocoder_dir / HIFT_NAME)
    flow.to(device=device, dtype=torch.float32).eval()
    hift.to(device=device, dtype=torch.float32).eval()
    logger.info(
        "Loaded the vocoder from %s (flow %.1fM, HiFT %.1fM parameters)",
        vocoder_dir,
        sum(p.numel() for p in flow.parameters()) / 1e6,
        sum(p.numel() for p in hift.parameters()) / 1e6,
    )
    return VocoderParts(directory=vocoder_dir, mel_conf=mel_conf, flow=flow, hift=hift)
