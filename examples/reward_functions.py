"""Reward functions, a worked example: pass one as `--reward-model-name examples/reward_functions.py:<name>` (or as
`--gold-reward-model-name`). Each gets the prompts and the responses as text (no special tokens: no EOS, no padding)
and returns one number per response; a function with a parameter `ended` also gets whether each response ended with
an EOS (a response cut off at --response-length did not). The script applies the missing-EOS penalty and the KL on top.

For a chat dataset (examples/chat_prompts.jsonl) a prompt is the text of its chat template, roles and all.
"""

import re

ANSWERS = {"12 times 7": "84", "9 plus 16": "25", "spider": "8"}  # a checker's answer key, found by a phrase


def correct_answer(prompts, responses):
    """RLVR's kind of reward: 1 if the first number of the response is the answer to the question, else 0 (0 for a
    question with no answer in the key)."""
    scores = []
    for prompt, response in zip(prompts, responses, strict=True):
        answer = next((a for phrase, a in ANSWERS.items() if phrase in prompt), None)
        numbers = re.findall(r"-?\d+", response)
        scores.append(float(answer is not None and numbers[:1] == [answer]))
    return scores


def short_and_finished(prompts, responses, ended):
    """A format rule: 1 for a response that ended within 20 words, less for each word beyond, -1 if it never ended."""
    return [(1.0 - 0.1 * max(0, len(r.split()) - 20)) if e else -1.0 for r, e in zip(responses, ended, strict=True)]
