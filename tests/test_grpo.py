"""grpo_rlhf.py: the group advantages, each loss type and the clip against plain loops, the exact expected gradient of
the unbiased settings, and convergence to pi* with them."""

import itertools
import math

import pytest
import torch

import grpo_rlhf as grpo
from tests import enumeration as en
from tests.helpers import TINY, read_jsonl, record_calls, run_main

BETA = 0.7


@pytest.mark.parametrize("scale_rewards", [True, False])
@pytest.mark.parametrize("k", [2, 4])
def test_group_advantages_match_a_naive_loop(k, scale_rewards):
    rewards = torch.randn(5 * k, generator=torch.Generator().manual_seed(0))
    rewards[:k] = 0.5  # a group whose responses all score the same: advantages 0, not NaN
    advantages, reward_std = grpo.grpo_advantages(rewards, k, scale_rewards)
    for i in range(len(rewards)):
        group = [rewards[j].item() for j in range(i - i % k, i - i % k + k)]
        mean = sum(group) / k
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (k - 1))  # Bessel's correction, as TRL's torch.std
        want = (rewards[i].item() - mean) / (std + 1e-4 if scale_rewards else 1.0)
        assert advantages[i].item() == pytest.approx(want, abs=1e-5)
        assert reward_std[i].item() == pytest.approx(std, abs=1e-6)
    assert advantages[:k].abs().max() == 0


def test_the_unscaled_advantage_is_rloos_shrunk_by_k_minus_one_over_k():
    import rloo_rlhf as rloo

    rewards, k = torch.randn(12, generator=torch.Generator().manual_seed(1)), 4
    torch.testing.assert_close(
        grpo.grpo_advantages(rewards, k, False)[0], (k - 1) / k * rloo.rloo_advantages(rewards, k)[0]
    )


def loop_loss(logprobs, old_logprobs, advantages, mask, eps_low, eps_high, loss_type, max_length):
    """The loss of each --loss-type written as its paper states it, by a loop over responses i and tokens t."""
    n = len(logprobs)
    token_losses = [[] for _ in range(n)]
    for i in range(n):
        for t in range(logprobs.shape[1]):
            if mask[i, t]:
                ratio = torch.exp(logprobs[i, t] - old_logprobs[i, t])
                clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
                token_losses[i].append(-torch.min(ratio * advantages[i], clipped * advantages[i]))
    if loss_type == "grpo":  # 1/G sum_i 1/|o_i| sum_t (Shao et al. 2024, eq. 3)
        return sum(sum(ls) / len(ls) for ls in token_losses) / n
    if loss_type == "dr_grpo":  # 1/G sum_i sum_t / max length
        return sum(sum(ls) for ls in token_losses) / (n * max_length)
    return sum(sum(ls) for ls in token_losses) / sum(len(ls) for ls in token_losses)  # dapo: 1/sum_i |o_i| sum_i sum_t


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_each_loss_type_matches_a_plain_loop_over_responses_and_tokens(loss_type):
    """Responses of lengths 1-5 (of 6), ratios off 1 on both sides of an asymmetric clip, advantages of both signs:
    the loss and its gradient with respect to every token's log-prob are the loop's."""
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([5, 1, 3, 2, 4, 5])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).float()
    old = -torch.rand(6, 6, generator=g) * 3
    new = (old + (torch.rand(6, 6, generator=g) - 0.5)).requires_grad_()  # ratios in [e^-0.5, e^0.5]
    advantages = torch.tensor([1.0, -1.0, 0.5, -2.0, 0.0, 1.5])
    weights = grpo.response_weights(mask, loss_type, max_length=6)
    loss, stats = grpo.grpo_policy_loss(new, old, advantages, weights, mask, 0.2, 0.28)
    want = loop_loss(new, old, advantages, mask, 0.2, 0.28, loss_type, 6)
    assert loss.item() == pytest.approx(want.item(), abs=1e-6) and stats["loss/policy"] == pytest.approx(want.item())
    torch.testing.assert_close(torch.autograd.grad(loss, new)[0], torch.autograd.grad(want, new)[0])


