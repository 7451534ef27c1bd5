"""PPO for RLHF: fine-tune a causal LM against a reward model with a KL penalty to a frozen reference.

Each update samples one response per prompt, scores it with the reward model (RM), and builds a
per-token reward: -kl_coef * (log pi - log pi_ref) at every response token plus the RM score at the
last one. A separate value model (initialised from the RM) estimates the return; GAE turns rewards and
values into advantages; then several epochs of clipped PPO over minibatches update policy and value.

Follows Ouyang et al. 2022 (InstructGPT), Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
Preferences", adaptive KL), Schulman et al. 2017 (PPO) and 2016 (GAE), and Huang et al. 2024 ("The N
Implementation Details of RLHF with PPO"). Style: CleanRL (one file, flat main loop).

Usage: python ppo_rlhf.py --help   (defaults train on the built-in offline tinyworld in a few minutes)
"""

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import torch
import transformers
import tyro
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

transformers.utils.logging.disable_progress_bar()  # keep the output to our own progress bar
TINYWORLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tinyworld")


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "rlhf"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    model_name: str = os.path.join(TINYWORLD, "sft")
    """policy initialisation and frozen reference: a hub name or a local folder"""
    reward_model_name: str = os.path.join(TINYWORLD, "reward_model")
    """reward model (sequence classification, one label) that RL optimises: a hub name or a local folder"""
    gold_reward_model_name: Optional[str] = os.path.join(TINYWORLD, "gold_reward_model")
    """second reward model used only for evaluation (None disables)"""
    dataset: str = os.path.join(TINYWORLD, "prompts_train.jsonl")
    """training prompts: a .jsonl file with a `prompt` field, or a hub dataset `name[:split]`"""
    eval_dataset: str = os.path.join(TINYWORLD, "prompts_eval.jsonl")
    """evaluation prompts, same format as --dataset"""
    max_prompt_length: int = 16
    """prompts longer than this many tokens are truncated from the left"""
    response_length: int = 24
    """maximum number of new tokens per response"""
    temperature: float = 1.0
    """sampling temperature; training log-probs are computed from logits / temperature"""
    stop_at_eos: bool = True
    """truncate each response after its first EOS; off = fixed-length responses"""
    missing_eos_penalty: Optional[float] = 1.0
    """subtracted from the score of a response with no EOS (None disables)"""
    total_episodes: int = 16384
    """number of sampled responses over the whole run"""
    batch_size: int = 64
    """responses sampled per rollout"""
    learning_rate: float = 3e-4
    """the policy's learning rate"""
    kl_coef: float = 0.05
    """beta, the weight of the KL penalty to the reference policy"""
    ref_sync_every: int = 0
    """every N updates set ref <- mix * policy + (1 - mix) * ref; 0 = never"""
    ref_sync_mix: float = 1.0
    """the mix of the reference reset (1.0 = copy the policy)"""
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    """autocast dtype of forward passes (fp32 weights and optimizer state); auto = bf16 on CUDA, none on the CPU"""
    eval_every: int = 2048
    """evaluate every N episodes (and before and after training)"""
    eval_size: int = 128
    """number of evaluation prompts (the first N of --eval-dataset)"""
    output_dir: Optional[str] = None
    """run folder; default runs/<run_name> (a new folder for every run)"""
    overwrite_output_dir: bool = False
    """replace the run in --output-dir (its records and model are deleted first)"""
    save_model: bool = True
    """save the final policy and tokenizer to <output-dir>/model"""

    # Algorithm specific arguments
    num_ppo_epochs: int = 4
    """number of passes over each rollout batch"""
    num_minibatches: int = 4
    """number of minibatches (optimizer steps) per epoch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per minibatch (gradients summed before each optimizer step)"""
    clip_coef: float = 0.2
    """the policy ratio clip range"""
    vf_clip_coef: float = 0.2
    """the value clip range (around the rollout-time values)"""
    vf_coef: float = 0.1
    """the weight of the value loss"""
    gamma: float = 1.0
    """the discount factor"""
    lam: float = 0.95
    """the GAE lambda"""
    whiten_rewards: bool = False
    """whiten the per-token rewards before GAE"""
    max_grad_norm: Optional[float] = 1.0
    """global gradient-norm clip (None disables)"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """per-token KL estimator: k1 = log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r with r = pi_ref / pi"""
    kl_in: Literal["reward", "loss"] = "reward"
    """put the KL penalty in the per-token reward (score-function form) or add it to the loss"""
    kl_target: Optional[float] = None
    """if set, adapt kl_coef towards this sequence KL (Ziegler et al. 2019)"""
    kl_horizon: int = 10000
    """the adaptive KL controller's horizon, in episodes"""


