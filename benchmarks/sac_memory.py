"""Memory of SAC's critic designs at a real vocabulary size: parameters, optimizer state and peak memory per run.

The fixture has Qwen2-0.5B's output layer (vocabulary 151,936, hidden 896, tied embeddings) on a two-layer body, and
the tinyworld tokenizer and prompts (a model may have more logits than its tokenizer has tokens, as Qwen2's does).
For each --critic design it reports, exactly, from the modules sac_rlhf.py builds:
- the critic's new parameters (beyond its copy of the reward model) and all its trainable ones; the target copy;
- AdamW's state after one critic step (two fp32 tensors per trainable parameter);
- the size of one [batch, time, 2, vocab] fp32 Q tensor at the run's batch and response length;
then runs sac_rlhf.py on the fixture with that critic (fixed-length responses, a few updates) as its own process:
- peak RSS (CPU) and, on CUDA, the peak allocated GPU memory the script logs (memory/cuda_peak_gb);
- each against ppo_rlhf.py's on the same fixture, batch and rollouts (one epoch of one minibatch: one gradient step
  per rollout, as SAC's here), whose value model is the same copy of the reward model: SAC's cost over PPO's.

Usage: python benchmarks/sac_memory.py        (CPU: a few minutes, about 13 GiB of memory at the peak)
"""

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field

import torch
import tyro
from bench import save_random_models  # benchmarks/ is on the path when this file runs
from compare import run_child
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, Qwen2Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import sac_rlhf as sac  # noqa: E402 (the critic classes the script itself builds)


@dataclass
class Args:
    critics: list[str] = field(default_factory=lambda: ["heads", "factored"])
    """the --critic designs to measure"""
    vocab_size: int = 151936
    """the fixture's vocabulary (output layer width); Qwen2's"""
    hidden_size: int = 896
    """the fixture's hidden size; Qwen2-0.5B's"""
    batch_size: int = 8
    """responses per rollout and per gradient step"""
    response_length: int = 16
    """new tokens per response (fixed length)"""
    updates: int = 2
    """rollouts (each followed by --updates-per-rollout 1 gradient step)"""


def build_fixture(args, folder):
    """A policy and a reward model with the fixture's sizes, saved with the tinyworld tokenizer: their paths."""
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO, "tinyworld", "sft"))
    config = Qwen2Config(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size,
        num_hidden_layers=2,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return save_random_models(config, tokenizer, folder)


def count_critic(args, models, design):
    """Parameter and AdamW-state counts of the critic sac_rlhf.py builds for `design` (as its main does)."""
    ref_policy = AutoModelForCausalLM.from_pretrained(models[0])
    reward_copy = AutoModelForSequenceClassification.from_pretrained(models[1])
    tokens = ref_policy.get_output_embeddings().weight.detach()
    critic = sac.SoftQNetwork(reward_copy, len(tokens), tokens if design == "factored" else None)
    trainable = sum(p.numel() for p in critic.parameters())
    new = trainable - sum(p.numel() for p in reward_copy.parameters())
    optimizer = torch.optim.AdamW(critic.parameters(), lr=1e-3, eps=1e-5, weight_decay=0.0)
    query = torch.tensor([[1, 5, 6]])
    q_all = critic(
        query,
        torch.ones_like(query),
        torch.tensor([[7, 8]]),
        torch.ones(1, 2, dtype=torch.long),
        sac.contextlib.nullcontext(),
    )
    q_all.square().mean().backward()
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    q_bytes = args.batch_size * args.response_length * 2 * args.vocab_size * 4
    return {"new": new, "trainable": trainable, "adam_bytes": state, "q_bytes": q_bytes}


def run_script(args, folder, models, script, *flags):
    """A script with these flags on the fixture: its peak RSS and (on CUDA) peak allocated GPU memory."""
    out = os.path.join(folder, "run-" + "-".join([script, *flags]))
    world = lambda name: os.path.join(REPO, "tinyworld", name)  # noqa: E731
    cmd = [sys.executable, os.path.join(REPO, script), *flags, "--output-dir", out]
    cmd += ["--model-name", models[0], "--reward-model-name", models[1]]
    cmd += ["--gold-reward-model-name", "None", "--dataset", world("prompts_train.jsonl")]
    cmd += ["--eval-dataset", world("prompts_eval.jsonl"), "--eval-size", "1", "--eval-every", str(10**9)]
    cmd += ["--batch-size", str(args.batch_size), "--total-episodes", str(args.batch_size * args.updates)]
    cmd += ["--response-length", str(args.response_length), "--no-stop-at-eos", "--no-save-model"]
    _, peak_rss = run_child(cmd)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        last = [r for r in map(json.loads, f) if "objective/scores" in r][-1]
    return peak_rss, last.get("memory/cuda_peak_gb")


if __name__ == "__main__":
    args = tyro.cli(Args)
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    print(
        f"Fixture: vocabulary {args.vocab_size}, hidden {args.hidden_size}, 2 layers, tied embeddings; batch "
        f"{args.batch_size}, {args.response_length}-token responses; {os.cpu_count()} CPU cores, "
        f"{'CUDA: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"
    )
    print(
        "| --critic | new parameters | critic trainable parameters | target copy GiB | AdamW state GiB "
        "| one Q tensor GiB | run peak RSS GiB (SAC / PPO) | run peak CUDA GiB (SAC / PPO) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    ratio = lambda a, b: "" if not b else f" ({a / b:.2f})"  # noqa: E731
    with tempfile.TemporaryDirectory() as folder:
        models = build_fixture(args, folder)
        ppo_rss, ppo_cuda = run_script(
            args, folder, models, "ppo_rlhf.py", "--num-ppo-epochs", "1", "--num-minibatches", "1"
        )
        cuda_cell = "-" if ppo_cuda is None else f"{ppo_cuda:.2f}"
        print(
            f"| (`ppo_rlhf.py`, its value model) | - | - | - | - | - | {ppo_rss / 1024:.2f} | {cuda_cell} |", flush=True
        )
        for design in args.critics:
            c = count_critic(args, models, design)
            peak_rss, cuda = run_script(
                args, folder, models, "sac_rlhf.py", "--critic", design, "--updates-per-rollout", "1"
            )
            cuda_cell = "-" if cuda is None else f"{cuda:.2f}{ratio(cuda, ppo_cuda)}"
            print(
                f"| {design} | {c['new'] / 1e6:.2f}M | {c['trainable'] / 1e6:.1f}M | {gib(4 * c['trainable'])} "
                f"| {gib(c['adam_bytes'])} | {gib(c['q_bytes'])} | {peak_rss / 1024:.2f}{ratio(peak_rss, ppo_rss)} "
                f"| {cuda_cell} |",
                flush=True,
            )
