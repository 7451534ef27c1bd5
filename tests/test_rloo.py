"""rloo_rlhf.py: the leave-one-out baseline, the exact expected gradient, and convergence to pi*."""

import itertools
import math

import pytest
import torch

import rloo_rlhf as rloo
from tests import enumeration as en
from tests.helpers import TINY, read_jsonl, record_calls, record_optimizer_steps, run_main, run_script

BETA = 0.7


@pytest.mark.parametrize("k", [2, 4])
def test_leave_one_out_baseline_matches_a_naive_loop(k):
    torch.manual_seed(0)
    rewards = torch.randn(5 * k)
    advantages, baselines = rloo.rloo_advantages(rewards, k)
    for i in range(len(rewards)):
        group = range(i - i % k, i - i % k + k)
        others = [rewards[j].item() for j in group if j != i]
        assert baselines[i].item() == pytest.approx(sum(others) / (k - 1), abs=1e-6)
        assert advantages[i].item() == pytest.approx(rewards[i].item() - sum(others) / (k - 1), abs=1e-6)
    mean = rewards.view(-1, k).mean(1, keepdim=True)
    torch.testing.assert_close(advantages, (k / (k - 1) * (rewards.view(-1, k) - mean)).flatten())


def expected_rloo_gradient(k, estimator, kl_in, scores):
    """sum over every ordered draw of k responses of P(draw) * grad loss(draw), exactly.

    loss(draw) is what rloo_rlhf.py minimises on a batch holding one prompt's k responses. On policy the
    loss is linear in the advantages, so the weighted sum over draws is one batch whose advantages carry
    the weight P(draw) * (number of draws): rloo_policy_loss averages over that batch.
    """
    first, second = en.tabular_policy(0)
    ref_first, ref_second = en.tabular_policy(1)
    logp, _ = en.token_logprobs(first, second)  # [V*V, 2]
    ref_logp, _ = en.token_logprobs(ref_first.detach(), ref_second.detach())
    probs = logp.sum(1).exp().detach()
    draws = torch.tensor(list(itertools.product(range(len(probs)), repeat=k))).flatten()  # groups of k, in a row
    lp, rlp = logp[draws], ref_logp[draws]
    rewards = rloo.sequence_rewards(
        scores[draws], lp.detach(), rlp, torch.ones_like(lp), BETA if kl_in == "reward" else 0.0, estimator
    )
    advantages, _ = rloo.rloo_advantages(rewards, k)
    draw_weight = probs[draws].view(-1, k).prod(1).repeat_interleave(k) * (len(draws) // k)
    seq_logp = lp.sum(1)
    loss, *_ = rloo.rloo_policy_loss(seq_logp, seq_logp.detach(), advantages * draw_weight, 0.2, "two-sided")
    # The loop adds sequence_kl_loss; each draw's term is weighted by its probability like the advantages.
    loss = loss + rloo.sequence_kl_loss(
        lp, rlp, draw_weight[:, None].expand_as(lp), BETA if kl_in == "loss" else 0.0, estimator
    )
    return torch.autograd.grad(loss, [first, second])


@pytest.mark.parametrize("k", [2, 3])
def test_expected_gradient_is_the_true_gradient_of_the_kl_regularised_objective(k):
    """E[grad loss] = -grad (E[score] - beta KL(pi || pi_ref)): the leave-one-out baseline adds no bias."""
    scores = torch.randn(en.V**2, generator=torch.Generator().manual_seed(3))
    first, second = en.tabular_policy(0)
    ref_first, ref_second = en.tabular_policy(1)
    logp, _ = en.token_logprobs(first, second)
    ref_logp, _ = en.token_logprobs(ref_first.detach(), ref_second.detach())
    seq = logp.sum(1)
    objective = (seq.exp() * (scores - BETA * (seq - ref_logp.sum(1)))).sum()  # exact, by enumeration
    want = torch.autograd.grad(objective, [first, second])
    got = expected_rloo_gradient(k, "k1", "reward", scores)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, -w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_option_gradients_match_their_docstring(estimator, kl_in):
    """With scores 0 the expected gradient is the KL term's alone: the one kl_penalty's docstring names."""
    got = expected_rloo_gradient(2, estimator, kl_in, torch.zeros(en.V**2))
    for g, w in zip(got, en.named_gradient(estimator, kl_in, BETA)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_clipping_acts_only_from_the_second_epoch():
    seq_old = torch.tensor([-3.0, -2.0, -1.0])
    advantages = torch.tensor([1.0, -1.0, 2.0])
    seq_new = seq_old.clone().requires_grad_()
    loss, stats = rloo.rloo_policy_loss(seq_new, seq_old, advantages, 0.2, "two-sided")
    assert stats["rloo/clipfrac"] == 0 and stats["rloo/ratio_mean"] == 1 and stats["rloo/approxkl"] == 0
    assert loss.item() == pytest.approx(-advantages.mean().item())  # the ratio loss's value: not what is reported
    assert stats["loss/policy"] == pytest.approx(-(advantages * seq_old).mean().item())  # the REINFORCE loss
    torch.testing.assert_close(torch.autograd.grad(loss, seq_new)[0], -advantages / 3)  # plain REINFORCE
    seq_new = (seq_old + torch.tensor([0.5, -0.5, 0.0])).requires_grad_()  # ratios e^0.5, e^-0.5, 1
    loss, stats = rloo.rloo_policy_loss(seq_new, seq_old, advantages, 0.2, "two-sided")
    approxkl, clipfrac, ratio_mean = stats["rloo/approxkl"], stats["rloo/clipfrac"], stats["rloo/ratio_mean"]
    grad = torch.autograd.grad(loss, seq_new)[0]
    # Both moved responses left the range in their advantage's direction: clipped, no gradient; the third is not.
    assert clipfrac == pytest.approx(2 / 3) and grad[0] == 0 and grad[1] == 0 and grad[2] == pytest.approx(-2 / 3)
    assert approxkl == pytest.approx(0.5 * (0.25 + 0.25) / 3) and ratio_mean == pytest.approx(
        (math.exp(0.5) + math.exp(-0.5) + 1) / 3
    )


def one_sided_loop(seq_new, seq_old, advantages, eps):
    """The one-sided loss and its gradient with respect to log pi(y_i | x_i), by a plain loop over the responses:
    loss = -sum_i w_i A_i log pi_i / n and gradient -w_i A_i / n, where w_i = min(r_i, 1 + eps) is a constant."""
    n = len(seq_new)
    loss, grad = 0.0, torch.zeros_like(seq_new)
    for i in range(n):
        weight = min(math.exp(seq_new[i].item() - seq_old[i].item()), 1 + eps)
        loss -= weight * advantages[i].item() * seq_new[i].item() / n
        grad[i] = -weight * advantages[i].item() / n
    return loss, grad


def test_one_sided_clip_matches_a_plain_loop_over_sequences():
    # Sequence ratios below 1 - eps, inside the range and above 1 + eps, with advantages of both signs.
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1, 0.9, 3.0, 1.25])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, -0.5, 0.3, -2.0])
    seq_old = -torch.linspace(2.0, 9.0, 8)
    seq_new = (seq_old + ratios.log()).requires_grad_()
    loss, stats = rloo.rloo_policy_loss(seq_new, seq_old, advantages, 0.2, "one-sided")
    want_loss, want_grad = one_sided_loop(seq_new.detach(), seq_old, advantages, 0.2)
    assert loss.item() == pytest.approx(want_loss)
    torch.testing.assert_close(torch.autograd.grad(loss, seq_new)[0], want_grad)
    assert stats["rloo/clipfrac"] == 0.5  # truncated weights: ratios 1.5, 1.5, 3.0, 1.25 of 8
    assert stats["rloo/ratio_mean"] == pytest.approx(10.25 / 8)
    assert stats["rloo/approxkl"] == pytest.approx(0.5 * (ratios.log() ** 2).mean().item())
    assert stats["loss/policy"] == pytest.approx(-(advantages * seq_new).mean().item())  # the REINFORCE loss, as ever


