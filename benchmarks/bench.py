"""Speed and memory of the RLHF scripts on a fixed configuration, measured, not guessed.

Runs each script as its own process (so peak memory is that run's alone), then reads its metrics.jsonl:

- episodes/s: episodes divided by the time spent in rollouts and updates (start-up and evaluation excluded);
- wall: the whole process, model loading and the two tiny evaluations included;
- rollout share: sampling plus the no-grad forward passes (reference, reward, value) vs the gradient updates;
- peak RSS: the process's maximum resident memory (CPU); on CUDA also the peak allocated GPU memory;
- model GFLOP per update and the achieved GFLOP/s against a matmul peak measured in the same process: how close
  the run is to what this machine's matmuls can do (see update_flops for what is counted).

Usage: python benchmarks/bench.py                      (the three scripts on the tinyworld)
       python benchmarks/bench.py --scripts ppo_rlhf.py --repeats 2 --extra="--num-minibatches 1"
       python benchmarks/bench.py --hidden-size 512 --layers 8 --total-episodes 64   (random 21M-parameter models)
"""

import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import tyro
from compare import mean_spread, run_child  # benchmarks/ is on the path when this file runs
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    scripts: list[str] = field(default_factory=lambda: ["ppo_rlhf.py", "rloo_rlhf.py", "sac_rlhf.py"])
    """scripts to measure (those missing from the repository are skipped)"""
    batch_size: int = 16
    """responses per rollout"""
    response_length: int = 16
    """new tokens per response (fixed length: --no-stop-at-eos, so every run generates the same amount)"""
    total_episodes: int = 1024
    """episodes per measured run"""
    repeats: int = 1
    """runs per script (seeds 1..repeats); the table shows mean and spread"""
    extra: str = ""
    """extra flags passed to every script, written --extra="--flag value" (e.g. --extra="--num-minibatches 1")"""
    hidden_size: int | None = None
    """None: the tinyworld models; else a random Llama policy and reward model of this width (and --layers)"""
    layers: int = 8
    """layers of the random models (--hidden-size 512 --layers 8: 21M matmul parameters each)"""
    nproc: int = 1
    """processes per run: 1 = `python <script>`, N > 1 = `torchrun --nproc-per-node N` on the script's _multigpu twin,
    the cores split between the processes"""


def build_random_models(args, folder):
    """A random policy and reward model of --hidden-size and --layers with the tinyworld tokenizer: the scripts' cost
    at a larger size, without a download (their scores mean nothing)."""
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO, "tinyworld", "sft"))
    config = AutoConfig.from_pretrained(os.path.join(REPO, "tinyworld", "sft"))
    config.hidden_size, config.num_hidden_layers = args.hidden_size, args.layers
    config.intermediate_size, config.head_dim = 2 * args.hidden_size, args.hidden_size // config.num_attention_heads
    config.num_key_value_heads, config.max_position_embeddings = config.num_attention_heads, 512
    policy, reward_model = save_random_models(config, tokenizer, folder)
    return ["--model-name", policy, "--reward-model-name", reward_model, "--gold-reward-model-name", "None"]


