"""Cascade attention: a group's replies read their shared prompt's keys/values once per decode step.

The replies of one group share a prompt of ~800 tokens and add a few dozen of their own. Plain SDPA over a
per-row cache reads the prompt's keys and values once per reply: at 16 replies that is as many bytes per token
step as SmolLM2's weights. Here the cache keeps each prompt once (`CascadeLayer.prefixes`) and each reply's own
tokens apart; attention takes the scores of a group's queries against its prompt in one batched matmul, joins
them with each row's scores against its own tokens, and normalises both together: the same softmax, so the same
numbers as SDPA to float rounding (tests compare replies and log-probs with the per-row cache).

It plugs in through transformers' `AttentionInterface` as "discover_cascade": a model switched to it
(`enable`) runs plain SDPA everywhere (same function, same masks) except in a forward given `cascade=cache`.
"""

from __future__ import annotations

from typing import cast

import torch
from transformers import AttentionInterface, DynamicCache, DynamicLayer, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["CASCADE", "CascadeLayer", "PreallocatedLayer", "cascade_cache", "enable"]

CASCADE = "discover_cascade"


class PreallocatedLayer(DynamicLayer):
    """A decode cache layer with room for `capacity` positions: each new token's keys/values are written in
    place instead of `torch.cat`-copying the whole layer every step (at batch 8 and ~800 positions that copy
    moves about as many bytes per step as reading SmolLM2's weights)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        shape = (*keys.shape[:2], capacity, keys.shape[-1])
        self._keys, self._values = keys.new_empty(shape), values.new_empty(shape)
        self._length = 0
        self.update(keys, values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self._length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            raise RuntimeError(f"decode cache full: {end} positions for a capacity of {self._keys.shape[-2]}")
        self._keys[:, :, self._length : end] = key_states
        self._values[:, :, self._length : end] = value_states
        self._length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (rows that finished leave the decode batch)."""
        self._keys, self._values = self._keys[rows], self._values[rows]
        self.keys, self.values = self._keys[:, :, : self._length], self._values[:, :, : self._length]


class CascadeLayer(PreallocatedLayer):
    """One layer's cache for rows that share prompts: `prefixes[g]` holds prompt g's keys and values
    [kv_heads, P_g, dim] once, `group[i]` the prompt row i continues; the layer's own storage holds each
    row's generated tokens only (`update` returns those, and `attend` adds the prompt)."""

    def __init__(self, prefixes: list[tuple[torch.Tensor, torch.Tensor]], group: torch.Tensor, capacity: int) -> None:
        keys = prefixes[0][0]
        empty = keys.new_empty((len(group), keys.shape[0], 0, keys.shape[-1]))
        super().__init__(empty, empty, capacity)
        self.prefixes = prefixes
        self._group(group)

    def keep(self, rows: torch.Tensor) -> None:
        super().keep(rows)
        self._group(self.group[rows])

    def _group(self, group: torch.Tensor) -> None:
        """Set `group` and `members`: (prompt, its rows, how many) for each prompt that has rows, the rows a
        slice where they are consecutive (a view, no copy: the usual case, as groups are batched in order)."""
        self.group = group
        self.members: list[tuple[int, slice | torch.Tensor, int]] = []
        for g in torch.unique(group).tolist():
            rows = (group == g).nonzero().squeeze(1)
            first, last = int(rows[0]), int(rows[-1])
            self.members.append((g, slice(first, last + 1) if last - first + 1 == len(rows) else rows, len(rows)))

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention output [B, 1, heads, dim] of one new token per row: query [B, heads, 1, dim] against its
        prompt's prefix and its own `keys`/`values` [B, kv_heads, t, dim] (grouped-query heads share kv heads)."""
        batch, heads, length, dim = query.shape
        if length != 1:
            raise ValueError(f"cascade attention decodes one token per row, got {length}")
        kv_heads, own_length = keys.shape[1], keys.shape[2]
        per_kv = heads // kv_heads
        q = query.reshape(batch, kv_heads, per_kv, dim)  # head h reads kv head h // per_kv, as `repeat_kv` does
        own = (q @ keys.transpose(-1, -2)) * scaling  # [B, kv_heads, per_kv, t]
        out = query.new_empty((batch, kv_heads, per_kv, dim))
        for g, rows, n in self.members:
            prefix_keys, prefix_values = self.prefixes[g]
            prompt = prefix_keys.shape[1]
            grouped = q[rows].transpose(0, 1).reshape(kv_heads, n * per_kv, dim)
            shared = (grouped @ prefix_keys.transpose(-1, -2)) * scaling  # [kv_heads, n * per_kv, P]
            mine = own[rows].transpose(0, 1).reshape(kv_heads, n * per_kv, own_length)
            weights = torch.cat([shared, mine], -1).softmax(-1, dtype=torch.float32).to(query.dtype)
            part = (weights[..., :prompt] @ prefix_values).reshape(kv_heads, n, per_kv, dim)
            part = part + weights[..., prompt:].reshape(kv_heads, n, per_kv, own_length) @ values[rows].transpose(0, 1)
            out[rows] = part.transpose(0, 1)
        return out.reshape(batch, heads, dim)[:, None]


def cascade_cache(
    prompts: list[list[tuple[torch.Tensor, torch.Tensor]]], index: list[int], capacity: int
) -> DynamicCache:
    """A cache for rows `index` (row i continues prompt `index[i]`) from each prompt's per-layer keys/values
    [1, kv_heads, P, dim], with room for `capacity` generated tokens a row; pass it as both `cache=` and
    `cascade=` to a model that `enable` switched."""
    group = torch.tensor(index, device=prompts[0][0][0].device)
    cache = DynamicCache()
    cache.layers = [
        CascadeLayer([(p[layer][0][0], p[layer][1][0]) for p in prompts], group, capacity)
        for layer in range(len(prompts[0]))
    ]
    return cache


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cascade: DynamicCache | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA, or, in a forward given `cascade=`, the cascade over that cache's prompts (the rows are unpadded:
    no mask applies)."""
    if cascade is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    layer = cascade.layers[cast(int, module.layer_idx)]  # set by every transformers attention layer
    assert isinstance(layer, CascadeLayer)  # `cascade_cache` builds no other
    return layer.attend(query, key, value, query.shape[-1] ** -0.5 if scaling is None else scaling), None


AttentionInterface.register(CASCADE, _attention)
AttentionMaskInterface.register(CASCADE, sdpa_mask)


def enable(model: PreTrainedModel) -> bool:
    """Switch a model that runs SDPA to "discover_cascade" (SDPA but where a forward passes `cascade=`); other
    attention implementations (eager, flash, a model's own) are left alone. Whether the model now has it."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(CASCADE)
    return model.config._attn_implementation == CASCADE
