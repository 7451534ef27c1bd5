"""SAC for RLHF: discrete token-level Soft Actor-Critic with a KL penalty to a frozen reference.

State: prompt + response so far; action: the next token; reward: the RM score (after the missing-EOS penalty) at
the last token. SAC maximises E[sum_t r_t + alpha H(pi(.|s_t)) - beta KL(pi(.|s_t) || pi_ref(.|s_t))], beta =
--kl-coef. Twin critics on a copy of the RM (and a Polyak-averaged target) give Q(s, .) over the whole vocabulary,
so soft values and the policy loss are exact sums over it; the loss is minimised by pi proportional to
pi_ref^(beta / (alpha + beta)) exp(Q / (alpha + beta)). Responses go into a replay buffer; gradient steps on samples
from it use n-step targets (off-policy).

Papers: SAC (Haarnoja et al. 2018, https://arxiv.org/abs/1801.01290; 2018b, https://arxiv.org/abs/1812.05905);
discrete SAC (Christodoulou 2019, https://arxiv.org/abs/1910.07207); KL-regularised soft RL (Fox et al. 2016,
https://arxiv.org/abs/1512.08562); dueling heads (Wang et al. 2016, https://arxiv.org/abs/1511.06581); twin critics
(Fujimoto et al. 2018, https://arxiv.org/abs/1802.09477); n-step returns (Hessel et al. 2018, arXiv 1710.02298).
"N details, <section> #k": item k of that section of "The N Implementation Details of RLHF with PPO" (Huang et al.
2023, https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo); "N+": Huang et al. 2024,
https://arxiv.org/abs/2403.17031. Style: CleanRL (one file, the algorithm first, a flat loop); flags: docs/usage.md.

The scale twin of sac_rlhf.py: the same algorithm (the same ALGO LOGIC text) plus what 1B-8B models on many GPUs
need, and nothing else; `diff sac_rlhf.py sac_rlhf_multigpu.py` shows exactly this (docs/scale.md walks through it):
- torchrun sharded data parallel (FSDP2): each rank holds 1/N of every model and optimizer state, samples its share
  of --batch-size with its own seed and keeps its share of the replay buffer; batch statistics and the logged records
  are the global batch's;
- sharded checkpoints (--save-every) and --resume: a stopped run goes on as if it had never stopped (on as many
  processes; on another number, resharded);
- memory flags that change no number: --gradient-checkpointing, --rollout-micro-batch-size.
One process (plain `python`) gives the same numbers as sac_rlhf.py.

Usage: torchrun --nproc-per-node 2 sac_rlhf_multigpu.py --help   (or plain `python`: one process)
"""

import contextlib
import copy
import dataclasses
import datetime
import functools
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
import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.distributed.checkpoint as dcp
import transformers
import tyro
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.modeling_layers import GradientCheckpointingLayer

transformers.utils.logging.disable_progress_bar()  # keep the output to our own progress bar
warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process saves a checkpoint alone: intended


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
    save_every: int = 0  # write a resumable checkpoint every N episodes (0 = never); see --resume
    resume: bool = False  # continue the run in --output-dir from its last checkpoint, with the flags in its args.json
    gradient_checkpointing: bool = False  # recompute layer activations in the backward pass instead of keeping them
    rollout_micro_batch_size: int | None = None  # rows per no-grad forward pass (rollouts, evaluation); None = all
    shard_frozen: bool = True  # torchrun: shard the reference and RMs too (1/N the memory); off: copies, fewer gathers

    # Algorithm specific arguments
    alpha: float = 0.0  # the entropy coefficient (the initial one with --autotune); 0 = no entropy term
    autotune: bool = False  # tune alpha so the per-token entropy stays above the target (Haarnoja et al. 2018b)
    target_entropy_scale: float = 0.5  # target entropy = this times pi_ref's mean per-token entropy at the same states
    critic: Literal["factored", "heads"] = "heads"  # A_j through pi_ref's token embeddings, or a vocab-wide head
    q_learning_rate: float = 1e-3  # the critic's (and alpha's) learning rate
    tau: float = 0.05  # Polyak rate of the target critic: target <- tau * critic + (1 - tau) * target every step
    gamma: float = 1.0  # the discount factor
    n_step: int = 8  # n of the n-step critic targets (1 = one-step TD)
    buffer_size: int = 1024  # replay buffer capacity, in responses (first in, first out)
    learning_starts: int = 0  # responses in the buffer before gradient steps begin
    offline: bool = False  # learn only from the first --buffer-size responses (later rollouts are only logged)
    updates_per_rollout: int = 4  # gradient steps (critic, actor and alpha) after each rollout
    minibatch_size: int | None = None  # responses sampled from the buffer per gradient step (None = --batch-size)
    max_grad_norm: float | None = 1.0  # global gradient-norm clip of the actor and of the critic (None disables)

    def __post_init__(self):  # (after every field: a method between fields hides the next field's --help line)
        if self.gold_reward_model_name is not None and self.gold_reward_model_name.strip().lower() in ("", "none"):
            self.gold_reward_model_name = None  # --gold-reward-model-name none, "" or None: no gold model
        for name in ["model_name", "reward_model_name", "gold_reward_model_name", "dataset", "eval_dataset"]:
            path = getattr(self, name)  # a tinyworld/ path that is not in the working folder is the one beside this
            if path is not None and path.startswith("tinyworld/") and not os.path.exists(path):
                setattr(self, name, os.path.join(os.path.dirname(os.path.abspath(__file__)), path))


# ======= ALGO LOGIC: this algorithm's losses and estimators (below them, the core and the plumbing are shared) ========
ALGO_RANGES = {  # the allowed interval of each numeric flag of this algorithm (see COMMON_RANGES)
    "[0, inf)": ["alpha", "target_entropy_scale", "learning_starts"],
    "(0, inf)": ["q_learning_rate", "max_grad_norm"],
    "[1, inf)": ["n_step", "buffer_size", "updates_per_rollout", "minibatch_size"],
    "(0, 1]": ["tau"],
    "[0, 1]": ["gamma"],
}


