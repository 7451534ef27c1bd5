"""Head-to-head on the tinyworld: the three scripts with their defaults, the same seeds, one table.

Each (script, seed) run is its own process with one thread (two run at a time on a two-core machine), with
the scripts' default flags plus --extra. The table gives, per script, the mean and half-range over seeds of
the final evaluation (proxy score, gold score, KL, entropy, response length), the wall time, and the number of
generated episodes at which each run's evaluation first reached the final proxy score of the reference
script (--reach-of, PPO by default), at a KL no larger than that script's final KL.

Usage: python benchmarks/compare.py --seeds 1 2          (about 20 minutes on two CPU cores)
       python benchmarks/compare.py --scripts ppo_rlhf.py sac_rlhf.py --extra="--total-episodes 4096"
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional

import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    scripts: List[str] = field(default_factory=lambda: ["ppo_rlhf.py", "rloo_rlhf.py", "sac_rlhf.py"])
    """scripts to compare (missing ones are skipped)"""
    seeds: List[int] = field(default_factory=lambda: [1, 2])
    """seeds, the same for every script"""
    extra: str = ""
    """flags added to every run, written --extra="--flag value" (e.g. --extra="--kl-coef 0.1")"""
    reach_of: str = "ppo_rlhf.py"
    """whose final proxy score (mean over seeds) the episodes-to-reach column measures against"""
    parallel: int = 2
    """runs at a time (each uses one thread)"""
    output_dir: Optional[str] = None
    """keep the run folders here (default: a temporary folder)"""


def run(script, seed, args, folder):
    out = os.path.join(folder, f"{script[:-3]}__{seed}")
    cmd = [sys.executable, os.path.join(REPO, script), "--seed", str(seed), "--output-dir", out,
           "--no-save-model", *args.extra.split()]
    start = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval/scores" in r]
    return script, seed, evals, time.time() - start


def mean_spread(xs, digits=2):
    m = sum(xs) / len(xs)
    return f"{m:.{digits}f} ± {(max(xs) - min(xs)) / 2:.{digits}f}"


if __name__ == "__main__":
    args = tyro.cli(Args)
    scripts = [s for s in args.scripts if os.path.exists(os.path.join(REPO, s))]
    folder = args.output_dir or tempfile.mkdtemp(prefix="compare_")
    jobs = [(s, seed) for s in scripts for seed in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda job: run(*job, args, folder), jobs))
    by_script = {s: [r for r in results if r[0] == s] for s in scripts}
    target = None
    if args.reach_of in by_script:
        finals = [evals[-1] for _, _, evals, _ in by_script[args.reach_of]]
        target = (sum(e["eval/scores"] for e in finals) / len(finals), max(e["eval/kl"] for e in finals))
    print(f"tinyworld, seeds {args.seeds}, extra flags: '{args.extra}'; mean ± half-range over seeds; run folders in {folder}")
    if target:
        print(f"episodes to reach: first evaluation with proxy score >= {target[0]:.2f} and KL <= {target[1]:.2f} "
              f"({args.reach_of}'s final mean score and largest final KL)")
    print("| script | proxy score | gold score | KL | entropy | response length | wall s | episodes to reach |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for s, runs in by_script.items():
        finals = [evals[-1] for _, _, evals, _ in runs]
        col = lambda k: mean_spread([e[k] for e in finals]) if all(k in e for e in finals) else "-"
        reach = []
        for _, seed, evals, _ in runs:
            hit = [e["episode"] for e in evals if target and e["eval/scores"] >= target[0] and e["eval/kl"] <= target[1]]
            reach.append(str(hit[0]) if hit else "never")
        print(f"| {s} | {col('eval/scores')} | {col('eval/gold_scores')} | {col('eval/kl')} | {col('eval/entropy')} "
              f"| {col('eval/response_length')} | {mean_spread([w for *_, w in runs], 0)} | {', '.join(reach)} |")
