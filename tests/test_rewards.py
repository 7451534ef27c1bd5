"""Chat prompts (formatted by the tokenizer's chat template) and reward functions (`file.py:function`), in every script
through the shared core: what they are given, what they must return, and every mistake ending in one line."""

import importlib.util
import json
import math
import random
import shutil
import sys

import pytest
import torch
from transformers import AutoTokenizer

import ppo_rlhf as ppo
from tests.helpers import REPO, TINY, read_jsonl, record_calls, run_main
from tests.test_newcomer import one_error_line

SCRIPTS = ["ppo_rlhf.py", "rloo_rlhf.py", "sac_rlhf.py", "grpo_rlhf.py"]
TEMPLATE = (  # a chat template in the tinyworld's own words: every turn a sentence, the assistant's opened by "overall"
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }} . {% endfor %}"
    "{% if add_generation_prompt %}overall it was{% endif %}"
)
MESSAGES = [[{"role": "user", "content": "the movie was good"}], [{"role": "system", "content": "i loved it"}] * 2]


@pytest.fixture
def chat_world(tmp_path, tinyworld):
    """The tinyworld with a chat template on its policy's tokenizer, and a chat dataset."""
    policy = tmp_path / "chat_sft"
    shutil.copytree(tinyworld.policy, policy)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(policy)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in MESSAGES * 4))
    return policy, data


def test_chat_messages_are_the_tokenizers_own_formatting(chat_world):
    policy, _ = chat_world
    tokenizer = AutoTokenizer.from_pretrained(policy)
    ids = ppo.tokenize_prompts(tokenizer, [*MESSAGES, "the movie was"], 64, "--dataset")
    for got, messages in zip(ids, MESSAGES, strict=False):
        want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert got == want and got[0] == tokenizer.bos_token_id and got.count(tokenizer.bos_token_id) == 1
    assert ids[-1] == tokenizer("the movie was")["input_ids"]  # a text prompt as before
    long = ppo.tokenize_prompts(tokenizer, MESSAGES[1:], 5, "--dataset")[0]  # truncated from the left, BOS kept
    assert len(long) == 5 and long[0] == tokenizer.bos_token_id and long[1:] == ids[1][-4:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_chat_dataset_trains_and_the_reward_model_reads_the_formatted_prompt(script, chat_world, tinyworld, tmp_path):
    policy, data = chat_world
    out = tmp_path / "run"
    flags = ["--model-name", str(policy), "--dataset", str(data), "--eval-dataset", str(data), "--output-dir", str(out)]
    with record_calls("get_scores") as calls:
        code, _, stderr = run_main(script, *TINY, *flags, cwd=tmp_path)
    assert code == 0, stderr[-2000:]
    tokenizer = AutoTokenizer.from_pretrained(policy)
    formatted = {tuple(tokenizer.apply_chat_template(m, add_generation_prompt=True)["input_ids"]) for m in MESSAGES}
    for call in calls["get_scores"]:  # every prompt the reward model scored is a formatted chat
        rows = {tuple(q[m.bool()].tolist()) for q, m in zip(call["query"], call["query_mask"], strict=True)}
        assert rows <= formatted
    prompts = {s["prompt"] for s in read_jsonl(out / "samples.jsonl")}
    assert prompts == {"the movie was good . overall it was", "i loved it . i loved it . overall it was"}


@pytest.mark.parametrize(
    "rows, said",
    [
        ([{"prompt": "the movie was", "messages": MESSAGES[0]}], "row 1 has both `prompt` and `messages`"),
        ([{"prompt": "a"}, {"text": "the movie was"}], "row 2 has no text `prompt` or well-formed `messages`"),
        ([{"messages": [{"role": "user", "content": 3}]}], "row 1 has no text `prompt` or well-formed `messages`"),
        ([{"messages": []}], "row 1 has no text `prompt` or well-formed `messages`"),
        ([{"messages": "the movie was"}], "row 1 has no text `prompt` or well-formed `messages`"),
    ],
)
def test_a_bad_chat_row_ends_in_one_line_naming_it(rows, said, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, stderr = run_main("rloo_rlhf.py", *TINY, "--dataset", str(data), cwd=tmp_path)
    line = one_error_line(code, stderr)
    assert "--dataset" in line and said in line and not (tmp_path / "runs").exists(), line


def test_chat_messages_without_a_template_end_in_one_line(tinyworld, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "the movie was"}) + "\n" + json.dumps({"messages": MESSAGES[0]}) + "\n")
    code, _, stderr = run_main("rloo_rlhf.py", *TINY, "--dataset", str(data), cwd=tmp_path)
    line = one_error_line(code, stderr)
    assert "--dataset: row 2" in line and "no chat template" in line and not (tmp_path / "runs").exists(), line