# ------------------------------------------------------------------------------------------------
# Common helpers: the same text in ppo_rlhf.py, rloo_rlhf.py and sac_rlhf.py.
# ------------------------------------------------------------------------------------------------
def fail(message):
    """Stop with one line that names the flag and the fix (no traceback)."""
    raise SystemExit(f"error: {message}")


# The allowed values of the common numeric flags, as intervals; every value must also be finite, and a flag that
# takes None may be None. Each script adds its own flags' ranges (ALGO_RANGES).
COMMON_RANGES = {"max_prompt_length": "[1, inf)", "response_length": "[1, inf)", "temperature": "(0, inf)",
                 "missing_eos_penalty": "[0, inf)", "total_episodes": "[1, inf)", "batch_size": "[1, inf)",
                 "learning_rate": "(0, inf)", "kl_coef": "[0, inf)", "ref_sync_every": "[0, inf)",
                 "ref_sync_mix": "(0, 1]", "eval_every": "[1, inf)", "eval_size": "[1, inf)"}
RUN_FILES = {"args.json", "metrics.jsonl", "samples.jsonl", "model", "INCOMPLETE"}  # what a run writes


def check_ranges(args, ranges):
    """Refuse a numeric flag that is not finite or lies outside its interval, naming the flag and the interval."""
    for name, interval in ranges.items():
        value = getattr(args, name)
        if value is None:
            continue
        low, high = (float(x) for x in interval[1:-1].split(","))
        above = low < value if interval[0] == "(" else low <= value
        below = value < high if interval[-1] == ")" else value <= high
        if not (math.isfinite(value) and above and below):
            fail(f"--{name.replace('_', '-')} must be in {interval} (got {value})")


def check_common_args(args):
    """Reject bad common flags, and an output folder that holds something, before anything is loaded."""
    signal.signal(signal.SIGINT, lambda *_: fail("interrupted by Ctrl-C before training; nothing was written"))
    check_ranges(args, COMMON_RANGES)
    if args.total_episodes % args.batch_size:
        fewer = args.total_episodes - args.total_episodes % args.batch_size
        fail(f"--total-episodes {args.total_episodes} is not a multiple of --batch-size {args.batch_size}; "
             + (f"use {fewer} or {fewer + args.batch_size}" if fewer else f"use {args.batch_size} or more"))
    if not args.stop_at_eos and args.missing_eos_penalty is not None:  # a fixed-length response has no end to miss
        print("note: --missing-eos-penalty applies only with --stop-at-eos; it is off in this run")
        args.missing_eos_penalty = None
    out = args.output_dir
    if out is not None and os.path.exists(out):
        if not os.path.isdir(out):
            fail(f"--output-dir {out} is a file; pass a folder")
        if os.listdir(out) and not args.overwrite_output_dir:
            fail(f"--output-dir {out} is not empty; choose another folder, or pass --overwrite-output-dir to replace "
                 "the run in it")
        foreign = sorted(set(os.listdir(out)) - RUN_FILES)
        if foreign:  # --overwrite-output-dir deletes a run's files, never anything else
            fail(f"--output-dir {out} holds files that are not a run's ({', '.join(foreign[:3])}); choose another folder")
    parent = os.path.dirname(os.path.abspath(out or "runs"))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
        fail(f"--output-dir {out}: {parent} is not a writable folder; choose another --output-dir")


def load_prompts(name, flag, size=None):
    """Prompts (the first `size`, if given) from a .jsonl file with a `prompt` on every line or a hub `name[:split]`."""
    form = 'pass a UTF-8 .jsonl file with one {"prompt": "..."} object per line'
    if name.endswith(".jsonl") or os.path.exists(name):
        if not os.path.exists(name):
            fail(f"{flag} {name}: no such file; {form}")
        if not (name.endswith(".jsonl") and os.path.isfile(name)):
            fail(f"{flag} {name}: not a .jsonl file; {form}")
        try:
            with open(name, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            fail(f"{flag} {name}: not UTF-8 text ({e.reason} at byte {e.start}); {form}")
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError:
                fail(f"{flag} {name}: line {number} is not valid JSON; {form}")
    else:
        try:
            import datasets  # lazy: only needed for hub datasets

            repo, _, split = name.partition(":")
            rows = datasets.load_dataset(repo, split=split or "train")
        except Exception as e:  # not installed, not found, no network: one line, not a traceback
            fail(f"{flag} {name}: no such .jsonl file, and no hub dataset could be loaded ({str(e).splitlines()[0]})")
    if len(rows) == 0:
        fail(f"{flag} {name} has no rows; {form}")
    for number, row in enumerate(rows, 1):
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)):
            fail(f"{flag} {name}: row {number} has no text `prompt` field (it is {repr(row)[:60]}); {form}")
    if size is not None and size > len(rows):
        fail(f"--eval-size {size} is more than the {len(rows)} prompts of {flag} {name}; pass at most {len(rows)}")
    return [row["prompt"] for row in rows][:size]