def test_at_ratio_one_both_clip_modes_give_plain_reinforce():
    seq_old, advantages = torch.tensor([-3.0, -2.0, -1.0]), torch.tensor([1.0, -1.0, 2.0])
    for clip_mode in ["two-sided", "one-sided"]:
        seq_new = seq_old.clone().requires_grad_()
        loss, stats = rloo.rloo_policy_loss(seq_new, seq_old, advantages, 0.2, clip_mode)
        torch.testing.assert_close(torch.autograd.grad(loss, seq_new)[0], -advantages / 3)
        assert stats["rloo/clipfrac"] == 0 and stats["rloo/ratio_mean"] == 1
        if clip_mode == "one-sided":  # weight 1: the loss is the REINFORCE loss that "loss/policy" reports
            assert loss.item() == pytest.approx(stats["loss/policy"])


def test_one_sided_clip_keeps_the_gradient_where_the_two_sided_clip_stops_it():
    """The inputs of the second half of test_clipping_acts_only_from_the_second_epoch: ratios e^0.5, e^-0.5, 1."""
    seq_old, advantages = torch.tensor([-3.0, -2.0, -1.0]), torch.tensor([1.0, -1.0, 2.0])
    grads, clipfracs = {}, {}
    for clip_mode in ["two-sided", "one-sided"]:
        seq_new = (seq_old + torch.tensor([0.5, -0.5, 0.0])).requires_grad_()
        loss, stats = rloo.rloo_policy_loss(seq_new, seq_old, advantages, 0.2, clip_mode)
        grads[clip_mode], clipfracs[clip_mode] = torch.autograd.grad(loss, seq_new)[0], stats["rloo/clipfrac"]
    # Two-sided: A > 0 above 1 + eps and A < 0 below 1 - eps get no gradient. One-sided: -min(r, 1.2) A / 3 for
    # every response, so the first is still pushed up (weight 1.2) and the second still down (weight e^-0.5).
    torch.testing.assert_close(grads["two-sided"], torch.tensor([0.0, 0.0, -2 / 3]))
    torch.testing.assert_close(grads["one-sided"], torch.tensor([-1.2 / 3, math.exp(-0.5) / 3, -2 / 3]))
    assert clipfracs == {"two-sided": pytest.approx(2 / 3), "one-sided": pytest.approx(1 / 3)}