RECORDING_REWARD = """
import importlib.util
import json

def words(prompts, responses, ended):
    with open({log!r}, "a") as f:
        f.write(json.dumps({{"prompts": prompts, "responses": responses, "ended": ended}}) + "\\n")
    return [float(len(r.split())) for r in responses]
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_reward_function_gets_the_decoded_texts_and_its_scores_are_used(script, tmp_path):
    """The function sees each prompt and response as the samples show them (no special tokens: no EOS, no padding)
    and whether each ended; its numbers are the scores, the missing-EOS penalty on top."""
    log = tmp_path / "calls.jsonl"
    (tmp_path / "reward.py").write_text(RECORDING_REWARD.format(log=str(log)))
    out = tmp_path / "run"
    spec = f"{tmp_path / 'reward.py'}:words"
    flags = ["--reward-model-name", spec, "--gold-reward-model-name", spec, "--output-dir", str(out)]
    code, _, stderr = run_main(script, *TINY, *flags, cwd=tmp_path)
    assert code == 0, stderr[-2000:]
    calls = read_jsonl(log)
    samples = [s for s in read_jsonl(out / "samples.jsonl") if s["episode"] == 32]
    assert len(samples) == 8
    # The last evaluation: a call for the rollout's scores, then one for the gold scores, on the same texts.
    rollout_call, gold_call = calls[-2], calls[-1]
    assert rollout_call["prompts"] == gold_call["prompts"] == [s["prompt"] for s in samples]
    assert rollout_call["responses"] == [s["response"] for s in samples]
    assert not any("<eos>" in r or "<pad>" in r for c in calls for r in c["responses"])
    for s, ended in zip(samples, rollout_call["ended"], strict=True):
        words = len(s["response"].split())
        assert s["gold_score"] == words and s["score"] == words - (0.0 if ended else 1.0)
    assert any(rollout_call["ended"]) and all(isinstance(e, bool) for e in rollout_call["ended"])


BAD_FUNCTIONS = {
    "raises": ("def f(prompts, responses):\n    raise ValueError('no answer found')\n", "raised ValueError: no answer"),
    "count": ("def f(prompts, responses):\n    return [0.0]\n", "returned [0.0] for 8 responses"),
    "nan": ("def f(prompts, responses):\n    return [float('nan')] * len(responses)\n", "returned nan"),
    "text": ("def f(prompts, responses):\n    return ['1'] * len(responses)\n", "returned '1'"),
    "bool": ("def f(prompts, responses):\n    return [True] * len(responses)\n", "returned True"),
    "none": ("def f(prompts, responses):\n    return None\n", "returned None for 8 responses"),
}


@pytest.mark.parametrize("mistake", list(BAD_FUNCTIONS))
def test_a_reward_function_that_fails_ends_in_one_line_and_keeps_the_records(mistake, tmp_path):
    code_text, said = BAD_FUNCTIONS[mistake]
    (tmp_path / "reward.py").write_text(code_text)
    out = tmp_path / "run"
    code, _, stderr = run_main(
        "rloo_rlhf.py", *TINY, "--reward-model-name", f"{tmp_path / 'reward.py'}:f", "--output-dir", str(out)
    )
    line = one_error_line(code, stderr)
    assert f"--reward-model-name {tmp_path / 'reward.py'}:f" in line and said in line, line
    assert (out / "INCOMPLETE").exists() and (out / "args.json").exists()  # what ran is kept, marked unfinished


@pytest.mark.parametrize(
    "file_text, spec, said",
    [
        (None, "missing.py:f", "missing.py:f: no such file"),
        ("def g(prompts, responses):\n    return []\n", "reward.py:f", "has no function `f`"),
        ("f = 3\n", "reward.py:f", "has no function `f`"),
        ("def f(:\n", "reward.py:f", "the file does not load (SyntaxError"),
        ("import not_a_module_anywhere\n", "reward.py:f", "the file does not load (ModuleNotFoundError"),
    ],
)
def test_a_reward_function_that_does_not_load_ends_before_the_run_folder(file_text, spec, said, tmp_path):
    if file_text is not None:
        (tmp_path / "reward.py").write_text(file_text)
    for flag in ["--reward-model-name", "--gold-reward-model-name"]:
        code, _, stderr = run_main("rloo_rlhf.py", *TINY, flag, str(tmp_path / spec), cwd=tmp_path)
        line = one_error_line(code, stderr)
        assert line.startswith(f"error: {flag} ") and said in line and not (tmp_path / "runs").exists(), line


def test_the_tinyworld_gold_function_is_the_builders_scorer(tinyworld):
    """tinyworld/gold.py:score on token ids decoded as the scripts decode them gives build.gold_score of the words, for
    grammatical reviews and the degenerate text RL produces, ended or not."""
    sys.path.insert(0, str(REPO / "tinyworld"))
    import build

    tokenizer = AutoTokenizer.from_pretrained(tinyworld.policy)
    function = ppo.RewardFunction(str(REPO / "tinyworld" / "gold.py:score"), "--reward-model-name", tokenizer)
    rng = random.Random(0)
    texts = [(build.sample_review(rng), rng.random() < 0.5) for _ in range(40)]
    texts += [build.sample_degenerate(rng) for _ in range(40)]
    prompts = [words[:3] for words, _ in texts]
    query, query_mask = ppo.left_pad([build.encode(p, ended=False) for p in prompts], 0, "cpu")
    rows = [build.encode(w[3:], ended=e)[1:] or [build.EOS_ID] for w, e in texts]  # [1:]: no BOS in a response
    responses, mask = ppo.left_pad([r[::-1] for r in rows], 0, "cpu")
    responses, mask = responses.flip(1), mask.flip(1)  # right-padded, as the scripts' responses are
    got = function(query, query_mask, responses, mask)
    want = [build.gold_score(" ".join(w), ended=e or len(w) <= 3) for w, e in texts]
    torch.testing.assert_close(got, torch.tensor(want))
    assert min(want) < -3 < 2 < max(want) and not any(math.isnan(x) for x in want)


RANK_REWARD = """
import json, os

