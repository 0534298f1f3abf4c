"""On-policy sampling from a sharded student (distill.py --fsdp): three ways, side by side in one run.

    per token     the FSDP-sharded student as it is: every unit all-gathers its weights at every decoded token
    gathered      sharding.gathered: every unit gathered once for the whole sampling call, freed after (distill.py)
    plain copy    the full state gathered (get_model_state_dict: one all-gather per parameter, not counted as unit
                  gathers) into a second, unsharded copy that samples

Each rank samples its own prompts (4 per rank, jagged) from its own generators; time and gathers (FSDP
unshards of a unit whose weights are not whole) are per sampling call, the median of the repeats.
Run:  torchrun --nproc_per_node=2 bench/bench_fsdp_sampling.py [--max-new-tokens 64] [--repeats 3]
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
from plumbing import sharding  # noqa: E402
import specdec  # noqa: E402

GATHERS = []
_unshard = FSDPParamGroup.unshard


def counting_unshard(group, *a, **k):
    if not group.is_unsharded and group._all_gather_result is None:
        GATHERS.append(1)
    return _unshard(group, *a, **k)


FSDPParamGroup.unshard = counting_unshard


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    teacher_dir, student_dir = models.resolve_pair(a.task, "tiny")
    student = models.load_model(student_dir, device="cpu").float()
    tok = models.load_tokenizer(student_dir)
    prompts = data.task_prompts(a.task, tok, split="train", n=4 * world)[rank::world]
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=1.0, eos_token_id=[], vocab_size=len(tok))
    copy_of = copy.deepcopy(student)
    sharding.shard(student)

    def gens():
        return [torch.Generator().manual_seed(1000 * rank + i) for i in range(len(prompts))]

    def per_token():
        return specdec.autoregressive_generate(student, prompts, generator=gens(), **kw).tokens

    def gathered():
        with sharding.gathered(student):
            return specdec.autoregressive_generate(student, prompts, generator=gens(), **kw).tokens

    def plain_copy():
        copy_of.load_state_dict(get_model_state_dict(student, options=StateDictOptions(full_state_dict=True)))
        return specdec.autoregressive_generate(copy_of, prompts, generator=gens(), **kw).tokens

    ways = {"per token": per_token, "gathered (distill.py)": gathered, "plain copy": plain_copy}
    times, gathers, tokens = {w: [] for w in ways}, {}, {}
    for _ in range(a.repeats):
        for name, fn in ways.items():
            dist.barrier()
            GATHERS.clear()
            t0 = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t0)
            gathers[name] = len(GATHERS)
    same = len({str(t) for t in tokens.values()}) == 1
    if rank == 0:
        print(f"\n{a.task} tiny student, {world} ranks x {len(prompts)} prompts, {a.max_new_tokens} new tokens, "
              f"median of {a.repeats}; same tokens every way: {same}\n")
        print("| way | seconds per sampling call | unit gathers per call |\n|---|---|---|")
        for name in ways:
            print(f"| {name} | {statistics.median(times[name]):.3f} | {gathers[name]} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
