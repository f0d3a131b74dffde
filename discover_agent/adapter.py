"""The LoRA-wrapped model's weights as `LocalPolicy` uses them, apart from sampling and scoring.

Which model computes what: the decoder and unembedding where logits are a plain `hidden @ weight.T` (so a
grammar's few allowed ids can be scored alone), a merged copy of the adapter for fast sampling, the version
counter that tells when weights changed, and the adapter's folder on disk.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple, cast

import torch
from peft import LoraConfig, PeftConfig, PeftModel, set_peft_model_state_dict
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch.nn.modules.module import _IncompatibleKeys
from transformers import PreTrainedModel

from discover_agent.storage import replace_dir

__all__ = ["Head", "MergedCopy", "load_adapter", "plain_head", "save_adapter", "weights_version"]


class Head(NamedTuple):
    """A model's decoder (up to the last hidden state) and its unembedding weight [vocab, hidden]."""

    decoder: torch.nn.Module
    weight: torch.Tensor


def base_model(model: PeftModel) -> PreTrainedModel:
    """The transformers model under the adapter (peft annotates it as a bare `Module`)."""
    return cast(PreTrainedModel, model.get_base_model())


def plain_head(model: PreTrainedModel | PeftModel, device: torch.device) -> Head | None:
    """(decoder, unembedding weight) when the model's logits are exactly `last hidden state @ weight.T` (Llama,
    Qwen, Mistral, SmolLM2 ...), checked on two tokens; None where the head has a bias, scales or soft-caps its
    logits, or carries a LoRA adapter (`lora_lm_head`): those models always compute full logits."""
    base = base_model(model) if isinstance(model, PeftModel) else model
    head, decoder = base.get_output_embeddings(), base.get_decoder()
    if type(head) is not torch.nn.Linear or head.bias is not None or decoder is None or decoder is base:
        return None
    ids = torch.tensor([[0, 1]], device=device)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        own = decoder(input_ids=ids).last_hidden_state @ head.weight.T
    return Head(decoder, head.weight) if torch.allclose(full, own, rtol=1e-4, atol=1e-4) else None


def weights_version(model: torch.nn.Module) -> tuple[int, ...]:
    """Changes whenever a trainable weight is modified in place (an optimiser step): what was computed from the
    weights before (kept prompts, a merged copy) is then stale."""
    return tuple(p._version for p in model.parameters() if p.requires_grad)


def _weight(layer: torch.nn.Module) -> torch.Tensor:
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)  # a Linear's (or Conv1D's) parameter
    return weight


class MergedCopy:
    """A plain copy of a LoRA model's base with W + delta(adapter) in each adapted layer, for sampling: the
    decode loop then runs no peft wrappers (Python per module and token) and no rank-r matmuls. The trainer
    keeps using the LoRA model; `sync` re-merges after the adapter changed (its weights' version counters)."""

    def __init__(self, model: PeftModel) -> None:
        self.model = copy.deepcopy(base_model(model))
        #: (adapted layer, its frozen weight, the copy's weight that holds the merged sum)
        self.layers: list[tuple[LoraLinear, torch.Tensor, torch.Tensor]] = []
        for name, module in base_model(model).named_modules():
            if isinstance(module, LoraLayer):
                assert isinstance(module, LoraLinear)  # `supports` admits no other adapted layer
                parent, _, child = name.rpartition(".")
                owner = self.model.get_submodule(parent)
                plain = getattr(owner, child).base_layer
                setattr(owner, child, plain)
                self.layers.append((module, _weight(module.get_base_layer()), plain.weight))
        self.model.requires_grad_(False).eval()
        self.version: tuple[int, ...] | None = None

    @staticmethod
    def supports(model: PeftModel) -> bool:
        """Only adapted Linear layers whose weights no other module shares (an adapted, tied lm_head would
        carry the delta into the input embeddings)."""
        base = base_model(model)
        tied = base.get_output_embeddings()
        return all(
            type(m) is LoraLinear and not (tied is not None and m.base_layer.weight is tied.weight)
            for m in base.modules()
            if isinstance(m, LoraLayer)
        ) and not isinstance(tied, LoraLayer)

    def sync(self, version: tuple[int, ...]) -> None:
        """Re-merge unless `version` (the LoRA model's `weights_version`) is the one last merged."""
        if version == self.version:
            return
        with torch.no_grad():
            for lora, frozen, merged in self.layers:
                merged.copy_(frozen + lora.get_delta_weight("default"))
        self.version = version


def save_adapter(model: PeftModel, path: str | Path) -> Path:
    """Write the LoRA adapter to the folder `path`, replacing it atomically (a crash leaves the old one)."""
    return replace_dir(lambda tmp: model.save_pretrained(str(tmp)), Path(path))


def load_adapter(model: PeftModel, path: str | Path, device: torch.device) -> None:
    """Load LoRA weights saved by `save_adapter`; the rank and target modules must match the model's."""
    path = Path(path)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no saved adapter in {path} (missing {weights.name})")
    # peft types both as the base `PeftConfig`; an adapter made by `wrap_lora` has a `LoraConfig`.
    saved = cast(LoraConfig, PeftConfig.from_pretrained(str(path)))
    current = cast(LoraConfig, model.peft_config["default"])
    if saved.r != current.r or set(saved.target_modules or ()) != set(current.target_modules or ()):
        raise ValueError(
            f"adapter in {path} has rank {saved.r} on {sorted(saved.target_modules or ())}, but this policy uses "
            f"rank {current.r} on {sorted(current.target_modules or ())}"
        )
    # peft annotates the result as a bare `namedtuple`; it is `load_state_dict`'s.
    result = cast(_IncompatibleKeys, set_peft_model_state_dict(model, load_file(weights, device=str(device))))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"adapter in {path} does not fit this model: unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}"
        )