def test_the_clip_stops_the_gradient_only_past_the_bound_the_advantage_pushes_towards():
    """eps_low 0.2, eps_high 0.28 (DAPO's): a token with A > 0 keeps its gradient up to ratio 1.28, one with A < 0 down
    to 0.8; past them, none; on the other side the ratio is not clipped at all. One token per response, grpo type."""
    ratios = torch.tensor([1.25, 1.3, 0.5, 1.25, 1.3, 0.85, 0.75, 1.0])
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 2.0])
    old = torch.full((8, 1), -1.0)
    new = (old + ratios.log()[:, None]).requires_grad_()
    mask = torch.ones(8, 1)
    loss, stats = grpo.grpo_policy_loss(new, old, advantages, grpo.response_weights(mask, "grpo", 1), mask, 0.2, 0.28)
    grad = torch.autograd.grad(loss, new)[0][:, 0]
    # d/dlogp of -A ratio / 8 is -A ratio / 8 where the clip does not act, 0 where it does.
    want = torch.where(torch.tensor([1, 0, 1, 1, 1, 1, 0, 1]).bool(), -advantages * ratios / 8, torch.zeros(8))
    torch.testing.assert_close(grad, want)
    assert stats["grpo/clipfrac"] == pytest.approx(2 / 8)  # 1.3 with A > 0, 0.75 with A < 0
    assert stats["grpo/approxkl"] == pytest.approx(0.5 * (ratios.log() ** 2).mean().item())
    assert stats["grpo/ratio_mean"] == pytest.approx(ratios.mean().item())
    # At ratio 1 nothing is clipped and the gradient is -w_i A_i per token.
    loss, stats = grpo.grpo_policy_loss(old.clone().requires_grad_(), old, advantages, torch.ones(8), mask, 0.2, 0.2)
    assert stats["grpo/clipfrac"] == 0 and stats["grpo/ratio_mean"] == 1


def expected_grpo_gradient(k, scores, loss_type, scale_rewards, estimator, kl_in):
    """sum over every ordered draw of k two-token responses of P(draw) * grad loss(draw), exactly, for the loss
    grpo_rlhf.py minimises on one prompt's k responses (on policy: ratio 1). Each draw is its own batch (the loss
    weights and the scaled advantages depend on the whole draw), so the sum runs over the draws one by one."""
    first, second = en.tabular_policy(0)
    ref_first, ref_second = en.tabular_policy(1)
    logp, _ = en.token_logprobs(first, second)  # [V*V, 2]
    ref_logp, _ = en.token_logprobs(ref_first.detach(), ref_second.detach())
    probs = logp.sum(1).exp().detach()
    total = 0.0
    for draw in itertools.product(range(len(probs)), repeat=k):
        lp, rlp, mask = logp[list(draw)], ref_logp[list(draw)], torch.ones(k, 2)
        rewards = grpo.sequence_rewards(
            scores[list(draw)], lp.detach(), rlp, mask, BETA * (kl_in == "reward"), estimator
        )
        advantages, _ = grpo.grpo_advantages(rewards, k, scale_rewards)
        weights = grpo.response_weights(mask, loss_type, max_length=2)
        loss, _ = grpo.grpo_policy_loss(lp, lp.detach(), advantages, weights, mask, 0.2, 0.2)
        kl_loss = grpo.aggregate(BETA * (kl_in == "loss") * grpo.kl_penalty(lp, rlp, estimator), weights, mask)
        total = total + probs[list(draw)].prod() * (loss + kl_loss)
    return torch.autograd.grad(total, [first, second])


def test_with_the_unbiased_settings_the_expected_gradient_is_the_true_gradient_shrunk():
    """--loss-type dr_grpo --no-scale-rewards --kl-in reward --kl-estimator k1: E[grad loss] = -(k - 1) / (k L) grad
    (E[score] - beta KL(pi || pi_ref)), L = --response-length: the KL-regularised objective's own direction."""
    k, scores = 2, torch.randn(en.V**2, generator=torch.Generator().manual_seed(3))
    first, second = en.tabular_policy(0)
    ref_first, ref_second = en.tabular_policy(1)
    logp, _ = en.token_logprobs(first, second)
    ref_logp, _ = en.token_logprobs(ref_first.detach(), ref_second.detach())
    seq = logp.sum(1)
    objective = (seq.exp() * (scores - BETA * (seq - ref_logp.sum(1)))).sum()
    want = torch.autograd.grad(objective, [first, second])
    got = expected_grpo_gradient(k, scores, "dr_grpo", False, "k1", "reward")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, -(k - 1) / (k * 2) * w, atol=1e-5, rtol=1e-4)


def test_kl_estimates_are_schulmans_formulas():
    """Values, not only gradients: a constant added to k3 would leave every gradient of a two-token test alone."""
    logp, ref_logp = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    log_r = logp - ref_logp  # log pi / pi_ref
    torch.testing.assert_close(grpo.kl_penalty(logp, ref_logp, "k1"), log_r)
    torch.testing.assert_close(grpo.kl_penalty(logp, ref_logp, "k2"), log_r**2 / 2)
    torch.testing.assert_close(grpo.kl_penalty(logp, ref_logp, "k3"), (-log_r).exp() - 1 + log_r)
    assert grpo.kl_penalty(logp, ref_logp, "k3")[2] == 0 and (grpo.kl_penalty(logp, ref_logp, "k3") >= 0).all()


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_option_gradients_match_their_docstring(estimator, kl_in):
    """With scores 0 the expected gradient is the KL term's alone: the one kl_penalty's docstring names (the RLOO
    script's, tests/test_rloo.py), here shrunk by the constant weight 1 / L of dr_grpo and, in the reward, by the
    (k - 1) / k of an advantage whose baseline includes the response."""
    k, length = 2, 2
    got = expected_grpo_gradient(k, torch.zeros(en.V**2), "dr_grpo", False, estimator, kl_in)
    factor = (k - 1) / (k * length) if kl_in == "reward" else 1 / length
    for g, w in zip(got, en.named_gradient(estimator, kl_in, BETA)):
        torch.testing.assert_close(g, factor * w, atol=1e-5, rtol=1e-4)


