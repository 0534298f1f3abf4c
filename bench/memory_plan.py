"""The memory plan of `distill.py --fsdp`: bytes per GPU for the teacher (target p) and the student (draft q) at
N GPUs, from the models' shapes. The README's table is this script's output.

Notation: P_T, P_S parameters of teacher and student; N ranks; B rows per rank's micro-batch; L = prompt +
completion tokens per row; C completion tokens; V vocabulary; per layer d hidden, I MLP width, h query heads,
k key/value heads, e head dim.

    persistent (every phase)
      teacher weights       bf16: 2 P_T / N (sharded);  8-bit: 1 byte per Linear weight + 2 per other weight,
                            whole on every rank (bitsandbytes' Int8Params are not sharded, sharding.py)
      student               16 P_S / N: float32 weights 4, gradients 4, AdamW m and v 8 (all sharded)
    transient, one phase at a time (the peak is the largest phase on top of the persistent part)
      sampling              the whole student gathered in bf16, 2 P_S, + KV cache 2 * 2 * layers * k * e * L * B
      teacher forward       gathered units in bf16: the root (embeddings, lm_head, final norm) for the whole
                            forward + 2 decoder layers (the current one and the prefetched next); no grad
      student forward+back  gathered units as above (student) + saved activations
                            2 bytes * B * L * layers * (6 d + 4 I + 4 h e + 4 k e + 2 h + k + 2)   (SDPA: no L^2 term;
                            the per-token count is measured, `--check`: float32 on the CPU, exact)
                            + the loss's working set: teacher logits, student logits and their gradient,
                            3 * 2 bytes * B * C * V, + ~4M-logit float32 blocks of the chunked loss
                            (divergences.divergence_sum; bench-loss measures it)

What N divides: teacher weights (bf16), student weights, gradients and AdamW state. What it does not: the
activations and the loss's working set (they depend on the rank's micro-batch B: use --grad-accum to keep B
small), the gathered units, the sampling copy of the student. Evaluation (evaluate.py, report.py) stays on
one device: the teacher must fit one GPU to be evaluated there.

Run:  python bench/memory_plan.py            the README's table
      python bench/memory_plan.py --check    the per-token activation count against autograd's saved tensors
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GB = 1e9


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer (Llama / Qwen3 / SmolLM), enough to count its parameters and activations."""
    name: str
    layers: int
    d: int           # hidden size
    I: int           # MLP intermediate size
    h: int           # query heads
    k: int           # key/value heads
    e: int           # head dim
    V: int           # vocabulary (embedding rows)
    tied: bool       # lm_head = embeddings
    qk_norm: bool = False   # Qwen3: RMSNorm on q and k per head

    @classmethod
    def of(cls, config, name: str = "model") -> "Shape":
        """The shape of a transformers config (LlamaConfig, Qwen3Config, ...)."""
        heads = config.num_attention_heads
        return cls(name, config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads,
                   config.num_key_value_heads, getattr(config, "head_dim", None) or config.hidden_size // heads,
                   config.vocab_size, config.tie_word_embeddings, config.model_type.startswith("qwen3"))

    def layer_params(self) -> int:
        attn = self.d * self.h * self.e + 2 * self.d * self.k * self.e + self.h * self.e * self.d
        return attn + 3 * self.d * self.I + 2 * self.d + (2 * self.e if self.qk_norm else 0)

    def root_params(self) -> int:
        """The root unit: embeddings, final norm, lm_head if not tied."""
        return self.V * self.d * (1 if self.tied else 2) + self.d

    def params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()

    def linear_params(self) -> int:
        """Weights in nn.Linear layers (what LLM.int8 quantises; lm_head is kept in 16 bits)."""
        return self.layers * (self.layer_params() - 2 * self.d - (2 * self.e if self.qk_norm else 0))

    def activation_elements_per_token(self) -> int:
        """Elements autograd saves per token and layer for the backward (SDPA attention, no recompute)."""
        return 6 * self.d + 4 * self.I + 4 * self.h * self.e + 4 * self.k * self.e + 2 * self.h + self.k + 2


# the paper's pairs (shapes from the models' config.json; tests/fixtures/qwen3 holds the Qwen3 ones) and
# two large targets with a ~1B draft of the same tokenizer
QWEN3_4B = Shape("Qwen3-4B-Instruct-2507", 36, 2560, 9728, 32, 8, 128, 151936, True, True)
QWEN3_0_6B = Shape("Qwen3-0.6B", 28, 1024, 3072, 16, 8, 128, 151936, True, True)
SMOLLM_1_7B = Shape("SmolLM-1.7B-Instruct", 24, 2048, 8192, 32, 32, 64, 49152, True)
SMOLLM_360M = Shape("SmolLM-360M-Instruct", 32, 960, 2560, 15, 5, 64, 49152, True)
QWEN3_32B = Shape("Qwen3-32B", 64, 5120, 25600, 64, 8, 128, 151936, False, True)
QWEN3_1_7B = Shape("Qwen3-1.7B", 28, 2048, 6144, 16, 8, 128, 151936, True, True)
LLAMA_70B = Shape("Llama-3.1-70B-Instruct", 80, 8192, 28672, 64, 8, 128, 128256, False)
LLAMA_1B = Shape("Llama-3.2-1B-Instruct", 16, 2048, 8192, 32, 8, 64, 128256, True)

