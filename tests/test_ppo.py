"""ppo_rlhf.py: its math against exact enumeration and plain loops, and the script end to end."""

import math

import pytest
import torch

import ppo_rlhf as ppo
from tests import enumeration as en
from tests.helpers import NO_AUTOCAST, TINY, read_jsonl, record_calls, record_optimizer_steps, run_main, run_script


# ---------------------------------------------------------------------------------------------
# GAE, whitening, masks
# ---------------------------------------------------------------------------------------------
def test_gae_matches_a_plain_loop_on_a_padded_batch():
    torch.manual_seed(0)
    lengths = [5, 3, 1, 4]
    rewards, values = torch.randn(4, 5), torch.randn(4, 5)
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    gamma, lam = 0.9, 0.8
    advantages, returns = ppo.compute_gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):  # reference: the textbook recursion on the real tokens only
        expected, last = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_value = values[i, t + 1].item() if t + 1 < n else 0.0
            last = rewards[i, t].item() + gamma * next_value - values[i, t].item() + gamma * lam * last
            expected[t] = last
        torch.testing.assert_close(advantages[i, :n], torch.tensor(expected))
        torch.testing.assert_close(returns[i, :n], torch.tensor(expected) + values[i, :n])
        assert advantages[i, n:].abs().sum() == 0 and returns[i, n:].abs().sum() == 0


def test_whitening_ignores_padding():
    torch.manual_seed(0)
    x, mask = torch.randn(3, 6) * 5 + 2, torch.tensor([[1.0] * 6, [1.0] * 2 + [0.0] * 4, [1.0] * 4 + [0.0] * 2])
    padded = torch.where(mask.bool(), x, torch.full_like(x, 1e6))  # garbage in the padding must not matter
    w = ppo.whiten(padded, mask)
    real = w[mask.bool()]
    assert abs(real.mean().item()) < 1e-5 and abs(real.var(unbiased=False).item() - 1) < 1e-4
    torch.testing.assert_close(w[mask.bool()], ppo.whiten(x, mask)[mask.bool()])
    kept_mean = ppo.whiten(padded, mask, shift_mean=False)[mask.bool()]
    assert abs(kept_mean.mean().item() - x[mask.bool()].mean().item()) < 1e-4


@pytest.mark.parametrize("same_id", [False, True], ids=["pad!=eos", "pad==eos"])
def test_response_mask_keeps_the_first_eos_and_pads_after_it(same_id):
    eos, pad = 2, (2 if same_id else 0)
    responses = torch.tensor([[5, 2, 6, 2], [5, 6, 7, 8], [2, 5, 5, 5]])
    mask, cleaned, has_eos = ppo.response_mask(responses, eos, pad, stop_at_eos=True)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert cleaned.tolist() == [[5, 2, pad, pad], [5, 6, 7, 8], [2, pad, pad, pad]]
    assert has_eos.tolist() == [True, False, True]
    mask, cleaned, _ = ppo.response_mask(responses, eos, pad, stop_at_eos=False)
    assert mask.sum() == 12 and torch.equal(cleaned, responses)


# ---------------------------------------------------------------------------------------------
# Left padding does not change log-probs, values or scores, for every fixture architecture
# ---------------------------------------------------------------------------------------------
def test_logprobs_scores_and_values_ignore_extra_left_padding(world):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world.policy)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    policy = AutoModelForCausalLM.from_pretrained(world.policy, dtype=torch.float32).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(world.reward, dtype=torch.float32).eval()
    prompts = [tok("the red cat")["input_ids"], tok("a dog")["input_ids"]]
    responses = torch.tensor([[7, 8, 9, 10], [11, 12, 13, 14]])
    resp_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    results = []
    for extra in [0, 5]:
        query, query_mask = ppo.left_pad(prompts, pad_id, "cpu")
        query = torch.cat([torch.full((2, extra), pad_id), query], dim=1)
        query_mask = torch.cat([torch.zeros(2, extra, dtype=torch.long), query_mask], dim=1)
        logp, entropy = ppo.forward_logprobs(policy, query, query_mask, responses, resp_mask, 0.7, NO_AUTOCAST)
        scores = ppo.get_scores(rm, query, query_mask, responses, resp_mask, NO_AUTOCAST)
        values = ppo.get_values(rm, query, query_mask, responses, resp_mask, NO_AUTOCAST)
        results.append((logp * resp_mask, entropy * resp_mask, scores, values * resp_mask))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# KL options: the expected gradient, by exact enumeration, is the one kl_penalty's docstring names
