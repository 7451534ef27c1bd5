"""Judge a comparison's evaluations by the tinyworld's true reward instead of the gold reward model.

The gold reward model is a network regressed on the programmatic judge's scores (`tinyworld/build.py: gold_score`),
so far from the SFT policy it is itself an imperfect judge. Every evaluation's responses are in each run's
samples.jsonl (prompt and response as decoded text), so the true reward of every evaluation can be computed after the
fact, with no rerun: `gold_score(prompt + " " + response, ended)`, as `tinyworld/gold.py:score` computes it in a run.
`ended` (whether an EOS ended the response) is not in the text: a tinyworld response is one token per word, so it ended
when it has fewer words than --response-length (the EOS was one of its tokens). Runs that trained on the true reward
check this: their samples' `score` is the same number less the missing-EOS penalty when not ended. It is not exact: a
sampled special token other than EOS (<bos>, <unk>, <pad>) decodes to nothing too; the script counts the disagreements.

Usage: python benchmarks/true_reward.py results/true_reward_rloo results/true_reward_grpo
Prints, per run (mean ± half-range over seeds of the final evaluation): the true reward, the gold RM's score and the
KL; then, per run, the best true reward any evaluation reached and the KL there (mean over seeds).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # compare.py, beside this file
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tinyworld"))
from build import gold_score  # noqa: E402 (the builder's own judge, as tinyworld/gold.py uses it)
from compare import mean_spread  # noqa: E402 (the tables' mean ± half-range over seeds)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def true_rewards(run_dir, response_length, missing_eos_penalty, trained_on_truth):
    """({episode: mean true reward of that evaluation's responses}, samples checked, disagreements) of one run: when
    it trained on the true reward, the reconstruction of `ended` is checked against the run's own scores."""
    per_episode, checked, disagree = {}, 0, 0
    for sample in read_jsonl(os.path.join(run_dir, "samples.jsonl")):
        ended = len(sample["response"].split()) < response_length
        value = gold_score(f"{sample['prompt']} {sample['response']}", ended=ended)
        if trained_on_truth:  # the run scored the same text itself: the two must agree
            expected = sample["score"] + (0.0 if ended or missing_eos_penalty is None else missing_eos_penalty)
            checked, disagree = checked + 1, disagree + (abs(value - expected) > 1e-4)
        per_episode.setdefault(sample["episode"], []).append(value)
    return {episode: sum(v) / len(v) for episode, v in per_episode.items()}, checked, disagree


def main(folders):
    print("| run | true reward | gold RM | KL | best true reward (KL there) |")
    print("| --- | --- | --- | --- | --- |")
    checked = disagree = 0
    for folder in folders:
        runs = {}
        for name in sorted(os.listdir(os.path.join(folder, "runs"))):
            run_dir = os.path.join(folder, "runs", name)
            with open(os.path.join(run_dir, "args.json")) as f:
                args = json.load(f)
            truth = args["reward_model_name"].endswith("gold.py:score")
            rewards, n, wrong = true_rewards(run_dir, args["response_length"], args["missing_eos_penalty"], truth)
            checked, disagree = checked + n, disagree + wrong
            evals = {r["episode"]: r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "eval/kl" in r}
            last = max(rewards)
            best = max(rewards, key=rewards.get)
            label = name.rsplit("__", 1)[0]
            final = (rewards[last], evals[last]["eval/gold_scores"], evals[last]["eval/kl"])
            runs.setdefault(label, []).append((*final, rewards[best], evals[best]["eval/kl"]))
        for label, seeds in runs.items():
            final, gold, kl, best, best_kl = zip(*seeds, strict=True)
            best_said = f"{sum(best) / len(best):.2f} ({sum(best_kl) / len(best_kl):.1f})"
            print(f"| {label} | {mean_spread(final)} | {mean_spread(gold)} | {mean_spread(kl)} | {best_said} |")
    said = f"{disagree} of {checked} samples of the true-reward runs disagree with their scores"
    print(f"\n`ended` reconstructed from the word count: {said}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["results/true_reward_rloo"])