# (teacher, student, rows per rank's micro-batch B, tokens per row L, completion tokens C)
PAIRS = [(QWEN3_4B, QWEN3_0_6B, 8, 512, 312),        # gsm8k: max_new_tokens 312
         (SMOLLM_1_7B, SMOLLM_360M, 8, 640, 128),    # cnndm: articles <= 512 tokens, 128 new
         (QWEN3_32B, QWEN3_1_7B, 8, 512, 312),
         (LLAMA_70B, LLAMA_1B, 8, 512, 312)]


def teacher_bytes(t: Shape, n: int, eight_bit: bool, dtype_bytes: int = 2) -> float:
    """dtype_bytes: 2 for bf16 on CUDA, 4 for the CPU's float32."""
    if eight_bit:                                   # whole on every rank: not sharded
        return t.linear_params() + dtype_bytes * (t.params() - t.linear_params())
    return dtype_bytes * t.params() / n


def student_bytes(s: Shape, n: int) -> float:
    """float32 weights + gradients + AdamW m and v, sharded."""
    return 16 * s.params() / n


def gathered_units_bytes(m: Shape) -> float:
    """bf16 root + two decoder layers (the current and the prefetched next)."""
    return 2 * (m.root_params() + 2 * m.layer_params())


def activations_bytes(s: Shape, B: int, L: int) -> float:
    return 2 * B * L * s.layers * s.activation_elements_per_token()


def loss_bytes(s: Shape, B: int, C: int) -> float:
    return 3 * 2 * B * C * s.V + 4 * 4 * 2**22        # logits x2 + their gradient, bf16; ~4 float32 blocks


def sampling_bytes(s: Shape, B: int, L: int) -> float:
    return 2 * s.params() + 2 * 2 * s.layers * s.k * s.e * L * B


def plan(t: Shape, s: Shape, n: int, B: int, L: int, C: int, eight_bit: bool = False) -> dict:
    """Bytes per GPU, by part, and the peak = persistent + the largest transient phase."""
    p = {"teacher": teacher_bytes(t, n, eight_bit), "student": student_bytes(s, n),
         "sampling": sampling_bytes(s, B, L),
         "teacher_forward": 0 if eight_bit else gathered_units_bytes(t),
         "student_step": gathered_units_bytes(s) + activations_bytes(s, B, L) + loss_bytes(s, B, C)}
    p["peak"] = p["teacher"] + p["student"] + max(p["sampling"], p["teacher_forward"], p["student_step"])
    return p


def table(ns=(1, 2, 4, 8)) -> str:
    """The README's table: GB (1e9 bytes) per GPU, for N = 1, 2, 4, 8 ranks."""
    def each(f):
        return " / ".join(f"{f(n) / GB:.1f}" for n in ns)
    rows = ["| teacher -> student, B x L | teacher | teacher weights | student weights + grads + AdamW | "
            "largest transient (not divided by N): sampling, teacher fwd units, student fwd+bwd | "
            "**peak per GPU** |",
            "|---|---|---|---|---|---|"]
    for t, s, B, L, C in PAIRS:
        for eight_bit in (False, True):
            p = plan(t, s, 1, B, L, C, eight_bit)
            rows.append(f"| {t.name} ({t.params() / 1e9:.1f}B) -> {s.name} ({s.params() / 1e9:.2f}B), {B} x {L} | "
                        f"{'8-bit, whole on each GPU' if eight_bit else 'bf16, sharded'} | "
                        f"{each(lambda n: teacher_bytes(t, n, eight_bit))} | {each(lambda n: student_bytes(s, n))} | "
                        f"{p['sampling'] / GB:.1f}, {p['teacher_forward'] / GB:.1f}, {p['student_step'] / GB:.1f} | "
                        f"**{each(lambda n: plan(t, s, n, B, L, C, eight_bit)['peak'])}** |")
    return "\n".join(rows)


def saved_activation_elements(model, B: int, L: int) -> int:
    """Elements of the tensors autograd saves in one training forward (not the parameters), one storage once."""
    import torch
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes() // t.element_size()
        return t

    x = torch.randint(0, model.config.vocab_size, (B, L))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, logits_to_keep=1, use_cache=False)
    return sum(seen.values())


CHECK_SHAPES = ((2, 64, 192, 4, 2, 16), (3, 96, 256, 6, 2, 16), (2, 64, 192, 4, 4, 32), (1, 160, 448, 10, 5, 16),
                (2, 128, 512, 8, 1, 64))


def check(shapes=CHECK_SHAPES) -> list[tuple]:
    """(shape, measured, formula) elements per token and layer: the difference of an L+1- and an L-layer
    model's saved tensors (the embedding and the head's share cancels), float32 on the CPU."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    out = []
    for layers, d, I, h, k, e in shapes:
        def saved(n):
            cfg = Qwen3Config(vocab_size=128, hidden_size=d, intermediate_size=I, num_attention_heads=h,
                              num_key_value_heads=k, head_dim=e, num_hidden_layers=n, tie_word_embeddings=True,
                              attn_implementation="sdpa")
            torch.manual_seed(0)
            return saved_activation_elements(Qwen3ForCausalLM(cfg).train(), 2, 48)
        measured = (saved(layers + 1) - saved(layers)) / (2 * 48)
        formula = Shape("check", layers, d, I, h, k, e, 128, True, True).activation_elements_per_token()
        out.append(((d, I, h, k, e), measured, formula))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="measure the activation count on small CPU models")
    a = p.parse_args(argv)
    if a.check:
        for shape, measured, formula in check():
            print(f"(d, I, h, k, e) = {shape}: measured {measured:.1f} elements/token/layer, formula {formula}")
        return
    print(table())


if __name__ == "__main__":
    main()
