"""GRPO for RLHF: group-relative policy optimisation with a per-token clipped ratio, and its 2025 corrections.

Each update samples G = --num-generations responses to each of a batch of prompts; each response gets one reward R_i
(the RM score; with --kl-in reward also - kl_coef * sum_t k_t) and the advantage A_i = (R_i - mean of its group's G
rewards) / (their std) (--no-scale-rewards: no division), shared by all its tokens. The loss is PPO's clipped surrogate
per token, weighted per response by --loss-type, with GRPO's KL term in the loss: kl_coef * k3 per token (the
defaults --kl-estimator k3 --kl-in loss). Unlike RLOO's, this baseline includes the response itself.

Papers: GRPO, DeepSeekMath (Shao et al. 2024, https://arxiv.org/abs/2402.03300, eq. 3 and sec. 4.1.2); Dr. GRPO
(Liu et al. 2025, https://arxiv.org/abs/2503.20783, sec. 3.1: no std scaling, a constant length normaliser); DAPO (Yu
et al. 2025, https://arxiv.org/abs/2503.14476: clip-higher, a token-level loss); TRL's GRPOTrainer `loss_type`s
(https://huggingface.co/docs/trl/grpo_trainer); KL estimators (Schulman 2020, http://joschu.net/blog/kl-approx.html)
and what their gradients are in a loss (Tang & Munos 2025, https://arxiv.org/abs/2506.09477).
"N details, <section> #k": item k of that section of "The N Implementation Details of RLHF with PPO" (Huang et al.
2023, https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo); "N+": Huang et al. 2024,
https://arxiv.org/abs/2403.17031. Style: CleanRL (one file, the algorithm first, a flat loop); flags: docs/usage.md.

Usage: python grpo_rlhf.py --help   (defaults train on the built-in offline tinyworld in a few minutes)
One process on one device; grpo_rlhf_multigpu.py is its twin for many GPUs (torchrun, checkpoints, memory flags).
"""

import contextlib
import importlib.util
import inspect
import itertools
import json
import math
import numbers
import os
import random
import runpy
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import transformers
import tyro
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

transformers.utils.logging.disable_progress_bar()  # keep the output to our own progress bar


@dataclass
class Args:
    """Fine-tune a causal LM against a reward model with a KL penalty to its frozen initial self. The defaults train
    the built-in tinyworld (a tiny SFT policy, proxy and gold RMs, prompts) on a CPU; README.md says more."""

    exp_name: str = os.path.basename(__file__).removesuffix(".py")  # the name of this experiment
    seed: int = 1  # seed of the experiment (new heads, prompt order, sampling)
    torch_deterministic: bool = True  # set torch.backends.cudnn.deterministic (CUDA only: CPU runs always repeat)
    cuda: bool = True  # use CUDA when it is available (--no-cuda forces the CPU)
    track: bool = False  # track this experiment with Weights and Biases
    wandb_project_name: str = "rlhf"  # the wandb's project name
    wandb_entity: str | None = None  # the entity (team) of wandb's project
    model_name: str = "tinyworld/sft"  # policy initialisation and frozen reference: a hub name or a local folder
    reward_model_name: str = "tinyworld/reward_model"  # the reward RL optimises: an RM (1 label) or file.py:function
    gold_reward_model_name: str | None = "tinyworld/gold_reward_model"  # a second reward used only to evaluate
    dataset: str = "tinyworld/prompts_train.jsonl"  # training prompts: .jsonl of `prompt` or chat `messages`, or hub
    eval_dataset: str = "tinyworld/prompts_eval.jsonl"  # evaluation prompts, same format as --dataset
    max_prompt_length: int = 16  # prompts longer than this many tokens are truncated from the left
    response_length: int = 24  # maximum number of new tokens per response
    temperature: float = 1.0  # sampling temperature; training log-probs are computed from logits / temperature
    stop_at_eos: bool = True  # truncate each response after its first EOS; off = fixed-length responses
    missing_eos_penalty: float | None = 1.0  # subtracted from the score of a response with no EOS (None disables)
    total_episodes: int = 16384  # number of sampled responses over the whole run
    batch_size: int = 64  # responses sampled per rollout
    learning_rate: float = 3e-4  # the policy's learning rate
    kl_coef: float = 0.05  # beta, the weight of the KL penalty to the reference policy
    ref_sync_every: int = 0  # every N updates set ref <- mix * policy + (1 - mix) * ref; 0 = never
    ref_sync_mix: float = 1.0  # the mix of the reference reset (1.0 = copy the policy)
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"  # autocast dtype; auto = bf16 on CUDA, no on CPU
    eval_every: int = 2048  # evaluate every N episodes (and before and after training)
    eval_size: int = 128  # number of evaluation prompts (the first N of --eval-dataset)
    output_dir: str | None = None  # run folder; default runs/<run_name> (a new folder for every run)
    overwrite_output_dir: bool = False  # replace the run in --output-dir (its records and model are deleted first)
    save_model: bool = True  # save the final policy and tokenizer to <output-dir>/model

    # Algorithm specific arguments
    num_generations: int = 4  # G, responses sampled per prompt; each rollout holds batch_size / G prompts
    num_ppo_epochs: int = 1  # passes over each rollout batch (GRPO's mu); 1 = on-policy, where the clip never acts
    clip_coef: float = 0.2  # epsilon: each token's ratio is clipped to [1 - clip_coef, 1 + clip_coef_high]
    clip_coef_high: float | None = None  # DAPO's clip-higher upper epsilon (it uses 0.28); None = --clip-coef
    scale_rewards: bool = True  # divide each advantage by its group's reward std (GRPO); off = Dr. GRPO's advantage
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"  # how token losses are averaged (see response_weights)
    max_grad_norm: float | None = 1.0  # global gradient-norm clip (None disables)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # the per-token KL estimator of Schulman 2020 (see kl_penalty)
    kl_in: Literal["reward", "loss"] = "loss"  # put the KL penalty in the reward, or add it to the loss (GRPO's)

    def __post_init__(self):  # (after every field: a method between fields hides the next field's --help line)
        if self.gold_reward_model_name is not None and self.gold_reward_model_name.strip().lower() in ("", "none"):
            self.gold_reward_model_name = None  # --gold-reward-model-name none, "" or None: no gold model
        for name in ["model_name", "reward_model_name", "gold_reward_model_name", "dataset", "eval_dataset"]:
            path = getattr(self, name)  # a tinyworld/ path that is not in the working folder is the one beside this
            if path is not None and path.startswith("tinyworld/") and not os.path.exists(path):
                setattr(self, name, os.path.join(os.path.dirname(os.path.abspath(__file__)), path))


