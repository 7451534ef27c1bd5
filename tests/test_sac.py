"""sac_rlhf.py: critic targets and policy loss against brute-force loops over the vocabulary, the policy loss's
minimiser, both critic designs, the replay buffer and target updates; convergence to pi* is in test_convergence.py."""

import pytest
import torch

import sac_rlhf as sac
from tests import enumeration as en
from tests.helpers import (
    NO_AUTOCAST,
    TINY,
    caller_snapshots,
    read_jsonl,
    record_calls,
    record_optimizer_steps,
    run_main,
)


def random_distributions(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(2 * torch.randn(*shape, generator=g), -1)


# ---------------------------------------------------------------------------------------------
# Soft value, critic targets, policy loss: plain loops over states, heads and vocabulary
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,beta", [(0.0, 0.1), (0.3, 0.05), (0.2, 0.0)])
def test_policy_loss_matches_a_loop_over_the_vocabulary(alpha, beta):
    """(The soft value is checked through critic_targets, against the textbook formula, below.)"""
    B, T, V = 3, 4, 7
    logp, ref_logp = random_distributions((B, T, V), 0), random_distributions((B, T, V), 1)
    q = torch.randn(B, T, 2, V, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    q_min = q.min(2).values
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            pl = 0.0
            for a in range(V):
                p, lp, lr = logp[b, t, a].exp().item(), logp[b, t, a].item(), ref_logp[b, t, a].item()
                qa = min(q[b, t, 0, a].item(), q[b, t, 1, a].item())
                pl += p * ((alpha + beta) * lp - beta * lr - qa)
            if mask[b, t]:
                total, count = total + pl, count + 1
    # The loss averages over real states (not over the vocabulary, not over padding).
    assert sac.sac_policy_loss(logp, ref_logp, q_min, alpha, beta, mask).item() == pytest.approx(
        total / count, abs=1e-5
    )


@pytest.mark.parametrize("n", [1, 2, 3, 6])  # 6: longer than the responses
def test_critic_targets_match_the_textbook_formula_written_out_over_the_vocabulary(n):
    """y_t = r_t + sum_{1<=i<n} g^i [r + alpha H(pi) - beta KL(pi || pi_ref)](s_{t+i}) + g^n V(s_{t+n}), with
    V(s) = sum_a pi(a|s) [min_j Qbar_j(s, a) - (alpha + beta) log pi(a|s) + beta log pi_ref(a|s)]; the episode ends
    at its last real token, where the reward is the score (n = 1: r + gamma (1 - done) V(s'))."""
    B, T, V, alpha, beta, gamma = 2, 4, 5, 0.1, 0.2, 0.95
    logp, ref_logp = random_distributions((B, T, V), 3), random_distributions((B, T, V), 4)
    q_target = torch.randn(B, T, 2, V, generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    rewards = torch.tensor([[0.0, 0, 0, 1.5], [0, -2.0, 0, 0]])  # the score at the last real token
    got = sac.critic_targets(q_target, logp, ref_logp, torch.tensor([1.5, -2.0]), mask, alpha, beta, gamma, n)

    def bonus(b, t):  # alpha H - beta KL at s_t
        p, lp, lr = logp[b, t].exp(), logp[b, t], ref_logp[b, t]
        return sum(p[a] * (-(alpha + beta) * lp[a] + beta * lr[a]) for a in range(V)).item()

    def value(b, t):
        q_min = [min(q_target[b, t, 0, a], q_target[b, t, 1, a]).item() for a in range(V)]
        return sum(logp[b, t, a].exp().item() * q_min[a] for a in range(V)) + bonus(b, t)

    for b in range(B):
        L = int(mask[b].sum())
        for t in range(T):
            want = 0.0
            for i in range(n):
                if t + i < L:
                    want += gamma**i * (rewards[b, t + i].item() + (bonus(b, t + i) if i > 0 else 0.0))
            if t + n < L:
                want += gamma**n * value(b, t + n)
            assert got[b, t].item() == pytest.approx(want if t < L else 0.0, abs=1e-5), (n, b, t)


@pytest.mark.parametrize("alpha,beta", [(0.0, 0.1), (0.05, 0.1), (0.5, 0.05)])
def test_policy_loss_minimiser_is_the_tempered_reference_times_exp_q(alpha, beta):
    """With Q fixed, a free softmax trained on the loss reaches pi_ref^(beta/(alpha+beta)) exp(Q/(alpha+beta)) / Z."""
    V = 6
    ref_logp = random_distributions((1, 1, V), 6)
    q = 0.3 * torch.randn(1, 1, V, generator=torch.Generator().manual_seed(7))
    logits = torch.zeros(1, 1, V, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(3000):
        loss = sac.sac_policy_loss(torch.log_softmax(logits, -1), ref_logp, q, alpha, beta, torch.ones(1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    want = torch.log_softmax(beta / (alpha + beta) * ref_logp + q / (alpha + beta), -1)
    got = torch.log_softmax(logits.detach(), -1)
    assert en.kl(got.flatten(), want.flatten()) < 1e-4
    torch.testing.assert_close(got.exp(), want.exp(), atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Replay buffer, target updates, the critic network
# ---------------------------------------------------------------------------------------------
def test_replay_buffer_keeps_the_newest_whole_responses_and_repads_them():
    pad = 0
    buffer = sac.ReplayBuffer(capacity=4)
    for k in range(3):  # 6 responses into a buffer of 4: the first two are overwritten
        query = torch.tensor([[pad, 5, 6], [7, 8, 9]])
        query_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
        responses = torch.tensor([[10 + k, 2, pad], [20 + k, 21, 22]])
        mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
        buffer.add(query, query_mask, responses, mask, torch.tensor([float(k), 10.0 + k]))
        assert len(buffer) == min(4, 2 * (k + 1))
    assert sorted(x[2] for x in buffer) == [1.0, 2.0, 11.0, 12.0]
    query, query_mask, responses, mask, scores = buffer.sample(4, pad, "cpu")
    assert sorted(scores.tolist()) == [1.0, 2.0, 11.0, 12.0]  # distinct responses
    for i, s in enumerate(scores.tolist()):
        k = int(s) % 10
        if s < 10:  # prompt [5, 6] left-padded, response [10 + k, EOS] right-padded
            assert query[i].tolist() == [pad, 5, 6] and query_mask[i].tolist() == [0, 1, 1]
            assert responses[i].tolist() == [10 + k, 2, pad] and mask[i].tolist() == [1, 1, 0]
        else:
            assert query[i].tolist() == [7, 8, 9] and responses[i].tolist() == [20 + k, 21, 22] and mask[i].sum() == 3
    counts = torch.zeros(4)
    for _ in range(400):  # uniform sampling
        counts[[int(s) % 10 - 1 + 2 * (s >= 10) for s in buffer.sample(1, pad, "cpu")[4].tolist()]] += 1
    assert counts.min() > 60


def test_polyak_update_of_the_target_critic():
    source, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in target.parameters()]
    sac.lerp_parameters(target, source, 0.25)
    for b, s, t in zip(before, source.parameters(), target.parameters()):
        torch.testing.assert_close(t, 0.25 * s + 0.75 * b)
    sac.lerp_parameters(target, source, 1.0)
    for s, t in zip(source.parameters(), target.parameters()):
        torch.testing.assert_close(t, s)


@pytest.mark.parametrize("design", ["heads", "factored"])
def test_critic_starts_at_the_prefix_score_for_every_token_and_ignores_left_padding(design, world):
    """Q_j(s_t, a) = RM score of s_t + a tiny advantage: pi* = pi_ref at the start, on every architecture."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world.policy)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokens = AutoModelForCausalLM.from_pretrained(world.policy).get_output_embeddings().weight.detach()
    vocab = len(tokens)
    rm = AutoModelForSequenceClassification.from_pretrained(world.reward, dtype=torch.float32).eval()
    critic = sac.SoftQNetwork(rm, vocab, tokens if design == "factored" else None).eval()
    prompts = [tok("the red cat")["input_ids"], tok("a dog")["input_ids"]]
    responses, resp_mask = torch.tensor([[7, 8, 9], [11, 12, 13]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    results = []
    with torch.no_grad():
        for extra in [0, 4]:
            query, query_mask = sac.left_pad(prompts, pad_id, "cpu")
            query = torch.cat([torch.full((2, extra), pad_id), query], dim=1)
            query_mask = torch.cat([torch.zeros(2, extra, dtype=torch.long), query_mask], dim=1)
            q = critic(query, query_mask, responses, resp_mask, NO_AUTOCAST)
            results.append(q * resp_mask[:, :, None, None])
        assert q.shape == (2, 3, 2, vocab)
        torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)
        # The state before response token t is prompt + y_<t: its RM score, for every action and both heads.
        for t in range(3):
            prefix_mask = resp_mask.clone()
            prefix_mask[:, t:] = 0
            query, query_mask = sac.left_pad(prompts, pad_id, "cpu")
            if t == 0:
                score = sac.get_scores(
                    rm, query[:, :-1], query_mask[:, :-1], query[:, -1:], query_mask[:, -1:], NO_AUTOCAST
                )
            else:
                score = sac.get_scores(rm, query, query_mask, responses[:, :t], resp_mask[:, :t], NO_AUTOCAST)
            for b in range(2):
                if resp_mask[b, t]:
                    assert (q[b, t] - score[b]).abs().max() < 1e-3
        assert (q[..., 0, :] - q[..., 1, :]).abs().max() > 0  # the twins differ (zero starts would stay equal)


def test_factored_advantage_is_the_unit_token_vector_times_a_state_vector_and_its_size_ignores_the_vocabulary(world):
    """A_j(s, a) = e_a . (W_j h(s) + c_j) / |e_a|, checked by a loop over tokens; its new parameters (W_j, c_j) are
    2 x hidden x d + 2 x d whatever the vocabulary, and the token vectors are not the critic's parameters."""
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(world.reward, dtype=torch.float32).eval()
    hidden = rm.score.in_features
    rm_params = sum(p.numel() for p in rm.parameters())
    tokens = torch.randn(11, 6, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3.0, 11)[:, None]
    tokens[3] = 0.0  # a token with no vector (e.g. a pad id's row) keeps its state's value: A_j = 0
    critic = sac.SoftQNetwork(rm, 11, tokens).eval()
    assert sum(p.numel() for p in critic.parameters()) - rm_params == 2 * hidden * 6 + 2 * 6
    wider = sac.SoftQNetwork(rm, 1000, torch.randn(1000, 6))
    assert sum(p.numel() for p in wider.parameters()) - rm_params == 2 * hidden * 6 + 2 * 6
    with torch.no_grad():
        critic.advantage.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
        critic.advantage.bias.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
        query, query_mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
        responses, resp_mask = torch.tensor([[8, 9]]), torch.ones(1, 2, dtype=torch.long)
        q = critic(query, query_mask, responses, resp_mask, NO_AUTOCAST)
        assert q.shape == (1, 2, 2, 11)
        for t in range(2):  # the state before response token t: prompt + y_<t
            ids = torch.cat([query, responses[:, :t]], dim=1)
            h = sac.backbone_hidden(rm, ids, torch.ones_like(ids), ids[:, :0], ids[:, :0], NO_AUTOCAST)[0, -1]
            for j in range(2):
                state_vector = critic.advantage.weight[6 * j : 6 * j + 6] @ h + critic.advantage.bias[6 * j : 6 * j + 6]
                for a in range(11):
                    advantage = 0.0 if a == 3 else (tokens[a] @ state_vector / tokens[a].norm()).item()
                    assert q[0, t, j, a].item() == pytest.approx(rm.score(h).item() + advantage, rel=1e-4, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------
def test_run_with_options_starts_learning_late_then_tunes_alpha(worlds, tmp_path):
    """--learning-starts delays the updates (no update statistics logged until then); a target entropy far above the
    policy's raises alpha; n-step targets, minibatches and reference resets run. An update's statistics are the means
    over its 4 gradient steps (with one step per update a sum would read the same)."""
    out = tmp_path / "run"
    with record_calls("critic_loss") as calls:
        code, _, stderr = run_main(
            "sac_rlhf.py",
            *worlds["llama"].args(),
            *TINY,
            "--learning-starts",
            "32",
            "--n-step",
            "3",
            "--minibatch-size",
            "8",
            "--target-entropy-scale",
            "10",
            "--autotune",
            "--alpha",
            "0.1",
            "--ref-sync-every",
            "1",
            "--output-dir",
            str(out),
            cwd=tmp_path,
        )
    assert code == 0, stderr[-3000:]
    train = [r for r in read_jsonl(out / "metrics.jsonl") if "objective/scores" in r]
    assert [r["sac/buffer_size"] for r in train] == [16, 32]
    assert "loss/q" not in train[0] and train[0]["sac/alpha"] == pytest.approx(0.1)
    assert train[1]["loss/q"] > 0 and train[1]["sac/alpha"] > 0.1  # entropy below target: alpha goes up
    assert train[1]["sac/entropy_target"] > train[1]["sac/policy_entropy"]
    steps = [call["return"][1] for call in calls["critic_loss"]]  # each step's statistics
    assert len(steps) == 4 and len({s["loss/q"] for s in steps}) == 4
    for key in ["loss/q", "sac/q_mean"]:
        assert train[1][key] == pytest.approx(sum(s[key] for s in steps) / 4, rel=1e-6)


def test_the_entropies_alpha_is_tuned_on_are_the_policys_and_the_references(worlds, tmp_path):
    """With a buffer of one rollout and one gradient step per update, each step's minibatch is the rollout just sampled
    by the policy that takes the step, so the policy entropy alpha is tuned on is the rollout's objective/entropy, and
    the target is the scale times the reference's entropy at those states (computed here from the responses the buffer
    received). At the first update pi = pi_ref; the second, after a large step, tells the two apart. At a temperature
    that is not 1, so the update's log-probs must be at --temperature, like the rollout's."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    flags = [
        *worlds["llama"].args(),
        *TINY,
        "--buffer-size",
        "16",
        "--updates-per-rollout",
        "1",
        "--temperature",
        "0.7",
    ]
    flags += ["--learning-rate", "0.2", "--target-entropy-scale", "0.7", "--output-dir", str(out)]
    with record_calls("add") as calls:
        code, _, stderr = run_main("sac_rlhf.py", *flags, cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    train = [r for r in read_jsonl(out / "metrics.jsonl") if "objective/entropy" in r]
    ref = AutoModelForCausalLM.from_pretrained(worlds["llama"].policy, dtype=torch.float32).eval()
    assert len(train) == len(calls["add"]) == 2
    for record, added in zip(train, calls["add"]):
        states = (added["query"], added["query_mask"], added["responses"], added["mask"].long())
        with torch.no_grad():
            ref_logp = sac.forward_logp_all(ref, *states, 0.7, NO_AUTOCAST)
        ref_entropy = sac.masked_mean(-(ref_logp.exp() * ref_logp).sum(-1), added["mask"]).item()
        assert record["sac/policy_entropy"] == pytest.approx(record["objective/entropy"], rel=1e-4)
        assert record["sac/entropy_target"] == pytest.approx(0.7 * ref_entropy, rel=1e-4)
    moved = train[1]["sac/entropy_target"] - 0.7 * train[1]["sac/policy_entropy"]
    assert abs(moved) > 1e-3 * train[1]["sac/entropy_target"]  # pi != pi_ref at the second update


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_alpha_gets_the_gradient_of_its_loss_through_the_gradient_scaler(precision, worlds, tmp_path, monkeypatch):
    """alpha's loss is alpha (H - target), so d/dlog_alpha = alpha (H - target) at the alpha before the step. Under
    fp16 its gradient comes from the same scaled backward: its optimizer must step through the scaler (which
    unscales it and skips a step whose gradients are inf), and see it unscaled."""
    stepped = []
    scaler_step = torch.amp.GradScaler.step
    monkeypatch.setattr(
        torch.amp.GradScaler, "step", lambda self, opt, *a, **k: stepped.append(opt) or scaler_step(self, opt, *a, **k)
    )
    steps = record_optimizer_steps(monkeypatch)
    out = tmp_path / "run"
    code, _, stderr = run_main(
        "sac_rlhf.py",
        *worlds["llama"].args(),
        *TINY,
        "--total-episodes",
        "48",
        "--mixed-precision",
        precision,
        "--autotune",
        "--alpha",
        "0.1",
        "--updates-per-rollout",
        "1",
        "--output-dir",
        str(out),
        cwd=tmp_path,
    )
    assert code == 0, stderr[-3000:]
    alpha_optimizer = next(s["optimizer"] for s in steps if type(s["optimizer"]) is torch.optim.Adam)
    assert alpha_optimizer in stepped
    alpha_grads = [s["grads"][0].item() for s in steps if s["optimizer"] is alpha_optimizer]
    train = [r for r in read_jsonl(out / "metrics.jsonl") if "sac/alpha" in r]
    alpha_before = [0.1] + [r["sac/alpha"] for r in train[:-1]]
    want = [a * (r["sac/policy_entropy"] - r["sac/entropy_target"]) for a, r in zip(alpha_before, train)]
    assert len(alpha_grads) == 3 and alpha_grads == pytest.approx(want, rel=1e-3, abs=1e-7)


def test_the_factored_critic_and_its_target_read_the_references_own_output_layer(worlds, tmp_path, monkeypatch):
    """--critic factored: the critic and its target copy use pi_ref's output embeddings themselves (no copy of a
    vocab-sized matrix, nothing trained), so they follow the reference's resets (--ref-sync-every)."""
    import copy

    from transformers import AutoModelForCausalLM

    copies, deepcopy = [], copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda x, *a, **k: copies.append((x, deepcopy(x, *a, **k))) or copies[-1][1])
    steps = record_optimizer_steps(monkeypatch)
    flags = [*worlds["llama"].args(), *TINY, "--critic", "factored", "--ref-sync-every", "1"]
    code, _, stderr = run_main("sac_rlhf.py", *flags, "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    critic, critic_target = next((x, y) for x, y in copies if hasattr(x, "token_vectors"))
    assert critic.token_vectors is not None and critic_target.token_vectors is critic.token_vectors
    critic_optimizer = next(
        s["optimizer"]
        for s in steps
        if any(p is critic.advantage.weight for p in s["optimizer"].param_groups[0]["params"])
    )
    assert not any(p is critic.token_vectors for p in critic_optimizer.param_groups[0]["params"])
    # Reset to the trained policy after every update, the reference's output layer moved, and the token vectors too.
    start = AutoModelForCausalLM.from_pretrained(worlds["llama"].policy).get_output_embeddings().weight
    assert critic.token_vectors.shape == start.shape and not torch.equal(critic.token_vectors, start)


def test_the_target_critic_follows_the_critic_at_rate_tau(worlds, tmp_path, monkeypatch):
    """target <- tau * critic + (1 - tau) * target after each critic step, at a rate whose 1 - tau differs (0.25, and 1,
    where 1 - tau = 0 would leave the target where it started), read as the second step starts, after the first update's
    one step: the target's RM backbone and score head sit at lerp(RM, critic, tau) (the critic starts as the RM). And
    one-step targets read the target critic: its rate changes the second critic step's gradient. The targets get
    --gamma 0.9 (the default 1 would hide 1 - gamma and gamma^n from this test), --n-step and --kl-coef as beta."""
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(worlds["llama"].reward, dtype=torch.float32).state_dict()
    grads = {}
    for tau in ["1.0", "0.25"]:
        steps = record_optimizer_steps(monkeypatch)
        out = tmp_path / tau

        def take(caller):  # the critic and its target, as they are at that moment
            return [{k: v.clone() for k, v in caller[m].state_dict().items()} for m in ["critic", "critic_target"]]

        with record_calls("critic_targets") as calls, caller_snapshots("critic_targets", take) as snapshots:
            code, _, stderr = run_main(
                "sac_rlhf.py",
                *worlds["llama"].args(),
                *TINY,
                "--n-step",
                "1",
                "--gamma",
                "0.9",
                "--kl-coef",
                "0.2",
                "--tau",
                tau,
                "--updates-per-rollout",
                "1",
                "--no-save-model",
                "--output-dir",
                str(out),
                cwd=tmp_path,
            )
        assert code == 0, stderr[-3000:]
        targets = [(c["alpha"], c["beta"], c["gamma"], c["n"]) for c in calls["critic_targets"]]
        assert targets == [(0.0, 0.2, 0.9, 1)] * 2  # one call per critic step
        critic_steps = [s for s in steps if s["optimizer"] is steps[1]["optimizer"]]  # policy, critic, policy, ...
        assert len(critic_steps) == 2  # one per update
        grads[tau] = critic_steps[1]["grads"]
        critic, target = snapshots[1]  # as the second critic step starts: after update 1's one Polyak step
        moved = 0
        for name, start in rm.items():
            critic_now = critic[f"model.{name}"]
            moved += not torch.equal(critic_now, start)
            torch.testing.assert_close(target[f"model.{name}"], torch.lerp(start, critic_now, float(tau)))
        assert moved > len(rm) / 2  # the step moved the critic, so a wrong rate would show
    # The first critic steps are alike (target = critic at the start); after one Polyak update they differ.
    assert any(not torch.allclose(a, b) for a, b in zip(grads["1.0"], grads["0.25"]))


def test_critic_loss_sums_both_heads_squared_errors_on_the_taken_tokens():
    q_all = torch.zeros(1, 2, 2, 3)
    q_all[0, 0, :, 1] = torch.tensor([1.0, 2.0])  # token 1 taken at t = 0
    q_all[0, 1, :, 2] = torch.tensor([0.5, -1.0])  # token 2 taken at t = 1
    q_all[0, 1, :, 0] = 9.0  # not taken: must not count
    responses, targets = torch.tensor([[1, 2]]), torch.tensor([[1.5, 0.0]])
    loss, stats = sac.critic_loss(q_all, responses, targets, torch.ones(1, 2))
    assert stats["loss/q"] == loss.item() and stats["sac/q_mean"] == pytest.approx((1.0 - 1.0) / 2)  # min over heads
    assert loss.item() == pytest.approx(((0.25 + 0.25) + (0.25 + 1.0)) / 2)
    assert sac.critic_loss(q_all, responses, targets, torch.tensor([[1.0, 0.0]]))[0].item() == pytest.approx(0.5)


def test_offline_sac_learns_only_from_the_first_buffer_of_responses(tmp_path):
    """--offline: the buffer holds the first --buffer-size responses (of the SFT policy, with --learning-starts
    equal to it) and never changes after; the same run online keeps replacing them. Read at the end of each run."""

    def buffer_after(episodes, *flags):
        out = tmp_path / f"run{episodes}{''.join(flags)}"
        base = ["--batch-size", "16", "--eval-size", "8", "--response-length", "6", "--total-episodes", episodes]
        base += ["--eval-every", episodes, "--buffer-size", "32", "--learning-starts", "32"]
        with record_calls("sample") as calls:
            assert run_main("sac_rlhf.py", *base, *flags, "--no-save-model", "--output-dir", out, cwd=tmp_path)[0] == 0
        buffer = calls["sample"][0]["self"]  # the run's buffer, as the run left it
        return list(buffer), buffer.next

    filled = buffer_after(32)  # after update 2: the two SFT rollouts, and gradient steps began (one sample each)
    assert len(filled[0]) == 32
    assert buffer_after(80, "--offline") == filled  # after update 5: untouched
    assert buffer_after(80)[0] != filled[0]  # online: newer responses replaced the oldest


def test_offline_keeps_the_first_responses_when_the_buffer_does_not_divide_by_the_rollout(tmp_path):
    """--offline with --buffer-size 24 and rollouts of 16: the buffer holds the first 24 responses, in order (the
    first rollout and the first 8 of the second), not a second rollout wrapped over the first's."""
    flags = ["--batch-size", "16", "--eval-size", "8", "--response-length", "6", "--total-episodes", "48"]
    flags += ["--eval-every", "48", "--buffer-size", "24", "--learning-starts", "24", "--offline", "--no-save-model"]
    with record_calls("rollout", "sample") as calls:
        code, _, stderr = run_main("sac_rlhf.py", *flags, "--output-dir", tmp_path / "run", cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    rollouts = [c["return"][6] for c in calls["rollout"] if len(c["return"][6]) == 16]  # not the evaluations' (8)
    assert len(rollouts) == 3
    buffer = calls["sample"][0]["self"]
    assert [item[2] for item in buffer] == torch.cat(rollouts)[:24].tolist()
