"""Run a script and record, per rank, which replay-buffer positions each of SAC's minibatches drew
(tests/test_scale.py: the ranks must draw on their own streams).

usage: [torchrun --nproc-per-node N] python tests/record_draws.py PREFIX <script> <flags>

Each rank appends one JSON line per draw to PREFIX<rank>: the drawn positions in its buffer. Nothing else changes:
the draws themselves are the script's (random.Random.sample, on whichever stream the script uses).
"""

import json
import os
import random
import runpy
import sys


def recording(sample, prefix):
    def record(self, population, k, **kwargs):
        drawn = sample(self, population, k, **kwargs)
        if type(population).__name__ == "ReplayBuffer":
            positions = [next(i for i, item in enumerate(population) if item is x) for x in drawn]
            with open(f"{prefix}{os.environ.get('RANK', '0')}", "a") as f:
                f.write(json.dumps(positions) + "\n")
        return drawn

    return record


if __name__ == "__main__":
    random.Random.sample = recording(random.Random.sample, sys.argv[1])
    random.sample = random.Random.sample.__get__(random._inst)  # the module's own function was bound at import
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