class SoftQNetwork(torch.nn.Module):
    """Twin soft Q-functions over the vocabulary on a trained copy of the RM, in dueling form (Wang et al. 2016):
    Q_j(s, a) = b(s) + A_j(s, a), b the RM's score head at s, A_j started near 0, so Q(s, .) starts flat (the optimum
    is pi_ref) and an untried token inherits its state's value. Different tiny starts keep the twins apart: min_j Q_j
    is pessimistic where they disagree (Fujimoto et al. 2018). A_j is a head as wide as the vocabulary, or factored
    through pi_ref's output embeddings e_a: A_j(s, a) = e_a . (W_j h(s) + c_j) / |e_a|, 2 (hidden + 1) d parameters."""

    def __init__(self, reward_model, vocab_size, token_vectors=None):
        super().__init__()
        self.model = reward_model  # AutoModelForSequenceClassification: backbone + `score` head, both trained
        self.token_vectors = token_vectors  # [vocab, d], not a parameter here: pi_ref's own output layer, not trained
        hidden = reward_model.score.in_features
        self.advantage = torch.nn.Linear(hidden, 2 * (vocab_size if token_vectors is None else token_vectors.shape[1]))
        torch.nn.init.normal_(self.advantage.weight, std=1e-3 / hidden)  # |A| ~ 1e-4: pi* = pi_ref to 0.1%
        torch.nn.init.zeros_(self.advantage.bias)

    def forward(self, query, query_mask, responses, resp_mask, autocast):
        """Q_j(s_t, .) for every response position t, [batch, time, 2, vocab], from one forward pass."""
        hidden = backbone_hidden(self.model, query, query_mask, responses, resp_mask, autocast)
        hidden = hidden[:, query.shape[1] - 1 : -1].float()  # the state before token t: prompt + y_<t
        baseline = self.model.score(hidden)  # [batch, time, 1]
        advantage = self.advantage(hidden).view(*hidden.shape[:2], 2, -1)  # [batch, time, 2, vocab or d]
        if self.token_vectors is not None:  # unit token vectors, so every token's A_j moves at the same rate
            norms = self.token_vectors.norm(dim=1).clamp(min=1e-8)  # an all-zero row (e.g. a pad id's) gets A_j = 0
            advantage = (advantage @ self.token_vectors.T) / norms  # [batch, time, 2, vocab]
        return baseline.unsqueeze(-1) + advantage


class ReplayBuffer(list):
    """A list of whole responses (prompt ids, response ids, score), first in, first out; a sample is re-padded. Its
    draws use `rng`: the random module's shared stream, or a random.Random of their own (each rank's, in the twin)."""

    def __init__(self, capacity, rng=random):
        super().__init__()
        self.capacity, self.next, self.rng = capacity, 0, rng

    def add(self, query, query_mask, responses, mask, scores):
        for i in range(len(query)):  # only the real tokens: padding is rebuilt for each sampled minibatch
            item = (query[i][query_mask[i].bool()].tolist(), responses[i][mask[i].bool()].tolist(), scores[i].item())
            self[self.next : self.next + 1] = [item]  # append until full, then overwrite the oldest
            self.next = (self.next + 1) % self.capacity

    def sample(self, n, pad_id, device):
        """n distinct responses, uniformly: left-padded prompts, right-padded responses, mask and scores."""
        items = self.rng.sample(self, n)
        query, query_mask = left_pad([x[0] for x in items], pad_id, device)
        responses, mask = (t.flip(1) for t in left_pad([x[1][::-1] for x in items], pad_id, device))  # right-padded
        return query, query_mask, responses, mask.float(), torch.tensor([x[2] for x in items], device=device)


def sac_policy_loss(logp, ref_logp, q_min, alpha, beta, mask):
    """Mean over states of sum_a pi(a|s) [(alpha + beta) log pi(a|s) - beta log pi_ref(a|s) - min_j Q_j(s, a)], exact
    over the vocabulary (Christodoulou 2019): per state (alpha + beta) KL(pi || pi*) + const, minimised by
    pi* proportional to pi_ref^(beta / (alpha + beta)) exp(Q / (alpha + beta))."""
    return masked_mean((logp.exp() * ((alpha + beta) * logp - beta * ref_logp - q_min)).sum(-1), mask)


@torch.no_grad()
def critic_targets(q_target_all, logp, ref_logp, scores, mask, alpha, beta, gamma, n):
    """n-step soft targets [batch, time] (0 past the episode's end, its last real token, where the reward is the score):
    y_t = sum_{i<n} g^i r_{t+i} + sum_{1<=i<n} g^i bonus(s_{t+i}) + g^n V(s_{t+n}), bonus = alpha H - beta KL under pi
    (Haarnoja et al. 2018, eq. 3), V(s) = sum_a pi(a|s) [min_j Qbar_j(s, a) - (alpha + beta) log pi(a|s) + beta log
    pi_ref(a|s)] exact from the target critic's Q_j(s, .) [batch, time, 2, vocab] (pessimistic min_j: Fujimoto et al.
    2018). For n > 1 the target follows the buffer's older tokens for n - 1 steps with no importance correction (as in
    Rainbow): a bias that vanishes for n = 1 and for fresh data."""
    bonuses = (logp.exp() * (-(alpha + beta) * logp + beta * ref_logp)).sum(-1)  # alpha H(pi) - beta KL, per state
    values = (logp.exp() * q_target_all.min(2).values).sum(-1) + bonuses
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(len(mask)), mask.sum(1).long() - 1] = scores
    width = mask.shape[1]  # below, x[:, t + i] sits at column t of x[:, i : i + width], and is 0 past the end
    rewards, bonuses, values = (torch.nn.functional.pad(x * mask, (0, n)) for x in (rewards, bonuses, values))
    targets = torch.zeros_like(mask)
    for i in range(n):
        targets += gamma**i * rewards[:, i : i + width]
        if i > 0:
            targets += gamma**i * bonuses[:, i : i + width]
    return (targets + gamma**n * values[:, n : n + width]) * mask


def critic_loss(q_all, responses, targets, mask):
    """Both heads' squared errors on the taken tokens, summed, averaged over states (Haarnoja et al. 2018, eq. 5)."""
    q_taken = q_all.gather(-1, responses[:, :, None, None].expand(-1, -1, 2, 1)).squeeze(-1)  # [batch, time, 2]
    loss = masked_mean(((q_taken - targets.unsqueeze(-1)) ** 2).sum(-1), mask)
    return loss, {"loss/q": loss.item(), "sac/q_mean": masked_mean(q_taken.detach().min(-1).values, mask).item()}


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
            fail(
                "the policy's next-token probabilities are not finite; nothing saved: lower --learning-rate",
                every_rank=True,
            )
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
        # use_cache=False: a whole-sequence pass needs no KV cache (and --gradient-checkpointing must not fill one).
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


def chunked(size, fn, *inputs, over_ranks=False):
    """fn(*inputs) on successive slices of `size` rows (all rows at once if None), concatenated: the same numbers with
    the memory of one slice (--rollout-micro-batch-size). Tensor inputs are sliced; the others (a model) pass whole.
    over_ranks (the evaluation, whose rows every rank holds): under torchrun each rank computes an equal run of the
    rows (the last rank's padded with copies of the last row), gathered back in order, so every rank makes the same
    forward passes through the sharded models and ends with every row's result (rows of tokens zero-padded at the end
    to the longest rank's: a rank whose samples all ended at an EOS stops early; the mask hides the padding)."""
    first = next(x for x in inputs if isinstance(x, torch.Tensor))
    rows = first.shape[0]
    if over_ranks and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        share = -(-rows // world_size)  # rows per rank, rounded up
        mine = torch.arange(rank * share, (rank + 1) * share, device=first.device).clamp(max=rows - 1)
        out = chunked(size, fn, *(x[mine] if isinstance(x, torch.Tensor) else x for x in inputs))
        parts = out if isinstance(out, tuple) else (out,)
        parts = tuple(all_gather(pad_to_longest(part))[:rows] for part in parts)  # (the padding rows last: dropped)
        return parts if isinstance(out, tuple) else parts[0]
    size = size or rows
    outputs = [
        fn(*(x[i : i + size] if isinstance(x, torch.Tensor) else x for x in inputs)) for i in range(0, rows, size)
    ]
    if isinstance(outputs[0], torch.Tensor):
        return torch.cat(outputs)
    return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))