def load_pretrained(auto_class, name, flag, **kwargs):
    """from_pretrained with one clear line naming the flag when the folder or hub name does not load."""
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except Exception as e:  # a missing folder, missing files, a wrong format: one line, not a traceback
        fail(f"{flag} {name}: could not load an {auto_class.__name__} from it ({str(e).splitlines()[0]}); "
             "pass a folder saved with save_pretrained or a hub name")


def tokenize_prompts(tokenizer, prompts, max_prompt_length, flag):
    """Token ids of each prompt, truncated from the left (the end of a prompt is what the response continues)."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    empty = sum(len(x) == 0 for x in ids)
    if empty:  # e.g. "" with a tokenizer that adds no BOS: there is nothing to condition on
        fail(f"{flag}: {empty} prompts are empty after tokenization; remove them or use a tokenizer that adds BOS")
    too_long = sum(len(x) > max_prompt_length for x in ids)
    if too_long:
        print(f"warning: {too_long} of {len(ids)} prompts are longer than --max-prompt-length {max_prompt_length} tokens; truncated from the left")
    return [x[-max_prompt_length:] for x in ids]


def next_prompt_indices(order, n, num_prompts):
    """The next n indices of a prompt stream that reshuffles all prompts on every pass; consumes `order`."""
    while len(order) < n:
        order += random.sample(range(num_prompts), num_prompts)
    batch = order[:n]
    del order[:n]
    return batch


def left_pad(seqs, pad_id, device):
    """Stack token lists into a left-padded batch, so every response starts at the same column."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def position_ids(mask):
    """Positions that count only real tokens, so left padding does not shift them (N details, #3)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


@torch.no_grad()
def generate(model, query, query_mask, args, eos_id, generator, autocast):
    """Sample up to --response-length tokens per row from softmax(logits / temperature), with a KV cache.

    Stops early once every row has produced an EOS (with --stop-at-eos); tokens a row samples after its
    own EOS are masked out later by `response_mask`. No top-k/top-p: training log-probs must describe
    exactly the distribution that was sampled.
    """
    input_ids, attention_mask, positions = query, query_mask, position_ids(query_mask)
    cache, tokens = None, []
    ended = torch.zeros(query.shape[0], dtype=torch.bool, device=query.device)
    for _ in range(args.response_length):
        with autocast:
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        probs = torch.softmax(out.logits[:, -1].float() / args.temperature, dim=-1)
        if not torch.isfinite(probs).all():  # say so rather than sample garbage
            raise SystemExit("error: the policy's next-token probabilities are not finite (NaN or inf logits); "
                             "stopping without saving. After updates: try a lower --learning-rate or --max-grad-norm")
        next_token = torch.multinomial(probs, 1, generator=generator)
        tokens.append(next_token)
        ended |= next_token[:, 0] == eos_id
        if args.stop_at_eos and ended.all():
            break
        input_ids, positions = next_token, positions[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
    return torch.cat(tokens, dim=1)


def response_mask(responses, eos_id, pad_id, stop_at_eos):
    """Mask of real response tokens, responses with post-EOS tokens set to pad, and whether each has an EOS.

    With --stop-at-eos a response ends at its first EOS, which is a real token (it is what the policy chose
    and what the RM reads); everything after is padding. Masks are computed from positions, never by
    comparing ids to pad_id, because pad and EOS can be the same id (GPT-2, Pythia).
    """
    is_eos = responses == eos_id
    has_eos = is_eos.any(dim=1)
    if not stop_at_eos:
        return torch.ones_like(responses), responses, has_eos
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).long(), responses.masked_fill(after_eos, pad_id), has_eos


def backbone_hidden(model, query, query_mask, responses, resp_mask, autocast):
    """Last hidden states of a sequence-classification model's backbone over prompt + response."""
    input_ids = torch.cat([query, responses], dim=1)
    mask = torch.cat([query_mask, resp_mask], dim=1)
    with autocast:
        backbone = getattr(model, model.base_model_prefix)  # e.g. `.model` for Llama, `.transformer` for GPT-2
        return backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state


def forward_logprobs(model, query, query_mask, responses, resp_mask, temperature, autocast):
    """Per-token log pi(y_t | x, y_<t) and exact per-token entropy, in fp32, from logits / temperature; 0 at padding.

    Zeroing the padding keeps every later use finite: at a low temperature a padded token's log-prob can be
    -1e3, and exp(-log ratio) of a KL estimate would overflow to inf, and inf * 0 (the mask) is NaN.
    """
    input_ids = torch.cat([query, responses], dim=1)
    mask = torch.cat([query_mask, resp_mask], dim=1)
    with autocast:
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    # The logit at position i predicts token i + 1: keep those that predict the response tokens.
    logits = logits[:, query.shape[1] - 1 : -1].float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    padding = resp_mask == 0
    return logprobs.masked_fill(padding, 0.0), entropy.masked_fill(padding, 0.0)