def words(prompts, responses):
    with open({log!r}, "a") as f:
        f.write(json.dumps({{"rank": int(os.environ.get("RANK", "0")), "n": len(responses)}}) + "\\n")
    if os.environ.get("RANK") == "1" and {fail_on_rank_1}:
        raise RuntimeError("rank 1 could not check an answer")
    return [float(len(r.split())) for r in responses]
"""


@pytest.mark.parametrize("fail_on_rank_1", [False, True])
def test_under_torchrun_each_rank_scores_its_own_share(fail_on_rank_1, tmp_path):
    """Two processes: each calls the function on its half of every rollout and of every evaluation; a function
    that fails on one rank only ends the run with that rank's line instead of leaving the other waiting."""
    from tests.test_scale import torchrun

    log = tmp_path / "calls.jsonl"
    (tmp_path / "reward.py").write_text(RANK_REWARD.format(log=str(log), fail_on_rank_1=fail_on_rank_1))
    spec = f"{tmp_path / 'reward.py'}:words"
    tiny = [*TINY[: TINY.index("--eval-size")], "--eval-size", "4", *TINY[TINY.index("--eval-size") + 2 :]]
    flags = [*tiny, "--reward-model-name", spec, "--gold-reward-model-name", "none"]
    flags += ["--output-dir", str(tmp_path / "run")]
    result = torchrun(2, str(REPO / "rloo_rlhf_multigpu.py"), *flags, cwd=tmp_path)
    calls = read_jsonl(log)
    if fail_on_rank_1:
        assert result.returncode != 0 and "error: --reward-model-name" in result.stderr
        assert "rank 1 could not check an answer" in result.stderr
        return
    assert result.returncode == 0, result.stderr[-2000:]
    training = [c for c in calls if c["n"] == 8]  # each rank's half of a batch of 16 (evaluations: 4 prompts)
    assert sorted(c["rank"] for c in training) == [0, 0, 1, 1]
    evaluations = [(c["rank"], c["n"]) for c in calls if c not in training]  # each rank scores half the prompts
    assert sorted(evaluations) == [(0, 2)] * 3 + [(1, 2)] * 3  # at episodes 0, 16 and 32