def all_gather(x):
    """The global batch under torchrun: every rank's rows of x, in rank order (x itself in a one-process run)."""
    if not torch.distributed.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def pad_to_longest(x):
    """x [rows, time] zero-padded at the end to the longest rank's time, so the ranks' rows can be gathered."""
    if x.dim() < 2:
        return x
    longest = torch.tensor(x.shape[1], device=x.device)
    torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
    return torch.nn.functional.pad(x, (0, longest.item() - x.shape[1]))


def mean_over_ranks(x):
    """x averaged over the ranks under torchrun (x itself in a one-process run)."""
    if torch.distributed.is_initialized():
        x = x.clone()
        torch.distributed.all_reduce(x)
        x /= torch.distributed.get_world_size()
    return x


def whole_batch_mean(x, mask):
    """masked_mean over every rank's real tokens (the same as masked_mean in a one-process run)."""
    sums = torch.stack([(x * mask).sum(), mask.sum()])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    return sums[0] / sums[1].clamp(min=1)


@torch.no_grad()
def rollout(policy, ref_policy, reward_model, query, query_mask, args, eos_id, pad_id, generator, autocast):
    """Sample responses and what the losses and logs need about them, with no gradient. Returns responses, mask
    (float), has_eos, log-probs, reference log-probs, entropy ([batch, time] each but has_eos) and scores [batch]."""
    with unsharded(policy):  # (under torchrun: gathered once for the whole generation)
        raw = generate(policy, query, query_mask, args, eos_id, generator, autocast)
    mask, responses, has_eos = response_mask(raw, eos_id, pad_id, args.stop_at_eos)
    rows = (query, query_mask, responses, mask)
    chunks = functools.partial(chunked, args.rollout_micro_batch_size)  # the no-grad passes, M rows at a time
    logprobs, entropy = chunks(forward_logprobs, policy, *rows, args.temperature, autocast)
    ref_logprobs, _ = chunks(forward_logprobs, ref_policy, *rows, args.temperature, autocast)
    scores = chunks(get_scores, reward_model, *rows, autocast)
    if args.missing_eos_penalty is not None:  # the "EOS trick" (N+ sec. 7): responses must end
        scores = scores - args.missing_eos_penalty * (~has_eos).float()
    return responses, mask.float(), has_eos, logprobs, ref_logprobs, entropy, scores


def batch_stats(scores, logprobs, ref_logprobs, entropy, mask, has_eos, gather=False):
    """The common metrics of a batch of responses (docs/usage.md, "Metrics"): objective/... or eval/... records. With
    gather, of the global batch (every rank's responses under torchrun)."""
    kl = ((logprobs - ref_logprobs) * mask).sum(1)  # [batch] sequence-level k1 on the sampled tokens
    n = torch.tensor(float(len(scores)), device=scores.device)
    totals = torch.stack([scores.sum(), kl.sum(), (entropy * mask).sum(), mask.sum(), has_eos.float().sum(), n])
    if gather and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    scores, kl, entropy, tokens, eos, n = totals
    stats = {"scores": scores / n, "kl": kl / n, "entropy": entropy / tokens.clamp(min=1)}  # entropy per token
    stats |= {"response_length": tokens / n, "eos_rate": eos / n}
    return {k: v.item() for k, v in stats.items()}