# ---------------------------------------------------------------------------------------------
BETA = 0.7


def expected_code_gradient(estimator, kl_in):
    """sum_y pi(y) grad loss(y), where loss(y) is what ppo_rlhf.py minimises on a batch holding only y.

    On policy (ratio 1), no value baseline (values 0), gamma = lam = 1, no whitening: what remains of PPO is
    the per-token policy gradient with reward-to-go, plus the KL term in the reward or in the loss.
    """
    first, second = en.tabular_policy(0)
    ref_first, ref_second = en.tabular_policy(1)
    logp, ys = en.token_logprobs(first, second)
    ref_logp, _ = en.token_logprobs(ref_first.detach(), ref_second.detach())
    weights = logp.sum(1).exp().detach()  # sampling probabilities: not differentiated, as in training
    total = 0.0
    for i in range(len(ys)):
        lp, rlp, mask = logp[i : i + 1], ref_logp[i : i + 1], torch.ones(1, 2)
        rewards = ppo.token_rewards(
            torch.zeros(1), lp.detach(), rlp, mask, BETA if kl_in == "reward" else 0.0, estimator
        )
        advantages, _ = ppo.compute_gae(rewards, torch.zeros(1, 2), mask, 1.0, 1.0)
        loss, *_ = ppo.ppo_policy_loss(lp, lp.detach(), advantages, mask, 0.2, "two-sided")
        loss = loss + ppo.token_kl_loss(
            lp, rlp, mask, BETA if kl_in == "loss" else 0.0, estimator
        )  # as the loop adds it
        total = total + weights[i] * loss
    grads = torch.autograd.grad(total, [first, second])
    return [2 * g for g in grads]  # the losses average over the 2 tokens of a response: undo that


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_option_gradients_match_their_docstring(estimator, kl_in):
    got, want = expected_code_gradient(estimator, kl_in), en.named_gradient(estimator, kl_in, BETA)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_only_k1_in_the_reward_gives_the_sequence_kl_gradient():
    """The identities above are not all the same vector: the loss forms miss the future-KL terms."""
    true = en.named_gradient("k1", "reward", BETA)
    assert torch.cat([g.flatten() for g in true]).norm() > 0.1
    for estimator, kl_in in [("k2", "loss"), ("k3", "loss"), ("k1", "loss"), ("k2", "reward"), ("k3", "reward")]:
        other = expected_code_gradient(estimator, kl_in)
        assert torch.cat([(a - b).flatten() for a, b in zip(other, true)]).norm() > 1e-2, (estimator, kl_in)


# ---------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------
def test_tinyworld_run_with_gold_rm_and_options(tinyworld, tmp_path):
    """The default world, with the gold RM, KL in the loss, an adaptive kl_coef and reference resets."""
    out = tmp_path / "run"
    result = run_script(
        "ppo_rlhf.py",
        *tinyworld.args(),
        *TINY,
        "--kl-estimator",
        "k3",
        "--kl-in",
        "loss",
        "--kl-target",
        "0.5",
        "--kl-horizon",
        "100",
        "--ref-sync-every",
        "1",
        "--ref-sync-mix",
        "0.5",
        "--whiten-rewards",
        "--output-dir",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert all("eval/gold_scores" in r for r in records if "eval/scores" in r)
    coefs = [r["objective/kl_coef"] for r in records if "objective/kl_coef" in r]
    assert coefs[0] == 0.05 and coefs[1] != coefs[0]  # the controller moved it


# ---------------------------------------------------------------------------------------------
# Clipping away from ratio 1
# ---------------------------------------------------------------------------------------------
def test_policy_clip_stops_the_gradient_only_where_the_ratio_left_the_range_in_the_advantage_direction():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()  # ratios 1.5, 1.5, 0.5, 0.5
    advantages, mask = torch.tensor([[1.0, -1.0, 1.0, -1.0]]), torch.ones(1, 4)
    loss, stats = ppo.ppo_policy_loss(new, old, advantages, mask, 0.2, "two-sided")
    # Per token: max(-A r, -A clip(r)): -1.2 (clipped), 1.5, -0.5, 0.8 (clipped); their mean.
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    grad = torch.autograd.grad(loss, new)[0]
    # A > 0 above 1 + eps and A < 0 below 1 - eps are clipped (no gradient); the other two are not: -A r / 4.
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.5 / 4, -0.5 / 4, 0.0]]))
    assert stats["ppo/clipfrac"] == 1.0 and stats["ppo/ratio_mean"] == pytest.approx(1.0)
    assert stats["ppo/approxkl"] == pytest.approx(0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4)
    masked, stats = ppo.ppo_policy_loss(new, old, advantages, torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 0.2, "two-sided")
    assert masked.item() == pytest.approx((-1.2 + 1.5 - 0.5) / 3)  # means over real tokens only
    assert stats["ppo/ratio_mean"] == pytest.approx(3.5 / 3) and stats["ppo/clipfrac"] == 1.0
    _, stats = ppo.ppo_policy_loss(
        torch.log(torch.tensor([[1.1, 0.5]])), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2, "two-sided"
    )
    assert stats["ppo/clipfrac"] == 0.5 and stats["ppo/ratio_mean"] == pytest.approx(0.8)