# ======= ALGO LOGIC: this algorithm's losses and estimators (below them, the core and the plumbing are shared) ========
ALGO_RANGES = {  # the allowed interval of each numeric flag of this algorithm (see COMMON_RANGES)
    "[2, inf)": ["num_generations"],
    "[1, inf)": ["num_ppo_epochs"],
    "(0, inf)": ["clip_coef", "clip_coef_high", "max_grad_norm"],
}


def kl_penalty(logprobs, ref_logprobs, estimator):
    """Per-token KL estimate from the log-ratio log pi - log pi_ref of sampled tokens (Schulman 2020, "Approx. KL").
    In the reward (--kl-in reward) only log pi's score function carries gradient: with k1 its expectation is the
    gradient of the sequence KL(pi || pi_ref); with k2 or k3, that of a frozen penalty, not of the KL. As a loss
    (--kl-in loss), through log pi: k1 -> 0; k2 -> grad KL(pi || pi_ref) at each visited state, without the future-KL
    terms; k3 -> grad KL(pi_ref || pi) (the forward KL) at each visited state."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return torch.exp(-log_ratio) - 1 + log_ratio  # k3: (r - 1) - log r with r = pi_ref / pi


def sequence_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, estimator):
    """One reward per response: R = RM score - kl_coef * sum_t k_t, the KL estimate summed over its real tokens."""
    return scores - kl_coef * (kl_penalty(logprobs, ref_logprobs, estimator) * mask).sum(1)


def grpo_advantages(rewards, k, scale_rewards):
    """Group-relative advantages for rewards laid out as consecutive groups of k responses per prompt (Shao et al.
    2024, sec. 4.1.2): A_i = (R_i - mean_j R_j) / (std_j R_j + 1e-4) over the k responses j of its prompt, the std
    with Bessel's correction and the 1e-4 as TRL's; --no-scale-rewards keeps R_i - mean_j R_j (Dr. GRPO).
    The mean includes R_i itself: R_i - mean_j R_j = (k - 1) / k (R_i - mean of the other k - 1), RLOO's unbiased
    advantage shrunk by (k - 1) / k. Dividing by the std is not: it weights prompts whose responses score alike
    (too easy or too hard) up (Liu et al. 2025, sec. 3.1). Returns (advantages, each group's reward std), flat."""
    grouped = rewards.view(-1, k)
    std = grouped.std(1, keepdim=True)
    advantages = grouped - grouped.mean(1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (std + 1e-4)
    return advantages.flatten(), std.expand_as(grouped).flatten()


def response_weights(mask, loss_type, max_length):
    """The weight w_i of each token of response i in the loss mean_i w_i sum_t l_it ([batch], no gradient), which
    makes --loss-type (TRL's names):
    grpo: w_i = 1 / |y_i|, the mean over each response's tokens, then over responses (Shao et al. 2024, eq. 3): a
        token of a short response counts more, so a long response's tokens are pushed less, whether A_i is good or
        bad (Liu et al. 2025, sec. 3.1, show it lengthens wrong answers);
    dr_grpo: w_i = 1 / --response-length, one constant (Liu et al. 2025): the sum over all tokens, unbiased;
    dapo: w_i = 1 / (mean |y_j| over the whole batch): the mean over all the batch's tokens (Yu et al. 2025, eq. 12),
        every token alike, which still depends on the other responses' lengths."""
    lengths = mask.sum(1)  # [batch]
    if loss_type == "grpo":
        return 1.0 / lengths.clamp(min=1)
    if loss_type == "dr_grpo":
        return torch.full_like(lengths, 1.0 / max_length)
    return torch.full_like(lengths, 1.0) / whole_batch_mean(lengths, torch.ones_like(lengths)).clamp(min=1)


def aggregate(per_token_loss, weights, mask):
    """mean_i w_i sum_t l_it over the real tokens t of the responses i: the loss of every --loss-type."""
    return ((per_token_loss * mask).sum(1) * weights).mean()


def grpo_policy_loss(logprobs, old_logprobs, advantages, weights, mask, clip_low, clip_high):
    """PPO's clipped surrogate per token (Schulman et al. 2017, eq. 7), with the response's advantage at every token:
    l_it = max(-A_i rho_it, -A_i clip(rho_it, 1 - eps_low, 1 + eps_high)), rho_it = pi(y_it | s_it) / pi_old(y_it |
    s_it), aggregated by `aggregate`. eps_high > eps_low is DAPO's clip-higher (Yu et al. 2025, sec. 3.1): a token
    whose probability rises with A_i > 0 may rise further before its gradient stops. At ratio 1 the gradient is
    -mean_i w_i A_i sum_t grad log pi(y_it | s_it). "grpo/clipfrac": the fraction of tokens whose gradient the clip
    stopped (ratio past 1 + eps_high with A > 0, or below 1 - eps_low with A < 0). Returns (loss, its statistics)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    advantages = advantages.unsqueeze(1)  # [batch, 1]: one advantage for every token of a response
    losses = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    with torch.no_grad():
        clipped = ((ratio > 1 + clip_high) & (advantages > 0)) | ((ratio < 1 - clip_low) & (advantages < 0))
        stats = {
            "grpo/approxkl": (0.5 * masked_mean(log_ratio**2, mask)).item(),
            "grpo/clipfrac": masked_mean(clipped.float(), mask).item(),
            "grpo/ratio_mean": masked_mean(ratio, mask).item(),
        }
    loss = aggregate(losses, weights, mask)
    return loss, {"loss/policy": loss.item(), **stats}


# ====== RLHF CORE: generation, log-probs, reward scoring and the rollout (the same text in every script) ======
def left_pad(seqs, pad_id, device):
    """Stack token lists into a left-padded batch, so every response starts at the same column: (ids, mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def position_ids(mask):
    """Positions that count only real tokens, so left padding does not shift them (N details, General #3)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


@torch.no_grad()
def generate(model, query, query_mask, args, eos_id, generator, autocast):
    """Sample up to --response-length tokens [batch, time] from softmax(logits / temperature) with a KV cache, until
    every row has an EOS (--stop-at-eos). No top-k/top-p: the training log-probs are those of the sampled one."""
    ids, mask, positions = query, query_mask, position_ids(query_mask)
    cache, tokens = None, []
    ended = torch.zeros(query.shape[0], dtype=torch.bool, device=query.device)
    for _ in range(args.response_length):
        with autocast:
            out = model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        probs = torch.softmax(out.logits[:, -1].float() / args.temperature, dim=-1)  # [batch, vocab]
        if not torch.isfinite(probs).all():  # say so rather than sample garbage
            fail("the policy's next-token probabilities are not finite; nothing saved: lower --learning-rate")
        next_token = torch.multinomial(probs, 1, generator=generator)  # [batch, 1]
        tokens.append(next_token)
        ended |= next_token[:, 0] == eos_id
        if args.stop_at_eos and ended.all():
            break
        ids, positions = next_token, positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
    return torch.cat(tokens, dim=1)


def response_mask(responses, eos_id, pad_id, stop_at_eos):
    """Mask of real tokens, responses with pad after their first EOS (a real token: with --stop-at-eos it ends them),
    and whether each has an EOS. From positions, never ids: pad and EOS can be the same id (GPT-2, Pythia)."""
    is_eos = responses == eos_id
    has_eos = is_eos.any(dim=1)
    if not stop_at_eos:
        return torch.ones_like(responses), responses, has_eos
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).long(), responses.masked_fill(after_eos, pad_id), has_eos


def backbone_hidden(model, query, query_mask, responses, resp_mask, autocast):
    """Last hidden states [batch, prompt + time, hidden] of a sequence-classification model's backbone."""
    input_ids = torch.cat([query, responses], dim=1)
    mask = torch.cat([query_mask, resp_mask], dim=1)
    with autocast:
        backbone = getattr(model, model.base_model_prefix)  # e.g. `.model` for Llama, `.transformer` for GPT-2
        out = backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    return out.last_hidden_state


def forward_logp_all(model, query, query_mask, responses, resp_mask, temperature, autocast):
    """log pi(. | s_t) over the vocabulary at every response position t, [batch, time, vocab], fp32, from logits / T."""
    input_ids = torch.cat([query, responses], dim=1)
    mask = torch.cat([query_mask, resp_mask], dim=1)
    with autocast:
        # use_cache=False: a whole-sequence pass needs no KV cache.
        logits = model(input_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
    # The logit at position i predicts token i + 1: keep those that predict the response tokens.
    return torch.log_softmax(logits[:, query.shape[1] - 1 : -1].float() / temperature, dim=-1)


def forward_logprobs(model, query, query_mask, responses, resp_mask, temperature, autocast):
    """Per-token log pi(y_t | x, y_<t) and exact entropy, [batch, time], fp32, from logits / temperature; 0 at padding
    (at a low temperature a padded token's log-prob can be -1e3: exp(-log ratio) would be inf, and inf * 0 NaN)."""
    logp_all = forward_logp_all(model, query, query_mask, responses, resp_mask, temperature, autocast)
    logprobs = logp_all.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    padding = resp_mask == 0
    return logprobs.masked_fill(padding, 0.0), entropy.masked_fill(padding, 0.0)


@torch.no_grad()
def get_scores(reward_model, query, query_mask, responses, resp_mask, autocast):
    """The RM's scalar score [batch], read at the last real token of prompt + truncated response (or the function's)."""
    if isinstance(reward_model, RewardFunction):
        return reward_model(query, query_mask, responses, resp_mask)
    hidden = backbone_hidden(reward_model, query, query_mask, responses, resp_mask, autocast)
    last = query.shape[1] + resp_mask.sum(1) - 1
    return reward_model.score(hidden[torch.arange(len(last)), last]).squeeze(-1).float()


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whole_batch_mean(x, mask):
    """masked_mean over the whole rollout batch: one process holds it here. (ALGO LOGIC calls this name so that its
    text is the _multigpu twin's, where the batch spans the ranks and this mean sums over all of them.)"""
    return masked_mean(x, mask)


@torch.no_grad()
def rollout(policy, ref_policy, reward_model, query, query_mask, args, eos_id, pad_id, generator, autocast):
    """Sample responses and what the losses and logs need about them, with no gradient. Returns responses, mask
    (float), has_eos, log-probs, reference log-probs, entropy ([batch, time] each but has_eos) and scores [batch]."""
    raw = generate(policy, query, query_mask, args, eos_id, generator, autocast)
    mask, responses, has_eos = response_mask(raw, eos_id, pad_id, args.stop_at_eos)
    rows = (query, query_mask, responses, mask)
    logprobs, entropy = forward_logprobs(policy, *rows, args.temperature, autocast)
    ref_logprobs, _ = forward_logprobs(ref_policy, *rows, args.temperature, autocast)
    scores = get_scores(reward_model, *rows, autocast)
    if args.missing_eos_penalty is not None:  # the "EOS trick" (N+ sec. 7): responses must end
        scores = scores - args.missing_eos_penalty * (~has_eos).float()
    return responses, mask.float(), has_eos, logprobs, ref_logprobs, entropy, scores


def batch_stats(scores, logprobs, ref_logprobs, entropy, mask, has_eos):
    """The common metrics of a batch of responses (docs/usage.md, "Metrics"): objective/... or eval/... records."""
    kl = ((logprobs - ref_logprobs) * mask).sum(1)  # [batch] sequence-level k1 on the sampled tokens
    n, tokens = len(scores), mask.sum()
    stats = {"scores": scores.sum() / n, "kl": kl.sum() / n, "entropy": (entropy * mask).sum() / tokens.clamp(min=1)}
    stats |= {"response_length": tokens / n, "eos_rate": has_eos.float().sum() / n}  # (the entropy is per token)
    return {k: v.item() for k, v in stats.items()}


# ============ MAIN: setup, models, then the training loop (it reads as the papers' pseudocode) ============
def main():
    args = tyro.cli(Args)
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    check_args(args, ALGO_RANGES)
    if args.batch_size % args.num_generations != 0:
        fail(f"--batch-size {args.batch_size} must be divisible by --num-generations {args.num_generations}")
    clip_high = args.clip_coef if args.clip_coef_high is None else args.clip_coef_high
    train_prompts = load_prompts(args.dataset, "--dataset")
    eval_prompts = load_prompts(args.eval_dataset, "--eval-dataset", args.eval_size)

    # MODELS
    device, autocast, tokenizer, policy, ref_policy, reward_model, gold_model = load_models(args)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    train_ids = tokenize_prompts(tokenizer, train_prompts, args.max_prompt_length, "--dataset")
    eval_ids = tokenize_prompts(tokenizer, eval_prompts, args.max_prompt_length, "--eval-dataset")
    params = list(policy.parameters())
    # eps=1e-5 as in N+ (sec. 7, PPO setup); no weight decay, so the KL-regularised optimum stays the fixed point.
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, eps=1e-5, weight_decay=0.0)
    # fp16 autocast needs loss scaling so small gradients do not underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    logger = RunLogger(args, run_name)
    generator = torch.Generator(device=device).manual_seed(args.seed)  # the sampling seed
    num_updates = args.total_episodes // args.batch_size
    # The loop's state: episodes so far, the next evaluation, the prompt stream, the time spent.
    episode, next_eval, order = 0, args.eval_every, []
    time_rollout = time_update = 0.0
    start_time = time.time()
    eval_models = (policy, ref_policy, reward_model, gold_model, tokenizer, eval_ids, args, device, autocast)
    logger.log_eval(0, *evaluate(*eval_models))

    for update in range(1, num_updates + 1):
        # Linear learning-rate decay to 0 over the run (N details, General #5).
        lr = args.learning_rate * (1.0 - (update - 1.0) / num_updates)
        optimizer.param_groups[0]["lr"] = lr

        # ROLLOUT: batch_size / G prompts (reshuffled each pass over the data), each repeated G times in a row.
        t0 = time.time()
        batch = next_prompt_indices(order, args.batch_size // args.num_generations, len(train_ids))
        query, query_mask = left_pad([train_ids[i] for i in batch for _ in range(args.num_generations)], pad_id, device)
        responses, mask, has_eos, logprobs, ref_logprobs, entropy, scores = rollout(
            policy, ref_policy, reward_model, query, query_mask, args, eos_id, pad_id, generator, autocast
        )
        episode += args.batch_size
        time_rollout += time.time() - t0

        # REWARDS AND ADVANTAGES: one reward per response, group-relative advantages and loss weights, all [batch].
        t0 = time.time()
        with torch.no_grad():
            kl_in_reward, kl_in_loss = (args.kl_coef, 0.0) if args.kl_in == "reward" else (0.0, args.kl_coef)
            rewards = sequence_rewards(scores, logprobs, ref_logprobs, mask, kl_in_reward, args.kl_estimator)
            advantages, reward_std = grpo_advantages(rewards, args.num_generations, args.scale_rewards)
            weights = response_weights(mask, args.loss_type, args.response_length)

        # GRPO UPDATE: one optimizer step per pass over the batch (as in the RLOO script).
        stats = []
        for _epoch in range(args.num_ppo_epochs):
            i = torch.randperm(args.batch_size, device=device)  # any order: the same gradient (this one: the twin's)
            rows = (query[i], query_mask[i], responses[i], mask[i].long())
            new_logprobs, _ = forward_logprobs(policy, *rows, args.temperature, autocast)
            pg_loss, pg_stats = grpo_policy_loss(
                new_logprobs, logprobs[i], advantages[i], weights[i], mask[i], args.clip_coef, clip_high
            )
            # GRPO's KL term: kl_coef * k per token, aggregated as the policy loss (Shao et al. 2024, eq. 3).
            kl_loss = aggregate(
                kl_in_loss * kl_penalty(new_logprobs, ref_logprobs[i], args.kl_estimator), weights[i], mask[i]
            )
            loss = pg_loss + kl_loss
            check_finite(loss, update)
            scaler.scale(loss).backward()
            stats.append(pg_stats)
            optimizer_step([(optimizer, params)], scaler, args.max_grad_norm)
        time_update += time.time() - t0

        # LOGGING: the common keys, then the means of the update's statistics and the algorithm's own diagnostics.
        stats = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
        stats |= {
            "grpo/reward_std": reward_std.mean().item(),
            "grpo/zero_std_frac": (reward_std == 0).float().mean().item(),
        }
        lengths = mask.sum(1)  # Dr. GRPO's question: are the responses with A < 0 the longer ones? (-1: there is none)
        for sign, pick in [("pos", advantages > 0), ("neg", advantages < 0)]:
            stats[f"grpo/length_advantage_{sign}"] = lengths[pick].mean().item() if pick.any() else -1.0
        objective = batch_stats(scores, logprobs, ref_logprobs, entropy, mask, has_eos)
        logger.log_train(episode, update, lr, args.kl_coef, objective, start_time, time_rollout, time_update, stats)

        if args.ref_sync_every > 0 and update % args.ref_sync_every == 0:
            lerp_parameters(ref_policy, policy, args.ref_sync_mix)

        # EVALUATION
        if episode >= next_eval or update == num_updates:
            next_eval += args.eval_every
            logger.log_eval(episode, *evaluate(*eval_models))

    logger.finish(policy, tokenizer, start_time)


# === TRY NOT TO MODIFY: checks, loading, evaluation, logging and saving (the same text in every script) ===
def fail(message):
    """Stop with one line that names the flag and the fix (no traceback)."""
    for bar in list(tqdm._instances):  # end the progress bar's line first, so the message starts its own
        bar.close()
    raise SystemExit(f"error: {message}")


COMMON_RANGES = {  # the allowed interval of each numeric flag; values must be finite, and a None flag may be None
    "[1, inf)": ["max_prompt_length", "response_length", "total_episodes", "batch_size", "eval_every", "eval_size"],
    "(0, inf)": ["temperature", "learning_rate"],
    "[0, inf)": ["missing_eos_penalty", "kl_coef", "ref_sync_every"],
    "(0, 1]": ["ref_sync_mix"],
}
RUN_FILES = {"args.json", "metrics.jsonl", "samples.jsonl", "model", "model.tmp", "INCOMPLETE"}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model"}


def check_args(args, algo_ranges):
    """Before anything loads, refuse bad flags (out of range, not finite, budgets that do not divide, a used folder)."""
    signal.signal(signal.SIGINT, lambda *_: fail("interrupted by Ctrl-C before training; nothing was written"))
    if args.track and importlib.util.find_spec("wandb") is None:
        fail("--track needs wandb, which is not installed: `pip install wandb`, or run without --track")
    for interval, names in [*COMMON_RANGES.items(), *algo_ranges.items()]:
        low, high = (float(x) for x in interval[1:-1].split(","))
        for name, value in [(name, getattr(args, name)) for name in names if getattr(args, name) is not None]:
            above = low < value if interval[0] == "(" else low <= value
            below = value < high if interval[-1] == ")" else value <= high
            if not (math.isfinite(value) and above and below):
                fail(f"--{name.replace('_', '-')} must be in {interval} (got {value})")
    if args.total_episodes % args.batch_size:
        fail(f"--total-episodes {args.total_episodes} is not a multiple of --batch-size {args.batch_size}; change one")
    if args.eval_every % args.batch_size:  # evaluations happen between updates, after whole batches
        every = math.ceil(args.eval_every / args.batch_size) * args.batch_size
        print(f"note: evaluating every {every} episodes: --eval-every {args.eval_every} rounded up to whole batches")
        args.eval_every = every
    if not args.stop_at_eos and args.missing_eos_penalty is not None:  # a fixed-length response has no end to miss
        print("note: --missing-eos-penalty applies only with --stop-at-eos; it is off in this run")
        args.missing_eos_penalty = None
    out = args.output_dir
    if out is not None and os.path.exists(out):
        foreign = sorted(set(os.listdir(out)) - RUN_FILES) if os.path.isdir(out) else ["it is a file"]
        if foreign:  # --overwrite-output-dir deletes a run's files, never anything else
            fail(f"--output-dir {out} is not a run's folder ({', '.join(foreign[:3])}); choose another folder")
        if os.listdir(out) and not args.overwrite_output_dir:
            fail(f"--output-dir {out} holds a run; choose another folder, or pass --overwrite-output-dir to replace it")


def load_prompts(name, flag, size=None):
    """The prompts (the first `size`) of a .jsonl file or a hub `name[:split]`: each row a text `prompt` or chat
    `messages` (a list of {"role": ..., "content": ...}, formatted by tokenize_prompts)."""
    form = "pass a UTF-8 .jsonl file with a text `prompt` or chat `messages` on each line"
    if not (name.endswith(".jsonl") or os.path.exists(name)):
        try:
            import datasets  # lazy: only needed for hub datasets

            rows = datasets.load_dataset(name.split(":")[0], split=(name.split(":") + ["train"])[1])
        except Exception as e:  # noqa: BLE001 (not installed, not found, no network: one line, not a traceback)
            fail(f"{flag} {name}: no such .jsonl file, and no hub dataset could be loaded ({str(e).splitlines()[0]})")
    elif not (name.endswith(".jsonl") and os.path.isfile(name)):
        fail(f"{flag} {name}: {'not a .jsonl file' if os.path.exists(name) else 'no such file'}; {form}")
    else:
        try:
            with open(name, encoding="utf-8-sig") as f:  # -sig: a byte-order mark at the start is not text
                lines = f.read().splitlines()
            rows = [json.loads(line) for line in lines if line.strip()]
        except UnicodeDecodeError as e:
            fail(f"{flag} {name}: not UTF-8 text ({e.reason} at byte {e.start}); {form}")
        except json.JSONDecodeError as e:  # e.doc is the line that failed
            fail(f"{flag} {name}: line {lines.index(e.doc) + 1} is not valid JSON; {form}")
    for number, row in enumerate(rows, 1):
        fields = [key for key in ("prompt", "messages") if isinstance(row, dict) and key in row]
        turns = row["messages"] if fields == ["messages"] and isinstance(row["messages"], list) else []
        chat = [isinstance(m, dict) and {type(m.get(k)) for k in ("role", "content")} == {str} for m in turns]
        if not (chat and all(chat) or fields == ["prompt"] and isinstance(row["prompt"], str)):
            what = "both `prompt` and `messages`" if len(fields) == 2 else "no text `prompt` or well-formed `messages`"
            fail(f"{flag} {name}: row {number} has {what} (it is {repr(row)[:60]}); {form}")
    if len(rows) == 0:
        fail(f"{flag} {name} has no rows; {form}")
    if size is not None and size > len(rows):
        fail(f"--eval-size {size} is more than the {len(rows)} prompts of {flag} {name}; pass at most {len(rows)}")
    return [row["prompt"] if "prompt" in row else row["messages"] for row in rows][:size]


def load_pretrained(auto_class, name, flag, **kwargs):
    """from_pretrained with one clear line naming the flag when the folder or hub name does not load."""
    parent = os.path.dirname(name.rstrip("/"))
    if not os.path.isdir(name) and (name.startswith((".", "/")) or name.count("/") > 1 or os.path.isdir(parent)):
        # A local path, not a hub name: say so now instead of retrying the hub.
        what = "is a file, not a model folder" if os.path.exists(name) else "no such folder"
        fail(f"{flag} {name}: {what}; pass a model's folder (save_pretrained) or a hub name such as org/model")
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except Exception as e:  # noqa: BLE001 (a missing folder, missing files, a wrong format: one line)
        fail(f"{flag} {name}: no {auto_class.__name__} loads from it ({str(e).splitlines()[0]}); pass another")


def tokenize_prompts(tokenizer, prompts, max_prompt_length, flag):
    """Token ids of each prompt, truncated from the left (the end of a prompt is what the response continues). Chat
    messages are formatted by the tokenizer's chat template, ending with the prompt that opens the assistant's turn."""
    ids = []
    for number, prompt in enumerate(prompts, 1):
        text = prompt
        if not isinstance(prompt, str):  # the template writes the special tokens (a BOS included): none added below
            try:
                text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # noqa: BLE001 (no template, or one that rejects these messages: one line)
                why = "it has no chat template" if tokenizer.chat_template is None else str(e).splitlines()[0]
                fail(f"{flag}: row {number} holds chat messages --model-name cannot format ({why}); use `prompt` text")
        ids.append(tokenizer(text, add_special_tokens=isinstance(prompt, str), verbose=False)["input_ids"])
    if any(len(x) == 0 for x in ids):  # e.g. "" with a tokenizer that adds no BOS: there is nothing to condition on
        fail(f"{flag}: some prompts are empty after tokenization; remove them or use a tokenizer that adds BOS")
    too_long = [i for i, x in enumerate(ids) if len(x) > max_prompt_length]
    if too_long:
        print(f"note: {len(too_long)} of {len(ids)} prompts of {flag} are over --max-prompt-length; each keeps its end")
    for i in too_long:  # a BOS the tokenizer put first stays first (the model always saw one there)
        keep = 1 if ids[i][0] == tokenizer.bos_token_id and max_prompt_length > 1 else 0
        ids[i] = ids[i][:keep] + ids[i][len(ids[i]) - max_prompt_length + keep :]
    return ids


def next_prompt_indices(order, n, num_prompts):
    """The next n indices of a prompt stream that reshuffles all prompts on every pass; consumes `order`."""
    while len(order) < n:
        order += random.sample(range(num_prompts), num_prompts)
    batch, order[:n] = order[:n], []
    return batch


def load_reward_model(name, flag, dtype, device, tokenizer=None):
    """A frozen or trained copy of a reward model (load_models has checked that it is one), or a reward function."""
    if is_reward_function(name):
        return RewardFunction(name, flag, tokenizer)
    return load_pretrained(AutoModelForSequenceClassification, name, flag, dtype=dtype).to(device)


def is_reward_function(name):
    """A reward given as path/to/file.py:function rather than a model."""
    return name is not None and name.rpartition(":")[0].endswith(".py")


class RewardFunction:
    """A reward computed by a Python function (e.g. a checker of verifiable answers, RLVR) of the prompts and responses
    as text (no special tokens, so no EOS), and of `ended` (each response's EOS) if it takes that keyword."""

    def __init__(self, spec, flag, tokenizer):
        path, _, name = spec.rpartition(":")
        self.said, self.tokenizer = f"{flag} {spec}", tokenizer
        if not os.path.isfile(path):
            fail(f"{self.said}: no such file; pass path/to/file.py:function")
        try:
            self.function = runpy.run_path(path).get(name)
        except Exception as e:  # noqa: BLE001 (a syntax error, a failed import: one line)
            fail(f"{self.said}: the file does not load ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
        if not callable(self.function):
            fail(f"{self.said}: the file has no function `{name}`; pass path/to/file.py:function")
        parameters = inspect.signature(self.function).parameters.values()
        self.takes_ended = any(p.name == "ended" or p.kind == p.VAR_KEYWORD for p in parameters)

    def __call__(self, query, query_mask, responses, resp_mask):
        """The function's scores [batch] of these prompts and responses, checked: one finite number per response."""
        decode = self.tokenizer.decode
        prompts = [decode(x[m.bool()], skip_special_tokens=True) for x, m in zip(query, query_mask, strict=True)]
        texts = [decode(x[m.bool()], skip_special_tokens=True) for x, m in zip(responses, resp_mask, strict=True)]
        ended = (((responses == self.tokenizer.eos_token_id) & resp_mask.bool()).any(1)).tolist()
        try:
            scores = self.function(prompts, texts, **({"ended": ended} if self.takes_ended else {}))
        except Exception as e:  # noqa: BLE001 (the user's code: one line naming it; the records so far are kept)
            fail(f"{self.said} raised {type(e).__name__}: {(str(e).splitlines() or [''])[0]}; fix the function")
        scores = scores.tolist() if hasattr(scores, "tolist") else scores  # a tensor or a NumPy array: a list
        if not isinstance(scores, list | tuple) or len(scores) != len(texts):
            fail(f"{self.said} returned {str(scores)[:40]} for {len(texts)} responses; return one number each")
        bad = [x for x in scores if not (isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x))]
        if bad:
            fail(f"{self.said} returned {bad[0]!r} among its scores; return one finite number per response")
        return torch.tensor([float(x) for x in scores], device=query.device)


def load_models(args):
    """Seed everything, resolve the device and precision (args.json records what runs), then load the tokenizer,
    trainable policy, frozen reference, reward and gold models, each checked for what its flag needs."""
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    args.cuda = device.type == "cuda"
    if not args.cuda and not os.environ.get("OMP_NUM_THREADS"):  # docs/usage.md, "Threads": the measurements
        torch.set_num_threads(1)  # a second thread is 1.3-1.5x faster on an idle machine, 10x slower on a busy one
        print("note: one CPU thread; OMP_NUM_THREADS=N gives N (faster on an idle machine, far slower on a busy one)")
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if args.cuda else "no"
    # Forward passes autocast to bf16/fp16 on any device (on the CPU too: slow, but the very code path a GPU runs).
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[args.mixed_precision]
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    frozen_dtype = amp_dtype or torch.float32  # the reward models are only ever read: hold them in low precision
    flags = {"--model-name": args.model_name, "--reward-model-name": args.reward_model_name}
    flags |= {"--gold-reward-model-name": args.gold_reward_model_name} if args.gold_reward_model_name else {}
    flags = {flag: name for flag, name in flags.items() if not is_reward_function(name)}  # models only
    for flag, name in flags.items():  # a folder with no tokenizer files: transformers would make up a tokenizer
        if os.path.isdir(name) and not any(os.path.exists(os.path.join(name, file)) for file in TOKENIZER_FILES):
            fail(f"{flag} {name}: this folder has no tokenizer; save the policy's into it (tokenizer.save_pretrained)")
    tokenizer = load_pretrained(AutoTokenizer, args.model_name, "--model-name")
    if tokenizer.eos_token_id is None:
        fail(f"--model-name {args.model_name}: its tokenizer has no EOS token, so responses cannot end; set one")
    if tokenizer.pad_token_id is None:  # e.g. GPT-2: padding is always masked, so EOS can stand in for it
        print(f"note: the tokenizer of {args.model_name} has no pad token; using EOS ({tokenizer.eos_token!r}) as pad")
        tokenizer.pad_token = tokenizer.eos_token
    for flag, name in flags.items():
        config = load_pretrained(AutoConfig, name, flag)
        positions = getattr(config, "max_position_embeddings", None)  # GPT-2's n_positions answers to this name too
        if positions is not None and args.max_prompt_length + args.response_length > positions:  # or it crashes
            fail(f"{flag} {name} has {positions} positions: lower --max-prompt-length plus --response-length")
        is_rm = (config.architectures or ["ForSequenceClassification"])[0].endswith("ForSequenceClassification")
        if flag == "--model-name" and is_rm:
            fail(f"--model-name {name} is a reward model ({config.architectures[0]}); pass a causal LM")
        if flag != "--model-name" and not (is_rm and config.num_labels == 1):
            fail(f"{flag} {name} is not a reward model: pass a sequence classifier with one label (num_labels=1)")
        policy_vocab = tokenizer.get_vocab()  # an RM reads the policy's token ids: its vocabulary must be the same
        vocab = load_pretrained(AutoTokenizer, name, flag).get_vocab() if flag != "--model-name" else policy_vocab
        if vocab != policy_vocab:  # say how they differ (an added [PAD] is the usual reason)
            differ = sorted(set(vocab.items()) ^ set(policy_vocab.items()), key=lambda item: (item[1], item[0]))[:4]
            said = ", ".join(f"{t!r} = {i} in {'this one' if vocab.get(t) == i else 'the policy'}" for t, i in differ)
            sizes = f"{len(vocab)} tokens against {len(policy_vocab)}"
            fail(f"{flag} {name}: its tokenizer is not the policy's ({sizes}: {said})")
    # The policy is trained: fp32 master weights. The reference is the same model and stays fp32 too, so that at
    # step 0 the two give the same log-probs in every precision (KL exactly 0) and reference resets are exact.
    policy = load_pretrained(AutoModelForCausalLM, args.model_name, "--model-name", dtype=torch.float32).to(device)
    ref_policy = load_pretrained(AutoModelForCausalLM, args.model_name, "--model-name", dtype=torch.float32).to(device)
    reward_model = load_reward_model(args.reward_model_name, "--reward-model-name", frozen_dtype, device, tokenizer)
    gold, gold_flag = args.gold_reward_model_name, "--gold-reward-model-name"
    gold_model = None if gold is None else load_reward_model(gold, gold_flag, frozen_dtype, device, tokenizer)
    # Dropout off everywhere, trained models included: eval mode keeps log-probs of the same tokens identical
    # between rollout and update (N details, Policy #4). Gradients flow in eval mode as usual.
    for model in [m for m in (policy, ref_policy, reward_model, gold_model) if isinstance(m, torch.nn.Module)]:
        model.eval().requires_grad_(model is policy)
    return device, autocast, tokenizer, policy, ref_policy, reward_model, gold_model


def optimizer_step(optimizers, scaler, max_grad_norm):
    """One step of each (optimizer, the parameters it clips) on the gradients of the backward pass: their global norm
    clipped (fp16: unscaled first), a step (fp16: skipped if any is inf or NaN), then cleared."""
    for optimizer, params in optimizers:
        if max_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        scaler.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    scaler.update()


@torch.no_grad()
def lerp_parameters(target, source, weight):
    """target <- weight * source + (1 - weight) * target, in fp32: reference resets and Polyak averaging."""
    for target_param, param in zip(target.parameters(), source.parameters(), strict=True):
        target_param.lerp_(param, weight)


def check_finite(loss, update):
    """Stop at the first NaN or inf loss; the last good model is left as it is."""
    if not torch.isfinite(loss):
        fail(f"non-finite loss at update {update}; nothing saved: try a lower --learning-rate or --max-grad-norm")


@torch.no_grad()
def evaluate(policy, ref_policy, reward_model, gold_model, tokenizer, eval_ids, args, device, autocast):
    """One response per evaluation prompt (a fixed seed, so evaluations are comparable), scored; the variety metrics."""
    generator = torch.Generator(device=device).manual_seed(args.seed + 12345)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    batches, samples, response_ids = [], [], []
    for i in range(0, len(eval_ids), args.batch_size):
        query, query_mask = left_pad(eval_ids[i : i + args.batch_size], pad_id, device)
        responses, mask, has_eos, logprobs, ref_logprobs, entropy, scores = rollout(
            policy, ref_policy, reward_model, query, query_mask, args, eos_id, pad_id, generator, autocast
        )
        stats = batch_stats(scores, logprobs, ref_logprobs, entropy, mask, has_eos)
        rows = (query, query_mask, responses, mask.long())
        gold = None if gold_model is None else get_scores(gold_model, *rows, autocast)
        stats |= {} if gold is None else {"gold_scores": gold.mean().item()}
        batches.append((len(query), stats))
        for j in range(len(query)):
            prompt = tokenizer.decode(query[j][query_mask[j].bool()], skip_special_tokens=True)
            response_ids.append(responses[j][mask[j].bool()].tolist())
            response = tokenizer.decode(response_ids[-1], skip_special_tokens=True)
            sample = {"prompt": prompt, "response": response, "score": scores[j].item()}
            samples.append(sample | {"gold_score": None if gold is None else gold[j].item()})
    # Means over all prompts: each batch's mean weighted by its size.
    record = {f"eval/{k}": sum(n * stats[k] for n, stats in batches) / len(eval_ids) for k in batches[0][1]}
    record |= {"eval/distinct_1": distinct_n(response_ids, 1), "eval/distinct_2": distinct_n(response_ids, 2)}
    # Variety for one prompt: 4 responses to each of the first 16 prompts (their own seed: the rest is unchanged).
    query, query_mask = left_pad([ids for ids in eval_ids[:16] for _ in range(4)], pad_id, device)
    group_generator = torch.Generator(device=device).manual_seed(args.seed + 54321)
    raw = generate(policy, query, query_mask, args, eos_id, group_generator, autocast)
    mask, responses, _ = response_mask(raw, eos_id, pad_id, args.stop_at_eos)
    groups = [[responses[j][mask[j].bool()].tolist() for j in range(i, i + 4)] for i in range(0, len(query), 4)]
    record["eval/self_similarity"] = sum(map(pairwise_similarity, groups)) / len(groups)
    return record, samples


def distinct_n(responses, n):
    """Distinct-n over n-grams: the share of distinct n-grams among all the n-grams of some responses (token-id lists);
    1 = no n-gram repeats. Li et al. 2016 (https://arxiv.org/abs/1510.03055) divide by the generated tokens instead:
    the same for n = 1; their distinct-2 is this one times (tokens - responses) / tokens, lower for short responses."""
    grams = [tuple(r[i : i + n]) for r in responses for i in range(len(r) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def pairwise_similarity(responses, n=2):
    """The mean Jaccard overlap of the n-gram sets of every pair of responses (one shorter than n is one n-gram,
    itself): 1 = all the same, 0 = no n-gram shared (a self-BLEU-like measure of mode collapse)."""
    sets = [{tuple(r[i : i + n]) for i in range(len(r) - n + 1)} or {tuple(r)} for r in responses]
    pairs = list(itertools.combinations(sets, 2))
    return sum(len(a & b) / len(a | b) for a, b in pairs) / len(pairs)


def new_folder(base):
    """Create and return base, or else base_2, base_3, ...: mkdir is atomic, so two runs never share a folder."""
    os.makedirs(os.path.dirname(base), exist_ok=True)
    for path in itertools.chain([base], (f"{base}_{n}" for n in itertools.count(2))):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
            return path


class RunLogger:
    """The run folder: args.json, metrics.jsonl, samples.jsonl and the final model; also wandb with --track, a tqdm
    bar, and a console line per evaluation. A file INCOMPLETE marks a run stopped by Ctrl-C, a NaN or a crash."""

    def __init__(self, args, run_name):
        self.args, self.episode, self.last_eval, self.wandb = args, 0, "", None
        self.dir = self.open_folder(args, run_name)
        if args.track:
            import wandb  # lazy: only needed with --track

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args), name=run_name)
            self.wandb = wandb
        self.bar = tqdm(total=args.total_episodes, unit="episode", dynamic_ncols=True)
        signal.signal(signal.SIGINT, self.interrupted)

    def open_folder(self, args, run_name):
        """A new run's folder, created only after every check has passed, so a bad flag leaves nothing behind."""
        try:
            path = args.output_dir = args.output_dir or new_folder(os.path.join("runs", run_name))
            os.makedirs(path, exist_ok=True)
            for name in set(os.listdir(path)) & RUN_FILES:  # --overwrite-output-dir: the old run goes
                (shutil.rmtree if os.path.isdir(os.path.join(path, name)) else os.remove)(os.path.join(path, name))
            texts = {"INCOMPLETE": "This run has not finished: no final model yet.\n", "samples.jsonl": ""}
            ran = {"num_processes": 1}  # (the _multigpu twin's runs may have more)
            ran["device"] = f"cuda ({torch.cuda.get_device_name()})" if args.cuda else "cpu"
            ran["cpu_threads"] = torch.get_num_threads()  # a CPU run repeats bit for bit with as many threads
            for name, text in {**texts, "args.json": json.dumps(asdict(args) | ran, indent=2)}.items():
                with open(os.path.join(path, name), "w") as f:
                    f.write(text)
            self.file = open(os.path.join(path, "metrics.jsonl"), "w")  # noqa: SIM115 (open for the whole run)
            return path
        except OSError as e:
            fail(f"--output-dir {args.output_dir}: cannot write there ({e.strerror}); choose another folder")

    def interrupted(self, *_):  # Ctrl-C: one line saying where the run stopped (its records stay, marked INCOMPLETE)
        fail(f"interrupted by Ctrl-C at episode {self.episode}; {self.args.output_dir} holds the records so far")

    def log(self, record):
        """Append a record to metrics.jsonl (and to wandb with --track)."""
        self.episode = record["episode"]
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: say so, with the records written so far left as they are
            fail(f"--output-dir {self.dir}: cannot write metrics.jsonl ({e.strerror}); the records so far are kept")
        if self.wandb is not None:
            self.wandb.log(record, step=record["episode"])

    def log_train(self, episode, update, lr, kl_coef, objective, start_time, time_rollout, time_update, algo_stats):
        """A training record: the common keys (docs/usage.md, "Metrics"), then the algorithm's own."""
        elapsed = time.time() - start_time
        record = {"episode": episode, "update": update, "lr": lr, "objective/kl_coef": kl_coef}
        record |= {"time/elapsed_s": elapsed, "time/episodes_per_s": episode / elapsed}
        record |= {"time/rollout_s": time_rollout, "time/update_s": time_update}
        record |= {f"objective/{k}": v for k, v in objective.items()}
        record["objective/rlhf_reward"] = objective["scores"] - kl_coef * objective["kl"]
        if self.args.cuda:  # the device that runs (setup_run resolved it)
            record["memory/cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.log(record | algo_stats)
        self.bar.n = episode
        self.bar.set_postfix(score=f"{objective['scores']:.3f}", kl=f"{objective['kl']:.3f}")

    def log_eval(self, episode, record, samples):
        """An evaluation: its record, a console line, and its prompts, responses and scores in samples.jsonl."""
        self.log({"episode": episode, **record})
        gold = f", gold score {record['eval/gold_scores']:.3f}" if "eval/gold_scores" in record else ""
        self.last_eval = f"eval score {record['eval/scores']:.3f}{gold}, KL {record['eval/kl']:.3f}"
        self.bar.write(f"episode {episode}: {self.last_eval}")
        with open(os.path.join(self.dir, "samples.jsonl"), "a") as f:
            f.writelines(json.dumps({"episode": episode, **s}) + "\n" for s in samples)

    def finish(self, policy, tokenizer, start_time):
        """Save the final policy (with --save-model), close the records and say what the run achieved."""
        self.bar.close()
        self.file.close()
        if self.args.save_model:  # written beside, then renamed: a failed save never looks like a model
            path = os.path.join(self.dir, "model")
            try:
                policy.save_pretrained(path + ".tmp")
                tokenizer.save_pretrained(path + ".tmp")
            except Exception as e:  # noqa: BLE001 (a full disk: one line, not a traceback; the records stay whole)
                shutil.rmtree(path + ".tmp", ignore_errors=True)
                fail(f"--output-dir {self.dir}: cannot save the final model ({str(e).splitlines()[0]}); records kept")
            os.replace(path + ".tmp", path)
        os.remove(os.path.join(self.dir, "INCOMPLETE"))
        if self.wandb is not None:
            self.wandb.finish()
        print(f"done: {self.episode} episodes in {time.time() - start_time:.0f}s; final {self.last_eval}; {self.dir}")


if __name__ == "__main__":
    main()