@torch.no_grad()
def get_scores(reward_model, query, query_mask, responses, resp_mask, autocast):
    """The RM's scalar score read at the last real token of prompt + truncated response."""
    hidden = backbone_hidden(reward_model, query, query_mask, responses, resp_mask, autocast)
    last = query.shape[1] + resp_mask.sum(1) - 1
    return reward_model.score(hidden[torch.arange(len(last)), last]).squeeze(-1).float()


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x, mask):
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


@torch.no_grad()
def rollout(policy, ref_policy, reward_model, query, query_mask, args, eos_id, pad_id, generator, autocast):
    """Sample responses and everything the losses and logs need about them, with no gradient."""
    raw = generate(policy, query, query_mask, args, eos_id, generator, autocast)
    mask, responses, has_eos = response_mask(raw, eos_id, pad_id, args.stop_at_eos)
    logprobs, entropy = forward_logprobs(policy, query, query_mask, responses, mask, args.temperature, autocast)
    ref_logprobs, _ = forward_logprobs(ref_policy, query, query_mask, responses, mask, args.temperature, autocast)
    scores = get_scores(reward_model, query, query_mask, responses, mask, autocast)
    if args.missing_eos_penalty is not None:  # discourage responses that never end (N details, #9)
        scores = scores - args.missing_eos_penalty * (~has_eos).float()
    return dict(responses=responses, mask=mask.float(), has_eos=has_eos, logprobs=logprobs,
                ref_logprobs=ref_logprobs, entropy=entropy, scores=scores)


def rollout_stats(r):
    """The common objective/... metrics of one rollout batch (the README's metric table)."""
    kl = ((r["logprobs"] - r["ref_logprobs"]) * r["mask"]).sum(1)  # sequence-level k1 on the sampled tokens
    return {"scores": r["scores"].mean().item(), "kl": kl.mean().item(),
            "entropy": masked_mean(r["entropy"], r["mask"]).item(),
            "response_length": r["mask"].sum(1).mean().item(), "eos_rate": r["has_eos"].float().mean().item()}