# ---------------------------------------------------------------------------------------------
# --clip-mode one-sided: a truncated importance weight (LlamaRL's AIPO, IMPALA's rho-bar)
# ---------------------------------------------------------------------------------------------
def one_sided_loop(new, old, advantages, mask, eps):
    """The one-sided loss and its gradient with respect to log pi, by a plain loop over the real tokens:
    loss = -sum_t w_t A_t log pi_t / n and gradient -w_t A_t / n (w_t = min(r_t, 1 + eps) is a constant), 0 at padding.
    """
    n = mask.sum().item()
    loss, grad = 0.0, torch.zeros_like(new)
    for b in range(new.shape[0]):
        for t in range(new.shape[1]):
            if mask[b, t] == 1:
                weight = min(math.exp(new[b, t].item() - old[b, t].item()), 1 + eps)
                loss -= weight * advantages[b, t].item() * new[b, t].item() / n
                grad[b, t] = -weight * advantages[b, t].item() / n
    return loss, grad


def test_one_sided_clip_matches_a_plain_loop_over_tokens():
    # Ratios below 1 - eps, inside the range and above 1 + eps, with advantages of both signs; the last token is
    # padding, with a ratio and an advantage that must not count.
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1, 0.9], [3.0, 0.7, 1.25, 1.0, 2.0, 5.0]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0, -0.5], [0.3, 1.5, -2.0, 0.7, 1.0, 9.0]])
    mask = torch.tensor([[1.0] * 6, [1.0] * 5 + [0.0]])
    old = -torch.linspace(1.0, 3.0, 12).view(2, 6)
    new = (old + ratios.log()).requires_grad_()
    loss, stats = ppo.ppo_policy_loss(new, old, advantages, mask, 0.2, "one-sided")
    want_loss, want_grad = one_sided_loop(new.detach(), old, advantages, mask, 0.2)
    assert loss.item() == pytest.approx(want_loss)
    torch.testing.assert_close(torch.autograd.grad(loss, new)[0], want_grad)
    # The clip fraction counts the real tokens whose weight was truncated: ratios 1.5, 1.5, 3.0, 1.25, 2.0 of 11.
    assert stats["ppo/clipfrac"] == pytest.approx(5 / 11)
    assert stats["ppo/ratio_mean"] == pytest.approx((6.0 + 7.95) / 11)
    assert stats["ppo/approxkl"] == pytest.approx(0.5 * (ratios.log() ** 2 * mask).sum().item() / 11)


