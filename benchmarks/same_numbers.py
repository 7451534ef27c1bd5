"""Did a change move any number? Same-seed runs of every script at two commits (or of two scripts), compared record
by record: metrics.jsonl (every key but the wall-clock time/...) and samples.jsonl must be identical.

A refactor that claims to change no number shows it with this (CPU, one thread each: a rerun is bit-identical only
on the same kind of machine with the same thread count).

Usage: python benchmarks/same_numbers.py --before HEAD~1                    (the working tree against a commit)
       python benchmarks/same_numbers.py --before main --after my-branch --scripts rloo_rlhf.py
       python benchmarks/same_numbers.py --pairs ppo_rlhf.py:ppo_rlhf_multigpu.py   (two scripts of one tree)
       python benchmarks/same_numbers.py --before HEAD~1 --flags="--total-episodes 1024"   (--flags= with its =)
"""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    before: str | None = None
    """a git revision to compare against (None: compare --pairs within the working tree)"""
    after: str | None = None
    """a git revision to compare (None: the working tree)"""
    scripts: list[str] = field(default_factory=lambda: ["ppo_rlhf.py", "rloo_rlhf.py", "sac_rlhf.py"])
    """scripts run at both revisions (those missing at either are skipped)"""
    pairs: list[str] = field(default_factory=list)
    """a.py:b.py pairs of scripts of the working tree that must give the same records"""
    flags: str = "--total-episodes 512 --eval-every 256 --eval-size 32 --no-save-model"
    """flags of every run (the tinyworld defaults otherwise)"""


def checkout(rev, folder):
    """The files of `rev` in a new `folder` (git archive: no worktree left behind)."""
    os.makedirs(folder)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def run(tree, script, out, flags):
    """One run of tree/script into out, one thread, offline; returns its (metrics, samples) without wall times."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, os.path.join(tree, script), *flags.split(), "--output-dir", out]
    result = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        said = [line for line in result.stderr.splitlines() if line.strip() and "episode/s" not in line]  # no tqdm bar
        raise SystemExit(f"error: {tree}/{script} failed: {(said or ['(no message)'])[-1].strip()}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in f]
    with open(os.path.join(out, "samples.jsonl")) as f:
        return metrics, f.read()


def compare(name, a, b):
    """Print whether two runs' records are identical, and the first record that differs if not."""
    same_metrics, same_samples = a[0] == b[0], a[1] == b[1]
    print(
        f"{name}: metrics.jsonl {'identical' if same_metrics else 'DIFFERENT'} ({len(a[0])} records), "
        f"samples.jsonl {'identical' if same_samples else 'DIFFERENT'}"
    )
    if not same_metrics:
        i = next((i for i, (x, y) in enumerate(zip(a[0], b[0], strict=False)) if x != y), min(len(a[0]), len(b[0])))
        print(f"  first difference at record {i}")
    return same_metrics and same_samples


if __name__ == "__main__":
    args = tyro.cli(Args)
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        if args.before is not None:
            before = checkout(args.before, os.path.join(tmp, "before"))
            after = REPO if args.after is None else checkout(args.after, os.path.join(tmp, "after"))
            for script in args.scripts:
                if all(os.path.exists(os.path.join(tree, script)) for tree in (before, after)):
                    a = run(before, script, os.path.join(tmp, "runs", "before", script), args.flags)
                    b = run(after, script, os.path.join(tmp, "runs", "after", script), args.flags)
                    same &= compare(f"{script} at {args.before} and {args.after or 'the working tree'}", a, b)
        for pair in args.pairs:
            first, second = pair.split(":")
            a = run(REPO, first, os.path.join(tmp, "runs", pair, "first"), args.flags)
            b = run(REPO, second, os.path.join(tmp, "runs", pair, "second"), args.flags)
            same &= compare(f"{first} and {second}", a, b)
    print("every number the same" if same else "SOME NUMBERS DIFFER")
    sys.exit(0 if same else 1)