# ============ MAIN: setup, models, then the training loop (it reads as the papers' pseudocode) ============
def main():
    args = parse_args()  # (with --resume: the run's own flags)
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    rank, world_size = setup_distributed(args)
    check_args(args, ALGO_RANGES, world_size)
    minibatch_size = args.minibatch_size or args.batch_size
    if args.buffer_size < max(args.batch_size, minibatch_size):
        fail(f"--buffer-size {args.buffer_size} must hold a rollout (--batch-size) and a minibatch (--minibatch-size)")
    if args.buffer_size % world_size or minibatch_size % world_size:  # each rank holds and samples its share
        fail(f"--buffer-size and --minibatch-size must be multiples of the number of processes ({world_size})")
    local_minibatch_size = minibatch_size // world_size  # each rank samples its share of every minibatch
    if args.autotune and args.alpha == 0:
        fail("--alpha must be > 0 with --autotune, where it is the initial value (--alpha 0 --no-autotune: no entropy)")
    if args.learning_starts > min(args.total_episodes, args.buffer_size):  # the buffer never holds more than its size
        fail(
            f"--learning-starts {args.learning_starts} is more than --total-episodes or --buffer-size: no step is taken"
        )
    train_prompts = load_prompts(args.dataset, "--dataset")
    eval_prompts = load_prompts(args.eval_dataset, "--eval-dataset", args.eval_size)

    # MODELS
    device, autocast, tokenizer, policy, ref_policy, reward_model, gold_model = load_models(args)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    train_ids = tokenize_prompts(tokenizer, train_prompts, args.max_prompt_length, "--dataset")
    eval_ids = tokenize_prompts(tokenizer, eval_prompts, args.max_prompt_length, "--eval-dataset")
    reward_copy = load_critic_base(args, device)
    tokens = ref_policy.get_output_embeddings().weight.detach()  # [vocab (maybe > len(tokenizer)), d], pi_ref's storage
    critic = SoftQNetwork(reward_copy, len(tokens), tokens if args.critic == "factored" else None).to(device).eval()
    critic_target = copy.deepcopy(critic, memo={id(tokens): tokens}).requires_grad_(False)  # one copy of tokens
    if args.gradient_checkpointing:  # after the copy: the target's layers must keep their own forward
        enable_gradient_checkpointing(policy)
        enable_gradient_checkpointing(critic)
    copied = [ref_policy] if args.ref_sync_every else []  # reset from the policy: sharded alike (tokens: a copy)
    shard_models([policy, critic, critic_target, *copied], [ref_policy, reward_model, gold_model], args, world_size)
    params, q_params = list(policy.parameters()), list(critic.parameters())
    # Same optimizer settings as the other scripts; no weight decay, so the KL-regularised optimum stays the optimum.
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, eps=1e-5, weight_decay=0.0)
    q_optimizer = torch.optim.AdamW(q_params, lr=args.q_learning_rate, eps=1e-5, weight_decay=0.0)
    # alpha = exp(log_alpha) stays positive while tuned; with --no-autotune it is the constant --alpha (maybe 0).
    log_alpha = torch.tensor(float(args.alpha), device=device).clamp(min=1e-30).log().requires_grad_(args.autotune)
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=args.q_learning_rate)  # steps only with --autotune
    # (optimizer, the parameters it clips): alpha's gradient comes from the same scaled backward, never clipped.
    optimizers = [(optimizer, params), (q_optimizer, q_params)] + ([(alpha_optimizer, [])] if args.autotune else [])
    # fp16 autocast needs loss scaling so small gradients do not underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    logger = RunLogger(args, run_name, rank)
    generator = torch.Generator(device=device).manual_seed(args.seed + 100_000 * rank)  # each rank's sampling seed
    num_updates = args.total_episodes // args.batch_size
    # The loop's state: the replay buffer, episodes so far, the next evaluation, the prompt stream, the time spent.
    # Each rank draws its minibatches on its own stream (one process on the shared one, as the plain file does).
    draws = random if world_size == 1 else random.Random(args.seed + 100_000 * rank)
    buffer, episode, next_eval, order = ReplayBuffer(args.buffer_size // world_size, draws), 0, args.eval_every, []
    time_rollout = time_update = 0.0
    start_time = time.time()
    eval_models = (policy, ref_policy, reward_model, gold_model, tokenizer, eval_ids, args, device, autocast)
    # What a checkpoint keeps (--save-every): the trained state, and each rank's sampling generator and buffer.
    trained = {"policy": policy, "critic": critic, "critic_target": critic_target, "log_alpha": log_alpha}
    trained |= {
        "optimizer": optimizer,
        "q_optimizer": q_optimizer,
        "alpha_optimizer": alpha_optimizer,
        "scaler": scaler,
    }
    trained |= {"ref_policy": ref_policy} if args.ref_sync_every else {}
    if args.resume:  # the run goes on from its last checkpoint exactly as if it had never stopped
        loop = logger.resume(trained, {"generator": generator, "buffer": buffer})
        episode, next_eval, order = loop["episode"], loop["next_eval"], loop["order"]
        if world_size > 1 and args.ref_sync_every:  # the resumed reference's token vectors (sharded: a whole copy)
            tokens.copy_(ref_policy.get_output_embeddings().weight.full_tensor())
        time_rollout, time_update, start_time = loop["time_rollout"], loop["time_update"], time.time() - loop["elapsed"]
    else:
        logger.log_eval(0, *evaluate(*eval_models))

    for update in range(episode // args.batch_size + 1, num_updates + 1):  # (a resumed run: from its next update)
        # Linear learning-rate decay to 0 over the run, as in the PPO script (the critic's and alpha's alongside).
        lr = args.learning_rate * (1.0 - (update - 1.0) / num_updates)
        optimizer.param_groups[0]["lr"] = lr
        for opt in [q_optimizer, alpha_optimizer]:
            opt.param_groups[0]["lr"] = args.q_learning_rate * lr / args.learning_rate

        # ROLLOUT: a batch of prompts (reshuffled each pass over the data), one response each, into the buffer.
        t0 = time.time()
        batch = next_prompt_indices(order, args.batch_size, len(train_ids))[rank::world_size]  # this rank's share
        query, query_mask = left_pad([train_ids[i] for i in batch], pad_id, device)  # [batch, prompt]
        responses, mask, has_eos, logprobs, ref_logprobs, entropy, scores = rollout(
            policy, ref_policy, reward_model, query, query_mask, args, eos_id, pad_id, generator, autocast
        )
        room = buffer.capacity - len(buffer) if args.offline else len(query)  # --offline: the first ones, then frozen
        buffer.add(*(x[:room] for x in (query, query_mask, responses, mask, scores)))
        episode += args.batch_size
        time_rollout += time.time() - t0

        # SAC UPDATE: gradient steps on minibatches of whole responses from the buffer, once it holds enough.
        t0 = time.time()
        stats = []
        num_steps = (
            args.updates_per_rollout if len(buffer) * world_size >= max(args.learning_starts, minibatch_size) else 0
        )
        for _ in range(num_steps):
            mb_query, mb_query_mask, mb_responses, mb_mask, mb_scores = buffer.sample(
                local_minibatch_size, pad_id, device
            )
            states = (mb_query, mb_query_mask, mb_responses, mb_mask.long())  # every prefix of the responses
            alpha = log_alpha.exp().item() if args.autotune else args.alpha
            logp = forward_logp_all(policy, *states, args.temperature, autocast)  # [batch, time, vocab]
            q_all = critic(*states, autocast)  # [batch, time, 2, vocab]
            with torch.no_grad():
                ref_logp = chunked(
                    args.rollout_micro_batch_size, forward_logp_all, ref_policy, *states, args.temperature, autocast
                )
                q_target = chunked(args.rollout_micro_batch_size, critic_target, *states, autocast)
            targets = critic_targets(
                q_target, logp.detach(), ref_logp, mb_scores, mb_mask, alpha, args.kl_coef, args.gamma, args.n_step
            )
            q_loss, q_stats = critic_loss(q_all, mb_responses, targets, mb_mask)
            # Actor: the exact expectation over the vocabulary against the (fixed) pessimistic Q.
            policy_loss = sac_policy_loss(logp, ref_logp, q_all.detach().min(2).values, alpha, args.kl_coef, mb_mask)
            # Alpha: up when the entropy is below a fraction of pi_ref's at these states (Christodoulou 2019, eq. 11).
            with torch.no_grad():
                policy_entropy = masked_mean(-(logp.exp() * logp).sum(-1), mb_mask)
                ref_entropy = masked_mean(-(ref_logp.exp() * ref_logp).sum(-1), mb_mask)
                entropy_target = args.target_entropy_scale * ref_entropy
            alpha_loss = log_alpha.exp() * (policy_entropy - entropy_target) if args.autotune else torch.zeros(())
            loss = q_loss + policy_loss + alpha_loss  # disjoint parameters: one backward serves all three
            check_finite(loss, update)
            # Each rank's token means weighted by its share of the tokens: the ranks' mean gradient is the minibatch's.
            scaler.scale(loss * (mb_mask.sum() / mean_over_ranks(mb_mask.sum()))).backward()
            optimizer_step(optimizers, scaler, args.max_grad_norm)
            lerp_parameters(critic_target, critic, args.tau)  # Polyak averaging (Haarnoja et al. 2018)
            stats.append({"loss/policy": policy_loss.item(), "loss/alpha": alpha_loss.item(), **q_stats})
            stats[-1] |= {"sac/policy_entropy": policy_entropy.item(), "sac/entropy_target": entropy_target.item()}
        time_update += time.time() - t0

        # LOGGING: the common keys, the means of the update's statistics (none before learning starts), alpha.
        stats = {k: sum(s[k] for s in stats) / len(stats) for k in (stats[0] if stats else {})}
        stats |= {"sac/alpha": log_alpha.exp().item() if args.autotune else args.alpha}
        stats["sac/buffer_size"] = len(buffer) * world_size
        objective = batch_stats(scores, logprobs, ref_logprobs, entropy, mask, has_eos, gather=True)
        logger.log_train(episode, update, lr, args.kl_coef, objective, start_time, time_rollout, time_update, stats)

        if args.ref_sync_every > 0 and update % args.ref_sync_every == 0:
            lerp_parameters(ref_policy, policy, args.ref_sync_mix)
            if world_size > 1:  # sharded: the critics' token vectors are a whole copy of pi_ref's, refreshed
                tokens.copy_(ref_policy.get_output_embeddings().weight.full_tensor())

        # EVALUATION
        if episode >= next_eval or update == num_updates:
            next_eval += args.eval_every
            logger.log_eval(episode, *evaluate(*eval_models))

        # CHECKPOINT, when a multiple of --save-every episodes was passed in this update.
        if args.save_every and episode % args.save_every < args.batch_size and update < num_updates:
            loop = {"episode": episode, "next_eval": next_eval, "order": order}
            loop |= {"time_rollout": time_rollout, "time_update": time_update, "elapsed": time.time() - start_time}
            logger.save_checkpoint(trained, {"generator": generator, "buffer": buffer}, loop)

    logger.finish(policy, tokenizer, start_time)


# === TRY NOT TO MODIFY: checks, loading, evaluation, logging and saving (the same text in every script) ===
def fail(message, every_rank=False):
    """Stop with one line that names the flag and the fix (no traceback). Under torchrun every rank finds a bad flag and
    rank 0 alone says it; what one rank can meet alone (a NaN in its share) is said by every rank that meets it."""
    for bar in list(tqdm._instances):  # end the progress bar's line first, so the message starts its own
        bar.close()
    raise SystemExit(f"error: {message}" if every_rank or os.environ.get("RANK", "0") == "0" else 1)


COMMON_RANGES = {  # the allowed interval of each numeric flag; values must be finite, and a None flag may be None
    "[1, inf)": ["max_prompt_length", "response_length", "total_episodes", "batch_size", "eval_every", "eval_size"],
    "(0, inf)": ["temperature", "learning_rate"],
    "[0, inf)": ["missing_eos_penalty", "kl_coef", "ref_sync_every", "save_every"],
    "(0, 1]": ["ref_sync_mix"],
}
COMMON_RANGES["[1, inf)"].append("rollout_micro_batch_size")
RUN_FILES = {"args.json", "metrics.jsonl", "samples.jsonl", "model", "model.tmp", "INCOMPLETE"}
RUN_FILES |= {"checkpoint", "checkpoint.tmp", "checkpoint.old"}
# Flags a resumed run may change: where and how it runs and logs, and its memory, not what it computes.
RESUMABLE = {"resume", "save_every", "output_dir", "overwrite_output_dir", "exp_name", "cuda", "mixed_precision"}
RESUMABLE |= {"track", "wandb_project_name", "wandb_entity"}
RESUMABLE |= {"gradient_checkpointing", "rollout_micro_batch_size", "gradient_accumulation_steps", "shard_frozen"}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model"}


def parse_args():
    """The flags. With --resume the run's own, from its args.json, are the defaults: `--output-dir <run> --resume` is
    the whole command, and check_args refuses a flag given here that would change what the run computes. The device
    and the precision are this machine's (args.json holds what they resolved to on the first machine)."""
    args = tyro.cli(Args)
    path = os.path.join(args.output_dir or "", "args.json")
    if args.resume and args.output_dir is not None and os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        fields = {field.name for field in dataclasses.fields(Args)} - {"resume", "cuda", "mixed_precision"}
        args = tyro.cli(Args, default=Args(**{k: v for k, v in saved.items() if k in fields}))
    return args


def setup_distributed(args):
    """torchrun --nproc-per-node N: N processes, data parallel (NCCL between GPUs, gloo on the CPU), each sampling its
    share of --batch-size. A plain `python` run is process 0 of 1 and sets up nothing. Returns (rank, world_size)."""
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        cuda = args.cuda and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # gloo for the CPU's tensors. A collective that waits 30 minutes (a rank died or hangs) ends the run with an
        # error: explicit, since NCCL's default is 10 minutes, which a long evaluation or checkpoint could pass.
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return rank, world_size


def check_args(args, algo_ranges, world_size):
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
    if args.batch_size % world_size:
        fail(f"--batch-size {args.batch_size} does not split over {world_size} processes; pass a multiple of it")
    if args.eval_every % args.batch_size:  # evaluations happen between updates, after whole batches
        every = math.ceil(args.eval_every / args.batch_size) * args.batch_size
        print(f"note: evaluating every {every} episodes: --eval-every {args.eval_every} rounded up to whole batches")
        args.eval_every = every
    if not args.stop_at_eos and args.missing_eos_penalty is not None:  # a fixed-length response has no end to miss
        print("note: --missing-eos-penalty applies only with --stop-at-eos; it is off in this run")
        args.missing_eos_penalty = None
    out = args.output_dir
    if args.resume:  # the same run, continued: its folder, its last checkpoint, its flags
        if out is None:
            fail("--resume continues the run in --output-dir: pass --output-dir <the run's folder>")
        if args.overwrite_output_dir:
            fail("--resume continues a run and --overwrite-output-dir replaces it: pass one of the two")
        if latest_checkpoint(out) is None:
            fail(f"--resume: --output-dir {out} holds no checkpoint (a run writes them with --save-every)")
        if not os.path.exists(os.path.join(out, "INCOMPLETE")):
            fail(f"--resume: the run in --output-dir {out} has finished; there is nothing to resume")
        with open(os.path.join(out, "args.json")) as f:
            saved = json.load(f)
        changed = [k for k, v in asdict(args).items() if k not in RESUMABLE and saved.get(k) != v]
        if changed:  # every difference at once
            said = "; ".join(f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {saved.get(k)})" for k in changed)
            fail(f"--resume: {said}: these would change what the run computes; leave them out (its own are used)")
    elif out is not None and os.path.exists(out):
        foreign = sorted(set(os.listdir(out)) - RUN_FILES) if os.path.isdir(out) else ["it is a file"]
        if foreign:  # --overwrite-output-dir deletes a run's files, never anything else
            fail(f"--output-dir {out} is not a run's folder ({', '.join(foreign[:3])}); choose another folder")
        stopped = latest_checkpoint(out) is not None and os.path.exists(os.path.join(out, "INCOMPLETE"))
        if stopped and not args.overwrite_output_dir:
            fail(f"--output-dir {out} holds a stopped run with a checkpoint: continue it with --resume, or replace it")
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
            fail(
                f"{self.said} raised {type(e).__name__}: {(str(e).splitlines() or [''])[0]}; fix the function",
                every_rank=True,  # each rank scores its own share: each says what it met
            )
        scores = scores.tolist() if hasattr(scores, "tolist") else scores  # a tensor or a NumPy array: a list
        if not isinstance(scores, list | tuple) or len(scores) != len(texts):
            fail(
                f"{self.said} returned {str(scores)[:40]} for {len(texts)} responses; return one number each",
                every_rank=True,
            )
        bad = [x for x in scores if not (isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x))]
        if bad:
            fail(
                f"{self.said} returned {bad[0]!r} among its scores; return one finite number per response",
                every_rank=True,  # each rank scores its own share: each says what it met
            )
        return torch.tensor([float(x) for x in scores], device=query.device)


def load_critic_base(args, device):
    """What PPO's value model and SAC's critic start from, trained in fp32: a copy of the reward model or, with a reward
    function (no network to copy), the policy's backbone with a new scalar head."""
    if is_reward_function(args.reward_model_name):
        print("note: the reward is a function, so the value model (or critic) is the policy with a new scalar head")
        verbosity = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()  # (transformers would list the new head's weights as missing)
        kwargs = {"dtype": torch.float32, "num_labels": 1}
        model = load_pretrained(AutoModelForSequenceClassification, args.model_name, "--model-name", **kwargs)
        transformers.utils.logging.set_verbosity(verbosity)  # the user's level back, not a fixed one
        return model.to(device)
    return load_reward_model(args.reward_model_name, "--reward-model-name", torch.float32, device)


def load_models(args):
    """Seed everything, resolve the device and precision (args.json records what runs), then load the tokenizer,
    trainable policy, frozen reference, reward and gold models, each checked for what its flag needs."""
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() and args.cuda else "cpu")
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