def train_record(r, episode, update, lr, kl_coef, start_time, time_rollout, time_update, device):
    """The common keys of a training record (the README's metric table); the algorithm adds its own."""
    stats, elapsed = rollout_stats(r), time.time() - start_time
    record = {"episode": episode, "update": update, "time/elapsed_s": elapsed, "time/episodes_per_s": episode / elapsed,
              "time/rollout_s": time_rollout, "time/update_s": time_update, "lr": lr,
              "objective/scores": stats["scores"], "objective/kl": stats["kl"], "objective/kl_coef": kl_coef,
              "objective/rlhf_reward": stats["scores"] - kl_coef * stats["kl"], "objective/entropy": stats["entropy"],
              "objective/response_length": stats["response_length"], "objective/eos_rate": stats["eos_rate"]}
    if device.type == "cuda":
        record["memory/cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return record


@torch.no_grad()
def evaluate(policy, ref_policy, reward_model, gold_model, tokenizer, eval_ids, args, eos_id, pad_id, device, autocast):
    """Sample one response per evaluation prompt (fixed seed, so evaluations are comparable) and score it."""
    generator = torch.Generator(device=device).manual_seed(args.seed + 12345)
    stats, samples = [], []
    for i in range(0, len(eval_ids), args.batch_size):
        query, query_mask = left_pad(eval_ids[i : i + args.batch_size], pad_id, device)
        r = rollout(policy, ref_policy, reward_model, query, query_mask, args, eos_id, pad_id, generator, autocast)
        gold = get_scores(gold_model, query, query_mask, r["responses"], r["mask"].long(), autocast) if gold_model is not None else None
        stats.append((len(query), rollout_stats(r), None if gold is None else gold.mean().item()))
        for j in range(len(query)):
            samples.append({"prompt": tokenizer.decode(query[j][query_mask[j].bool()], skip_special_tokens=True),
                            "response": tokenizer.decode(r["responses"][j][r["mask"][j].bool()], skip_special_tokens=True),
                            "score": r["scores"][j].item(), "gold_score": None if gold is None else gold[j].item()})
    n = sum(s[0] for s in stats)
    mean = lambda k: sum(size * batch_stats[k] for size, batch_stats, _ in stats) / n  # weighted by batch size
    record = {"eval/scores": mean("scores"), "eval/kl": mean("kl"), "eval/entropy": mean("entropy"),
              "eval/response_length": mean("response_length"), "eval/eos_rate": mean("eos_rate")}
    if gold_model is not None:
        record["eval/gold_scores"] = sum(size * gold for size, _, gold in stats) / n
    return record, samples


def setup_run(args):
    """Seed everything and resolve the device and precision (so that args.json records what runs)."""
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    args.cuda = device.type == "cuda"
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if args.cuda else "no"
    # Autocast runs forward passes in bf16/fp16 on any device (on the CPU too: slow, but the very code path a
    # GPU runs); weights, optimizer state, log-softmaxes and losses stay fp32.
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[args.mixed_precision]
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    frozen_dtype = amp_dtype or torch.float32  # the reward models are only ever read: hold them in low precision
    return device, autocast, frozen_dtype


def load_reward_model(name, flag, dtype, device):
    """A frozen or trained copy of a reward model (load_models has checked that it is one)."""
    return load_pretrained(AutoModelForSequenceClassification, name, flag, dtype=dtype).to(device)


def load_models(args, device, frozen_dtype):
    """Tokenizer, trainable policy, frozen reference, reward and gold models, each checked for what its flag needs."""
    tokenizer = load_pretrained(AutoTokenizer, args.model_name, "--model-name")
    if tokenizer.eos_token_id is None:
        fail(f"--model-name {args.model_name}: the tokenizer has no EOS token, so responses cannot end; set tokenizer.eos_token")
    if tokenizer.pad_token_id is None:  # e.g. GPT-2: padding is always masked, so EOS can stand in for it
        print(f"note: the tokenizer of {args.model_name} has no pad token; using EOS ({tokenizer.eos_token!r}) as pad")
        tokenizer.pad_token = tokenizer.eos_token
    names = [("--model-name", args.model_name), ("--reward-model-name", args.reward_model_name),
             ("--gold-reward-model-name", args.gold_reward_model_name)]
    for flag, name in [(flag, name) for flag, name in names if name is not None]:
        config = load_pretrained(AutoConfig, name, flag)
        positions = getattr(config, "max_position_embeddings", None)  # GPT-2's n_positions answers to this name too
        if positions is not None and args.max_prompt_length + args.response_length > positions:
            fail(f"{flag} {name} has {positions} positions, fewer than --max-prompt-length {args.max_prompt_length} "
                 f"+ --response-length {args.response_length}; lower them")  # absolute positions crash past it
        kind = (config.architectures or ["?"])[0]  # the class it was saved as, when it says
        if flag == "--model-name":
            if kind.endswith("ForSequenceClassification"):
                fail(f"--model-name {name} is a reward model ({kind}); pass a causal LM")
            continue
        if kind != "?" and not kind.endswith("ForSequenceClassification"):
            fail(f"{flag} {name} is a {kind}, not a reward model; pass an AutoModelForSequenceClassification with one label")
        if config.num_labels != 1:
            fail(f"{flag} {name} has {config.num_labels} labels; a reward model gives one score, so pass one with one label")
        if load_pretrained(AutoTokenizer, name, flag).get_vocab() != tokenizer.get_vocab():
            fail(f"{flag} {name}: its tokenizer differs from the policy's ({args.model_name}); the RM reads the "
                 "policy's token ids, so use an RM trained with the same tokenizer")
    # The policy is trained: fp32 master weights. The reference is the same model and stays fp32 too, so that at
    # step 0 the two give the same log-probs in every precision (KL exactly 0) and reference resets are exact.
    policy = load_pretrained(AutoModelForCausalLM, args.model_name, "--model-name", dtype=torch.float32).to(device)
    ref_policy = load_pretrained(AutoModelForCausalLM, args.model_name, "--model-name", dtype=torch.float32).to(device)
    reward_model = load_reward_model(args.reward_model_name, "--reward-model-name", frozen_dtype, device)
    gold_model = None
    if args.gold_reward_model_name is not None:
        gold_model = load_reward_model(args.gold_reward_model_name, "--gold-reward-model-name", frozen_dtype, device)
    # Dropout off everywhere, trained models included: eval mode keeps log-probs of the same tokens identical
    # between rollout and update (N details, #1). Gradients flow in eval mode as usual.
    for model in (policy, ref_policy, reward_model, gold_model):
        if model is not None:
            model.eval()
    for model in (ref_policy, reward_model, gold_model):
        if model is not None:
            model.requires_grad_(False)
    return tokenizer, policy, ref_policy, reward_model, gold_model


@torch.no_grad()
def sync_reference(ref_policy, policy, mix):
    """Reference reset: ref <- mix * policy + (1 - mix) * ref, in fp32 (both are held in fp32)."""
    for ref_param, param in zip(ref_policy.parameters(), policy.parameters()):
        ref_param.lerp_(param, mix)


def check_finite(loss, update):
    """Stop at the first NaN or inf loss; the last good model is left as it is."""
    if not torch.isfinite(loss):
        raise SystemExit(f"error: non-finite loss ({loss.item()}) at update {update}; stopping without saving. "
                         "Try a lower --learning-rate or --max-grad-norm")


def new_folder(base):
    """Create base, or else base_2, base_3, ...: the first that does not exist yet (mkdir is atomic, so two runs
    started in the same second never share a folder). Returns its path."""
    os.makedirs(os.path.dirname(base), exist_ok=True)
    path, n = base, 1
    while True:
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            n += 1
            path = f"{base}_{n}"


class RunLogger:
    """Creates the run folder, appends records to metrics.jsonl, mirrors them to wandb with --track, shows a tqdm bar.

    The folder holds a file INCOMPLETE from its creation until close(), after the final model is saved: a run
    stopped by Ctrl-C, a NaN or a crash says so.
    """

    def __init__(self, args, run_name):
        # Created only after every check has passed, so a bad flag leaves nothing behind.
        try:
            args.output_dir = args.output_dir or new_folder(os.path.join("runs", run_name))
            os.makedirs(args.output_dir, exist_ok=True)
            for name in set(os.listdir(args.output_dir)) & RUN_FILES:  # --overwrite-output-dir: the old run goes
                path = os.path.join(args.output_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
            with open(os.path.join(args.output_dir, "INCOMPLETE"), "w") as f:
                f.write("This run has not finished: its records so far are here, and no final model.\n")
            with open(os.path.join(args.output_dir, "args.json"), "w") as f:
                json.dump(asdict(args), f, indent=2)
            self.file = open(os.path.join(args.output_dir, "metrics.jsonl"), "w")
            open(os.path.join(args.output_dir, "samples.jsonl"), "w").close()
        except OSError as e:
            fail(f"--output-dir {args.output_dir}: cannot write there ({e.strerror}); choose another folder")
        self.output_dir, self.episode = args.output_dir, 0
        self.wandb = None
        if args.track:
            import wandb  # lazy: only needed with --track

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args), name=run_name)
            self.wandb = wandb
        self.bar = tqdm(total=args.total_episodes, unit="episode", dynamic_ncols=True)
        signal.signal(signal.SIGINT, self.interrupted)

    def interrupted(self, *_):
        """Ctrl-C: one line saying where the run stopped (the folder keeps its records, marked INCOMPLETE)."""
        self.bar.close()
        fail(f"interrupted by Ctrl-C at episode {self.episode}; {self.output_dir} holds the records so far, marked INCOMPLETE")

    def log(self, record):
        self.episode = record["episode"]
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["episode"])
        if "objective/scores" in record:
            self.bar.n = record["episode"]
            self.bar.set_postfix(score=f"{record['objective/scores']:.3f}", kl=f"{record['objective/kl']:.3f}")

    def log_samples(self, episode, samples):
        """Append one evaluation's prompts, responses and scores to samples.jsonl."""
        with open(os.path.join(self.output_dir, "samples.jsonl"), "a") as f:
            f.writelines(json.dumps({"episode": episode, **s}) + "\n" for s in samples)

    def close(self):
        """Finish the run: call it after the final model is saved."""
        self.bar.close()
        self.file.close()
        os.remove(os.path.join(self.output_dir, "INCOMPLETE"))
        if self.wandb is not None:
            self.wandb.finish()


