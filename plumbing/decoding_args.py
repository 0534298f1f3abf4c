"""The generators' arguments: checked once before any work, resolved into what decoding uses.

Every refusal is a ValueError that names the argument and the value, before a model is called;
`check_logits` refuses non-finite logits where sampling starts (NonFiniteLogits names the model).
"""
import math
import numbers

import torch


def check_args(models, prompts, max_new_tokens, temperature, top_k, top_p, gamma=1,
               vocab_size=None):
    """Refuse every argument no generator can use (ValueError naming it), prompts included."""
    for name, value in (("gamma", gamma), ("top_k", top_k), ("max_new_tokens", max_new_tokens)):
        if not is_int(value):
            raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if gamma < 1:
        raise ValueError(f"gamma must be an integer >= 1, got {gamma}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_prompts(prompts, shared_vocab(models, vocab_size))
    for i, prompt in enumerate(prompts):
        for model in models:
            ctx = context_length(model)
            if ctx is not None and len(prompt) + max_new_tokens > ctx:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} "
                    f"that exceeds the model's context of {ctx} positions "
                    f"(max_position_embeddings)")


def check_prompts(prompts, vocab: int):
    """prompts: a non-empty list of non-empty lists of token ids in [0, vocab) (ValueError
    otherwise)."""
    if not isinstance(prompts, (list, tuple)):
        hint = ("; convert a tensor with .tolist() (one list per row, without padding)"
                if torch.is_tensor(prompts) else "")
        raise ValueError(f"prompts must be a list of token-id lists, got "
                         f"{type(prompts).__name__}{hint}")
    if len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists, got an empty list")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"prompt {i} must be a list of token ids, got "
                             f"{type(prompt).__name__}: {str(prompt)[:60]}")
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        for t in prompt:
            if not is_int(t):
                raise ValueError(f"prompt {i} holds {t!r} ({type(t).__name__}); token ids must be "
                                 f"integers")
            if not 0 <= t < vocab:
                raise ValueError(f"prompt {i} holds token id {t}, outside the vocabulary "
                                 f"[0, {vocab})")


def is_int(x) -> bool:
    """A Python / numpy integer (bool is not a token id or a count)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def context_length(model) -> int | None:
    """The model's context in positions (its config's max_position_embeddings or n_positions)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


def shared_vocab(models, vocab_size) -> int:
    """The vocabulary the models are compared and sampled on: vocab_size, or the one lm_head width.
    Widths that differ may be one tokenizer with padding rows, or two vocabularies (then decoding
    would be silently wrong): refused unless vocab_size (len(tokenizer)) says which tokens they
    share."""
    widths = [m.get_output_embeddings().weight.shape[0] for m in models]
    shared = min(widths)
    if vocab_size is None and len(set(widths)) > 1:
        raise ValueError(f"the lm_heads have different widths {widths}: pass "
                         f"vocab_size=len(tokenizer) if they share one tokenizer (the extra rows "
                         f"are padding); models of different vocabularies cannot draft for each "
                         f"other")
    if vocab_size is not None:
        if not is_int(vocab_size) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer (len(tokenizer)), got "
                             f"{vocab_size!r}")
        if vocab_size > shared:
            raise ValueError(f"vocab_size={vocab_size} is larger than the narrowest lm_head "
                             f"({shared})")
        shared = vocab_size
    return shared


def resolve_stop_ids(model, eos_token_id=None) -> list[int]:
    """Stop ids: an int or a list as given ([] = never stop early); None -> the model's generation
    config (Qwen3 lists several), else its config."""
    if eos_token_id is None:
        gen_config = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen_config, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(i) for i in eos_token_id]


def make_generator(seed, generator, device):
    """The sampling RNG: generator as given (one, or a list of one per row), else one seeded with
    seed on the device, else None (torch's global RNG)."""
    if generator is not None:
        return generator
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


class NonFiniteLogits(ValueError):
    """A model's logits hold NaN or +inf (or a row is all -inf): its weights are not finite (a
    damaged file, a diverged run). Raised where sampling starts, naming the model, instead of a
    failure deep in top-p."""

    bad_input = True  # a damaged model folder, not a bug: one line (cli.script_main)


def check_logits(logits: torch.Tensor, model, role: str) -> None:
    """Refuse logits (..., V) that no sampling rule can use, naming the model: a row whose max is
    NaN (NaN propagates through amax), +inf or -inf (every token masked). One reduction; called on
    the first call of each model of a generation (where sampling starts: damaged weights give
    non-finite logits at once), so decoding adds no device synchronisation per token."""
    if bool(torch.isfinite(logits.float().amax(-1)).all()):
        return
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    raise NonFiniteLogits(f"the {role} model {name} gives non-finite logits (NaN or inf): its "
                          f"weights hold NaN or inf (a damaged file, e.g. flipped bytes, or a run "
                          f"that diverged); load an intact copy (a run's checkpoints and final/ "
                          f"carry checksums.json)")
