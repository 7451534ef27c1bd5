"""What a newcomer meets in the first minutes: every flag's help, typos in model names, a folder with no tokenizer,
--track without wandb, a full disk at the end, resuming with only --output-dir, long prompts, a byte-order mark, an
evaluation cadence that is not whole batches, a bad flag under torchrun, and what args.json records."""

import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import transformers
from transformers import AutoTokenizer

from tests.helpers import OFFLINE_ENV, REPO, TINY, read_jsonl, run_main, run_script

SCRIPTS = [s for s in ["ppo_rlhf.py", "rloo_rlhf.py", "sac_rlhf.py", "grpo_rlhf.py"] if (REPO / s).exists()]


def one_error_line(code, stderr):
    """The run stopped with exactly one line, `error: ...`, and no traceback; returns that line."""
    lines = [line for line in re.split(r"[\r\n]", stderr) if line.strip() and not re.search(r"\d+%\|", line)]  # no bar
    assert code != 0 and "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def llama(worlds):
    return worlds["llama"]


@pytest.mark.parametrize("script", SCRIPTS + [s.replace(".py", "_multigpu.py") for s in SCRIPTS])
def test_every_flag_has_its_help_line(script):
    """tyro reads each field's comment as its help; a method between fields hid the next field's (the first algorithm
    flag of each script had none)."""
    env = {**os.environ, **OFFLINE_ENV, "COLUMNS": "200"}
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    entries = re.split(r"\n│ (?=--)", result.stdout)[1:]  # one entry per flag, with its wrapped lines
    assert len(entries) > 30
    for entry in entries:
        text = re.sub(r"[│─╰╯\s]+", " ", entry)
        flag, _, rest = text.partition(" ")
        described = re.sub(r"\((default|required)[^)]*\)|\{[^}]*\}|\b[A-Z|{},]+\b", "", rest).strip()
        assert len(described) > 10, f"{script} {flag} has no help: {text!r}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_model_name_that_looks_like_a_path_is_a_folder_or_an_error_at_once(script, tmp_path, llama):
    """A typo of a local folder must not become minutes of hub retries: it fails before anything loads."""
    (tmp_path / "my_models").mkdir()
    for name, said in [("my_models/policy", "no such folder"), (str(tmp_path / "no" / "where"), "no such folder")]:
        code, _, stderr = run_main(script, *llama.args(), *TINY, "--model-name", name, cwd=tmp_path)
        line = one_error_line(code, stderr)
        assert line.startswith(f"error: --model-name {name}: {said}"), line
    (tmp_path / "my_models" / "file").write_text("x")
    code, _, stderr = run_main(script, *llama.args(), *TINY, "--reward-model-name", "my_models/file", cwd=tmp_path)
    assert "--reward-model-name my_models/file: is a file" in one_error_line(code, stderr)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_none_and_empty_turn_the_gold_model_off(script):
    """`--gold-reward-model-name none` (or "") means no gold model, as `None` does, instead of a hub look-up."""
    args = importlib.import_module(script.removesuffix(".py")).Args
    for name in ["none", "None", "NONE", "", " "]:
        assert args(gold_reward_model_name=name).gold_reward_model_name is None
    assert args(gold_reward_model_name="my/gold").gold_reward_model_name == "my/gold"


def copy_without_tokenizer(source, folder):
    shutil.copytree(source, folder)
    for name in os.listdir(folder):
        if "token" in name or name.startswith(("vocab", "merges", "special")):
            os.remove(os.path.join(folder, name))


@pytest.mark.parametrize("flag", ["--model-name", "--reward-model-name", "--gold-reward-model-name"])
def test_a_model_folder_with_no_tokenizer_is_named_with_the_fix(flag, tmp_path, llama):
    source = llama.policy if flag == "--model-name" else llama.reward
    copy_without_tokenizer(source, tmp_path / "bare")
    code, _, stderr = run_main("ppo_rlhf.py", *llama.args(), *TINY, flag, str(tmp_path / "bare"), cwd=tmp_path)
    line = one_error_line(code, stderr)
    assert f"{flag} {tmp_path / 'bare'}: this folder has no tokenizer; save the policy's into it" in line


def test_a_reward_model_with_another_vocabulary_says_how_they_differ(tmp_path, llama):
    """An added [PAD] (the usual cause) is named, with both vocabulary sizes."""
    shutil.copytree(llama.reward, tmp_path / "rm")
    tokenizer = AutoTokenizer.from_pretrained(llama.reward)
    size = len(tokenizer.get_vocab())
    tokenizer.add_special_tokens({"additional_special_tokens": ["[PAD]"]})
    tokenizer.save_pretrained(tmp_path / "rm")
    code, _, stderr = run_main("ppo_rlhf.py", *llama.args(), *TINY, "--reward-model-name", str(tmp_path / "rm"))
    line = one_error_line(code, stderr)
    assert f"its tokenizer is not the policy's ({size + 1} tokens against {size}: '[PAD]' = {size} in this one)" in line