# ------------------------------------------------------------------------------------------------
# ALGO LOGIC: PPO helpers
# ------------------------------------------------------------------------------------------------
ALGO_RANGES = {"num_ppo_epochs": "[1, inf)", "num_minibatches": "[1, inf)", "gradient_accumulation_steps": "[1, inf)",
               "clip_coef": "(0, inf)", "vf_clip_coef": "(0, inf)", "vf_coef": "[0, inf)", "gamma": "[0, 1]",
               "lam": "[0, 1]", "max_grad_norm": "(0, inf)", "kl_target": "(0, inf)", "kl_horizon": "[1, inf)"}


def kl_penalty(logprobs, ref_logprobs, estimator):
    """Per-token KL estimate from log r = log pi - log pi_ref on sampled tokens (Schulman 2020, "Approximating KL").

    In the reward (--kl-in reward) the value is a constant and only log pi's score function carries gradient:
    with k1 the expected policy gradient is exactly the gradient of the sequence KL(pi || pi_ref); with k2 or
    k3 it is E[grad log pi(y) * sum_t k_t(y)], the gradient of a frozen penalty, which is not the KL gradient.
    As a loss (--kl-in loss) the gradient goes through log pi, and its expectation over sampled tokens is:
    k1 -> 0 (E[grad log pi] = 0); k2 -> grad KL(pi || pi_ref) at each visited state, without the future-KL terms;
    k3 -> grad KL(pi_ref || pi) (the forward KL) at each visited state.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return torch.exp(-log_ratio) - 1 + log_ratio  # k3: (r - 1) - log r with r = pi_ref / pi


def token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, estimator):
    """Per-token rewards r_t = -kl_coef * k_t on every response token, plus the RM score on the last real one (the EOS
    when there is one): the InstructGPT reward, whose return is score - kl_coef * sum_t k_t (N details, #9)."""
    rewards = -kl_coef * kl_penalty(logprobs, ref_logprobs, estimator) * mask
    last = mask.sum(1).long() - 1  # index of the last real token of each response
    rewards[torch.arange(len(last)), last] += scores
    return rewards


def token_kl_loss(logprobs, ref_logprobs, mask, kl_coef, estimator):
    """--kl-in loss: kl_coef times the token mean of the KL estimate, differentiated through log pi (see kl_penalty)."""
    return kl_coef * masked_mean(kl_penalty(logprobs, ref_logprobs, estimator), mask)


def whiten(x, mask, shift_mean=True):
    """Normalise x to unit variance (and zero mean) over the real tokens."""
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + 1e-8)
    return whitened if shift_mean else whitened + mean


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016) over the real tokens of each response.

    Rewards and values are zero after the last real token, so the last real token bootstraps from 0.
    Returns (advantages, returns = advantages + values).
    """
    rewards, values = rewards * mask, values * mask
    last_gae, advantages = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    return advantages * mask, (advantages + values) * mask


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_coef):
    """Clipped surrogate (Schulman et al. 2017), averaged over real tokens.

    At ratio 1 its gradient is -mean_t A_t grad log pi(y_t | s_t), so whole-sequence gradients are divided
    by the number of tokens in the minibatch. Returns (loss, approxkl, clipfrac, ratio_mean).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef))
    with torch.no_grad():
        approxkl = 0.5 * masked_mean(log_ratio**2, mask)
        clipfrac = masked_mean(((ratio - 1).abs() > clip_coef).float(), mask)
        ratio_mean = masked_mean(ratio, mask)
    return masked_mean(pg_losses, mask), approxkl, clipfrac, ratio_mean


