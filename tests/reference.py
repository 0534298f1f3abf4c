"""Reference code that only the tests run: the paths the loop's fused ones are compared against."""

def completion_logits(model, batch: dict):
    """Logits that predict the completion tokens: (B, C, V) -- the reference path the tests compare
    the loop's (completion_hidden + hidden_divergence_sum) against.

    Column P - 1 + j predicts completion token j, so only the last C + 1 columns are kept
    (logits_to_keep: no (B, P, V) logits for the prompt) and the very last one is dropped."""
    C = batch["input_ids"].shape[1] - batch["prompt_width"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=C + 1, use_cache=False)
    return out.logits[:, :-1]                                      # (B, C, V)
