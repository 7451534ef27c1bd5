"""The shared contract of the three scripts (the README documents it): identical common helpers, the run folder and
metric keys on every fixture architecture, and bad input stopped with one clear message before training."""

import json
import math
import os

import pytest
import torch

from tests.helpers import (
    NO_AUTOCAST,
    REPO,
    TINY,
    read_jsonl,
    record_calls,
    record_optimizer_steps,
    run_main,
    run_script,
)

SCRIPTS = [s for s in ["ppo_rlhf.py", "rloo_rlhf.py", "sac_rlhf.py", "grpo_rlhf.py"] if (REPO / s).exists()]
COMMON_TRAIN_KEYS = [
    "episode",
    "update",
    "time/elapsed_s",
    "time/episodes_per_s",
    "time/rollout_s",
    "time/update_s",
    "lr",
    "objective/scores",
    "objective/kl",
    "objective/kl_coef",
    "objective/rlhf_reward",
    "objective/entropy",
    "objective/response_length",
    "objective/eos_rate",
    "loss/policy",
]
ALGO_KEYS = {
    "ppo_rlhf.py": [
        "ppo/approxkl",
        "ppo/clipfrac",
        "ppo/ratio_mean",
        "loss/value",
        "ppo/value_clipfrac",
        "ppo/explained_variance",
    ],
    "rloo_rlhf.py": ["rloo/advantage_std", "rloo/baseline_mean"],
    "sac_rlhf.py": ["loss/q", "sac/q_mean", "sac/alpha", "loss/alpha", "sac/entropy_target", "sac/buffer_size"],
    "grpo_rlhf.py": ["grpo/approxkl", "grpo/clipfrac", "grpo/ratio_mean", "grpo/reward_std", "grpo/zero_std_frac"]
    + ["grpo/length_advantage_pos", "grpo/length_advantage_neg"],
}
EVAL_KEYS = ["episode", "eval/scores", "eval/kl", "eval/entropy", "eval/response_length", "eval/eos_rate"]
EVAL_KEYS += ["eval/distinct_1", "eval/distinct_2", "eval/self_similarity"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_short_run_writes_the_run_folder_and_metric_keys(script, world, tmp_path):
    out = tmp_path / "run"
    result = run_script(script, *world.args(), *TINY, "--output-dir", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    if not world.has_pad_token:
        assert "no pad token; using EOS" in result.stdout
    args = json.load(open(out / "args.json"))
    assert args["model_name"] == world.policy and args["total_episodes"] == 32
    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if "objective/scores" in r]
    evals = [r for r in records if "eval/scores" in r]
    assert [r["episode"] for r in train] == [16, 32] and [r["episode"] for r in evals] == [0, 16, 32]
    keys = set(COMMON_TRAIN_KEYS + ALGO_KEYS[script])
    for r in train:
        assert keys <= set(r), keys - set(r)
        assert all(isinstance(v, (int, float)) and v == v for v in r.values()), r
        assert 1 <= r["objective/response_length"] <= 6 and 0 <= r["objective/eos_rate"] <= 1
        assert r["objective/rlhf_reward"] == pytest.approx(
            r["objective/scores"] - r["objective/kl_coef"] * r["objective/kl"]
        )
        # Cumulative seconds in rollouts and in updates: both grow, and together they fit in the elapsed time.
        assert r["time/rollout_s"] > 0 and r["time/update_s"] > 0
        assert r["time/rollout_s"] + r["time/update_s"] <= r["time/elapsed_s"] < 600
        assert r["time/episodes_per_s"] * r["time/elapsed_s"] == pytest.approx(r["episode"])
        assert "memory/cuda_peak_gb" not in r  # a CUDA-only key
    assert (
        train[0]["time/rollout_s"] < train[1]["time/rollout_s"]
        and train[0]["time/update_s"] < train[1]["time/update_s"]
    )
    for r in evals:
        assert set(EVAL_KEYS) <= set(r) and "eval/gold_scores" not in r  # these worlds have no gold RM
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 3 * 8 and {"episode", "prompt", "response", "score", "gold_score"} <= set(samples[0])
    from transformers import AutoTokenizer

    special = AutoTokenizer.from_pretrained(world.policy).all_special_tokens  # the EOS a response ends with is not text
    assert not any(t in s["prompt"] + s["response"] for s in samples for t in special)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "model")
    AutoTokenizer.from_pretrained(out / "model")


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the flag, before the run folder exists, no traceback, in every script
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def llama(worlds):
    return worlds["llama"]


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory, worlds):
    """Inputs of every family of mistakes: prompt files, models that are not what their flag needs."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("bad")
    texts = {
        "null.jsonl": '{"prompt": null}\n',
        "number.jsonl": '{"prompt": 3}\n',
        "list.jsonl": '{"prompt": ["a"]}\n',
        "later.jsonl": '{"prompt": "a b"}\n{"text": "a b"}\n',
        "empty.jsonl": "",
        "row.jsonl": '"a b"\n',
        "notjson.jsonl": '{"prompt": "a"}\nnot json\n',
        "prompts.csv": "prompt\na b\n",
        "prompts.json": '[{"prompt": "a"}]',
    }
    for name, text in texts.items():
        (root / name).write_text(text)
    (root / "bytes.jsonl").write_bytes(b'{"prompt": "a \xff\xfe b"}\n')
    (root / "folder").mkdir()
    (root / "file").write_text("mine")
    config = AutoConfig.from_pretrained(worlds["llama"].reward)
    config.num_labels = 2
    AutoModelForSequenceClassification.from_config(config).save_pretrained(root / "two_labels")
    AutoTokenizer.from_pretrained(worlds["llama"].reward).save_pretrained(root / "two_labels")
    AutoModelForCausalLM.from_pretrained(worlds["llama"].policy).save_pretrained(root / "no_tokenizer")
    return root


# (flags, the flag the one-line error must name); "{bad}": the bad_files folder, "{world:x}": a path of the llama world.
COMMON_BAD_INPUT = [
    (["--dataset", "{bad}/null.jsonl"], "--dataset"),
    (["--dataset", "{bad}/number.jsonl"], "--dataset"),
    (["--dataset", "{bad}/list.jsonl"], "--dataset"),
    (["--dataset", "{bad}/later.jsonl"], "--dataset"),
    (["--dataset", "{bad}/empty.jsonl"], "--dataset"),
    (["--dataset", "{bad}/row.jsonl"], "--dataset"),
    (["--dataset", "{bad}/notjson.jsonl"], "--dataset"),
    (["--dataset", "{bad}/bytes.jsonl"], "--dataset"),
    (["--dataset", "{bad}/prompts.csv"], "--dataset"),
    (["--eval-dataset", "{bad}/prompts.json"], "--eval-dataset"),
    (["--dataset", "{bad}/folder"], "--dataset"),
    (["--dataset", "{bad}/nowhere.jsonl"], "--dataset"),
    (["--model-name", "{bad}/nowhere"], "--model-name"),
    (["--model-name", "{bad}/no_tokenizer"], "--model-name"),
    (["--model-name", "{world:reward}"], "--model-name"),
    (["--reward-model-name", "{world:policy}"], "--reward-model-name"),
    (["--reward-model-name", "{bad}/two_labels"], "--reward-model-name"),
    (["--gold-reward-model-name", "{world:policy}"], "--gold-reward-model-name"),
    (["--learning-rate", "-1e-4"], "--learning-rate"),
    (["--learning-rate", "nan"], "--learning-rate"),
    (["--kl-coef", "-0.1"], "--kl-coef"),
    (["--kl-coef", "inf"], "--kl-coef"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--missing-eos-penalty", "-1"], "--missing-eos-penalty"),
    (["--ref-sync-mix", "0"], "--ref-sync-mix"),
    (["--ref-sync-mix", "1.5"], "--ref-sync-mix"),
    (["--response-length", "0"], "--response-length"),
    (["--batch-size", "0"], "--batch-size"),
    (["--total-episodes", "8"], "--total-episodes"),
    (["--total-episodes", "40"], "--total-episodes"),
    (["--eval-size", "17"], "--eval-size"),
    (["--eval-every", "0"], "--eval-every"),
    (["--max-prompt-length", "250", "--response-length", "10"], "--model-name"),  # past the 256 positions
    (["--output-dir", "{bad}/file"], "--output-dir"),
    (["--output-dir", "{bad}/file/run"], "--output-dir"),
]
ALGO_BAD_INPUT = {
    # The twins' memory flag (see tests/test_scale.py for the others)
    "ppo_rlhf_multigpu.py": [
        (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps"),
        (["--gradient-accumulation-steps", "3"], "--gradient-accumulation-steps"),
    ],
    "rloo_rlhf_multigpu.py": [
        (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps"),
        (["--gradient-accumulation-steps", "3"], "--gradient-accumulation-steps"),
    ],
    "grpo_rlhf_multigpu.py": [
        (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps"),
        (["--gradient-accumulation-steps", "3"], "--gradient-accumulation-steps"),
    ],
    "ppo_rlhf.py": [
        (["--num-ppo-epochs", "0"], "--num-ppo-epochs"),
        (["--num-minibatches", "0"], "--num-minibatches"),
        (["--num-minibatches", "3"], "--num-minibatches"),
        (["--clip-coef", "-0.2"], "--clip-coef"),
        (["--vf-clip-coef", "0"], "--vf-clip-coef"),
        (["--vf-coef", "nan"], "--vf-coef"),
        (["--gamma", "1.5"], "--gamma"),
        (["--lam", "-0.1"], "--lam"),
        (["--max-grad-norm", "0"], "--max-grad-norm"),
        (["--kl-target", "0"], "--kl-target"),
        (["--kl-horizon", "0"], "--kl-horizon"),
    ],
    "grpo_rlhf.py": [
        (["--num-generations", "3"], "--num-generations"),
        (["--num-generations", "1"], "--num-generations"),
        (["--num-ppo-epochs", "0"], "--num-ppo-epochs"),
        (["--clip-coef", "0"], "--clip-coef"),
        (["--clip-coef-high", "-0.1"], "--clip-coef-high"),
        (["--max-grad-norm", "-1"], "--max-grad-norm"),
    ],
    "rloo_rlhf.py": [
        (["--rloo-k", "3"], "--rloo-k"),
        (["--rloo-k", "1"], "--rloo-k"),
        (["--num-ppo-epochs", "0"], "--num-ppo-epochs"),
        (["--clip-coef", "0"], "--clip-coef"),
        (["--max-grad-norm", "-1"], "--max-grad-norm"),
    ],
    "sac_rlhf.py": [
        (["--buffer-size", "8"], "--buffer-size"),
        (["--minibatch-size", "0"], "--minibatch-size"),
        (["--minibatch-size", "2048"], "--buffer-size"),
        (["--n-step", "0"], "--n-step"),
        (["--tau", "0"], "--tau"),
        (["--tau", "1.5"], "--tau"),
        (["--gamma", "1.5"], "--gamma"),
        (["--alpha", "-1"], "--alpha"),
        (["--alpha", "0", "--autotune"], "--alpha"),
        (["--q-learning-rate", "0"], "--q-learning-rate"),
        (["--target-entropy-scale", "nan"], "--target-entropy-scale"),
        (["--updates-per-rollout", "0"], "--updates-per-rollout"),
        (["--learning-starts", "64"], "--learning-starts"),
        (["--total-episodes", "96", "--buffer-size", "32", "--learning-starts", "48"], "--learning-starts"),
    ],
}


@pytest.mark.parametrize(
    "script,flags,flag",
    [(s, f, n) for s in ALGO_BAD_INPUT for f, n in (COMMON_BAD_INPUT if s in SCRIPTS else []) + ALGO_BAD_INPUT[s]],
    ids=lambda x: " ".join(x) if isinstance(x, list) else x,
)
def test_bad_input_ends_in_one_line_naming_the_flag(script, flags, flag, tmp_path, llama, bad_files):
    flags = [
        f.replace("{bad}", str(bad_files))
        .replace("{world:reward}", llama.reward)
        .replace("{world:policy}", llama.policy)
        for f in flags
    ]
    out = flags[flags.index("--output-dir") + 1] if "--output-dir" in flags else str(tmp_path / "run")
    code, stdout, stderr = run_main(script, *llama.args(), *TINY, "--output-dir", out, *flags, cwd=tmp_path)
    assert code != 0 and "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()  # stopped before any run folder
    assert (bad_files / "file").read_text() == "mine"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_folder_with_anything_in_it_is_refused_and_left_alone(script, tmp_path, llama):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("mine")  # the user's own file, not a run of ours (no args.json)
    code, _, stderr = run_main(script, *llama.args(), *TINY, "--output-dir", str(out), cwd=tmp_path)
    assert code != 0 and "--overwrite-output-dir" in stderr and "Traceback" not in stderr
    (out / "notes.txt").write_text("mine")  # with a file no run writes, even --overwrite-output-dir is refused
    code, _, stderr = run_main(
        script, *llama.args(), *TINY, "--output-dir", str(out), "--overwrite-output-dir", cwd=tmp_path
    )
    assert code != 0 and "notes.txt" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "notes.txt"]
    assert (out / "metrics.jsonl").read_text() == "mine"


def test_overwrite_replaces_the_whole_previous_run(tmp_path, llama):
    """The old run's model must not stay beside the new run's records."""
    out = tmp_path / "run"
    code, _, stderr = run_main("rloo_rlhf.py", *llama.args(), *TINY, "--output-dir", str(out), cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    assert (out / "model").is_dir() and not (out / "INCOMPLETE").exists()
    code, _, stderr = run_main(
        "rloo_rlhf.py",
        *llama.args(),
        *TINY,
        "--output-dir",
        str(out),
        "--overwrite-output-dir",
        "--no-save-model",
        "--total-episodes",
        "16",
        cwd=tmp_path,
    )
    assert code == 0, stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "metrics.jsonl", "samples.jsonl"]
    assert max(r["episode"] for r in read_jsonl(out / "metrics.jsonl")) == 16


def test_default_run_folders_are_new_even_in_the_same_second(tmp_path):
    import ppo_rlhf

    base = str(tmp_path / "runs" / "ppo__1__1700000000")
    assert [ppo_rlhf.new_folder(base) for _ in range(3)] == [base, base + "_2", base + "_3"]


def test_args_json_records_the_device_and_precision_that_ran(tmp_path, llama):
    out = tmp_path / "run"
    code, _, stderr = run_main("rloo_rlhf.py", *llama.args(), *TINY, "--output-dir", str(out), cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    args = json.load(open(out / "args.json"))
    assert args["cuda"] is False and args["mixed_precision"] == "no"  # auto on the CPU: no autocast


def test_missing_eos_penalty_is_off_without_stop_at_eos(tmp_path, llama):
    """A fixed-length response has no end to miss: the penalty would reward an EOS in the middle of the text."""
    out = tmp_path / "run"
    code, stdout, stderr = run_main(
        "rloo_rlhf.py", *llama.args(), *TINY, "--no-stop-at-eos", "--output-dir", str(out), cwd=tmp_path
    )
    assert code == 0, stderr[-3000:]
    assert "--missing-eos-penalty applies only with --stop-at-eos" in stdout
    assert json.load(open(out / "args.json"))["missing_eos_penalty"] is None


def test_ctrl_c_ends_with_one_line_and_an_incomplete_folder(tmp_path, llama):
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import REPO

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "ppo_rlhf.py"),
            *llama.args(),
            "--total-episodes",
            "100000",
            "--batch-size",
            "16",
            "--eval-size",
            "8",
            "--response-length",
            "6",
            "--output-dir",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    deadline = time.time() + 120
    while (
        time.time() < deadline
        and not (out / "metrics.jsonl").exists()
        or "objective" not in (out / "metrics.jsonl").read_text()
    ):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.count("error:") == 1 and "interrupted by Ctrl-C at episode" in stderr.strip().splitlines()[-1]
    assert (out / "INCOMPLETE").exists() and not (out / "model").exists()
    assert any("objective/scores" in r for r in read_jsonl(out / "metrics.jsonl"))


@pytest.mark.parametrize("script", [*SCRIPTS, "ppo_rlhf_multigpu.py", "sac_rlhf_multigpu.py"])  # (twins: own loops)
def test_non_finite_loss_stops_without_saving(script, tmp_path, llama):
    out = tmp_path / "run"
    code, _, stderr = run_main(
        script,
        *llama.args(),
        *TINY,
        "--output-dir",
        str(out),
        "--learning-rate",
        "1e30",
        "--max-grad-norm",
        "None",
        cwd=tmp_path,
    )
    assert code != 0 and "Traceback" not in stderr, stderr[-3000:]
    # PPO's and SAC's several steps per rollout meet the NaN in a loss; RLOO's single step first meets it when sampling.
    if script in ["rloo_rlhf.py", "grpo_rlhf.py"]:
        assert "next-token probabilities are not finite" in stderr
    else:
        assert "non-finite loss" in stderr and "at update 1;" in stderr
    assert not (out / "model").exists() and (out / "INCOMPLETE").exists()


# ---------------------------------------------------------------------------------------------
# Precision: bf16 and fp16 autocast run on the CPU too, the very code path a GPU runs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_mixed_precision_runs_on_the_cpu_with_kl_zero_at_the_start(script, precision, tmp_path, llama, monkeypatch):
    out = tmp_path / "run"
    through_scaler, scaler_step = set(), torch.amp.GradScaler.step
    monkeypatch.setattr(
        torch.amp.GradScaler,
        "step",
        lambda self, opt, *a, **k: through_scaler.add(opt) or scaler_step(self, opt, *a, **k),
    )
    steps = record_optimizer_steps(monkeypatch)
    extra = ["--autotune", "--alpha", "0.1"] if script == "sac_rlhf.py" else []
    code, _, stderr = run_main(
        script, *llama.args(), *TINY, "--mixed-precision", precision, "--output-dir", str(out), *extra, cwd=tmp_path
    )
    assert code == 0, stderr[-3000:]
    # Every optimizer steps through the gradient scaler (a no-op for bf16; for fp16 it unscales and skips infs).
    assert steps and {s["optimizer"] for s in steps} == through_scaler
    assert json.load(open(out / "args.json"))["mixed_precision"] == precision
    records = read_jsonl(out / "metrics.jsonl")
    assert all(math.isfinite(v) for r in records for v in r.values())
    # Policy and reference are the same model at the start: the KL is exactly 0 under autocast as in fp32.
    assert records[0]["eval/kl"] == 0.0 and records[1]["objective/kl"] == 0.0
    assert records[-1]["eval/kl"] != 0.0  # and the policy did move


def test_precision_of_each_model_under_autocast(llama):
    """fp32 master weights for what is trained and for the reference; the reward models held in the low precision;
    forward passes in bf16 under autocast, log-probs in fp32."""
    import ppo_rlhf as ppo

    args = ppo.Args(**dict(zip([a[2:].replace("-", "_") for a in llama.args()[::2]], llama.args()[1::2])))
    args.gold_reward_model_name, args.mixed_precision = llama.reward, "bf16"
    device, autocast, tokenizer, policy, ref_policy, reward_model, gold_model = ppo.load_models(args)
    assert policy.dtype == ref_policy.dtype == torch.float32
    assert reward_model.dtype == gold_model.dtype == torch.bfloat16
    query, query_mask = ppo.left_pad([[5, 6, 7]], tokenizer.pad_token_id, device)
    responses, resp_mask = torch.tensor([[8, 9]]), torch.ones(1, 2, dtype=torch.long)
    with autocast:
        assert policy(input_ids=query).logits.dtype == torch.bfloat16
    logprobs, entropy = ppo.forward_logprobs(policy, query, query_mask, responses, resp_mask, 1.0, autocast)
    assert logprobs.dtype == entropy.dtype == torch.float32
    assert ppo.get_scores(reward_model, query, query_mask, responses, resp_mask, autocast).dtype == torch.float32


def test_reference_reset_is_exact_in_fp32():
    """ref <- mix * policy + (1 - mix) * ref, exactly as in fp32 even for a small mix (bf16 would round it away)."""
    import ppo_rlhf as ppo

    torch.manual_seed(0)
    policy, ref = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    before = [p.detach().clone() for p in ref.parameters()]
    ppo.lerp_parameters(ref, policy, 0.01)
    for r, b, p in zip(ref.parameters(), before, policy.parameters()):
        torch.testing.assert_close(r, b + 0.01 * (p - b), atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------------------------
# The shared RLHF core: sampling, masks, scores
# ---------------------------------------------------------------------------------------------
def test_sampling_with_the_kv_cache_uses_the_full_forward_distribution(world, monkeypatch):
    """Every next-token distribution generate() samples from is softmax(full forward logits / temperature), and the
    training log-probs (forward_logp_all, forward_logprobs and its entropy) describe that very distribution, at a
    temperature that is not 1 (where dropping `/ temperature` on either side would change nothing)."""
    import types

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ppo_rlhf as ppo

    tok = AutoTokenizer.from_pretrained(world.policy)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    policy = AutoModelForCausalLM.from_pretrained(world.policy, dtype=torch.float32).eval()
    query, query_mask = ppo.left_pad([tok("the red cat sees")["input_ids"], tok("a dog")["input_ids"]], pad_id, "cpu")
    seen, multinomial = [], torch.multinomial
    monkeypatch.setattr(
        torch,
        "multinomial",
        lambda probs, n, generator: seen.append(probs) or multinomial(probs, n, generator=generator),
    )
    args = types.SimpleNamespace(response_length=5, temperature=0.7, stop_at_eos=False)
    tokens = ppo.generate(
        policy, query, query_mask, args, tok.eos_token_id, torch.Generator().manual_seed(0), NO_AUTOCAST
    )
    assert tokens.shape == (2, 5) and len(seen) == 5
    ids, mask = torch.cat([query, tokens], 1), torch.cat([query_mask, torch.ones_like(tokens)], 1)
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=mask, position_ids=ppo.position_ids(mask)).logits
    for t in range(5):
        want = torch.softmax(logits[:, query.shape[1] - 1 + t] / 0.7, -1)
        torch.testing.assert_close(seen[t], want, atol=1e-5, rtol=1e-4)
    sampled = torch.stack(seen, 1)  # [batch, time, vocab]: what generate() drew each token from
    resp_mask = torch.ones_like(tokens)
    with torch.no_grad():
        logp_all = ppo.forward_logp_all(policy, query, query_mask, tokens, resp_mask, 0.7, NO_AUTOCAST)
        logprobs, entropy = ppo.forward_logprobs(policy, query, query_mask, tokens, resp_mask, 0.7, NO_AUTOCAST)
    torch.testing.assert_close(logp_all.exp(), sampled, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logprobs.exp(), sampled.gather(-1, tokens[..., None])[..., 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(entropy, torch.special.entr(sampled).sum(-1), atol=1e-4, rtol=1e-4)


def test_generate_stops_once_every_row_has_ended(llama, monkeypatch):
    import types

    from transformers import AutoModelForCausalLM

    import ppo_rlhf as ppo

    policy = AutoModelForCausalLM.from_pretrained(llama.policy, dtype=torch.float32).eval()
    eos = policy.config.eos_token_id
    draws = iter([[[5], [eos]], [[eos], [6]], [[7], [8]], [[9], [9]]])  # row 0 ends at step 2, row 1 at step 1
    monkeypatch.setattr(torch, "multinomial", lambda probs, n, generator: torch.tensor(next(draws)))
    args = types.SimpleNamespace(response_length=4, temperature=1.0, stop_at_eos=True)
    query, query_mask = ppo.left_pad([[5, 6], [7]], 0, "cpu")
    tokens = ppo.generate(policy, query, query_mask, args, eos, None, NO_AUTOCAST)
    assert tokens.tolist() == [[5, eos], [eos, 6]]  # stopped after step 2: both rows have an EOS
    args.stop_at_eos = False
    draws = iter([[[5], [eos]], [[eos], [6]], [[7], [8]], [[9], [9]]])
    assert ppo.generate(policy, query, query_mask, args, eos, None, NO_AUTOCAST).shape == (2, 4)


def test_rollout_subtracts_the_missing_eos_penalty_from_responses_without_eos(llama, monkeypatch):
    import types

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import ppo_rlhf as ppo

    policy = AutoModelForCausalLM.from_pretrained(llama.policy, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(llama.policy, dtype=torch.float32).eval()
    with torch.no_grad():
        ref.lm_head.weight.mul_(3.0)  # a reference that is not the policy
    rm = AutoModelForSequenceClassification.from_pretrained(llama.reward, dtype=torch.float32).eval()
    eos, pad = policy.config.eos_token_id, policy.config.pad_token_id
    raw = torch.tensor([[5, eos, 9], [5, 6, 7], [eos, 8, 8]])
    monkeypatch.setattr(ppo, "generate", lambda model, *a: raw if model is policy else None)  # the policy samples
    query, query_mask = ppo.left_pad([[5, 6], [7], [8, 9]], pad, "cpu")
    args = types.SimpleNamespace(temperature=0.7, stop_at_eos=True, missing_eos_penalty=2.5, rollout_micro_batch_size=2)
    responses, mask, has_eos, logprobs, ref_logprobs, entropy, scores = ppo.rollout(
        policy, ref, rm, query, query_mask, args, eos, pad, None, NO_AUTOCAST
    )
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]] and has_eos.tolist() == [True, False, True]
    raw_scores = ppo.get_scores(rm, query, query_mask, responses, mask.long(), NO_AUTOCAST)
    torch.testing.assert_close(scores, raw_scores - torch.tensor([0.0, 2.5, 0.0]))
    # Each model's own log-probs at the rollout's temperature, 0 at padding.
    want, want_entropy = ppo.forward_logprobs(policy, query, query_mask, responses, mask.long(), 0.7, NO_AUTOCAST)
    want_ref, _ = ppo.forward_logprobs(ref, query, query_mask, responses, mask.long(), 0.7, NO_AUTOCAST)
    torch.testing.assert_close(logprobs, want.detach())
    torch.testing.assert_close(entropy, want_entropy.detach())
    torch.testing.assert_close(ref_logprobs, want_ref.detach())
    assert (logprobs * (1 - mask)).abs().sum() == 0 and (logprobs - ref_logprobs)[mask.bool()].abs().min() > 1e-3


# ---------------------------------------------------------------------------------------------
# The main loops, run in this process: schedule, reference resets
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_learning_rates_decay_linearly_to_zero_over_the_updates(script, llama, tmp_path, monkeypatch):
    """The learning rates decay linearly. Also each model is in its place (the policy and the reference are one model
    at the start, and the reward model and PPO's value model too): every rollout and evaluation samples from the
    trained policy, and reads its reference and reward model, neither of them trained; the KL metrics take the policy's
    and the reference's log-probs each in its place, and the KL loss differentiates the policy's."""
    steps = record_optimizer_steps(monkeypatch)
    extra = {
        "ppo_rlhf.py": ["--num-ppo-epochs", "2"],  # not --num-minibatches (4): each count in its place
        "rloo_rlhf.py": [],
        "grpo_rlhf.py": ["--kl-estimator", "k2"],
        "sac_rlhf.py": ["--autotune", "--alpha", "0.1", "--q-learning-rate", "3e-3"],
    }[script]
    with record_calls(
        "rollout", "evaluate", "generate", "batch_stats", "token_kl_loss", "sequence_kl_loss", "kl_penalty"
    ) as calls:
        code, _, stderr = run_main(
            script,
            *llama.args(),
            *TINY,
            "--total-episodes",
            "64",
            "--learning-rate",
            "1e-3",
            "--output-dir",
            str(tmp_path / "run"),
            *extra,
            cwd=tmp_path,
        )
    assert code == 0, stderr[-3000:]
    optimizers = list(dict.fromkeys(s["optimizer"] for s in steps))  # policy first; SAC: then critic, alpha
    trained = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    policy = {id(p) for p in optimizers[0].param_groups[0]["params"]}

    def is_policy(model):
        return id(next(model.parameters())) in policy

    def is_trained(model):
        return id(next(model.parameters())) in trained

    assert len(calls["rollout"]) == 4 + 5 and len(calls["evaluate"]) == 5  # 4 updates, 5 evaluations
    for call in calls["rollout"] + calls["evaluate"]:
        assert is_policy(call["policy"]) and not is_trained(call["ref_policy"]) and not is_trained(call["reward_model"])
    assert len(calls["generate"]) == 4 + 2 * 5 and all(is_policy(call["model"]) for call in calls["generate"])
    rates = [[s["lr"] for s in steps if s["optimizer"] is opt] for opt in optimizers]
    factors = [1, 0.75, 0.5, 0.25]  # update u of 4 runs at (1 - (u - 1) / 4) of the initial rate
    per_update = {"ppo_rlhf.py": 8, "rloo_rlhf.py": 1, "sac_rlhf.py": 4, "grpo_rlhf.py": 1}[
        script
    ]  # PPO: 2 epochs x 4 minibatches
    assert rates[0] == pytest.approx([1e-3 * f for f in factors for _ in range(per_update)])
    if script == "sac_rlhf.py":  # the critic's and alpha's rates decay alongside, from --q-learning-rate
        assert len(optimizers) == 3 and rates[1] == rates[2] == pytest.approx([3 * x for x in rates[0]])
    # Each batch_stats call reads one rollout's policy log-probs as logprobs, its reference's as ref_logprobs, and its
    # scores (not RLOO's rewards, the scores minus the KL penalty: the same at the first update, where the KL is 0).
    rollouts = [call["return"] for call in calls["rollout"]]  # responses, mask, has_eos, logprobs, ref_logprobs, ...
    assert len(calls["batch_stats"]) == 4 + 5
    for call in calls["batch_stats"]:
        read = (call["logprobs"], call["ref_logprobs"], call["scores"])
        assert any(all(a is b for a, b in zip(read, (r[3], r[4], r[6]))) for r in rollouts)
    kl_losses = calls["token_kl_loss"] + calls["sequence_kl_loss"]  # PPO's, RLOO's (with kl_coef 0 in the reward)
    if script == "grpo_rlhf.py":  # GRPO's KL term in the loss (its default): the kl_penalty calls that take a gradient
        kl_losses = [c for c in calls["kl_penalty"] if c["logprobs"].requires_grad]
    assert len(kl_losses) == (0 if script == "sac_rlhf.py" else 4 * per_update)
    assert all(c["logprobs"].requires_grad and not c["ref_logprobs"].requires_grad for c in kl_losses)


@pytest.mark.parametrize("script", SCRIPTS)
def test_reference_reset_copies_the_policy(script, llama, tmp_path):
    """--ref-sync-mix 1 copies the policy into the reference (here after every update); a mix that is neither 1 nor 1/2
    (0.25) moves the reference that far towards the policy, no further, and leaves the policy alone (read at the end of
    a run whose last update resets it), every 2 updates (not after every one, as a sync every update would)."""
    from transformers import AutoModelForCausalLM

    out, resets = {}, {}
    for mix, every, episodes in [("1.0", "1", "48"), ("0.25", "2", "32")]:
        out[mix] = tmp_path / f"mix{mix}"
        with record_calls("lerp_parameters") as calls:
            code, _, stderr = run_main(
                script,
                *llama.args(),
                *TINY,
                "--total-episodes",
                episodes,
                "--learning-rate",
                "1e-2",
                "--ref-sync-every",
                every,
                "--ref-sync-mix",
                mix,
                "--no-save-model",
                "--output-dir",
                str(out[mix]),
                cwd=tmp_path,
            )
        assert code == 0, stderr[-3000:]
        resets[mix] = [c for c in calls["lerp_parameters"] if type(c["target"]).__name__.endswith("ForCausalLM")]
    synced, mixed = read_jsonl(out["1.0"] / "metrics.jsonl"), read_jsonl(out["0.25"] / "metrics.jsonl")
    # After each update the reference is set to the policy: the evaluation right after it, and the next rollout, see
    # no KL at all; after update 1 (no reset yet) and after a partial reset both do.
    evals, train = [r for r in synced if "eval/kl" in r], [r for r in synced if "objective/kl" in r]
    assert [r["episode"] for r in evals] == [0, 16, 32, 48]
    assert [r["eval/kl"] for r in evals[1:]] == [0.0] * 3 and [r["objective/kl"] for r in train] == [0.0] * 3
    evals = [r for r in mixed if "eval/kl" in r]
    assert evals[1]["eval/kl"] != 0.0 and evals[2]["eval/kl"] != 0.0
    assert [len(resets["1.0"]), len(resets["0.25"])] == [3, 1]  # after updates 1, 2, 3; after update 2
    start = AutoModelForCausalLM.from_pretrained(llama.policy, dtype=torch.float32).state_dict()
    # The policy and the reference as the run left them: after update 2, the last, and its reset.
    policy, ref = resets["0.25"][0]["source"].state_dict(), resets["0.25"][0]["target"].state_dict()
    assert sum(not torch.equal(policy[name], start[name]) for name in start) > len(start) / 2  # the policy moved
    for name, initial in start.items():  # the reference was the initial policy until then
        torch.testing.assert_close(ref[name], torch.lerp(initial, policy[name], 0.25))


@pytest.mark.parametrize("precision", ["no", "fp16"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_gradients_are_clipped_to_max_grad_norm(script, precision, llama, tmp_path, monkeypatch):
    """Each optimizer's global gradient norm is clipped to --max-grad-norm: to max * n / (n + 1e-6) for a natural norm
    n (torch's epsilon), so to over half of it here (every natural norm is over 2.5e-5); under fp16 the gradients
    are unscaled before clipping, or the step would be 65536 times too small."""
    steps = record_optimizer_steps(monkeypatch)
    code, _, stderr = run_main(
        script,
        *llama.args(),
        *TINY,
        "--max-grad-norm",
        "1e-5",
        "--mixed-precision",
        precision,
        "--output-dir",
        str(tmp_path / "run"),
        cwd=tmp_path,
    )
    assert code == 0, stderr[-3000:]
    norms = [
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in s["grads"]])).item() for s in steps
    ]
    assert len(norms) >= 2 and all(0.5e-5 < n <= 1.0001e-5 for n in norms), norms  # SAC: actor and critic each


@pytest.fixture(scope="session")
def gold_of_llama(worlds, tmp_path_factory):
    """A gold RM that is not the proxy RM and whose every score is known: the llama world's RM with its score head
    times -2, so gold(x, y) = -2 * proxy(x, y) exactly (the head has no bias; -2 is exact in floating point)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("gold") / "gold_reward_model"
    rm = AutoModelForSequenceClassification.from_pretrained(worlds["llama"].reward)
    assert getattr(rm.score, "bias", None) is None
    with torch.no_grad():
        rm.score.weight.mul_(-2.0)
    rm.save_pretrained(path)
    AutoTokenizer.from_pretrained(worlds["llama"].reward).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("script", SCRIPTS)
def test_evaluation_over_several_batches_is_the_mean_over_every_prompt(script, llama, gold_of_llama, tmp_path):
    """Each evaluation's means count every prompt once, and the gold scores are the gold RM's (not the proxy's, with
    the proxy's missing-EOS penalty off so that every gold score is -2 times its proxy score)."""
    out = tmp_path / "run"
    code, _, stderr = run_main(
        script,
        *llama.args(),
        *TINY,
        "--batch-size",
        "4",
        "--total-episodes",
        "16",
        "--eval-every",
        "8",
        "--eval-size",
        "6",
        "--gold-reward-model-name",
        gold_of_llama,
        "--missing-eos-penalty",
        "None",
        "--output-dir",
        str(out),
        cwd=tmp_path,
    )
    assert code == 0, stderr[-3000:]
    samples, evals = (
        read_jsonl(out / "samples.jsonl"),
        [r for r in read_jsonl(out / "metrics.jsonl") if "eval/scores" in r],
    )
    assert [r["episode"] for r in evals] == [0, 8, 16]  # before training, every 8 episodes, after the last update
    for r in evals:  # batches of 4 and 2 prompts: each prompt counts once
        scores = [s["score"] for s in samples if s["episode"] == r["episode"]]
        assert len(scores) == 6 and r["eval/scores"] == pytest.approx(sum(scores) / 6)
        gold = [s["gold_score"] for s in samples if s["episode"] == r["episode"]]
        assert r["eval/gold_scores"] == pytest.approx(sum(gold) / 6)
        assert gold == pytest.approx([-2 * s for s in scores], rel=1e-5, abs=1e-6)  # the gold RM's, on the same text
        assert len({s["response"] for s in samples if s["episode"] == r["episode"]}) > 1  # each prompt's own
    assert min(abs(s["score"]) for s in samples) > 1e-3  # so gold = proxy would fail the line above


def test_prompt_stream_reshuffles_every_pass_and_truncates_from_the_left(llama):
    import random

    from transformers import AutoTokenizer

    import ppo_rlhf as ppo

    random.seed(0)
    order = []
    first, second = ppo.next_prompt_indices(order, 20, 8), ppo.next_prompt_indices(order, 4, 8)
    stream = first + second  # three passes over 8 prompts, each a permutation
    assert all(sorted(stream[i : i + 8]) == list(range(8)) for i in (0, 8, 16)) and order == []
    tok = AutoTokenizer.from_pretrained(llama.policy)
    ids = tok("the red cat sees a dog")["input_ids"]
    assert ppo.tokenize_prompts(tok, ["the red cat sees a dog", "a dog"], 3, "--dataset") == [
        ids[-3:],
        tok("a dog")["input_ids"],
    ]


def test_batch_stats_sum_the_log_ratio_over_real_tokens():
    import ppo_rlhf as ppo

    r = dict(
        logprobs=torch.tensor([[-1.0, -2, 0], [-0.5, -0.5, -0.5]]),
        ref_logprobs=torch.tensor([[-2.0, -1, 0], [-1.0, -1, -2]]),
        mask=torch.tensor([[1.0, 1, 0], [1, 1, 1]]),
        entropy=torch.tensor([[1.0, 3, 9], [2, 2, 2]]),
        scores=torch.tensor([1.0, 2.0]),
        has_eos=torch.tensor([True, False]),
    )
    stats = ppo.batch_stats(r["scores"], r["logprobs"], r["ref_logprobs"], r["entropy"], r["mask"], r["has_eos"])
    assert stats["kl"] == pytest.approx((0.0 + 2.5) / 2) and stats["scores"] == pytest.approx(1.5)
    assert stats["entropy"] == pytest.approx((1 + 3 + 2 + 2 + 2) / 5) and stats["response_length"] == pytest.approx(2.5)
    assert stats["eos_rate"] == pytest.approx(0.5)


def test_masked_mean_is_the_mean_over_real_tokens_even_one_or_none():
    """Over every real token of the batch, however many rows hold them; one real token is its own mean (a minibatch of
    one short response), and no real token gives 0, not a division by zero."""
    import ppo_rlhf as ppo

    x = torch.tensor([[1.0, 2.0, 30.0], [4.0, 50.0, 60.0]])
    assert ppo.masked_mean(x, torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])).item() == pytest.approx(7 / 3)
    assert ppo.masked_mean(x, torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])).item() == 4.0
    assert ppo.masked_mean(x, torch.zeros(2, 3)).item() == 0.0