def test_the_worked_examples_load_and_score(tinyworld):
    tokenizer = AutoTokenizer.from_pretrained(tinyworld.policy)
    query, query_mask = ppo.left_pad([tokenizer("the movie was")["input_ids"]] * 2, 0, "cpu")
    responses = torch.tensor([[4, tokenizer.eos_token_id], [4, 4]])  # one ended, one cut off
    for name, want in [("correct_answer", [0.0, 0.0]), ("short_and_finished", [1.0, -1.0])]:
        function = ppo.RewardFunction(
            str(REPO / "examples" / f"reward_functions.py:{name}"), "--reward-model-name", tokenizer
        )
        assert function(query, query_mask, responses, torch.ones_like(responses)).tolist() == want


def test_true_reward_benchmark_judges_every_evaluation_by_the_builders_scorer(tmp_path, capsys):
    """benchmarks/true_reward.py: each run's evaluation samples scored by build.gold_score, `ended` read from the word
    count (fewer words than --response-length: an EOS ended it), checked against a true-reward run's own scores."""
    spec = importlib.util.spec_from_file_location("true_reward", REPO / "benchmarks" / "true_reward.py")
    true_reward = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(true_reward)
    from tinyworld.build import gold_score

    short, cut = "i loved it .", " ".join(["great ."] * 12)  # 4 words (ended) and 24 words (cut at the length)
    runs = [("truth__1", "tinyworld/gold.py:score"), ("truth__2", "tinyworld/gold.py:score")]
    for name, reward in [*runs, ("proxy__1", "tinyworld/reward_model"), ("proxy__2", "tinyworld/reward_model")]:
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "args.json").write_text(
            json.dumps({"reward_model_name": reward, "response_length": 24, "missing_eos_penalty": 1.0})
        )
        truth = {r: gold_score(f"the film {r}", ended=r == short) - (r != short) for r in (short, cut)}
        samples = [
            {"episode": e, "prompt": "the film", "response": r, "score": truth[r]} for e in (0, 8) for r in truth
        ]
        (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        metrics = [{"episode": e, "eval/kl": e / 2, "eval/gold_scores": 0.5} for e in (0, 8)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    true_reward.main([str(tmp_path)])
    out = capsys.readouterr().out
    expected = (gold_score("the film i loved it .") + gold_score(f"the film {cut}", ended=False)) / 2
    assert f"| truth | {expected:.2f} ± 0.00 | 0.50 ± 0.00 | 4.00 ± 0.00 |" in out
    assert f"| proxy | {expected:.2f} ± 0.00 |" in out
    assert "0 of 8 samples of the true-reward runs disagree" in out