def enable_gradient_checkpointing(model):
    """--gradient-checkpointing: each decoder layer keeps only its input and recomputes its activations in the backward
    pass (less memory, about a third more compute), and only when a gradient is taken, so sampling keeps its KV cache.
    (transformers' own switch acts only in training mode, where it also drops the cache; these models stay in eval.)"""
    for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:

        def forward(*inputs, _forward=layer.forward, **kwargs):
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_forward, *inputs, use_reentrant=False, **kwargs)
            return _forward(*inputs, **kwargs)

        layer.forward = forward


def shard_models(always, frozen, args, world_size):
    """Sharded data parallel under torchrun, FSDP2's fully_shard: each rank keeps 1/N of every parameter, and so of
    its gradient and AdamW state; a module's forward pass all-gathers its whole weights and frees them after
    (https://docs.pytorch.org/docs/stable/distributed.fsdp.fully_shard.html). `always`: the trained models and the
    copies updated in place from them (a reference reset by --ref-sync-every, SAC's critic target: sharded alike, so
    the update is local); `frozen`: the reference and the reward models, unless --no-shard-frozen. One process:
    nothing is sharded."""
    if world_size == 1:
        return
    for model in [m for m in always + (frozen if args.shard_frozen else []) if isinstance(m, torch.nn.Module)]:
        if isinstance(model, FSDPModule):  # (the reference, in both lists with --ref-sync-every)
            continue
        # Each decoder layer, then a reward model's backbone and score head, which backbone_hidden and get_scores call
        # apart, then the root: what is left (embeddings, final norm, output layer, SAC's advantage heads).
        for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:
            fully_shard(layer, reshard_after_forward=True)
        for rm in [m for m in model.modules() if isinstance(m, transformers.PreTrainedModel) and hasattr(m, "score")]:
            fully_shard(getattr(rm, rm.base_model_prefix), reshard_after_forward=True)
            fully_shard(rm.score, reshard_after_forward=True)
        fully_shard(model, reshard_after_forward=True)  # (True for the root too: unsharded() restores it)
        # A parameter with no gradient on some rank (a branch that depends on the data) is reduced as zeros, so every
        # rank reduces the same tensors (else NCCL hangs and gloo aborts); DDP's find_unused_parameters.
        model.set_reduce_scatter_unused_params(True)


