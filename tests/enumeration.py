"""Exact enumeration on a problem small enough to list every response.

One prompt, a vocabulary of 6 tokens (<pad>, <bos>, <eos>, <unk>, "a", "b") and responses of exactly two
tokens (`--no-stop-at-eos`): 36 responses, so pi(y), the reward r(y) and the KL-regularised optimum

    pi*(y) = pi_ref(y) exp(r(y) / beta) / Z

are computed exactly, with no sampling. Every token id can be sampled (specials included), so every
enumeration runs over the model's whole output vocabulary.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from tests.helpers import World, build_reward_model, make_tokenizer

PROMPT = "a b a"
RESPONSE_LENGTH = 2


def build_enum_world(root: Path, policy_logit_scale: float = 3.0, score_std: float = 1.0) -> World:
    """A tiny Llama policy with a peaked (non-uniform) pi_ref and a reward model with well spread scores."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = Path(root)
    tok = make_tokenizer(["a", "b"], with_pad=True)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # the default init gives nearly uniform next-token distributions; make pi_ref peaked
        policy.lm_head.weight.normal_(0.0, policy_logit_scale / config.hidden_size**0.5)
    policy.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    build_reward_model("llama", tok, root / "reward_model", seed=1, score_std=score_std)
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n")
    return World("enum", str(root / "policy"), str(root / "reward_model"), str(prompts), str(prompts))


def all_responses(vocab_size: int) -> torch.Tensor:
    """Every two-token response, shape [vocab_size ** 2, 2]."""
    return torch.tensor(list(itertools.product(range(vocab_size), repeat=RESPONSE_LENGTH)))


def load_with_all_inputs(auto_class, path: str):
    """The saved model in fp32, and PROMPT followed by every two-token response: (model, ids, prompt length, ys)."""
    from transformers import AutoTokenizer

    model = auto_class.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.tensor(AutoTokenizer.from_pretrained(path)(PROMPT)["input_ids"])
    ys = all_responses(model.config.vocab_size)
    return model, torch.cat([prompt.expand(len(ys), -1), ys], dim=1), len(prompt), ys


@torch.no_grad()
def response_logprobs(policy_path: str) -> torch.Tensor:
    """log pi(y | PROMPT) for every two-token response y, from the saved policy, exactly."""
    from transformers import AutoModelForCausalLM

    model, ids, prompt_length, ys = load_with_all_inputs(AutoModelForCausalLM, policy_path)
    logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    per_token = logp[:, prompt_length - 1 : -1].gather(-1, ys.unsqueeze(-1)).squeeze(-1)
    return per_token.sum(1)


@torch.no_grad()
def response_scores(reward_path: str) -> torch.Tensor:
    """r(y): the reward model's score of PROMPT + y for every two-token response y."""
    from transformers import AutoModelForSequenceClassification

    model, ids, _, _ = load_with_all_inputs(AutoModelForSequenceClassification, reward_path)
    hidden = model.model(input_ids=ids).last_hidden_state[:, -1]  # score read at the last token
    return model.score(hidden).squeeze(-1).float()


def optimum_logprobs(ref_logprobs: torch.Tensor, scores: torch.Tensor, beta: float) -> torch.Tensor:
    """log pi*(y) with pi* proportional to pi_ref(y) exp(r(y) / beta)."""
    return torch.log_softmax(ref_logprobs + scores / beta, dim=0)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """KL(p || q) between two distributions given as log-probabilities over the same responses."""
    return float((logp.exp() * (logp - logq)).sum())


# ---------------------------------------------------------------------------------------------
# A tabular two-token policy, for exact expected gradients of the losses
# ---------------------------------------------------------------------------------------------
V = 4  # tokens of the tabular policy: V * V two-token responses
KL_ESTIMATORS = {  # per-token estimators of KL(pi || pi_ref) from log r = log pi - log pi_ref (Schulman 2020)
    "k1": lambda log_r: log_r,
    "k2": lambda log_r: 0.5 * log_r**2,
    "k3": lambda log_r: torch.exp(-log_r) - 1 + log_r,
}