def ppo_value_loss(values, old_values, returns, mask, vf_clip_coef):
    """Clipped value loss: the worse of the plain and the clipped squared error (N details, #11)."""
    clipped = old_values + torch.clamp(values - old_values, -vf_clip_coef, vf_clip_coef)
    losses = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    clipfrac = masked_mean(((values - old_values).abs() > vf_clip_coef).float(), mask)
    return 0.5 * masked_mean(losses, mask), clipfrac.detach()


def get_values(value_model, query, query_mask, responses, resp_mask, autocast):
    """V(s_t) for every response token: the value head read at the position just before that token."""
    hidden = backbone_hidden(value_model, query, query_mask, responses, resp_mask, autocast)
    return value_model.score(hidden[:, query.shape[1] - 1 : -1]).squeeze(-1).float()


if __name__ == "__main__":
    args = tyro.cli(Args)
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    check_common_args(args)
    check_ranges(args, ALGO_RANGES)
    if args.batch_size % args.num_minibatches != 0:
        fail(f"--batch-size {args.batch_size} must be divisible by --num-minibatches {args.num_minibatches}")
    minibatch_size = args.batch_size // args.num_minibatches
    if minibatch_size % args.gradient_accumulation_steps != 0:
        fail(f"the minibatch size {minibatch_size} (--batch-size / --num-minibatches) must be divisible by "
             f"--gradient-accumulation-steps {args.gradient_accumulation_steps}")
    micro_batch_size = minibatch_size // args.gradient_accumulation_steps
    train_prompts = load_prompts(args.dataset, "--dataset")
    eval_prompts = load_prompts(args.eval_dataset, "--eval-dataset", args.eval_size)

    # MODELS
    device, autocast, frozen_dtype = setup_run(args)
    tokenizer, policy, ref_policy, reward_model, gold_model = load_models(args, device, frozen_dtype)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    train_ids = tokenize_prompts(tokenizer, train_prompts, args.max_prompt_length, "--dataset")
    eval_ids = tokenize_prompts(tokenizer, eval_prompts, args.max_prompt_length, "--eval-dataset")
    # The value model is a copy of the RM (backbone + scalar head), trained; it is the critic of InstructGPT.
    value_model = load_reward_model(args.reward_model_name, "--reward-model-name", torch.float32, device).eval()
    params = list(policy.parameters()) + list(value_model.parameters())
    # eps=1e-5 as in the N details (#5); no weight decay, so the KL-regularised optimum stays the fixed point.
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, eps=1e-5, weight_decay=0.0)
    # fp16 autocast needs loss scaling so small gradients do not underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    logger = RunLogger(args, run_name)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    num_updates = args.total_episodes // args.batch_size
    kl_coef = args.kl_coef
    episode, next_eval, order = 0, args.eval_every, []
    time_rollout = time_update = 0.0
    start_time = time.time()

    record, samples = evaluate(policy, ref_policy, reward_model, gold_model, tokenizer, eval_ids, args, eos_id, pad_id, device, autocast)
    logger.log({"episode": 0, **record})
    logger.log_samples(0, samples)

    for update in range(1, num_updates + 1):
        # Linear learning-rate decay to 0 over the run (N details, #5).
        lr = args.learning_rate * (1.0 - (update - 1.0) / num_updates)
        optimizer.param_groups[0]["lr"] = lr

        # ROLLOUT: a batch of prompts (reshuffled each pass over the data), one response each.
        t0 = time.time()
        batch = next_prompt_indices(order, args.batch_size, len(train_ids))
        query, query_mask = left_pad([train_ids[i] for i in batch], pad_id, device)
        r = rollout(policy, ref_policy, reward_model, query, query_mask, args, eos_id, pad_id, generator, autocast)
        responses, mask = r["responses"], r["mask"]
        with torch.no_grad():
            values = get_values(value_model, query, query_mask, responses, mask.long(), autocast) * mask
        episode += args.batch_size
        time_rollout += time.time() - t0

        # ALGO LOGIC: per-token rewards, GAE advantages and returns
        t0 = time.time()
        with torch.no_grad():
            kl_in_reward, kl_in_loss = (kl_coef, 0.0) if args.kl_in == "reward" else (0.0, kl_coef)
            rewards = token_rewards(r["scores"], r["logprobs"], r["ref_logprobs"], mask, kl_in_reward, args.kl_estimator)
            if args.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False) * mask
            advantages, returns = compute_gae(rewards, values, mask, args.gamma, args.lam)
            advantages = whiten(advantages, mask) * mask  # N details, #7

        # PPO update: several epochs of minibatches over this batch.
        stats = {k: [] for k in ["loss/policy", "loss/value", "ppo/approxkl", "ppo/clipfrac", "ppo/ratio_mean", "ppo/value_clipfrac"]}
        for epoch in range(args.num_ppo_epochs):
            perm = torch.randperm(args.batch_size, device=device)
            for mb_start in range(0, args.batch_size, minibatch_size):
                # The losses are token means over the whole minibatch: each micro-batch's token mean is weighted
                # by its share of the minibatch's tokens, so accumulation gives the gradient of one big minibatch.
                minibatch_tokens = mask[perm[mb_start : mb_start + minibatch_size]].sum()
                for micro_start in range(mb_start, mb_start + minibatch_size, micro_batch_size):
                    idx = perm[micro_start : micro_start + micro_batch_size]
                    mb_mask = mask[idx]
                    new_logprobs, _ = forward_logprobs(policy, query[idx], query_mask[idx], responses[idx], mb_mask.long(), args.temperature, autocast)
                    new_values = get_values(value_model, query[idx], query_mask[idx], responses[idx], mb_mask.long(), autocast)
                    pg_loss, approxkl, clipfrac, ratio_mean = ppo_policy_loss(new_logprobs, r["logprobs"][idx], advantages[idx], mb_mask, args.clip_coef)
                    vf_loss, vf_clipfrac = ppo_value_loss(new_values, values[idx], returns[idx], mb_mask, args.vf_clip_coef)
                    kl_term = token_kl_loss(new_logprobs, r["ref_logprobs"][idx], mb_mask, kl_in_loss, args.kl_estimator)
                    loss = pg_loss + args.vf_coef * vf_loss + kl_term
                    check_finite(loss, update)
                    scaler.scale(loss * (mb_mask.sum() / minibatch_tokens)).backward()  # exactly 1 unless accumulating
                    for k, v in zip(stats, [pg_loss, vf_loss, approxkl, clipfrac, ratio_mean, vf_clipfrac]):
                        stats[k].append(v.item())
                if args.max_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
        time_update += time.time() - t0

        # LOGGING
        record = train_record(r, episode, update, lr, kl_coef, start_time, time_rollout, time_update, device)
        explained_var = 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)
        logger.log({**record, **{k: sum(v) / len(v) for k, v in stats.items()}, "ppo/explained_variance": explained_var.item()})

        # Adaptive KL controller (Ziegler et al. 2019): move kl_coef so the sequence KL tracks --kl-target.
        if args.kl_target is not None:
            error = max(-0.2, min(0.2, record["objective/kl"] / args.kl_target - 1))
            kl_coef *= 1 + error * args.batch_size / args.kl_horizon
        if args.ref_sync_every > 0 and update % args.ref_sync_every == 0:
            sync_reference(ref_policy, policy, args.ref_sync_mix)

        # EVALUATION
        if episode >= next_eval or update == num_updates:
            next_eval += args.eval_every
            record, samples = evaluate(policy, ref_policy, reward_model, gold_model, tokenizer, eval_ids, args, eos_id, pad_id, device, autocast)
            logger.log({"episode": episode, **record})
            logger.log_samples(episode, samples)

    if args.save_model:
        policy.save_pretrained(os.path.join(args.output_dir, "model"))
        tokenizer.save_pretrained(os.path.join(args.output_dir, "model"))
    logger.close()
    print(f"done: {episode} episodes in {time.time() - start_time:.0f}s; run folder {args.output_dir}")