@pytest.mark.parametrize("module", ["ppo_rlhf", "rloo_rlhf"])
def test_kl_estimators_have_schulmans_values(module):
    """k1 = log r, k2 = (log r)^2 / 2, k3 = (r' - 1) - log r' with r' = pi_ref / pi (Schulman 2020), on numbers."""
    import importlib

    kl_penalty = importlib.import_module(module).kl_penalty
    logprobs, ref_logprobs = torch.log(torch.tensor([0.5, 0.2, 0.3])), torch.log(torch.tensor([0.25, 0.4, 0.3]))
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k1"), torch.log(torch.tensor([2.0, 0.5, 1.0])))
    torch.testing.assert_close(
        kl_penalty(logprobs, ref_logprobs, "k2"), 0.5 * torch.log(torch.tensor([2.0, 0.5, 1.0])) ** 2
    )
    torch.testing.assert_close(
        kl_penalty(logprobs, ref_logprobs, "k3"), torch.tensor([0.5 - 1 - math.log(0.5), 2.0 - 1 - math.log(2.0), 0.0])
    )


@pytest.mark.parametrize("script", ["ppo_rlhf.py"])  # RLOO's one noisy step per batch needs a far longer run to show it
def test_kl_in_the_loss_pulls_the_policy_towards_the_reference(script, llama, tmp_path):
    kls = {}
    for kl_coef in ["0", "3"]:
        out = tmp_path / kl_coef
        code, _, stderr = run_main(
            script,
            *llama.args(),
            *TINY,
            "--total-episodes",
            "64",
            "--learning-rate",
            "1e-2",
            "--kl-in",
            "loss",
            "--kl-estimator",
            "k2",
            "--kl-coef",
            kl_coef,
            "--output-dir",
            str(out),
            cwd=tmp_path,
        )
        assert code == 0, stderr[-3000:]
        kls[kl_coef] = [r["eval/kl"] for r in read_jsonl(out / "metrics.jsonl") if "eval/kl" in r][-1]
    assert kls["3"] < 0.5 * kls["0"], kls


