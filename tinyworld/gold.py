"""The tinyworld's true reward as a reward function: `--reward-model-name tinyworld/gold.py:score` trains on it.

`build.gold_score` is the programmatic judge the builder labelled every gold text with (the gold reward model is a
network regressed on its scores); here it scores the prompt and response the script decodes, joined by a space (the
tokenizer's words are space-separated), with `ended`: whether an EOS ended the response (a review cut off loses 1.0).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build import gold_score  # noqa: E402 (the builder's own scorer, not a copy)


def score(prompts, responses, ended):
    """gold_score of each prompt + response: a float per response (about -3 to 3, down to -8 for degenerate text)."""
    return [gold_score(f"{p} {r}", ended=e) for p, r, e in zip(prompts, responses, ended, strict=True)]
