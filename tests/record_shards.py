"""Run a script and record, per rank, what each rank holds of every sharded model and of the optimizers' states
(tests/test_scale.py: each rank must hold 1/N of each).

usage: [torchrun --nproc-per-node N] python tests/record_shards.py PREFIX <script> <flags>

At each optimizer's first step each rank appends one JSON line to PREFIX<rank>: for every whole model fully_shard was
applied to, its class and the numbers of parameter elements this rank holds and in all; for the optimizer, the same
for its parameters and for its AdamW moments. Before the first backward pass (after the rollout's sampling and no-grad
passes and the update's forward pass) it appends the models' line alone: nothing may stay gathered between passes.
Nothing else changes.
"""

import json
import os
import runpy
import sys

import torch
import torch.distributed.fsdp
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_post_hook


def held(tensors):
    """(elements this rank holds, elements in all) of some tensors, sharded (DTensors) or not."""
    tensors = list(tensors)
    local = sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in tensors)
    return local, sum(t.numel() for t in tensors)


if __name__ == "__main__":
    prefix, sharded, stepped = sys.argv[1], [], set()
    fully_shard = torch.distributed.fsdp.fully_shard

    def recording_fully_shard(module, **kwargs):
        sharded.append((type(module).__name__, module))
        return fully_shard(module, **kwargs)

    def record(optimizer, *_):
        if id(optimizer) in stepped:
            return
        stepped.add(id(optimizer))
        models = models_held()
        params = held(p for group in optimizer.param_groups for p in group["params"])
        moments = held(s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq") if k in s)
        with open(f"{prefix}{os.environ.get('RANK', '0')}", "a") as f:
            f.write(json.dumps({"models": models, "params": params, "moments": moments}) + "\n")

    def models_held():
        inner = {id(m) for _, model in sharded for m in list(model.modules())[1:]}
        return [[name, *held(m.parameters())] for name, m in sharded if id(m) not in inner]

    backward, backward_recorded = torch.Tensor.backward, []  # (a list: set from inside the function)

    def recording_backward(tensor, *args, **kwargs):
        if not backward_recorded:
            backward_recorded.append(True)
            with open(f"{prefix}{os.environ.get('RANK', '0')}", "a") as f:
                f.write(json.dumps({"before_backward": models_held()}) + "\n")
        return backward(tensor, *args, **kwargs)

    torch.distributed.fsdp.fully_shard = recording_fully_shard  # before the script imports it
    torch.Tensor.backward = recording_backward
    register_optimizer_step_post_hook(record)
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