ACCUMULATION_FLAGS = {
    "ppo_rlhf_multigpu.py": ["--num-minibatches", "2", "--num-ppo-epochs", "1"],  # minibatches of 8, micro 2
    "rloo_rlhf_multigpu.py": ["--kl-in", "loss", "--kl-estimator", "k2"],
    "grpo_rlhf_multigpu.py": ["--loss-type", "dapo"],  # its weights read the whole batch's lengths
}  # the KL term accumulated too


@pytest.mark.parametrize("script", list(ACCUMULATION_FLAGS))  # a memory flag: the twins'
def test_gradient_accumulation_gives_the_gradient_of_one_big_minibatch(script, tinyworld, tmp_path, monkeypatch):
    """The tinyworld's responses have unequal lengths: micro-batches must weigh every token (PPO) or every response
    (RLOO) as one big minibatch would. The first optimizer step sees the same rollout and policy in every run. PPO's
    token counts that weigh the micro-batches are those of each minibatch: together, every token of the rollout once
    (a count over more rows, or a mean, scales every step alike in both runs)."""
    grads = {}
    for steps in [1, 4]:
        recorded = record_optimizer_steps(monkeypatch)
        out = tmp_path / f"run{steps}"
        with record_calls("rollout", "mean_over_ranks") as calls:
            code, _, stderr = run_main(
                script,
                *tinyworld.args(),
                "--total-episodes",
                "16",
                "--batch-size",
                "16",
                "--gradient-accumulation-steps",
                str(steps),
                "--eval-size",
                "4",
                "--eval-every",
                "100",
                "--max-grad-norm",
                "None",
                "--no-save-model",
                "--output-dir",
                str(out),
                *ACCUMULATION_FLAGS[script],
                cwd=tmp_path,
            )
        assert code == 0, stderr[-3000:]
        grads[steps] = recorded[0]["grads"]
        if script == "ppo_rlhf_multigpu.py":  # one epoch of 2 minibatches
            counts = [c["x"] for c in calls["mean_over_ranks"] if c["x"].dim() == 0]  # not the logged statistics
            mask = next(c["return"][1] for c in calls["rollout"] if len(c["return"][1]) == 16)  # not the evaluations'
            assert len(counts) == 2 and sum(counts) == mask.sum()
        record = next(r for r in read_jsonl(out / "metrics.jsonl") if "objective/response_length" in r)
        assert 1 < record["objective/response_length"] < 23  # responses end at their EOS, at different lengths
    assert len(grads[1]) == len(grads[4]) > 0
    for a, b in zip(grads[1], grads[4]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_gradient_carries_over_from_one_optimizer_step_to_the_next(script, llama, tmp_path, monkeypatch):
    """Every backward pass after an optimizer step starts from no gradient on that optimizer's parameters, so each
    step sees only its own minibatch (with Adam, left-over gradients would act like extra momentum, unnoticed)."""
    stepped, leftovers = [], []
    original_backward = torch.Tensor.backward

    def recording(original_step):
        def step(self, *args, **kwargs):
            stepped.append(self)
            return original_step(self, *args, **kwargs)

        return step

    def backward(self, *args, **kwargs):
        for opt in stepped:
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            leftovers.append(sum(float(g.abs().sum()) for g in grads))
        stepped.clear()
        return original_backward(self, *args, **kwargs)

    originals = {cls: cls.step for cls in [torch.optim.Adam, torch.optim.AdamW]}  # each class's own step
    for cls, original_step in originals.items():
        monkeypatch.setattr(cls, "step", recording(original_step))
    monkeypatch.setattr(torch.Tensor, "backward", backward)
    out = tmp_path / "run"
    code, _, stderr = run_main(script, *llama.args(), *TINY, "--output-dir", str(out), cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    assert len(leftovers) > 0 and leftovers == [0.0] * len(leftovers)


@pytest.mark.parametrize("script", ["ppo_rlhf.py", "rloo_rlhf.py"])
def test_k3_in_the_loss_stays_finite_at_a_low_temperature(script, tinyworld, tmp_path):
    """log pi at padding used to be unmasked: exp(-log r) overflowed to inf and the loss became NaN."""
    code, _, stderr = run_main(
        script,
        *tinyworld.args(),
        *TINY,
        "--temperature",
        "0.1",
        "--kl-estimator",
        "k3",
        "--kl-in",
        "loss",
        "--output-dir",
        str(tmp_path / "run"),
        cwd=tmp_path,
    )
    assert code == 0, stderr[-3000:]


def test_distinct_n_counts_distinct_ngrams_over_all_responses():
    import ppo_rlhf as ppo

    responses = [[1, 2, 3], [1, 2, 4], [5]]  # unigrams 1 2 3 1 2 4 5: 5 distinct of 7; bigrams 12 23 12 24: 3 of 4
    assert ppo.distinct_n(responses, 1) == 5 / 7
    assert ppo.distinct_n(responses, 2) == 3 / 4
    # Li et al. 2016 divide by the 7 generated tokens: their distinct-2 is 3 / 7, ours times (7 - 3 responses) / 7.
    assert ppo.distinct_n(responses, 2) * (7 - 3) / 7 == pytest.approx(3 / 7)
    assert ppo.distinct_n([[7], []], 2) == 0.0  # no bigram at all: 0, not a division by zero
    assert ppo.distinct_n([[1, 1, 1, 1]], 1) == 1 / 4


def test_pairwise_similarity_is_the_mean_jaccard_overlap_of_bigram_sets():
    import ppo_rlhf as ppo

    a, b, c = [1, 2, 3], [1, 2, 4], [9]  # bigram sets {12, 23}, {12, 24}, and c's own {(9,)}
    assert ppo.pairwise_similarity([a, a, a]) == 1.0
    assert ppo.pairwise_similarity([a, b]) == 1 / 3  # {12} shared of {12, 23, 24}
    assert ppo.pairwise_similarity([a, b, c]) == (1 / 3 + 0 + 0) / 3
    assert ppo.pairwise_similarity([[], []]) == 1.0  # two empty responses are the same response
    assert ppo.pairwise_similarity([a, b], n=1) == 2 / 4  # unigrams {1, 2, 3} and {1, 2, 4}


def test_evaluation_logs_variety_and_a_collapsed_policy_scores_as_one(tinyworld, tmp_path, monkeypatch):
    """The variety metrics of the tinyworld's SFT policy lie inside their ranges, and are the policy's, not the
    reference's (a policy that is not its reference: the same variety as when it is its own reference, another than
    the reference's); a policy that gives one response to every prompt has self-similarity 1 and distinct-1 of one
    token over all the tokens."""
    import ppo_rlhf as ppo

    args = ppo.Args(eval_size=8, batch_size=8, output_dir=str(tmp_path))
    device, autocast, tokenizer, policy, ref_policy, reward_model, gold_model = ppo.load_models(args)
    eval_ids = ppo.tokenize_prompts(tokenizer, ppo.load_prompts(args.eval_dataset, "--eval-dataset", 8), 16, "x")
    models = (policy, ref_policy, reward_model, gold_model, tokenizer, eval_ids, args, device, autocast)
    record, samples = ppo.evaluate(*models)
    assert 0 < record["eval/distinct_1"] <= 1 and 0 < record["eval/distinct_2"] <= 1
    assert 0 <= record["eval/self_similarity"] < 1
    with torch.no_grad():
        policy.get_output_embeddings().weight.mul_(2.0)  # a sharper policy than its reference
    moved, _ = ppo.evaluate(*models)
    alone, _ = ppo.evaluate(policy, policy, *models[2:])
    variety = ["eval/distinct_1", "eval/distinct_2", "eval/self_similarity"]
    assert [moved[k] for k in variety] == [alone[k] for k in variety] != [record[k] for k in variety]
    assert moved["eval/kl"] > 0 and alone["eval/kl"] == 0
    monkeypatch.setattr(ppo, "generate", lambda *a: a[1][:, :1] * 0 + 5)  # every response: the one token 5
    record_one, _ = ppo.evaluate(*models)
    assert record_one["eval/self_similarity"] == 1.0 and record_one["eval/distinct_1"] == 1 / 8
