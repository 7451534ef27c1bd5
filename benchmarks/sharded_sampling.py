"""What sampling from a sharded policy costs: the twins' `generate` on a policy held whole by every rank (replicated, as
before sharding), sharded and gathered once for the whole generation (`unsharded`, what the twins do), and sharded
and run through its shards (every token all-gathers every layer), with the parameter memory each rank holds.

Usage: python benchmarks/sharded_sampling.py                                         (one process: the whole policy)
       torchrun --nproc-per-node 2 benchmarks/sharded_sampling.py                    (sharded: both ways)
       torchrun --nproc-per-node 2 benchmarks/sharded_sampling.py --hidden-size 512 --layers 8   (a random 21M policy)
Each rank samples --batch-size / N responses of --response-length tokens (no early stop), --repeats times after one
warm-up, the ways taking turns; rank 0 prints the median times. Set OMP_NUM_THREADS (one per process on 2 cores).
"""

import contextlib
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import tyro
from transformers import AutoConfig, AutoModelForCausalLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import ppo_rlhf_multigpu as twin  # noqa: E402 (the twin's own generate, shard_models and unsharded)


@dataclass
class Args:
    batch_size: int = 16
    """responses per generation, over all the ranks"""
    response_length: int = 24
    """new tokens per response"""
    repeats: int = 5
    """timed generations per way (after one warm-up)"""
    hidden_size: int | None = None
    """None: the tinyworld policy; else a random Llama of this width (and --layers)"""
    layers: int = 8
    """layers of the random policy"""


def megabytes(tensors):
    return sum((t.to_local() if isinstance(t, twin.DTensor) else t).numel() * t.element_size() for t in tensors) / 2**20


def main():
    args = tyro.cli(Args)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        torch.distributed.init_process_group("gloo")
    folder = os.path.join(REPO, "tinyworld", "sft")
    if args.hidden_size is None:
        policy = AutoModelForCausalLM.from_pretrained(folder)
    else:
        config = AutoConfig.from_pretrained(folder)
        config.hidden_size, config.num_hidden_layers = args.hidden_size, args.layers
        config.intermediate_size, config.head_dim = 2 * args.hidden_size, args.hidden_size // config.num_attention_heads
        config.num_key_value_heads, config.max_position_embeddings = config.num_attention_heads, 512
        torch.manual_seed(0)
        policy = AutoModelForCausalLM.from_config(config)
    policy.eval().requires_grad_(False)
    whole_mb = megabytes(policy.parameters())
    replica = copy.deepcopy(policy)
    run = twin.Args(response_length=args.response_length, stop_at_eos=False, shard_frozen=True)
    twin.shard_models([policy], [], run, world_size)
    query, query_mask = twin.left_pad([[1, 5 + i % 7, 9, 11] for i in range(args.batch_size // world_size)], 0, "cpu")
    generator = torch.Generator().manual_seed(rank)

    def seconds(model, context):
        if world_size > 1:
            torch.distributed.barrier()
        start = time.perf_counter()
        with context():
            twin.generate(model, query, query_mask, run, -1, generator, contextlib.nullcontext())
        return time.perf_counter() - start

    ways = {"replicated (no sharding)": (replica, contextlib.nullcontext)}
    if world_size > 1:
        ways["sharded, gathered once (unsharded)"] = (policy, lambda: twin.unsharded(policy))
        ways["sharded, through the shards"] = (policy, contextlib.nullcontext)
    rounds = [{name: seconds(*way) for name, way in ways.items()} for _ in range(args.repeats + 1)]  # interleaved
    results = {name: statistics.median(r[name] for r in rounds[1:]) for name in ways}  # (the first: a warm-up)
    held = megabytes(policy.parameters())
    if rank == 0:
        print(f"{world_size} process(es); policy {whole_mb:.1f} MiB of fp32 parameters; each rank holds {held:.1f} MiB")
        for name, median in results.items():
            extra = f"; + {whole_mb:.1f} MiB gathered while sampling" if "gathered" in name else ""
            per_token = 1000 * median / args.response_length
            print(f"{name}: {1000 * median:.1f} ms per generation ({per_token:.2f} ms per token){extra}")
    if world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
