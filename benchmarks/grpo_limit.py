"""Where does GRPO go? Exact answers on the enumerable problem of tests/test_convergence.py.

The problem: one prompt, responses of one or two tokens from a 6-token vocabulary (31 responses, every one of them
enumerable), a reward model's score with a missing-EOS penalty, kl_coef beta = 0.1, so the KL-regularised optimum
pi*(y) proportional to pi_ref(y) exp(r(y) / beta) is known exactly (tests/enumeration.py). For each setting of
grpo_rlhf.py's flags and each seed this trains the script as the convergence test does (6,400 episodes, batch 64,
learning rate 1e-3) and measures the trained policy pi over all 31 responses:
- KL(pi || pi*): 0 at the optimum the KL-regularised objective asks for;
- KL(pi || pi_ref) and pi's entropy (nats);
- beta_fit, the beta' whose optimum pi*_beta' is nearest to pi (least KL(pi || pi*_beta') on a log grid from 1e-3 to
  10), and that KL: if pi is an optimum, it is the one of a different KL weight;
- KL(pi || pi_fwd), pi_fwd the maximiser of E_pi[r] - beta KL(pi_ref || pi) (the forward KL, whose per-state
  gradient k3 in the loss gives: docs/usage.md, "The KL penalty"): pi_fwd(y) = beta pi_ref(y) / (lam - r(y)), lam
  set by normalisation.

Usage: python benchmarks/grpo_limit.py   (5 settings x 3 seeds, one run at a time: about 8 minutes on one CPU core)
Prints a markdown table (mean and range over the seeds) and writes it to --output if given.
"""

import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests import enumeration as en  # noqa: E402 (the enumerable problem the convergence tests train on)

SETTINGS = {
    "GRPO's defaults (grpo loss, std scaling, k3 in the loss)": [],
    "unbiased (dr_grpo, no std scaling, k1 in the reward)": ["--loss-type", "dr_grpo", "--no-scale-rewards"]
    + ["--kl-in", "reward", "--kl-estimator", "k1"],
    "only k3 in the loss (dr_grpo, no std scaling)": ["--loss-type", "dr_grpo", "--no-scale-rewards"],
    "only std scaling (dr_grpo, k1 in the reward)": ["--loss-type", "dr_grpo", "--kl-in", "reward"]
    + ["--kl-estimator", "k1"],
    "only the grpo loss type (no std scaling, k1 in the reward)": ["--no-scale-rewards", "--kl-in", "reward"]
    + ["--kl-estimator", "k1"],
}


@dataclass
class Args:
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """the seeds of each setting"""
    total_episodes: int = 6400
    """episodes per run (the convergence test's)"""
    output: str | None = None
    """also write the table to this markdown file"""


def forward_kl_optimum(ref, scores, beta):
    """log pi_fwd over the responses: argmax_pi E_pi[r] - beta KL(pi_ref || pi), pi(y) = beta pi_ref(y) / (lam - r(y))
    with lam > max r found by bisection so that the probabilities sum to 1."""
    p_ref, top = ref.exp(), scores.max().item()
    low, high = top + 1e-12, top + beta + 1.0  # the sum is decreasing in lam: above 1 at low, below 1 at high
    while (beta * p_ref / (high - scores)).sum() > 1:
        high += 1.0
    for _ in range(200):
        lam = (low + high) / 2
        low, high = (lam, high) if (beta * p_ref / (lam - scores)).sum() > 1 else (low, lam)
    probs = beta * p_ref / ((low + high) / 2 - scores)
    return (probs / probs.sum()).log()


def measure(policy_dir, world):
    ref, optimum = en.eos_optimum_logprobs(world)
    scores = en.eos_response_scores(world.reward)
    logp = en.eos_response_logprobs(policy_dir)
    fits = [(en.kl(logp, en.optimum_logprobs(ref, scores, b)), b) for b in (10 ** (k / 20) for k in range(-60, 21))]
    fit_kl, fit_beta = min(fits)
    return {
        "KL(pi || pi*)": en.kl(logp, optimum),
        "KL(pi || pi_ref)": en.kl(logp, ref),
        "entropy": -float((logp.exp() * logp).sum()),
        "beta_fit": fit_beta,
        "KL(pi || pi*_beta_fit)": fit_kl,
        "KL(pi || pi_fwd)": en.kl(logp, forward_kl_optimum(ref, scores, en.BETA_STAR)),
    }


def main():
    args = tyro.cli(Args)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        world = en.build_eos_world(Path(tmp) / "world")
        ref, optimum = en.eos_optimum_logprobs(world)
        start = {"KL(pi || pi*)": en.kl(ref, optimum), "KL(pi || pi_ref)": 0.0}
        start["entropy"] = -float((ref.exp() * ref).sum())
        start["KL(pi || pi_fwd)"] = en.kl(ref, forward_kl_optimum(ref, en.eos_response_scores(world.reward), 0.1))
        print(f"pi_ref: {start}; pi* entropy {-float((optimum.exp() * optimum).sum()):.3f}", flush=True)
        for name, flags in SETTINGS.items():
            results = []
            for seed in args.seeds:
                root = Path(tmp) / f"{len(rows)}_{seed}"
                root.mkdir()
                en.train_and_measure_eos(
                    "grpo_rlhf.py", root, "--total-episodes", str(args.total_episodes), "--learning-rate", "1e-3",
                    "--seed", str(seed), *flags,
                )  # fmt: skip
                results.append(measure(str(root / "run" / "model"), world))
                print(name, seed, {k: round(v, 4) for k, v in results[-1].items()}, flush=True)
            rows.append((name, " ".join(flags) or "(none)", results))
    keys = list(rows[0][2][0])
    lines = ["| setting | flags | " + " | ".join(keys) + " |", "| --- | --- |" + " --- |" * len(keys)]
    for name, flags, results in rows:

        def cell(k, results=results):
            values = [r[k] for r in results]
            digits = 3 if k != "beta_fit" else 4
            return f"{sum(values) / len(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

        lines.append(f"| {name} | `{flags}` | " + " | ".join(cell(k) for k in keys) + " |")
    table = "\n".join(lines)
    head = f"pi_ref: KL(pi_ref || pi*) {start['KL(pi || pi*)']:.3f}, entropy {start['entropy']:.3f}, "
    head += f"KL(pi_ref || pi_fwd) {start['KL(pi || pi_fwd)']:.3f}; seeds {args.seeds}; mean (min-max)\n\n"
    print(head + table)
    if args.output:
        Path(args.output).write_text(head + table + "\n")
    if any(math.isnan(r[k]) for _, _, results in rows for r in results for k in keys):
        raise SystemExit("error: a measure is NaN")


if __name__ == "__main__":
    main()
