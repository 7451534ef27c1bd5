"""How many CPU threads should a run use? Each script's speed with one thread and with torch's default (every core),
on a quiet machine and beside a busy one (another run of the same script, with the default threads, started first).

Runs each measured script as a child process with OMP_NUM_THREADS set (or not) and reports its episodes per second
(rollouts and updates only, from its metrics.jsonl). The busy job runs the same script with a large budget and is
killed when the measured run ends.

Usage: python benchmarks/threads.py                                    (PPO and RLOO on the tinyworld)
       python benchmarks/threads.py --scripts sac_rlhf.py --total-episodes 512
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    scripts: list[str] = field(default_factory=lambda: ["ppo_rlhf.py", "rloo_rlhf.py"])
    """scripts to measure"""
    total_episodes: int = 1024
    """episodes per measured run (tinyworld defaults otherwise)"""
    threads: list[int | None] = field(default_factory=lambda: [1, None])
    """thread counts to measure; None = torch's default (every core)"""
    wait_policy: str | None = None
    """OMP_WAIT_POLICY of the measured runs (PASSIVE: idle threads sleep instead of spinning); None = OpenMP's own"""


def run(script, episodes, threads, folder, name, wait_policy=None):
    """Start one run of `script` as a child process; returns the Popen and its run folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env |= {"OMP_NUM_THREADS": str(threads)} if threads else {}
    env |= {"OMP_WAIT_POLICY": wait_policy} if wait_policy else {}
    out = os.path.join(folder, name)
    cmd = [sys.executable, os.path.join(REPO, script), "--total-episodes", str(episodes), "--output-dir", out]
    cmd += ["--eval-every", str(episodes), "--eval-size", "16", "--no-save-model"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out


def episodes_per_s(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        last = [r for r in map(json.loads, f) if "objective/scores" in r][-1]
    return last["episode"] / (last["time/rollout_s"] + last["time/update_s"])


if __name__ == "__main__":
    args = tyro.cli(Args)
    policy = f", OMP_WAIT_POLICY={args.wait_policy}" if args.wait_policy else ""
    print(f"{os.cpu_count()} cores{policy}; episodes/s of each run (rollouts and updates), one run per cell")
    print("| script | threads | quiet | beside a busy job |\n| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for script in args.scripts:
            for threads in args.threads:
                cells = []
                for busy in [False, True]:
                    name = f"{script}_{threads}_{busy}"
                    job = run(script, 10**6, None, folder, name + "_busy")[0] if busy else None
                    if busy:
                        time.sleep(15)  # the busy job is past loading and training
                    child, out = run(script, args.total_episodes, threads, folder, name, args.wait_policy)
                    child.wait()
                    if job is not None:
                        job.kill()
                        job.wait()
                    cells.append(f"{episodes_per_s(out):.1f}" if child.returncode == 0 else "failed")
                shown = threads or f"default ({os.cpu_count()})"
                print(f"| `{script}` | {shown} | {cells[0]} | {cells[1]} |", flush=True)
