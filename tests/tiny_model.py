"""A tiny randomly initialised Llama and a BPE tokenizer built in code, so tests need no downloaded weights."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, PreTrainedTokenizerFast

SPECIAL = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "```json\n[0.5, 0.25, 1.0, 0.125, 0.75]\n```",
    "```python\nimport numpy as np\ndef run(construction, **kwargs):\n    return construction\n```",
    "Give an improved construction: a list of numbers in [0, 1]. [[0.1, 0.2, 0.05], [0.9, 0.8, 0.1]]",
    '0123456789 -1e-3 2.5E+2 , ] [ { } " : true false null',
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with multi-character number tokens (e.g. '0.', '25'), like real LLM vocabularies."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


class CountingConstraint:
    """A stand-in grammar with the `JsonArrayConstraint` interface: the first `length` tokens must come from
    `allowed`, after that only EOS. Enough to test how the policy and trainer use a constraint."""

    prefix = "```json\n"
    suffix = "\n```"

    def __init__(self, tokenizer: PreTrainedTokenizerFast, allowed: list[int], length: int = 3) -> None:
        self.vocab = len(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.allowed, self.length = list(allowed), length

    def mask(self, position: int) -> torch.Tensor:
        row = torch.zeros(self.vocab, dtype=torch.bool)
        row[self.allowed if position < self.length else [self.eos]] = True
        return row

    def token_masks(self, completion_ids: list[int]) -> torch.Tensor:
        masks = torch.stack([self.mask(t) for t in range(len(completion_ids))])
        if not all(masks[t, token] for t, token in enumerate(completion_ids)):
            raise ValueError(f"completion {completion_ids} breaks the constraint")
        return masks

    def logits_processor(self, prompt_length: int):
        constraint = self

        class Processor(LogitsProcessor):
            def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
                row = constraint.mask(input_ids.shape[1] - prompt_length).to(scores.device)
                return scores.masked_fill(~row[: scores.shape[1]], -torch.inf)

        return Processor()
