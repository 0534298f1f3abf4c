"""Reference code that only the tests run: the paths the loop's fused ones are compared against."""
import divergences


def completion_logits(model, batch: dict):
    """Logits that predict the completion tokens: (B, C, V) -- the reference path the tests compare
    the loop's (completion_hidden + hidden_divergence_sum) against.

    Column P - 1 + j predicts completion token j, so only the last C + 1 columns are kept
    (logits_to_keep: no (B, P, V) logits for the prompt) and the very last one is dropped."""
    C = batch["input_ids"].shape[1] - batch["prompt_width"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=C + 1, use_cache=False)
    return out.logits[:, :-1]                                      # (B, C, V)


def batch_divergence_sum(student_logits, teacher_logits, mask, divergence: divergences.Divergence,
                         vocab_size: int | None = None, return_teacher_entropy: bool = False,
                         return_alpha: bool = False) -> divergences.LossSums:
    """Sum of the per-token divergence d(p, q) over the masked completion tokens (LossSums.total, a
    scalar). vocab_size: compare only the tokenizer's real tokens (lm_heads may carry padding rows).
    return_teacher_entropy=True / return_alpha=True (passed on to divergences.divergence_sum) also
    fill the sums of H(p_T) and of alpha at the loss temperature, without top-p: logged as
    loss_teacher_entropy and train_alpha."""
    if vocab_size is not None or student_logits.shape[-1] != teacher_logits.shape[-1]:
        student_logits, teacher_logits = divergences.shared_vocab(student_logits, teacher_logits,
                                                                  vocab_size)
    return divergences.divergence_sum(student_logits, teacher_logits, mask, divergence,
                                      return_teacher_entropy=return_teacher_entropy,
                                      return_alpha=return_alpha)