@contextlib.contextmanager
def unsharded(model):
    """Sampling from a sharded policy: all-gather its weights once for the whole generation and reshard after. Through
    the shards every token would all-gather every layer (3.5x slower on two CPU processes), and ranks that stop after
    different numbers of tokens (--stop-at-eos) would wait for each other forever. unshard() is not recursive: every
    FSDP module of the model, each told to keep its weights after its forward pass. One process: nothing to do."""
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(True, recurse=False)


def sync_gradients(models, sync):
    """--gradient-accumulation-steps under FSDP: only the last micro-batch's backward pass reduces the gradients over
    the ranks (the others add to unsharded gradients, as DDP's no_sync)."""
    for model in [m for m in models if isinstance(m, FSDPModule)]:
        model.set_requires_gradient_sync(sync)


def optimizer_step(optimizers, scaler, max_grad_norm):
    """One step of each (optimizer, the parameters it clips) on the gradients backward summed: averaged over the ranks,
    their global norm clipped (fp16: unscaled first), a step (fp16: skipped if any is inf or NaN), then cleared. Under
    torchrun FSDP averaged the sharded parameters' gradients in the backward pass (DTensors); a plain parameter's (SAC's
    log_alpha) is averaged here."""
    if torch.distributed.is_initialized():
        for p in [p for optimizer, _ in optimizers for group in optimizer.param_groups for p in group["params"]]:
            if p.grad is not None and not isinstance(p.grad, DTensor):
                torch.distributed.all_reduce(p.grad)
                p.grad /= torch.distributed.get_world_size()
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
        fail(
            f"non-finite loss at update {update}; nothing saved: try a lower --learning-rate or --max-grad-norm",
            every_rank=True,
        )


