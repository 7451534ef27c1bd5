"""Could the rollout take the policy's log-probs from the sampling pass instead of a second forward pass? (issue: speed)

Every script's rollout samples responses with the KV cache (`generate`, one forward pass per new token) and then runs
the policy once more over prompt + response (`forward_logprobs`) for the log-probs and entropies the losses and the
logs use. The sampling pass computed the very distribution each token was drawn from, so keeping its logits would save
that second pass. The two are the same function of the same weights, computed with other matrix shapes (one token at a
time against a cache, or the whole sequence at once), so they differ by float rounding. This measures by how much, in
fp32 and under bf16 autocast, and what the second pass costs:

- `max dlogp`, `mean dlogp`: the absolute difference of log pi(y_t | s_t), sampling pass minus full pass, over the
  response tokens;
- `max dseq`: the largest absolute difference of a response's summed log-prob (what the KL and RLOO's loss sum);
- `max dentropy`: of the per-token entropy over the vocabulary;
- `full pass ms`: the second pass's time (the saving), against `sampling ms`, the whole sampling loop's.

Usage: python benchmarks/sampling_logprobs.py                                (the tinyworld policy, 64 prompts)
       python benchmarks/sampling_logprobs.py --hidden-size 512 --layers 8   (a random 21M-parameter policy)
One thread by default (OMP_NUM_THREADS), as the scripts; give it the machine to itself for the times.
"""

import contextlib
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the scripts import as modules
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # bench.py's random models
from bench import build_random_models  # noqa: E402

import ppo_rlhf as script  # noqa: E402 (the shared core: every script holds the same text)


@dataclass
class Args:
    batch_size: int = 64
    """prompts sampled at once (the scripts' default --batch-size)"""
    response_length: int = 24
    """new tokens per response (the scripts' default)"""
    max_prompt_length: int = 16
    """prompt tokens kept (the scripts' default)"""
    temperature: float = 1.0
    """sampling temperature (log-probs of logits / temperature, as in the scripts)"""
    hidden_size: int | None = None
    """None: the tinyworld policy; else a random Llama policy of this width (and --layers)"""
    layers: int = 8
    """layers of the random policy"""
    repeats: int = 3
    """timed repeats (the fastest is reported)"""
    seed: int = 1
    """sampling seed"""


@torch.no_grad()
def sampling_pass(model, query, query_mask, args, eos_id, generator, autocast):
    """The scripts' own `generate`, with what each of its forward passes computed kept: the sampled tokens [batch, time]
    and, per step, log softmax(logits / T) [batch, time, vocab] (fp32)."""
    logits = []  # each step's next-token logits, read by a hook on the model (generate itself is unchanged)
    hook = model.register_forward_hook(lambda _model, _inputs, out: logits.append(out.logits[:, -1].float()))
    try:
        tokens = script.generate(model, query, query_mask, args, eos_id, generator, autocast)
    finally:
        hook.remove()
    return tokens, torch.log_softmax(torch.stack(logits, dim=1) / args.temperature, dim=-1)


def compare(policy, tokenizer, prompts, args, precision):
    """One row: the sampling pass against the full pass, in `precision` ("fp32" or "bf16" autocast)."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    query, query_mask = script.left_pad(prompts, tokenizer.pad_token_id, torch.device("cpu"))
    sampling = SimpleNamespace(**asdict(args), stop_at_eos=False)  # what generate reads; every step samples a token
    times = {"sampling": [], "full": []}
    for _ in range(args.repeats):
        generator = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        raw, logp_all = sampling_pass(policy, query, query_mask, sampling, tokenizer.eos_token_id, generator, autocast)
        times["sampling"].append(time.perf_counter() - start)
        # Fixed-length responses (no EOS cut): every sampled token is one the sampling pass scored.
        mask, responses, _ = script.response_mask(raw, tokenizer.eos_token_id, tokenizer.pad_token_id, False)
        start = time.perf_counter()
        with torch.no_grad():
            full_logp, full_entropy = script.forward_logprobs(
                policy, query, query_mask, responses, mask, args.temperature, autocast
            )
        times["full"].append(time.perf_counter() - start)
    sampled_logp = logp_all.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    sampled_entropy = -(logp_all.exp() * logp_all).sum(-1)
    diff = (sampled_logp - full_logp).abs()
    return {
        "precision": precision,
        "max dlogp": diff.max().item(),
        "mean dlogp": diff.mean().item(),
        "max dseq": (sampled_logp - full_logp).sum(1).abs().max().item(),
        "max dentropy": (sampled_entropy - full_entropy).abs().max().item(),
        "full pass ms": 1000 * min(times["full"]),
        "sampling ms": 1000 * min(times["sampling"]),
    }


def main():
    args = tyro.cli(Args)
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        name = build_random_models(args, folder)[1] if args.hidden_size else os.path.join(REPO, "tinyworld", "sft")
        tokenizer = AutoTokenizer.from_pretrained(name)
        policy = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
        texts = script.load_prompts(os.path.join(REPO, "tinyworld", "prompts_train.jsonl"), "--dataset")
        prompts = script.tokenize_prompts(tokenizer, texts[: args.batch_size], args.max_prompt_length, "--dataset")
        params = sum(p.numel() for p in policy.parameters())
        what = "a random Llama" if args.hidden_size else "tinyworld/sft"
        print(f"policy: {what} ({params / 1e6:.1f}M), batch {args.batch_size}, {args.response_length} tokens")
        rows = [compare(policy, tokenizer, prompts, args, precision) for precision in ["fp32", "bf16"]]
    print(table(rows))


def table(rows):
    """The rows as a Markdown table."""
    lines = ["| " + " | ".join(rows[0]) + " |", "| " + " | ".join("---" for _ in rows[0]) + " |"]
    lines += ["| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else v for v in row.values()) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
