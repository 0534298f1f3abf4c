"""KV-cache plumbing for jagged batches: left padding, masks over cache slots, compaction, joins.

A batch's rows have different lengths, and speculative decoding rejects drafts whose keys and values
are already in the cache. Both are handled with one DynamicCache per model and a 2-D slot mask
(B, L): 1 = a token, 0 = a hole (left padding, or a rejected draft). Holes are never cropped: a
masked slot gives the same logits as a cache without it (verified for stock transformers 5.x Qwen3 /
Llama / GPT-2, see tests/test_specdec.py), and every call gets explicit per-row position_ids
(position = number of real tokens before the token). A cache that is mostly holes is compacted
(`compact`); newly admitted rows are prefilled alone and joined to the running cache (`join`).
Limitation: full-attention decoders (sliding-window layers would count holes as tokens).
"""
import functools
import inspect

import torch
from transformers import DynamicCache


def left_pad(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged token lists -> ids (B, T) and attention mask (B, T), left-padded with id 0 / mask
    0."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)  # (B, T)
    for b, s in enumerate(seqs):
        if s:
            ids[b, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[b, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def forward(model, ids, mask, positions, cache, logits_to_keep=0):
    """One cached forward pass of ids (B, T'); `mask` (B, L) covers every slot of the cache plus the
    new ones. -> logits (B, T', V) (the last logits_to_keep of them, 0 = all)."""
    cache_kw = cache_kwarg(type(model))
    out = model(input_ids=ids, attention_mask=attention_mask(model, mask, ids.shape[1]),
                position_ids=positions, use_cache=True, logits_to_keep=logits_to_keep,
                **{cache_kw: cache})
    return out.logits  # (B, T', V)


@functools.cache
def cache_kwarg(model_class) -> str:
    """transformers 5.24 renamed forward's `past_key_values` to `cache`; support both."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def attention_mask(model, mask: torch.Tensor, n_new: int) -> torch.Tensor:
    """The 2-D slot mask (B, L) -> the 4-D mask (B, 1, n_new, L) that transformers would build from
    it: the new tokens fill the last n_new slots, and a query sees every valid slot up to its own.
    Handing it over ready-made skips transformers' mask construction in every call (~20 small ops
    and a GPU sync each, a fifth of a one-layer draft's ops), with the same logits. Attention
    implementations that do not take a 4-D tensor get the 2-D mask."""
    implementation = model.config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        return mask
    visible = mask[:, None, None, :].bool()  # (B, 1, 1, L)
    if n_new > 1:  # causality among the new tokens; one new token is the last slot: sees everything
        slots = torch.arange(mask.shape[1], device=mask.device)  # (L,)
        visible = visible & (slots <= slots[-n_new:, None])  # (B, 1, n_new, L)
    if implementation == "eager":  # eager attention adds the mask to its scores: 0 or dtype's min
        return torch.zeros(visible.shape, dtype=model.dtype, device=mask.device).masked_fill_(
            ~visible, torch.finfo(model.dtype).min)  # (B, 1, n_new, L)
    return visible


def compact(cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
    """Drop holes: move every row's valid slots to the right end, in order, with one stable sort and
    a gather per layer. Returns the new mask (B, L')."""
    width = int(mask.sum(1).max())
    keep = torch.sort(mask, dim=1, stable=True).indices[:, -width:]  # (B, L'): holes, then valid
    for layer in cache.layers:
        for name in ("keys", "values"):
            kv = getattr(layer, name)  # (B, H, L, D)
            idx = keep[:, None, :, None].expand(-1, kv.shape[1], -1, kv.shape[-1])  # (B, H, L', D)
            setattr(layer, name, kv.gather(2, idx))  # (B, H, L', D)
    return mask.gather(1, keep)  # (B, L')


def join(cache: DynamicCache, mask: torch.Tensor, new_cache: DynamicCache,
         new_mask: torch.Tensor):
    """Append the rows of new_cache (mask (m, L2)) to cache (mask (b, L)); the narrower one is
    left-padded with holes, so both get max(L, L2) slots. Returns the cache and its mask
    (b + m, max(L, L2))."""
    if mask.shape[0] == 0:  # an empty batch: the new rows are the batch
        return new_cache, new_mask
    width = max(mask.shape[1], new_mask.shape[1])
    for i, layer in enumerate(cache.layers):
        for name in ("keys", "values"):
            kv = getattr(layer, name)  # (b, H, L, D)
            new_kv = (getattr(new_cache.layers[i], name) if new_cache.layers  # (m, H, L2, D)
                      else kv.new_zeros(new_mask.shape[0], kv.shape[1], 0, kv.shape[3]))  # L2 = 0
            padded = [torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0))
                      for t in (kv, new_kv)]  # (b, H, width, D), (m, H, width, D)
            setattr(layer, name, torch.cat(padded))  # (b + m, H, width, D)
    padded = [torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in (mask, new_mask)]
    return cache, torch.cat(padded)  # (b + m, width)