def test_grpos_defaults_do_not_follow_the_true_gradient():
    """Std scaling and k3 in the loss: the expected gradient is not parallel to the objective's (a check that the test
    above can tell the settings apart). Its direction is 21 degrees off here (k3 in the loss alone: 25)."""
    k, scores = 2, torch.randn(en.V**2, generator=torch.Generator().manual_seed(3))
    unbiased = expected_grpo_gradient(k, scores, "dr_grpo", False, "k1", "reward")
    defaults = expected_grpo_gradient(k, scores, "grpo", True, "k3", "loss")
    a, b = torch.cat([g.flatten() for g in unbiased]), torch.cat([g.flatten() for g in defaults])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) < math.cos(math.radians(5))


def test_tinyworld_run_logs_grpos_statistics_with_every_loss_type_and_the_clip(tinyworld, tmp_path):
    for loss_type in ["dr_grpo", "dapo"]:
        out = tmp_path / loss_type
        flags = ["--loss-type", loss_type, "--num-ppo-epochs", "2", "--clip-coef-high", "0.28", "--no-scale-rewards"]
        code, _, stderr = run_main(
            "grpo_rlhf.py", *tinyworld.args(), *TINY, *flags, "--output-dir", str(out), cwd=tmp_path
        )
        assert code == 0, stderr[-2000:]
        train = [r for r in read_jsonl(out / "metrics.jsonl") if "update" in r]
        keys = ["grpo/clipfrac", "grpo/approxkl", "grpo/reward_std", "grpo/length_advantage_pos", "loss/policy"]
        assert all(key in r and math.isfinite(r[key]) for r in train for key in keys)
        assert any(r["grpo/approxkl"] > 0 for r in train)  # the second epoch is off policy


def test_batch_size_must_divide_by_the_group_size(tmp_path):
    code, _, stderr = run_main("grpo_rlhf.py", *TINY, "--total-episodes", "36", "--batch-size", "6", cwd=tmp_path)
    assert code != 0 and "--num-generations" in stderr and not (tmp_path / "runs").exists()


def test_the_loop_feeds_its_kl_term_the_reference_and_logs_the_groups_statistics(tinyworld, tmp_path):
    """Three updates with a step large enough to move the policy: each update's KL term in the loss reads that rollout's
    reference log-probs (not its sampling log-probs, which differ once the policy has moved), and each record's group
    statistics are those of its rollout: the mean reward std, the share of groups with none, the lengths by the sign of
    the advantage."""
    out = tmp_path / "run"
    flags = ["--total-episodes", "48", "--learning-rate", "1e-2", "--num-ppo-epochs", "2", "--output-dir", str(out)]
    with record_calls("sequence_rewards", "grpo_advantages", "kl_penalty") as calls:
        code, _, stderr = run_main("grpo_rlhf.py", *tinyworld.args(), *TINY, *flags, cwd=tmp_path)
    assert code == 0, stderr[-2000:]
    rollouts, groups = calls["sequence_rewards"], calls["grpo_advantages"]
    kl_terms = [c for c in calls["kl_penalty"] if c["logprobs"].requires_grad]
    assert len(rollouts) == len(groups) == 3 and len(kl_terms) == 3 * 2
    for u, rollout in enumerate(rollouts):
        for term in kl_terms[2 * u : 2 * u + 2]:  # the same rows, shuffled: compare their sums
            assert term["ref_logprobs"].sum().item() == pytest.approx(rollout["ref_logprobs"].sum().item(), rel=1e-6)
    assert any(r["ref_logprobs"].sum() != r["logprobs"].sum() for r in rollouts[1:])  # the policy has moved
    train = [r for r in read_jsonl(out / "metrics.jsonl") if "update" in r]
    for record, rollout, group in zip(train, rollouts, groups, strict=True):
        advantages, reward_std = group["return"]
        lengths = rollout["mask"].sum(1)
        assert record["grpo/reward_std"] == pytest.approx(reward_std.mean().item())
        assert record["grpo/zero_std_frac"] == pytest.approx((reward_std == 0).float().mean().item())
        for sign, pick in [("pos", advantages > 0), ("neg", advantages < 0)]:
            want = lengths[pick].mean().item() if pick.any() else -1.0
            assert record[f"grpo/length_advantage_{sign}"] == pytest.approx(want)
    assert any(r["grpo/length_advantage_pos"] != r["grpo/length_advantage_neg"] for r in train)
