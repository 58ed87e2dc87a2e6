"""Reuse of prompt key/value states across turns of an episode.

An episode's next prompt is its last prompt plus what the human and the assistant wrote since, so
re-encoding it from scratch every turn spends most of a turn on tokens the model has already seen.
:class:`PrefixCache` keeps the key/value states of recent prompts; :func:`batch_inputs` lays a batch
out so each row's cached prefix goes in as the ``cache`` and only the rest is encoded.

Layout of row i, with P the longest cached prefix in the batch and S the longest remainder::

    [pad]*(P - L_i) + prefix_i (cached) + [pad]*(S - s_i) + rest_i

Padding is masked out and position ids come from the mask, so every real token keeps the position
it had when its states were computed.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from transformers import DynamicCache

States = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (heads, tokens, dim)


def supports_prefix_cache(model) -> bool:
    """Only plain full-attention decoders: a sliding-window layer does not keep the whole prefix."""
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "use_sliding_window", False):
        return False
    return all(
        kind == "full_attention" for kind in (getattr(config, "layer_types", None) or ["full_attention"])
    )


def prefix_cache_for(model, size: int) -> PrefixCache | None:
    """A cache of ``size`` prompts for ``model``, or None when size is 0 or the model cannot use one."""
    return PrefixCache(size) if size and supports_prefix_cache(model) else None


class PrefixCache:
    """Key/value states of the last ``max_entries`` prompts, looked up by longest common token prefix."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, States]] = OrderedDict()
        self.reused_tokens = 0
        self.encoded_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: list[int]) -> tuple[int, States | None]:
        """(length, states) of the longest cached prefix of ``ids``, leaving at least its last token to
        encode (generation needs the logits after it); (0, None) when nothing useful is cached."""
        best, best_key = 0, None
        query = np.asarray(ids)
        for key, (array, _) in self._entries.items():
            n = min(len(key), len(ids) - 1)
            if n <= best:
                continue
            differ = np.flatnonzero(array[:n] != query[:n])
            common = int(differ[0]) if differ.size else n
            if common > best:
                best, best_key = common, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        return best, [(k[:, :best], v[:, :best]) for k, v in self._entries[best_key][1]]

    def store(self, ids: list[int], states: States) -> None:
        """Keep ``states`` (one per layer, covering exactly ``ids``); entries it extends are dropped."""
        key = tuple(ids)
        for old in [k for k in self._entries if len(k) <= len(key) and key[: len(k)] == k]:
            del self._entries[old]
        self._entries[key] = (np.asarray(ids), states)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def batch_inputs(cache: PrefixCache, rows: list[list[int]], pad_id: int, device) -> dict:
    """``generate`` inputs for ``rows`` that start from their cached prefixes (see the module doc).

    Returns input_ids, attention_mask and cache (a DynamicCache holding the prefixes, empty when no
    row has one; ``generate``'s ``cache``, formerly ``past_key_values``), plus ``layout``: (prefix
    width P, remainder width S, per-row prefix lengths).
    """
    found = [cache.lookup(ids) for ids in rows]
    lengths = [n for n, _ in found]
    width_p = max(lengths)
    width_s = max(len(ids) - n for ids, n in zip(rows, lengths, strict=True))
    input_ids, mask = [], []
    for ids, n in zip(rows, lengths, strict=True):
        rest = len(ids) - n
        input_ids.append([pad_id] * (width_p - n) + ids[:n] + [pad_id] * (width_s - rest) + ids[n:])
        mask.append([0] * (width_p - n) + [1] * n + [0] * (width_s - rest) + [1] * rest)
    cache.reused_tokens += sum(lengths)
    cache.encoded_tokens += sum(len(ids) for ids in rows) - sum(lengths)
    past = DynamicCache()
    if width_p:
        layers = next(states for _, states in found if states is not None)
        data = []
        for layer, (keys, values) in enumerate(layers):
            shape = (len(rows), keys.shape[0], width_p, keys.shape[2])
            k = torch.zeros(shape, dtype=keys.dtype, device=device)
            v = torch.zeros(shape, dtype=values.dtype, device=device)
            for row, (n, states) in enumerate(found):
                if n:
                    k[row, :, width_p - n :] = states[layer][0]
                    v[row, :, width_p - n :] = states[layer][1]
            data.append((k, v))
        past = DynamicCache(ddp_cache_data=data)
    return {
        "input_ids": torch.tensor(input_ids, device=device),
        "attention_mask": torch.tensor(mask, device=device),
        "cache": past,
        "layout": (width_p, width_s, lengths),
    }


def store_prompts(cache: PrefixCache, rows: list[list[int]], past: DynamicCache, layout) -> None:
    """After ``generate``: keep each row's prompt states (its prefix and remainder, padding dropped)."""
    width_p, width_s, lengths = layout
    layers = [(layer.keys, layer.values) for layer in past.layers]
    for row, (ids, n) in enumerate(zip(rows, lengths, strict=True)):
        rest = len(ids) - n
        spans = [slice(width_p - n, width_p), slice(width_p + width_s - rest, width_p + width_s)]
        states = [
            (torch.cat([k[row, :, s] for s in spans], dim=1), torch.cat([v[row, :, s] for s in spans], dim=1))
            for k, v in layers
        ]
        cache.store(ids, states)


__all__ = ["PrefixCache", "batch_inputs", "prefix_cache_for", "store_prompts", "supports_prefix_cache"]