@torch.no_grad()
def evaluate(policy, ref_policy, reward_model, gold_model, tokenizer, eval_ids, args, device, autocast):
    """One response per evaluation prompt (a fixed seed, so evaluations are comparable), scored; the variety metrics.
    Under torchrun each rank samples and scores its share of each batch (as many rows as its rollouts), with its own
    seed as in training (so N processes draw other responses than one), and rank 0 writes them."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    generator = torch.Generator(device=device).manual_seed(args.seed + 12345 + 100_000 * rank)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    batches, samples, response_ids = [], [], []
    for i in range(0, len(eval_ids), args.batch_size):
        query, query_mask = left_pad(eval_ids[i : i + args.batch_size], pad_id, device)
        models = (policy, ref_policy, reward_model)
        responses, mask, has_eos, logprobs, ref_logprobs, entropy, scores = chunked(
            None, rollout, *models, query, query_mask, args, eos_id, pad_id, generator, autocast, over_ranks=True
        )  # (under torchrun each rank samples its share of the rows; every rank gets them all back)
        stats = batch_stats(scores, logprobs, ref_logprobs, entropy, mask, has_eos)
        rows, size = (query, query_mask, responses, mask.long()), args.rollout_micro_batch_size
        gold = None if gold_model is None else chunked(size, get_scores, gold_model, *rows, autocast, over_ranks=True)
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
    group_generator = torch.Generator(device=device).manual_seed(args.seed + 54321 + 100_000 * rank)
    with unsharded(policy):  # (under torchrun: gathered once; each rank samples its share of the rows)
        raw = chunked(
            None, generate, policy, query, query_mask, args, eos_id, group_generator, autocast, over_ranks=True
        )
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


def latest_checkpoint(folder):
    """The newest whole checkpoint of a run folder: checkpoint/, or checkpoint.old/ when a crash came between the two
    renames that replace it (RunLogger.save_checkpoint); None if it has none."""
    for name in ["checkpoint", "checkpoint.old"]:
        if os.path.isfile(os.path.join(folder, name, "run.pt")):
            return os.path.join(folder, name)
    return None


def distributed_state(trained, names=None):
    """What torch's distributed checkpoint (DCP) keeps of `trained`, each rank its own shards: every model, and every
    optimizer of their parameters that has state (or those `names`, on resume: reading a fresh one's creates it).
    Returns {name: state_dict} and the models as one module, whose parameter names key the optimizers' states."""
    models = torch.nn.ModuleList([m for m in trained.values() if isinstance(m, torch.nn.Module)])
    ids = {id(p) for p in models.parameters()}
    states = {name: get_model_state_dict(obj) for name, obj in trained.items() if isinstance(obj, torch.nn.Module)}
    for name, obj in [(name, obj) for name, obj in trained.items() if isinstance(obj, torch.optim.Optimizer)]:
        of_models = all(id(p) in ids for group in obj.param_groups for p in group["params"])  # (not SAC's alpha's)
        if of_models and (obj.state if names is None else name in names):
            states[name] = get_optimizer_state_dict(models, obj)
    return states, models


def state_of(obj):
    """What a checkpoint keeps, beside DCP's part, of a scaler or optimizer (its state_dict), a generator, a tensor, or
    SAC's replay buffer (a list: its items, its write position and its draw stream)."""
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if isinstance(obj, list):
        return {"items": list(obj), "next": obj.next, "rng": obj.rng.getstate()}
    return obj.detach().clone() if isinstance(obj, torch.Tensor) else obj.state_dict()


def sync_to_disk(path):
    """fsync a file, or a folder (its entries: a rename in it), so that a crash or a power cut cannot undo it."""
    if os.name == "nt" and os.path.isdir(path):  # Windows opens no folder (and its renames need no folder sync)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@torch.no_grad()
def load_state(obj, state):
    """Put back what state_of kept. A resume on another device or precision goes on, not bit for bit: a generator
    state from another kind of device seeds a new stream, and a scaler that had no state (bf16, fp32) starts afresh."""
    if isinstance(obj, torch.Generator):
        if state.shape == obj.get_state().shape:
            obj.set_state(state)
        else:
            obj.manual_seed(sum(state.tolist()))
    elif isinstance(obj, torch.amp.GradScaler) and not state:
        return
    elif isinstance(obj, list):
        obj[:], obj.next = state["items"], state["next"]
        obj.rng.setstate(state["rng"])
    elif isinstance(obj, torch.Tensor):
        obj.copy_(state)
    else:
        obj.load_state_dict(state)


class RunLogger:
    """The run folder: args.json, metrics.jsonl, samples.jsonl, checkpoints and the final model; also wandb with
    --track, a tqdm bar, and a console line per evaluation. A file INCOMPLETE marks a run stopped by Ctrl-C, a NaN or a
    crash. Under torchrun rank 0 alone writes; the records it writes are the global ones (the other ranks' included)."""

    def __init__(self, args, run_name, rank):
        self.args, self.rank, self.episode, self.last_eval, self.wandb = args, rank, 0, "", None
        self.checkpoint = self.saved = self.ranks = None
        if args.resume:  # every rank reads run.pt and each rank's file before rank 0 cuts the records back: resume()
            self.checkpoint = latest_checkpoint(args.output_dir)
            self.saved = self.read(self.checkpoint, "run.pt")
            self.ranks = [self.read(self.checkpoint, f"rank{r}.pt") for r in range(self.saved["num_processes"])]
        if rank == 0:
            self.dir = self.open_folder(args, run_name)
            if args.track:
                import wandb  # lazy: only needed with --track

                wandb.init(
                    project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args), name=run_name
                )
                self.wandb = wandb
        self.bar = tqdm(total=args.total_episodes, unit="episode", dynamic_ncols=True, disable=rank > 0)
        signal.signal(signal.SIGINT, self.interrupted)

    def open_folder(self, args, run_name):
        """A new run's folder (created only after every check has passed, so a bad flag leaves nothing behind), or with
        --resume the run's own, its records cut back to the checkpoint's."""
        try:
            if args.resume:
                for name, size in self.saved["records"].items():
                    os.truncate(os.path.join(args.output_dir, name), size)
                self.file = open(os.path.join(args.output_dir, "metrics.jsonl"), "a")  # noqa: SIM115 (for the run)
                return args.output_dir
            path = args.output_dir = args.output_dir or new_folder(os.path.join("runs", run_name))
            os.makedirs(path, exist_ok=True)
            for name in set(os.listdir(path)) & RUN_FILES:  # --overwrite-output-dir: the old run goes
                (shutil.rmtree if os.path.isdir(os.path.join(path, name)) else os.remove)(os.path.join(path, name))
            texts = {"INCOMPLETE": "This run has not finished: no final model yet.\n", "samples.jsonl": ""}
            ran = {"num_processes": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}
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
        out, saved = self.args.output_dir, self.args.save_every
        last = f" and its last checkpoint (go on with --output-dir {out} --resume)" if saved else ""
        fail(f"interrupted by Ctrl-C at episode {self.episode}; {out} holds the records so far{last}")

    def log(self, record):
        """Append a record to metrics.jsonl (and to wandb with --track)."""
        self.episode = record["episode"]
        if self.rank > 0:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: say so, with the records written so far left as they are
            fail(f"--output-dir {self.dir}: cannot write metrics.jsonl ({e.strerror}); the records so far are kept")
        if self.wandb is not None:
            self.wandb.log(record, step=record["episode"])

    def log_train(self, episode, update, lr, kl_coef, objective, start_time, time_rollout, time_update, algo_stats):
        """A training record: the common keys (docs/usage.md, "Metrics"), then the algorithm's own (rank means)."""
        elapsed = time.time() - start_time
        record = {"episode": episode, "update": update, "lr": lr, "objective/kl_coef": kl_coef}
        record |= {"time/elapsed_s": elapsed, "time/episodes_per_s": episode / elapsed}
        record |= {"time/rollout_s": time_rollout, "time/update_s": time_update}
        record |= {f"objective/{k}": v for k, v in objective.items()}
        record["objective/rlhf_reward"] = objective["scores"] - kl_coef * objective["kl"]
        if self.args.cuda:  # the device that runs (setup_run resolved it)
            record["memory/cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        means = mean_over_ranks(torch.tensor(list(algo_stats.values()), dtype=torch.float64))
        self.log({**record, **dict(zip(algo_stats, means.tolist(), strict=True))})
        self.bar.n = episode
        self.bar.set_postfix(score=f"{objective['scores']:.3f}", kl=f"{objective['kl']:.3f}")

    def log_eval(self, episode, record, samples):
        """An evaluation: its record, a console line, and its prompts, responses and scores in samples.jsonl."""
        if self.rank > 0:  # rank 0 evaluated for all
            return
        self.log({"episode": episode, **record})
        gold = f", gold score {record['eval/gold_scores']:.3f}" if "eval/gold_scores" in record else ""
        self.last_eval = f"eval score {record['eval/scores']:.3f}{gold}, KL {record['eval/kl']:.3f}"
        self.bar.write(f"episode {episode}: {self.last_eval}")
        with open(os.path.join(self.dir, "samples.jsonl"), "a") as f:
            f.writelines(json.dumps({"episode": episode, **s}) + "\n" for s in samples)

    def save_checkpoint(self, trained, own, loop):
        """--save-every: <output-dir>/checkpoint/ holds all the next update depends on: the models and optimizers in
        torch's distributed checkpoint format (https://docs.pytorch.org/docs/stable/distributed.checkpoint.html: each
        rank writes its own shards, nothing is gathered), each rank's `own` (its sampling generator, SAC's buffer) and
        RNG states in rank<r>.pt, and in run.pt the rest of `trained` (the scaler, SAC's alpha), the loop's counters
        and the records' lengths. Written to checkpoint.tmp/, every file synced, then renamed: Ctrl-C or a crash leaves
        the previous checkpoint whole (latest_checkpoint finds the newest whole one), and the records it counts are
        on disk."""
        path = os.path.join(self.args.output_dir, "checkpoint")
        num_ranks = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        states, _ = distributed_state(trained)
        run = {"trained": {name: state_of(obj) for name, obj in trained.items() if name not in states}}
        run |= {"distributed": list(states), "loop": loop, "num_processes": num_ranks}
        own = {name: state_of(obj) for name, obj in own.items()}
        own["rng"] = [torch.get_rng_state(), random.getstate(), torch.cuda.get_rng_state() if self.args.cuda else None]
        if self.rank == 0:
            shutil.rmtree(path + ".tmp", ignore_errors=True)  # what a crash left half written
            run["records"] = {"metrics.jsonl": self.file.tell()}
            run["records"]["samples.jsonl"] = os.path.getsize(os.path.join(self.dir, "samples.jsonl"))
            for name in run["records"]:  # flushed is not on disk: a power cut could lose what the checkpoint counts
                sync_to_disk(os.path.join(self.dir, name))
        if num_ranks > 1:
            torch.distributed.barrier()
        try:
            dcp.save(states, checkpoint_id=path + ".tmp", no_dist=num_ranks == 1)  # (a collective; files synced)
            for name, state in [(f"rank{self.rank}.pt", own), *([("run.pt", run)] if self.rank == 0 else [])]:
                torch.save(state, os.path.join(path + ".tmp", name))
                sync_to_disk(os.path.join(path + ".tmp", name))
        except Exception as e:  # noqa: BLE001 (a full disk: one line; the previous checkpoint stays whole)
            shutil.rmtree(path + ".tmp", ignore_errors=True)
            out = self.args.output_dir
            fail(f"--output-dir {out}: cannot write a checkpoint ({str(e).splitlines()[0]}); kept the last", True)
        if num_ranks > 1:  # every rank's files are written
            torch.distributed.barrier()
        if self.rank == 0:
            if os.path.isdir(path):  # a crash from here on leaves checkpoint.old/ or checkpoint/ whole
                shutil.rmtree(path + ".old", ignore_errors=True)
                os.replace(path, path + ".old")
            os.replace(path + ".tmp", path)
            sync_to_disk(self.dir)  # the renames themselves
            shutil.rmtree(path + ".old", ignore_errors=True)

    def resume(self, trained, own):
        """--resume: put the checkpoint's states into the run's objects (built as for a new run) and return its loop.
        On another number of processes than wrote it, DCP reshards the models and optimizers; rank r takes rank r's
        generators and RNG states (a rank it lacks keeps its new ones: fresh streams), and SAC's buffers are pooled
        and dealt out again: the run goes on correctly, but not bit for bit."""
        folder, run = self.checkpoint, self.saved
        num_ranks = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        states, models = distributed_state(trained, run["distributed"])
        dcp.load(states, checkpoint_id=folder, no_dist=num_ranks == 1)  # each rank its shards, whatever N wrote them
        for name, state in states.items():
            if isinstance(trained[name], torch.nn.Module):
                set_model_state_dict(trained[name], state)
            else:
                set_optimizer_state_dict(models, trained[name], state)
        for name, state in run["trained"].items():
            load_state(trained[name], state)
        ranks = self.ranks
        mine = ranks[self.rank] if self.rank < len(ranks) else None
        for name, obj in own.items():
            if isinstance(obj, list) and len(ranks) != num_ranks:  # SAC's buffers: pooled oldest first, dealt out
                aged = [r[name]["items"][r[name]["next"] :] + r[name]["items"][: r[name]["next"]] for r in ranks]
                pooled = [x for items in itertools.zip_longest(*aged) for x in items if x is not None]
                items = pooled[self.rank :: num_ranks][-obj.capacity :]
                rng = mine[name]["rng"] if mine else obj.rng.getstate()
                load_state(obj, {"items": items, "next": len(items) % obj.capacity, "rng": rng})
            elif mine is not None:
                load_state(obj, mine[name])
        random.setstate(ranks[0]["rng"][1])  # the prompt order: one stream, the same on every rank
        if mine is not None:
            torch.set_rng_state(mine["rng"][0])
        if self.args.cuda and mine is not None and mine["rng"][2] is not None:
            torch.cuda.set_rng_state(mine["rng"][2])
        self.episode = self.bar.n = run["loop"]["episode"]
        if self.rank == 0:
            self.bar.write(f"resumed at episode {self.episode} from its checkpoint in {self.dir}")
            if len(ranks) != num_ranks:
                self.bar.write(f"note: written by {len(ranks)} process(es), resumed on {num_ranks}: not bit for bit")
        return run["loop"]

    @staticmethod
    def read(folder, name):
        """A checkpoint's file, read with weights_only: tensors and plain data, never code that loading would run. A
        damaged or foreign file stops the run in one line."""
        try:
            return torch.load(os.path.join(folder, name), weights_only=True)
        except Exception as e:  # noqa: BLE001 (a damaged or foreign file: one line)
            why = (str(e).splitlines() or [type(e).__name__])[0]  # (an exception may carry no message)
            fail(f"--resume: {folder}/{name} does not load ({why}); start a new run")

    def finish(self, policy, tokenizer, start_time):
        """Save the final policy (with --save-model), close the records and say what the run achieved."""
        self.bar.close()
        whole = None
        if isinstance(policy, FSDPModule):  # sharded: gathered whole on rank 0's CPU, a tied weight once (as unsharded)
            whole = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            kept = dict(policy.named_parameters()).keys()  # (a tied weight under its first name)
            tied = {name for name, _ in policy.named_parameters(remove_duplicate=False)} - kept
            whole = {name: tensor for name, tensor in whole.items() if name not in tied}
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if self.rank > 0:
            return
        self.file.close()
        if self.args.save_model:  # written beside, then renamed: a failed save never looks like a model
            path = os.path.join(self.dir, "model")
            try:
                policy.save_pretrained(path + ".tmp", state_dict=whole)
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