def test_clip_mode_reaches_the_loss_the_first_epoch_agrees_and_the_second_does_not(worlds, tmp_path, monkeypatch):
    """--clip-mode one-sided runs end to end; the first epoch is on policy (ratio 1: the same REINFORCE gradient in both
    modes), and once the policy has moved (a large learning rate) the second epoch's clips act differently."""
    grads, records = {}, {}
    for clip_mode in ["two-sided", "one-sided"]:
        steps = record_optimizer_steps(monkeypatch)
        out = tmp_path / clip_mode
        code, _, stderr = run_main(
            "rloo_rlhf.py",
            *worlds["llama"].args(),
            *TINY,
            "--total-episodes",
            "16",
            "--num-ppo-epochs",
            "2",
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
    assert len(grads["one-sided"]) == 2  # one optimizer step per epoch
    for a, b in zip(grads["two-sided"][0], grads["one-sided"][0]):
        torch.testing.assert_close(a, b)
    assert max((a - b).abs().max().item() for a, b in zip(grads["two-sided"][1], grads["one-sided"][1])) > 1e-3
    train = [r for r in records["one-sided"] if "rloo/clipfrac" in r]
    assert train and train[0]["rloo/clipfrac"] > 0  # some weights were truncated in the second epoch


def test_tinyworld_run_with_clipping_and_options(tinyworld, tmp_path):
    """The default world, with the gold RM, two epochs (clip on), KL in the loss and normalised advantages."""
    out = tmp_path / "run"
    result = run_script(
        "rloo_rlhf.py",
        *tinyworld.args(),
        *TINY,
        "--num-ppo-epochs",
        "2",
        "--kl-estimator",
        "k2",
        "--kl-in",
        "loss",
        "--normalize-advantage",
        "--ref-sync-every",
        "1",
        "--output-dir",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert all("eval/gold_scores" in r for r in records if "eval/scores" in r)
    train = [r for r in records if "objective/scores" in r]
    assert all({"rloo/clipfrac", "rloo/approxkl", "rloo/ratio_mean"} <= set(r) for r in train)
    assert train[-1]["rloo/approxkl"] > 0  # the second epoch saw a changed policy
    assert all(r["rloo/advantage_std"] == pytest.approx(1.0, abs=1e-4) for r in train)  # --normalize-advantage


def test_the_update_reads_the_rollouts_log_probs_at_a_temperature_that_is_not_one(worlds, tmp_path):
    """Two passes with a vanishing learning rate: both are on policy (ratio 1), which holds only if the update's
    log-probs are at --temperature like the rollout's (at temperature 1 any mix-up of the two would go unseen)."""
    out = tmp_path / "run"
    flags = ["--total-episodes", "16", "--num-ppo-epochs", "2", "--learning-rate", "1e-12", "--temperature", "0.7"]
    code, _, stderr = run_main(
        "rloo_rlhf.py", *worlds["llama"].args(), *TINY, *flags, "--output-dir", str(out), cwd=tmp_path
    )
    assert code == 0, stderr[-3000:]
    train = next(r for r in read_jsonl(out / "metrics.jsonl") if "rloo/approxkl" in r)
    assert train["rloo/approxkl"] < 1e-12 and train["rloo/ratio_mean"] == pytest.approx(1.0, abs=1e-6), train


def test_with_the_kl_in_the_loss_each_step_minimises_the_policy_loss_plus_the_kl_loss(worlds, tmp_path):
    """--kl-in loss: the loss of each step is the policy loss plus the KL loss. The KL loss is 0 with the KL in the
    reward (the default) and at the first step (pi = pi_ref), where its sign could not show: two updates, k3 (> 0)."""
    out = tmp_path / "run"
    flags = ["--kl-in", "loss", "--kl-estimator", "k3", "--kl-coef", "0.5", "--learning-rate", "1e-2"]
    with record_calls("check_finite", "rloo_policy_loss", "sequence_kl_loss") as calls:
        code, _, stderr = run_main(
            "rloo_rlhf.py", *worlds["llama"].args(), *TINY, *flags, "--output-dir", str(out), cwd=tmp_path
        )
    assert code == 0, stderr[-3000:]
    losses = [call["loss"].item() for call in calls["check_finite"]]
    policy_losses = [call["return"][0].item() for call in calls["rloo_policy_loss"]]
    kl_losses = [call["return"].item() for call in calls["sequence_kl_loss"]]
    assert len(losses) == len(policy_losses) == len(kl_losses) == 2 and kl_losses[1] > 1e-6
    assert losses == pytest.approx([p + k for p, k in zip(policy_losses, kl_losses)], rel=1e-6, abs=1e-9)


def test_logged_policy_loss_is_the_reinforce_loss_not_the_zero_ratio_loss(worlds, tmp_path):
    out = tmp_path / "run"
    code, _, stderr = run_main("rloo_rlhf.py", *worlds["llama"].args(), *TINY, "--output-dir", str(out), cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    train = [r for r in read_jsonl(out / "metrics.jsonl") if "loss/policy" in r]
    # The ratio loss is 0 up to rounding on a first pass (its advantages sum to 0 per prompt); this one is not.
    assert all(abs(r["loss/policy"]) > 1e-3 for r in train)
    # The mean leave-one-out baseline is the mean reward: at the first update (KL 0) the mean score.
    assert train[0]["rloo/baseline_mean"] == pytest.approx(train[0]["objective/scores"], rel=1e-5, abs=1e-6)
    assert not any("rloo/clipfrac" in r for r in train)  # one pass: the ratio is 1, its statistics are not logged


def test_sequence_rewards_subtract_the_kl_summed_over_real_tokens_only():
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    logprobs = torch.tensor([[-1.0, -2, -9], [-1, -1, -1]])  # the -9 is padding: it must not count
    ref_logprobs = torch.tensor([[-1.5, -1, 0], [-1, -2, -1]])
    rewards = rloo.sequence_rewards(torch.tensor([2.0, 0.5]), logprobs, ref_logprobs, mask, 0.1, "k1")
    torch.testing.assert_close(rewards, torch.tensor([2.0 - 0.1 * (0.5 - 1.0), 0.5 - 0.1 * 1.0]))