def test_at_ratio_one_both_clip_modes_give_the_plain_policy_gradient():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    advantages, mask = torch.tensor([[1.0, -2.0, 0.5, 3.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    for clip_mode in ["two-sided", "one-sided"]:
        new = old.clone().requires_grad_()
        loss, stats = ppo.ppo_policy_loss(new, old, advantages, mask, 0.2, clip_mode)
        # -mean_t A_t grad log pi over the 3 real tokens
        torch.testing.assert_close(torch.autograd.grad(loss, new)[0], torch.tensor([[-1.0, 2.0, -0.5, 0.0]]) / 3)
        assert stats["ppo/clipfrac"] == 0 and stats["ppo/ratio_mean"] == 1


def test_one_sided_clip_keeps_the_gradient_where_the_two_sided_clip_stops_it():
    """The inputs of the two-sided test above: ratios 1.5, 1.5, 0.5, 0.5 with advantages 1, -1, 1, -1."""
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    advantages, mask = torch.tensor([[1.0, -1.0, 1.0, -1.0]]), torch.ones(1, 4)
    grads, clipfracs = {}, {}
    for clip_mode in ["two-sided", "one-sided"]:
        loss, stats = ppo.ppo_policy_loss(new, old, advantages, mask, 0.2, clip_mode)
        grads[clip_mode], clipfracs[clip_mode] = torch.autograd.grad(loss, new)[0], stats["ppo/clipfrac"]
    # Two-sided: A > 0 above 1 + eps and A < 0 below 1 - eps get no gradient; the others -A r / 4.
    torch.testing.assert_close(grads["two-sided"], torch.tensor([[0.0, 1.5 / 4, -0.5 / 4, 0.0]]))
    # One-sided: every token keeps -min(r, 1.2) A / 4: A > 0 at 1.5 is still pushed up (weight 1.2, not 0), A < 0 at
    # 1.5 is pushed down with weight 1.2 (not 1.5), and A < 0 at 0.5 is still pushed down (weight 0.5, not 0).
    torch.testing.assert_close(grads["one-sided"], torch.tensor([[-1.2 / 4, 1.2 / 4, -0.5 / 4, 0.5 / 4]]))
    assert clipfracs == {"two-sided": 1.0, "one-sided": 0.5}  # outside [0.8, 1.2], against above 1.2


def test_clip_mode_reaches_the_loss_the_first_step_agrees_and_later_ones_do_not(llama_world, tmp_path, monkeypatch):
    """--clip-mode one-sided runs end to end; the first minibatch is on policy (ratio 1: the same gradient in both
    modes), and once the policy has moved (a large learning rate) the clips act differently."""
    grads, records = {}, {}
    for clip_mode in ["two-sided", "one-sided"]:
        steps = record_optimizer_steps(monkeypatch)
        out = tmp_path / clip_mode
        code, _, stderr = run_main(
            "ppo_rlhf.py",
            *llama_world.args(),
            *TINY,
            "--total-episodes",
            "16",
            "--learning-rate",
            "0.05",
            "--clip-mode",
            clip_mode,
            "--output-dir",
            str(out),
            cwd=tmp_path,
        )
        assert code == 0, stderr[-3000:]
        grads[clip_mode], records[clip_mode] = [s["grads"] for s in steps], read_jsonl(out / "metrics.jsonl")
    assert len(grads["one-sided"]) == 16  # 4 epochs x 4 minibatches
    for a, b in zip(grads["two-sided"][0], grads["one-sided"][0]):
        torch.testing.assert_close(a, b)
    later = [max((a - b).abs().max().item() for a, b in zip(*step)) for step in zip(*grads.values())][1:]
    assert max(later) > 1e-3, later
    train = [r for r in records["one-sided"] if "ppo/clipfrac" in r]
    assert train and train[0]["ppo/clipfrac"] > 0  # some weights were truncated


def test_value_clip_takes_the_worse_of_the_plain_and_the_clipped_error():
    old, returns, mask = torch.tensor([[0.2, 0.0, -0.3]]), torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3)
    values = torch.tensor([[0.5, -0.5, -0.2]], requires_grad=True)  # moved by 0.3, -0.5, 0.1 from the rollout's
    loss, stats = ppo.ppo_value_loss(values, old, returns, mask, 0.2)
    clipfrac = torch.tensor(stats["ppo/value_clipfrac"])
    # Clipped values 0.4, -0.2, -0.2; errors plain 0.25, 2.25, 0.64 and clipped 0.36, 1.44, 0.64; the larger of each.
    assert loss.item() == pytest.approx(0.5 * (0.36 + 2.25 + 0.64) / 3)
    grad = torch.autograd.grad(loss, values)[0]
    # Token 0: the clipped error is larger and does not depend on the value (gradient 0); tokens 1 and 2: v - R.
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1.5 / 3, 0.8 / 3]]))
    assert clipfrac.item() == pytest.approx(2 / 3)  # the first two moved more than 0.2