@pytest.mark.parametrize("script", SCRIPTS)
def test_track_without_wandb_stops_before_anything_loads(script, tmp_path, llama, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    code, _, stderr = run_main(script, *llama.args(), *TINY, "--track", "--output-dir", str(tmp_path / "run"))
    assert "--track needs wandb" in one_error_line(code, stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_full_disk_at_the_final_save_keeps_the_records_and_says_so(script, tmp_path, llama, monkeypatch):
    def full_disk(self, folder, *args, **kwargs):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "model.safetensors"), "w") as f:
            f.write("half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    out = tmp_path / "run"
    code, _, stderr = run_main(script, *llama.args(), *TINY, "--output-dir", str(out))
    line = one_error_line(code, stderr)
    assert (
        line
        == f"error: --output-dir {out}: cannot save the final model ([Errno 28] No space left on device); records kept"
    )
    assert sorted(os.listdir(out)) == ["INCOMPLETE", "args.json", "metrics.jsonl", "samples.jsonl"]  # no half model
    assert [r["episode"] for r in read_jsonl(out / "metrics.jsonl") if "eval/scores" in r] == [0, 16, 32]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, worlds):
    """A run of the PPO twin (checkpoints are a scale feature) with its own flags that stopped after its checkpoint at
    episode 32 (of 48), and the uninterrupted
    run's records. The stop is made by putting back the INCOMPLETE mark a finished run removes, and cutting the
    records back is the resume's own work (to the lengths the checkpoint holds)."""
    root = tmp_path_factory.mktemp("stopped")
    flags = [*worlds["llama"].args(), *TINY, "--total-episodes", "48", "--save-every", "32", "--seed", "3"]
    result = run_script("ppo_rlhf_multigpu.py", *flags, "--output-dir", root / "run", cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    full = read_jsonl(root / "run" / "metrics.jsonl")
    shutil.rmtree(root / "run" / "model")
    (root / "run" / "INCOMPLETE").write_text("stopped\n")
    return root, flags, full


def test_resume_needs_only_the_output_dir_and_says_where_it_resumed(stopped_run):
    root, _, full = stopped_run
    work = root / "copy"
    shutil.copytree(root / "run", work)
    result = run_script("ppo_rlhf_multigpu.py", "--output-dir", work, "--resume", cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed at episode 32 from its checkpoint in {work}" in result.stderr + result.stdout
    no_time = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_jsonl(work / "metrics.jsonl")]
    assert no_time == [{k: v for k, v in r.items() if not k.startswith("time/")} for r in full]


def test_resume_may_change_the_memory_flags(stopped_run):
    """Running out of memory is the commonest reason to resume: the memory flags may change on resume (the run goes on
    with the same numbers up to float rounding)."""
    root, _, full = stopped_run
    work = root / "memory"
    shutil.copytree(root / "run", work)
    memory = ["--gradient-checkpointing", "--rollout-micro-batch-size", "4", "--gradient-accumulation-steps", "2"]
    result = run_script("ppo_rlhf_multigpu.py", "--output-dir", work, "--resume", *memory, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = read_jsonl(work / "metrics.jsonl")
    assert [sorted(r) for r in resumed] == [sorted(r) for r in full]
    for a, b in zip(resumed, full, strict=True):
        for key in [k for k in a if k.startswith(("objective/", "eval/"))]:
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-3), (a["episode"], key)


def test_resume_on_another_precision_or_device_goes_on(stopped_run):
    """The run stopped in fp32 resumes in fp16 (its scaler had no state: a fresh scale), and a checkpoint written on
    another kind of device (a CUDA generator's 16-byte state, which a CPU generator cannot take) resumes on a new
    sampling stream drawn from it: both go on to the end, not bit for bit (docs/scale.md)."""
    import torch

    root, _, full = stopped_run
    fp16, device = root / "fp16", root / "device"
    shutil.copytree(root / "run", fp16)
    result = run_script("ppo_rlhf_multigpu.py", "--output-dir", fp16, "--resume", "--mixed-precision", "fp16", cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    shutil.copytree(root / "run", device)
    own = torch.load(device / "checkpoint" / "rank0.pt", weights_only=True)  # rank 0's generator and RNG states
    own["generator"] = torch.arange(16, dtype=torch.uint8)  # as a CUDA generator's state
    torch.save(own, device / "checkpoint" / "rank0.pt")
    result = run_script("ppo_rlhf_multigpu.py", "--output-dir", device, "--resume", cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    for run in [fp16, device]:
        assert [r["episode"] for r in read_jsonl(run / "metrics.jsonl")] == [r["episode"] for r in full]


def test_resume_lists_every_flag_that_would_change_the_run_at_once(stopped_run):
    root, _, _ = stopped_run
    run = root / "run"
    flags = ["--output-dir", run, "--resume", "--learning-rate", "1e-3", "--seed", "5", "--save-every", "16"]
    code, _, stderr = run_main("ppo_rlhf_multigpu.py", *flags, cwd=root)
    line = one_error_line(code, stderr)
    assert "--seed 5 (the run's: 3); --learning-rate 0.001 (the run's: 0.0003)" in line and "save-every" not in line


def test_resume_and_output_dir_mistakes_say_the_fix(stopped_run, llama):
    root, flags, _ = stopped_run
    run = str(root / "run")
    cases = [
        (["--resume"], "error: --resume continues the run in --output-dir: pass --output-dir <the run's folder>"),
        (["--resume", "--output-dir", run, "--overwrite-output-dir"], "and --overwrite-output-dir replaces it"),
        (["--resume", "--output-dir", str(root)], f"--output-dir {root} holds no checkpoint"),
        ([*flags, "--output-dir", run], "holds a stopped run with a checkpoint: continue it with --resume"),
    ]
    for args, said in cases:
        code, _, stderr = run_main("ppo_rlhf_multigpu.py", *args, cwd=root)
        assert said in one_error_line(code, stderr)


def test_long_prompts_keep_their_bos_and_end_with_one_note(tinyworld, capsys, caplog):
    import ppo_rlhf as ppo

    tokenizer = AutoTokenizer.from_pretrained(tinyworld.policy)
    tokenizer.model_max_length = 4  # transformers warns past this; the scripts say it once, their way
    prompts = ["the movie was great and i loved it", "the plot"]
    ids = ppo.tokenize_prompts(tokenizer, prompts, 5, "--dataset")
    full = tokenizer(prompts[0], verbose=False)["input_ids"]
    assert full[0] == tokenizer.bos_token_id and len(full) == 9
    assert ids == [[full[0], *full[-4:]], tokenizer(prompts[1])["input_ids"]]  # BOS + the last 4; short ones stay
    out = capsys.readouterr()
    assert out.out == "note: 1 of 2 prompts of --dataset are over --max-prompt-length; each keeps its end\n"
    assert "indexing errors" not in out.err + caplog.text


def test_a_jsonl_with_a_byte_order_mark_is_read(tmp_path):
    import ppo_rlhf as ppo

    (tmp_path / "p.jsonl").write_bytes('{"prompt": "a b"}\n{"prompt": "c"}\n'.encode("utf-8-sig"))
    assert ppo.load_prompts(str(tmp_path / "p.jsonl"), "--dataset") == ["a b", "c"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_eval_cadence_of_part_batches_is_rounded_up_and_said(script, tmp_path, llama):
    out = tmp_path / "run"
    flags = [*TINY, "--total-episodes", "64", "--eval-every", "20", "--output-dir", str(out), "--no-save-model"]
    code, stdout, stderr = run_main(script, *llama.args(), *flags)
    assert code == 0, stderr[-2000:]
    assert "note: evaluating every 32 episodes: --eval-every 20 rounded up to whole batches" in stdout
    assert [r["episode"] for r in read_jsonl(out / "metrics.jsonl") if "eval/scores" in r] == [0, 32, 64]
    assert json.loads((out / "args.json").read_text())["eval_every"] == 32


@pytest.mark.parametrize("script", ["rloo_rlhf.py", "rloo_rlhf_multigpu.py"])  # the twin's own count, as one process
def test_args_json_records_the_processes_and_the_device(script, tmp_path, llama):
    out = tmp_path / "run"
    code, _, stderr = run_main(script, *llama.args(), *TINY, "--output-dir", str(out), "--no-save-model")
    assert code == 0, stderr[-2000:]
    args = json.loads((out / "args.json").read_text())
    assert args["num_processes"] == 1 and args["device"] == "cpu" and args["mixed_precision"] == "no"
    assert args["cpu_threads"] == 1  # the default on the CPU (no OMP_NUM_THREADS here)


def test_a_bad_flag_under_torchrun_is_said_once(tmp_path, llama):
    """Every rank finds it; rank 0 alone says it (torchrun then adds its own report of the failed processes)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [str(REPO / "rloo_rlhf_multigpu.py"), *llama.args(), *TINY, "--batch-size", "9", "--total-episodes", "18"]
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert said == ["error: --batch-size 9 does not split over 2 processes; pass a multiple of it"], result.stderr


def test_a_checkpoint_that_cannot_be_written_keeps_the_last_one(tmp_path, llama, monkeypatch):
    import torch

    save, calls = torch.save, []

    def full_disk_on_the_second(obj, path, *args, **kwargs):  # the second checkpoint's rank0.pt (after DCP's files)
        calls.extend([path] if str(path).endswith("rank0.pt") else [])
        if len(calls) == 2 and str(path).endswith("rank0.pt"):
            with open(path, "w") as f:
                f.write("half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_on_the_second)
    out = tmp_path / "run"
    code, _, stderr = run_main(
        "rloo_rlhf_multigpu.py",
        *llama.args(),
        *TINY,
        "--total-episodes",
        "48",
        "--save-every",
        "16",
        "--output-dir",
        out,
    )
    line = one_error_line(code, stderr)
    assert (
        line.startswith(f"error: --output-dir {out}: cannot write a checkpoint ([enforce fail")
        and "kept the last" in line
    )
    assert not (out / "checkpoint.tmp").exists()
    assert torch.load(out / "checkpoint" / "run.pt", weights_only=True)["loop"]["episode"] == 16  # the first, whole