def save_random_models(config, tokenizer, folder):
    """A random causal LM and a 1-label reward model of `config` (seed 0), each saved with `tokenizer` in `folder`;
    returns their two paths. Also used by sac_memory.py."""
    torch.manual_seed(0)
    paths = [os.path.join(folder, name) for name in ["policy", "reward_model"]]
    config.num_labels = 1
    for path, auto_class in zip(paths, [AutoModelForCausalLM, AutoModelForSequenceClassification]):
        auto_class.from_config(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return paths


def matmul_peak_gflops(n=2048, repeats=5):
    """The best fp32 GFLOP/s of an n x n matmul on this machine, with torch's default threads (as the runs have)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_shape(name, auto_class, extra_params=0):
    """(matmul parameters, layers, hidden size) of a model: every Linear weight, the output layer included (tied or
    not), not the embedding lookup; extra_params for a head the script adds (SAC's critic)."""
    model = auto_class.from_pretrained(name)
    params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) + extra_params
    return params, model.config.num_hidden_layers, model.config.hidden_size


def forward_flops(shape, rows, length, kv_cache=False):
    """One forward pass: 2 FLOPs per matmul parameter per token, plus attention's QK^T and AV, 4 x layers x hidden
    per (query, key) pair: all length^2 pairs in a forward pass (what a non-flash kernel computes), about half of
    them when sampling token by token with a KV cache."""
    params, layers, hidden = shape
    pairs = length**2 / 2 if kv_cache else length**2
    return rows * (2 * params * length + 4 * layers * hidden * pairs)


def mean_prompt_width(run_args, draws=200):
    """The mean left-padded prompt width of a rollout: the longest of batch_size random training prompts."""
    tokenizer = AutoTokenizer.from_pretrained(run_args["model_name"])
    with open(run_args["dataset"]) as f:
        widths = [len(tokenizer(json.loads(line)["prompt"])["input_ids"]) for line in f if line.strip()]
    widths = [min(w, run_args["max_prompt_length"]) for w in widths]
    return sum(max(random.Random(i).sample(widths, run_args["batch_size"])) for i in range(draws)) / draws


def update_flops(script, run_args):
    """Model FLOPs of one update (a rollout of batch_size responses and its gradient steps; a backward pass counted
    as twice its forward): sampling, the rollout's no-grad forwards (policy, reference, reward model; PPO's value
    model), then PPO: epochs x (policy and value model, forward and backward); RLOO: epochs x policy, forward and
    backward; SAC: steps x (policy forward and backward, reference forward, critic forward and backward, target
    critic forward) on minibatches. Evaluation is left out, as in episodes/s."""
    policy = model_shape(run_args["model_name"], AutoModelForCausalLM)
    rm = model_shape(run_args["reward_model_name"], AutoModelForSequenceClassification)
    rows, length = run_args["batch_size"], mean_prompt_width(run_args) + run_args["response_length"]
    flops = forward_flops(policy, rows, length, kv_cache=True) + 2 * forward_flops(policy, rows, length)
    flops += forward_flops(rm, rows, length)
    if script.startswith("ppo_rlhf"):  # the value model is a copy of the reward model
        flops += forward_flops(rm, rows, length)
        flops += (
            run_args["num_ppo_epochs"] * 3 * (forward_flops(policy, rows, length) + forward_flops(rm, rows, length))
        )
    elif script.startswith(("rloo_rlhf", "grpo_rlhf")):
        flops += run_args["num_ppo_epochs"] * 3 * forward_flops(policy, rows, length)
    else:
        vocab = AutoConfig.from_pretrained(run_args["model_name"]).vocab_size
        head = 2 * rm[2] * (vocab if run_args["critic"] == "heads" else policy[2])  # the critic's advantage head
        critic = (rm[0] + head + (2 * vocab * policy[2] if run_args["critic"] == "factored" else 0), *rm[1:])
        mb = run_args["minibatch_size"] or rows
        step = 4 * forward_flops(policy, mb, length) + 4 * forward_flops(critic, mb, length)
        flops += run_args["updates_per_rollout"] * step
    return flops


def run_once(script, args, seed, folder, models):
    """One run as a child process; returns its last training record, wall time, peak RSS in MiB and args.json."""
    out = os.path.join(folder, f"{script}-{seed}")
    launcher = [sys.executable] if args.nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [
        *launcher,
        *([f"--nproc-per-node={args.nproc}"] if args.nproc > 1 else []),
        os.path.join(REPO, script),
        "--seed",
        str(seed),
        "--output-dir",
        out,
        "--batch-size",
        str(args.batch_size),
        "--response-length",
        str(args.response_length),
        "--total-episodes",
        str(args.total_episodes),
        "--no-stop-at-eos",
        "--eval-every",
        str(10**9),
        "--eval-size",
        "1",
        "--no-save-model",
        *models,
        *args.extra.split(),
    ]
    # One process: the machine's default thread count, as a user would run it; N: the cores shared out among them.
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.nproc))}  # all cores (not the one default)
    wall, peak_rss = run_child(cmd, env={**os.environ, **threads})  # peak RSS: the largest process's
    with open(os.path.join(out, "metrics.jsonl")) as f:
        last = [r for r in map(json.loads, f) if "objective/scores" in r][-1]
    with open(os.path.join(out, "args.json")) as f:
        return last, wall, peak_rss, json.load(f)


if __name__ == "__main__":
    args = tyro.cli(Args)
    peak = matmul_peak_gflops()
    with tempfile.TemporaryDirectory() as folder:
        models = build_random_models(args, folder) if args.hidden_size else []
        name = models[1] if models else os.path.join(REPO, "tinyworld", "sft")
        print(
            f"batch {args.batch_size}, {args.response_length}-token responses, {args.total_episodes} episodes, "
            f"{args.repeats} run(s) per script, {args.nproc} process(es) per run, {os.cpu_count()} CPU cores; "
            f"fp32 matmul peak {peak:.0f} GFLOP/s; "
            f"policy of {model_shape(name, AutoModelForCausalLM)[0] / 1e6:.1f}M matmul parameters"
        )
        print(
            "| script | episodes/s | wall s | rollout share % | peak RSS MiB | peak CUDA GiB | model GFLOP per update "
            "| achieved GFLOP/s | % of matmul peak |"
        )
        print("|" + " --- |" * 9)
        for script in args.scripts:
            if args.nproc > 1 and not script.endswith("_multigpu.py"):  # torchrun runs the scale twin (same numbers)
                script = script.replace(".py", "_multigpu.py")
            if not os.path.exists(os.path.join(REPO, script)):
                continue
            rows = [run_once(script, args, seed, folder, models) for seed in range(1, args.repeats + 1)]
            busy = [r["time/rollout_s"] + r["time/update_s"] for r, *_ in rows]
            speed = [r["episode"] / b for (r, *_), b in zip(rows, busy)]
            share = [100 * r["time/rollout_s"] / b for (r, *_), b in zip(rows, busy)]
            cuda = [r.get("memory/cuda_peak_gb") for r, *_ in rows]
            cuda_text = mean_spread(cuda, 1) if None not in cuda else "-"
            flops = update_flops(script, rows[0][3])  # per update of batch_size episodes
            achieved = [flops * v / args.batch_size / 1e9 for v in speed]
            share_of_peak = [100 * a / peak for a in achieved]
            print(
                f"| {script} | {mean_spread(speed, 1)} | {mean_spread([w for _, w, *_ in rows], 1)} "
                f"| {mean_spread(share, 1)} | {mean_spread([m for *_, m, _ in rows], 1)} | {cuda_text} "
                f"| {flops / 1e9:.2f} | {mean_spread(achieved, 2)} | {mean_spread(share_of_peak, 2)} |",
                flush=True,
            )