# ---------------------------------------------------------------------------------------------
# The main loop, run in this process
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target,direction", [(1e-4, 1), (1e4, -1)])
def test_adaptive_kl_controller_raises_the_coefficient_above_the_target_and_lowers_it_below(
    target, direction, llama_world, tmp_path
):
    out = tmp_path / "run"
    code, _, stderr = run_main(
        "ppo_rlhf.py",
        *llama_world.args(),
        *TINY,
        "--total-episodes",
        "64",
        "--kl-target",
        str(target),
        "--kl-horizon",
        "160",
        "--learning-rate",
        "1e-2",
        "--output-dir",
        str(out),
        cwd=tmp_path,
    )
    assert code == 0, stderr[-3000:]
    train = [r for r in read_jsonl(out / "metrics.jsonl") if "objective/kl_coef" in r]
    coefs = [r["objective/kl_coef"] for r in train]
    assert coefs[0] == 0.05 and train[0]["objective/kl"] == 0  # the first batch comes from the reference itself
    for before, after, r in zip(coefs, coefs[1:], train):
        # Ziegler et al.: kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * batch / horizon (batch 16, horizon 160).
        error = max(-0.2, min(0.2, r["objective/kl"] / target - 1))
        assert after == pytest.approx(before * (1 + error * 0.1))
    assert all((b - a) * direction > 0 for a, b in zip(coefs[1:], coefs[2:]))  # KL > 0 from the second batch on


@pytest.fixture
def llama_world(worlds):
    return worlds["llama"]


def test_token_rewards_put_the_score_on_the_last_real_token_of_each_response():
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])  # lengths 3 (EOS last), 1 (EOS first), 4 (cut)
    logprobs = torch.tensor([[-1.0, -2, -1, 0], [-0.5, 0, 0, 0], [-1, -1, -1, -1]])
    ref_logprobs = torch.tensor([[-1.5, -1, -1, 0], [-1.0, 0, 0, 0], [-1, -2, -1, -1]])
    rewards = ppo.token_rewards(torch.tensor([2.0, -1.0, 0.5]), logprobs, ref_logprobs, mask, 0.1, "k1")
    want = torch.tensor([[-0.05, 0.1, 2.0, 0], [-1.05, 0, 0, 0], [0, -0.1, 0, 0.5]])
    torch.testing.assert_close(rewards, want)
    # The return from the first token is score - kl_coef * the sequence's summed log-ratio.
    torch.testing.assert_close(rewards.sum(1), torch.tensor([2.0 - 0.1 * -0.5, -1.0 - 0.1 * 0.5, 0.5 - 0.1 * 1.0]))