def tabular_policy(seed):
    """pi(a) and pi(b | a) over V tokens, as free logits: a two-token 'language model' we can enumerate."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g).requires_grad_(), torch.randn(V, V, generator=g).requires_grad_()


def token_logprobs(first, second):
    """[V*V, 2] per-token log-probs of every response (a, b), and the response list."""
    ys = all_responses(V)
    lp1, lp2 = torch.log_softmax(first, -1), torch.log_softmax(second, -1)
    return torch.stack([lp1[ys[:, 0]], lp2[ys[:, 0], ys[:, 1]]], dim=1), ys


def named_gradient(estimator, kl_in, beta):
    """The gradient each --kl-estimator x --kl-in combination should have, from its definition, for kl_coef = beta."""
    first, second = tabular_policy(0)
    ref_first, ref_second = tabular_policy(1)
    p1, p2 = torch.log_softmax(first, -1), torch.log_softmax(second, -1)
    q1, q2 = torch.log_softmax(ref_first, -1).detach(), torch.log_softmax(ref_second, -1).detach()
    visit = p1.exp().detach()  # how often each second-token state is visited

    def state_kl(p, q):  # KL(p || q) per state, over the last dim
        return (p.exp() * (p - q)).sum(-1)

    if kl_in == "reward" and estimator == "k1":  # the true sequence-level KL(pi || pi_ref)
        objective = state_kl(p1, q1) + (p1.exp() * state_kl(p2, q2)).sum()
    elif kl_in == "reward":  # score function of a frozen penalty: grad sum_y pi(y) [sum_t k_t(y)], k_t held fixed
        logp, _ = token_logprobs(first, second)
        ref_logp, _ = token_logprobs(ref_first.detach(), ref_second.detach())
        penalty = KL_ESTIMATORS[estimator](logp.detach() - ref_logp).sum(1)
        objective = (logp.sum(1).exp() * penalty).sum()
    elif estimator == "k1":
        return [torch.zeros(V), torch.zeros(V, V)]
    elif estimator == "k2":  # reverse KL at each visited state, state distribution held fixed
        objective = state_kl(p1, q1) + (visit * state_kl(p2, q2)).sum()
    else:  # k3: forward KL(pi_ref || pi) at each visited state
        objective = state_kl(q1, p1) + (visit * state_kl(q2, p2)).sum()
    return [beta * g for g in torch.autograd.grad(objective, [first, second])]


# ---------------------------------------------------------------------------------------------
# Convergence of a whole script run to pi*
# ---------------------------------------------------------------------------------------------
BETA_STAR = 0.1  # kl_coef of the convergence runs: pi* is then KL 2.6 away from pi_ref


def train_and_measure(script: str, root: Path, *flags: str) -> tuple[float, float]:
    """Run `script` on the enumerable world; return (KL(pi_ref || pi*), KL(pi_trained || pi*)), exactly.

    Flags common to every script fix the problem (one prompt, two-token responses, temperature 1, no EOS
    handling, kl_coef BETA_STAR); `flags` add the algorithm's own budget and step sizes.
    """
    from tests.helpers import run_script

    world = build_enum_world(root / "world")
    out = root / "run"
    result = run_script(script, *world.args(), "--no-stop-at-eos", "--missing-eos-penalty", "None",
                        "--temperature", "1.0", "--response-length", "2", "--kl-coef", str(BETA_STAR),
                        "--batch-size", "64", "--eval-every", "100000", "--eval-size", "1",
                        "--output-dir", str(out), *flags, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    ref = response_logprobs(world.policy)
    optimum = optimum_logprobs(ref, response_scores(world.reward), BETA_STAR)
    return kl(ref, optimum), kl(response_logprobs(str(out / "model")), optimum)
