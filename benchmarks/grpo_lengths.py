"""Dr. GRPO's question on a comparison folder's runs: are the responses with a negative advantage the longer ones?

Reads every GRPO run of a `benchmarks/compare.py` folder (its runs/ subfolder, kept on the machine that ran it) and
prints, per run and averaged over its seeds, the mean length of the responses with A > 0 and with A < 0
(`grpo/length_advantage_pos` and `_neg`) over the first 16 updates and over the last 64 (of 256), and the share of
groups whose rewards were all equal (`grpo/zero_std_frac`, no learning signal).

Usage: python benchmarks/grpo_lengths.py results/grpo
"""

import glob
import json
import os
import statistics
import sys


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "results/grpo"
    runs = {}
    for run in sorted(glob.glob(os.path.join(folder, "runs", "*"))):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            train = [r for r in map(json.loads, f) if "grpo/length_advantage_pos" in r]
        if train:
            runs.setdefault(os.path.basename(run).rsplit("__", 1)[0], []).append(train)
    if not runs:
        raise SystemExit(f"error: no GRPO run in {folder}/runs (the folder compare.py ran, on its machine)")
    print("| run | A > 0, first 16 | A < 0, first 16 | A > 0, last 64 | A < 0, last 64 | groups all alike, last 64 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, seeds in runs.items():

        def mean(key, part):
            values = [r[key] for train in seeds for r in (train[:16] if part == "first" else train[-64:])]
            return statistics.mean(v for v in values if v >= 0)  # -1: no response of that sign in that update

        cells = [mean(f"grpo/length_advantage_{s}", p) for p in ["first", "last"] for s in ["pos", "neg"]]
        cells.append(mean("grpo/zero_std_frac", "last"))
        print(f"| {name} ({len(seeds)} seeds) | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