def test_values_are_read_at_the_state_before_each_token(llama_world):
    """V(s_t) is the value head at the last token of prompt + y_<t (the token before y_t), like a prefix score."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_world.policy)
    rm = AutoModelForSequenceClassification.from_pretrained(llama_world.reward, dtype=torch.float32).eval()
    query, query_mask = ppo.left_pad(
        [tok("the red cat")["input_ids"], tok("a dog")["input_ids"]], tok.pad_token_id, "cpu"
    )
    responses, resp_mask = torch.tensor([[7, 8, 9], [11, 12, 13]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        values = ppo.get_values(rm, query, query_mask, responses, resp_mask, NO_AUTOCAST)
        for t in range(3):
            prefix = (
                ppo.get_scores(rm, query, query_mask, responses[:, :t], resp_mask[:, :t], NO_AUTOCAST)
                if t
                else ppo.get_scores(
                    rm, query[:, :-1], query_mask[:, :-1], query[:, -1:], query_mask[:, -1:], NO_AUTOCAST
                )
            )
            for b in range(2):
                if resp_mask[b, t]:
                    assert values[b, t].item() == pytest.approx(prefix[b].item(), abs=1e-5)


def test_value_loss_weight_scales_only_the_value_models_gradient(llama_world, tmp_path, monkeypatch):
    """--vf-coef scales the value model's gradient alone. The clip ranges differ (the policy's too wide to clip, the
    value's too narrow not to): each must reach its own loss, --clip-coef the ratio's, --vf-clip-coef the values'.
    With --whiten-rewards, GAE gets rewards of unit variance over the real tokens, their mean kept. The logged update
    statistics are the means over the 16 minibatches, and ppo/explained_variance is 1 - Var(R - V) / Var(R)."""
    grads = {}
    for vf_coef in ["0.1", "0.2"]:
        steps = record_optimizer_steps(monkeypatch)
        with record_calls("compute_gae", "ppo_policy_loss", "ppo_value_loss") as calls:
            code, _, stderr = run_main(
                "ppo_rlhf.py",
                *llama_world.args(),
                *TINY,
                "--total-episodes",
                "16",
                "--vf-coef",
                vf_coef,
                "--max-grad-norm",
                "None",
                "--clip-coef",
                "100",
                "--vf-clip-coef",
                "1e-6",
                "--whiten-rewards",
                "--output-dir",
                str(tmp_path / vf_coef),
                cwd=tmp_path,
            )
        assert code == 0, stderr[-3000:]
        assert len(calls["compute_gae"]) == 1  # one update
        for call in calls["compute_gae"]:
            rewards, mask = call["rewards"], call["mask"]
            assert ppo.masked_var(rewards, mask).item() == pytest.approx(1.0, rel=1e-4)
            assert abs(ppo.masked_mean(rewards, mask).item()) > 1e-3  # not shifted to 0
        grads[vf_coef] = steps[0]["grads"]
        train = next(r for r in read_jsonl(tmp_path / vf_coef / "metrics.jsonl") if "ppo/clipfrac" in r)
        assert train["ppo/clipfrac"] == 0 and train["ppo/value_clipfrac"] > 0.5, train
        minibatches = [c["return"][1] for c in calls["ppo_policy_loss"] + calls["ppo_value_loss"]]  # their stats
        assert len(minibatches) == 2 * 16
        for key in ["ppo/approxkl", "ppo/ratio_mean", "ppo/value_clipfrac"]:
            values = [stats[key] for stats in minibatches if key in stats]
            assert len(values) == 16 and train[key] == pytest.approx(sum(values) / 16, rel=1e-6)
        gae = calls["compute_gae"][0]
        returns, values, mask = gae["return"][1], gae["values"], gae["mask"]
        explained = 1 - ppo.masked_var(returns - values, mask) / ppo.masked_var(returns, mask)
        assert train["ppo/explained_variance"] == pytest.approx(explained.item(), rel=1e-5)
    from transformers import AutoModelForCausalLM

    n_policy = len(
        list(AutoModelForCausalLM.from_pretrained(llama_world.policy).parameters())
    )  # params = policy + value
    for i, (a, b) in enumerate(zip(grads["0.1"], grads["0.2"])):
        torch.testing.assert_close(b, a if i < n_policy else 2 * a, atol=1e-7, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads["0.1"][n_policy:])


def test_advantages_are_whitened_so_the_reward_scale_does_not_change_the_policy_step(
    llama_world, tmp_path, monkeypatch
):
    """N details #7: with the rewards (and so the values and advantages) ten times larger, the whitened advantages,
    and the first policy gradient with them, are the same. At a temperature that is not 1, the one minibatch is on
    policy: the update's log-probs are the rollout's, both at --temperature (ratio 1 exactly). GAE gets --gamma and
    --lam, each in its place (0.9 and 0.6: neither the other nor 1 minus the other; the defaults 1 and 0.95 would hide
    a swap from the convergence test)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    scaled = tmp_path / "scaled_rm"
    rm = AutoModelForSequenceClassification.from_pretrained(llama_world.reward)
    with torch.no_grad():
        rm.score.weight.mul_(10.0)  # score = w . h: ten times the score, and ten times the initial values
    rm.save_pretrained(scaled)
    AutoTokenizer.from_pretrained(llama_world.reward).save_pretrained(scaled)
    grads = []
    for reward in [llama_world.reward, str(scaled)]:
        steps = record_optimizer_steps(monkeypatch)
        with record_calls("compute_gae", "ppo_policy_loss", "ppo_value_loss") as calls:
            code, _, stderr = run_main(
                "ppo_rlhf.py",
                *llama_world.args(),
                *TINY,
                "--reward-model-name",
                reward,
                "--gamma",
                "0.9",
                "--lam",
                "0.6",
                "--kl-coef",
                "0",
                "--missing-eos-penalty",
                "None",
                "--vf-coef",
                "0",
                "--num-ppo-epochs",
                "1",
                "--num-minibatches",
                "1",
                "--max-grad-norm",
                "None",
                "--temperature",
                "0.7",
                "--output-dir",
                str(tmp_path / f"run{len(grads)}"),
                cwd=tmp_path,
            )
        assert code == 0, stderr[-3000:]
        assert [(c["gamma"], c["lam"]) for c in calls["compute_gae"]] == [(0.9, 0.6)] * 2  # one call per update
        grads.append(steps[0]["grads"])
        train = next(r for r in read_jsonl(tmp_path / f"run{len(grads) - 1}" / "metrics.jsonl") if "ppo/approxkl" in r)
        assert train["ppo/approxkl"] < 1e-12 and train["ppo/ratio_mean"] == pytest.approx(1.0, abs=1e-6), train
    policy_grads = [(a, b) for a, b in zip(*grads) if a.abs().sum() > 0]  # the value model's are 0 (vf_coef 0)
    assert policy_grads
    for a, b in policy_grads:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-3)
