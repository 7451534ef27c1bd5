"""benchmarks/same_numbers.py, the check that a change moved no number: the same script twice is the same, two
algorithms are not."""

import subprocess
import sys

from tests.helpers import REPO

FLAGS = "--total-episodes 32 --batch-size 16 --eval-every 16 --eval-size 8 --response-length 6 --no-save-model"


def same_numbers(*args):
    cmd = [sys.executable, str(REPO / "benchmarks" / "same_numbers.py"), f"--flags={FLAGS}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_the_same_script_twice_gives_the_same_numbers_and_two_algorithms_do_not():
    same = same_numbers("--pairs", "rloo_rlhf.py:rloo_rlhf.py")
    assert same.returncode == 0 and "metrics.jsonl identical (5 records), samples.jsonl identical" in same.stdout
    different = same_numbers("--pairs", "rloo_rlhf.py:ppo_rlhf.py")
    assert different.returncode == 1 and "metrics.jsonl DIFFERENT" in different.stdout, different.stdout
