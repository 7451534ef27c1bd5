"""From a laptop to many GPUs (README, "Real models"): torchrun data parallel on the CPU with gloo, exact resumption
from checkpoints, gradient checkpointing and chunked no-grad forward passes. Every run here is a real run of a script;
two processes run with one thread each."""

import datetime
import importlib
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.fixed_sampling import inverse_cdf_sampler
from tests.helpers import NO_AUTOCAST, OFFLINE_ENV, REPO, read_jsonl, run_main, run_script

SCRIPTS = ["ppo_rlhf_multigpu.py", "rloo_rlhf_multigpu.py", "sac_rlhf_multigpu.py"]
SMALL = ["--batch-size", "32", "--eval-size", "16", "--response-length", "8"]
# A batch that every process count here splits into whole prompts and whole minibatches (PPO: one minibatch, so one
# process and two see the same minibatch; SAC: the buffer holds one rollout, so every minibatch is all of it). SAC's
# factored critic reads the reference's output layer, reset at update 2 (under torchrun a whole copy of a sharded
# layer), and its tuned alpha is a plain parameter, outside FSDP, whose gradient is averaged apart.
SAME_STEPS = {
    "ppo_rlhf_multigpu.py": ["--num-minibatches", "1"],
    "rloo_rlhf_multigpu.py": [],
    "grpo_rlhf_multigpu.py": ["--loss-type", "dapo"],  # its weights read the lengths of the whole batch, every rank's
    "sac_rlhf_multigpu.py": [
        "--buffer-size",
        "32",
        "--critic",
        "factored",
        "--ref-sync-every",
        "2",
        "--autotune",
        "--alpha",
        "0.05",
    ],
}
# Flags of the two-process run only, which change no number: PPO's and RLOO's gradients accumulated over two
# micro-batches (FSDP reduces them on the last only); RLOO's frozen models whole on each rank; SAC's no-grad passes
# (the evaluation's split over the ranks) 3 rows at a time.
TWO_ONLY = {
    "ppo_rlhf_multigpu.py": ["--gradient-accumulation-steps", "2"],
    "rloo_rlhf_multigpu.py": ["--gradient-accumulation-steps", "2", "--no-shard-frozen"],
    "grpo_rlhf_multigpu.py": ["--gradient-accumulation-steps", "2"],
    "sac_rlhf_multigpu.py": ["--rollout-micro-batch-size", "3"],
}


ENV = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}  # every child's: offline, CPU, one thread each


def torchrun_command(nproc, *args):
    """`torchrun --standalone --nproc-per-node nproc *args` (gloo on the CPU), as a command list."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *map(str, args)]


def torchrun(nproc, *args, cwd, timeout=600):
    """Run torchrun_command to the end, with ENV; return the CompletedProcess (no assert)."""
    return subprocess.run(
        torchrun_command(nproc, *args), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def records(run, prefixes=("episode", "objective/", "eval/")):
    """metrics.jsonl without the wall-clock keys (or only the keys with the given prefixes)."""
    return [{k: v for k, v in r.items() if k.startswith(prefixes)} for r in read_jsonl(run / "metrics.jsonl")]


def assert_close_records(a, b, tol):
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key, value in ra.items():
            assert rb[key] == pytest.approx(value, rel=tol, abs=tol), (ra["episode"], key)


def policy_weights(run):
    return load_file(run / "model" / "model.safetensors")


@pytest.mark.parametrize("script", [*SCRIPTS, "grpo_rlhf_multigpu.py"])
def test_two_processes_take_the_same_steps_as_one(script, tmp_path, monkeypatch):
    """With the same responses (fixed sampling, tests/fixed_sampling.py), two processes that each hold half of every
    batch and half of every model (FSDP) average their gradients to the one-process gradient of the whole batch: the
    same policy after three updates (float noise: sums in another order), the same common metrics, which are those of
    the global batch, and the same evaluations (each rank samples its share of them from the policy gathered whole)."""
    k = "4" if script in ["rloo_rlhf_multigpu.py", "grpo_rlhf_multigpu.py"] else "1"  # responses per prompt
    flags = [*SMALL, *SAME_STEPS[script], "--total-episodes", "96", "--eval-every", "64"]
    monkeypatch.setattr(torch, "multinomial", inverse_cdf_sampler(int(k)))  # this process: the one-process run
    code, _, stderr = run_main(script, *flags, "--output-dir", tmp_path / "one", cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    sampled = [str(REPO / "tests" / "fixed_sampling.py"), k, str(REPO / script), *flags]
    two = torchrun(2, *sampled, *TWO_ONLY[script], "--output-dir", str(tmp_path / "two"), cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_close_records(records(tmp_path / "one"), records(tmp_path / "two"), tol=1e-5)
    assert read_jsonl(tmp_path / "one" / "samples.jsonl")[-1]["response"] != ""
    trained_one, trained_two = policy_weights(tmp_path / "one"), policy_weights(tmp_path / "two")
    start = load_file(REPO / "tinyworld" / "sft" / "model.safetensors")
    assert any(not torch.equal(weight, start[name]) for name, weight in trained_one.items())  # it learned
    for name, weight in trained_one.items():
        torch.testing.assert_close(trained_two[name], weight, rtol=1e-5, atol=1e-5)


COUNTING = """
import runpy, sys, torch
sample, rows, seeds = torch.multinomial, set(), set()
def counting(probs, num_samples, generator=None):  # the real sampler, noting the rows it samples at once and the seeds
    rows.add(len(probs))
    seeds.add(generator.initial_seed())
    return sample(probs, num_samples, generator=generator)
torch.multinomial = counting
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print(f"rows sampled at once: {sorted(rows)}; seeds: {sorted(seeds)}", flush=True)
"""


@pytest.mark.parametrize(
    "script, episodes, flags",
    [("ppo_rlhf_multigpu.py", 256, ["--num-minibatches", "2"]), ("rloo_rlhf_multigpu.py", 1024, [])],
    ids=SCRIPTS[:2],
)
def test_a_two_process_run_learns_and_writes_one_run_folder(script, episodes, flags, tmp_path):
    """A real two-process run (each rank its own sampling seed) raises the evaluation score, and rank 0 alone writes
    the run folder, with the common keys in every record. Each rank samples its 16 rows of a rollout, its 8 of the 16
    evaluation prompts and its 32 of the 64 variety rows, with seeds of its own, never all of the rows (memory: at 8
    GPUs an evaluation sampled whole on each rank holds 8 times a rollout's KV cache). (SAC's: the resume test.)"""
    out = tmp_path / "run"
    (tmp_path / "counting.py").write_text(COUNTING)
    result = torchrun(
        2,
        tmp_path / "counting.py",
        str(REPO / script),
        *SMALL,
        *flags,  # (PPO: 2 minibatches of 8 responses per rank, not 4 of 4: half the steps, for CI's time)
        "--total-episodes",
        episodes,
        "--eval-every",
        episodes,
        "--output-dir",
        out,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["args.json", "metrics.jsonl", "model", "samples.jsonl"]
    assert not (tmp_path / "runs").exists()  # the other rank made no folder of its own
    rows = read_jsonl(out / "metrics.jsonl")
    train, evals = [r for r in rows if "update" in r], [r for r in rows if "eval/scores" in r]
    assert [r["episode"] for r in train] == list(range(32, episodes + 1, 32))
    assert all({"objective/scores", "objective/kl", "objective/entropy", "loss/policy"} <= set(r) for r in train)
    assert [r["episode"] for r in evals] == [0, episodes]
    assert evals[1]["eval/scores"] > evals[0]["eval/scores"] + 0.2
    assert len(read_jsonl(out / "samples.jsonl")) == 2 * 16  # one evaluation set each time, not one per rank
    lines = [line for line in result.stdout.splitlines() if line.startswith("rows sampled at once: [8, 16, 32]; ")]
    seeds = [set(json.loads(line.split("seeds: ")[1])) for line in lines]
    assert len(seeds) == 2 and len(seeds[0]) == len(seeds[1]) == 3, result.stdout[-3000:]  # rollouts, eval, variety
    assert not seeds[0] & seeds[1], seeds  # each rank its own draws, in the evaluation as in training


def test_each_process_holds_half_of_every_model_and_of_the_optimizer_state(tmp_path):
    """Under torchrun the models are sharded (FSDP2): each of two processes holds half of every model's parameters
    (the policy, the value model, and the frozen reference, reward and gold models) and half of the optimizer's
    parameters and AdamW moments, the two halves making the whole (tests/record_shards.py records them at the first
    step), and nothing stays gathered after a forward pass (after sampling, the rollout's no-grad passes and the
    update's forward pass, before its backward pass, each rank holds the same half). --no-shard-frozen keeps whole
    copies of the frozen models and shards the trained ones."""
    flags = [*SMALL, "--total-episodes", "32", "--eval-every", "32", "--num-ppo-epochs", "1", "--no-save-model"]
    trained, frozen = ["LlamaForCausalLM", "LlamaForSequenceClassification"], ["LlamaForCausalLM"]
    frozen += ["LlamaForSequenceClassification"] * 2  # the reward and gold models
    for name, extra, models in [("sharded", [], trained + frozen), ("copies", ["--no-shard-frozen"], trained)]:
        recorded = [str(REPO / "tests" / "record_shards.py"), str(tmp_path / name), str(REPO / "ppo_rlhf_multigpu.py")]
        result = torchrun(2, *recorded, *flags, *extra, "--output-dir", tmp_path / f"{name}_run", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [read_jsonl(tmp_path / f"{name}{rank}") for rank in [0, 1]]
        before, ranks = [x[0]["before_backward"] for x in lines], [x[1] for x in lines]  # then the first step's
        assert before == [r["models"] for r in ranks], name  # every model resharded after its forward passes
        assert [m[0] for m in ranks[0]["models"]] == models, name
        held = [[local for _, local, _ in r["models"]] + [r["params"][0], r["moments"][0]] for r in ranks]
        whole = [total for _, _, total in ranks[0]["models"]] + [ranks[0]["params"][1], ranks[0]["moments"][1]]
        assert whole[-1] == 2 * whole[-2] > 0  # AdamW's two moments of every trained parameter
        for local_0, local_1, total in zip(*held, whole, strict=True):
            assert local_0 + local_1 == total and abs(local_0 - total / 2) < 0.01 * total, (name, held, whole)


BRANCH = """
import sys, copy, torch
sys.path.insert(0, sys.argv[1])
import ppo_rlhf_multigpu as ppo

class Routed(torch.nn.Module):  # an expert only some data reaches (a mixture of experts, a custom branch)
    def __init__(self):
        super().__init__()
        self.shared, self.expert = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x, routed):
        h = self.shared(x)
        return self.expert(h) if routed else h

torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
torch.manual_seed(0)
model, x = Routed(), torch.randn(3, 4)
plain = copy.deepcopy(model)
plain(x, True).sum().backward()  # the expert's gradient from rank 0's data, which alone reaches it
ppo.shard_models([model], [], ppo.Args(), 2)
optimizer = torch.optim.AdamW(model.parameters())
model(x, rank == 0).sum().backward()
torch.testing.assert_close(model.expert.weight.grad.full_tensor(), plain.expert.weight.grad / 2)
ppo.optimizer_step([(optimizer, list(model.parameters()))], torch.amp.GradScaler("cpu", enabled=False), 1.0)
print(f"stepped {rank}", flush=True)  # (one write: the ranks' lines stay whole)
torch.distributed.destroy_process_group()  # (else gloo's threads can abort the exit)
"""


def test_a_parameter_that_gets_no_gradient_on_one_process_does_not_hang(tmp_path):
    """A parameter only some ranks' data reaches (an expert, a data-dependent branch) has a gradient on rank 0 and none
    on rank 1: the sharded reduction treats the missing one as zeros (same tensors on every rank, no hang or abort,
    which a plain all-reduce of the gradients there are, or FSDP's default, would give), so the step is the mean."""
    (tmp_path / "branch.py").write_text(BRANCH)
    result = torchrun(2, tmp_path / "branch.py", REPO, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stepped 0" in result.stdout and "stepped 1" in result.stdout


SPLIT = """
import importlib, os, sys, torch
sys.path.insert(0, sys.argv[1])

torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
for name in ["ppo_rlhf_multigpu", "rloo_rlhf_multigpu", "grpo_rlhf_multigpu", "sac_rlhf_multigpu"]:
    twin = importlib.import_module(name)  # each twin's own copy of the shared helpers
    torch.manual_seed(0)  # the same model on both ranks
    x, model = torch.arange(15.0).view(5, 3), torch.nn.Linear(3, 2)  # 5 rows over 2 ranks: 3 each, the last padded
    calls = []
    def fn(model, x):
        calls.append(len(x))
        return model(x), x.sum(1)
    with torch.no_grad():
        whole = fn(model, x)
        calls.clear()
        split = twin.chunked(2, fn, model, x, over_ranks=True)
    assert calls == [2, 1], (name, calls)  # this rank's 3 rows, 2 at a time: the same calls on every rank
    for a, b in zip(split, whole, strict=True):
        torch.testing.assert_close(a, b)
    # The global batch's statistics: rank 0 holds [1, 2] (one token masked out), rank 1 holds [3, 4, 5].
    mine = torch.tensor([1.0, 2.0]) if rank == 0 else torch.tensor([3.0, 4.0, 5.0])
    mask = torch.tensor([1.0, 0.0]) if rank == 0 else torch.ones(3)
    local = mine.sum()
    assert twin.mean_over_ranks(local).item() == 7.5 and local.item() == (3.0 if rank == 0 else 12.0), name
    assert twin.whole_batch_mean(mine, mask).item() == 3.25, name  # (1 + 3 + 4 + 5) / 4 real tokens
    assert twin.all_gather(mine[:2] + 10 * rank).tolist() == [1.0, 2.0, 13.0, 14.0], name  # in rank order
    # Rows of another length on each rank (samples that stopped at an EOS early): zero-padded to the longest.
    ragged = twin.chunked(None, lambda x: x[:, : 3 - rank], x, over_ranks=True)  # rank 0: 3 columns, rank 1: 2
    assert ragged.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 0], [12, 13, 0]], (name, ragged)
print(f"rows in order {rank}", flush=True)  # (one write: the ranks' lines stay whole)
torch.distributed.destroy_process_group()  # (else gloo's threads can abort the exit: "terminate called without ...")
os._exit(0)  # and skip the interpreter's teardown, which still aborted 2 runs in 12 under load after every check passed
"""


def test_the_evaluation_splits_its_rows_over_the_processes_in_order(tmp_path):
    """The evaluation's no-grad passes split over the ranks (chunked(..., over_ranks=True)): each rank computes an
    equal run of the rows, --rollout-micro-batch-size at a time (the same number of forward passes on every rank, as a
    sharded model needs), and every rank gets every row's result back in order, rows of tokens zero-padded to the
    longest rank's (a rank whose samples all ended early stops early). And the global batch's statistics:
    mean_over_ranks (its input left as it was), whole_batch_mean over every rank's real tokens, all_gather in rank
    order; each twin's own copy of them."""
    (tmp_path / "split.py").write_text(SPLIT)
    result = torchrun(2, tmp_path / "split.py", REPO, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rows in order 0" in result.stdout and "rows in order 1" in result.stdout


def interrupt_after_first_checkpoint(command, out):
    """Start a run in out's parent folder, press Ctrl-C once its first checkpoint exists, and return what it printed."""
    pipe = subprocess.PIPE
    proc = subprocess.Popen(command, cwd=out.parent, env=ENV, stdout=pipe, stderr=pipe, text=True)
    while not (out / "checkpoint").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the run ended before it was interrupted: give it more updates"
    return stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_interrupted_run_resumed_writes_the_same_records_and_policy(script, tmp_path):
    """Ctrl-C leaves the last checkpoint whole; --resume continues from it and writes the same metrics.jsonl and
    samples.jsonl (every number but the wall-clock times) and the same final policy as a run never stopped. SAC with
    a buffer that wraps and alpha tuned, so the buffer, its position and alpha's optimizer must come back too."""
    flags = [*SMALL, "--batch-size", "16", "--total-episodes", "192", "--eval-every", "64", "--save-every", "32"]
    if script == "sac_rlhf_multigpu.py":
        flags += ["--buffer-size", "48", "--autotune", "--alpha", "0.05", "--ref-sync-every", "5"]
    if script == "ppo_rlhf_multigpu.py":
        flags += ["--kl-target", "1.0"]  # kl_coef moves: it must come back too
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert run_main(script, *flags, "--output-dir", full, cwd=tmp_path)[0] == 0
    command = [sys.executable, str(REPO / script), *flags, "--output-dir", str(stopped)]
    stderr = interrupt_after_first_checkpoint(command, stopped)
    assert "interrupted by Ctrl-C" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert len(read_jsonl(stopped / "metrics.jsonl")) < len(read_jsonl(full / "metrics.jsonl"))
    code, _, stderr = run_main(script, *flags, "--output-dir", stopped, "--resume", cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    assert records(stopped, ("episode", "update", "lr", "objective/", "eval/", "loss/", "ppo/", "rloo/", "sac/")) == (
        records(full, ("episode", "update", "lr", "objective/", "eval/", "loss/", "ppo/", "rloo/", "sac/"))
    )
    assert read_jsonl(stopped / "samples.jsonl") == read_jsonl(full / "samples.jsonl")
    for name, weight in policy_weights(full).items():
        assert torch.equal(policy_weights(stopped)[name], weight), name
    train = [r for r in read_jsonl(stopped / "metrics.jsonl") if "update" in r]
    for key in ["time/rollout_s", "time/update_s", "time/elapsed_s"]:  # the clocks go on from the checkpoint's
        times = [r[key] for r in train]
        assert times == sorted(times) and 0 < times[-1] < 600, (key, times)


def test_a_two_process_run_resumes_each_ranks_own_state(tmp_path):
    """Under torchrun the checkpoint holds every rank's shards of the models and optimizers, sampling generator, SAC
    buffer and its draw stream: an interrupted two-process run resumed with two processes writes the same records as
    one never stopped; one process goes on from it to the end, the two buffers pooled into its one (it holds both
    ranks' responses at once). Minibatches (48) larger than a rollout (32): learning starts once the buffer holds one,
    counted over both ranks (each samples its share, 24, from its own 32). Each rank draws its minibatches on its own
    stream: the same positions on both would make a minibatch pairs of responses from the same updates."""
    flags = [*SMALL, "--total-episodes", "256", "--eval-every", "128", "--save-every", "64", "--buffer-size", "64"]
    flags += ["--minibatch-size", "48"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    recorded = [str(REPO / "tests" / "record_draws.py"), str(tmp_path / "draws"), str(REPO / "sac_rlhf_multigpu.py")]
    assert torchrun(2, *recorded, *flags, "--output-dir", full, cwd=tmp_path).returncode == 0
    draws = [read_jsonl(tmp_path / f"draws{rank}") for rank in [0, 1]]
    assert len(draws[0]) == len(draws[1]) > 10  # 4 steps per update once learning starts
    assert sum(a != b for a, b in zip(*draws, strict=True)) > len(draws[0]) / 2, draws
    evals = [r["eval/scores"] for r in read_jsonl(full / "metrics.jsonl") if "eval/scores" in r]
    assert evals[-1] > evals[0] + 0.2  # it learns
    sizes = [r["sac/buffer_size"] for r in read_jsonl(full / "metrics.jsonl") if "update" in r]
    assert sizes[:3] == [32, 64, 64]  # both ranks' responses
    interrupt_after_first_checkpoint(
        torchrun_command(2, REPO / "sac_rlhf_multigpu.py", *flags, "--output-dir", stopped), stopped
    )
    shutil.copytree(stopped, tmp_path / "alone")
    alone = run_script("sac_rlhf_multigpu.py", *flags, "--output-dir", tmp_path / "alone", "--resume", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "written by 2 process(es), resumed on 1: not bit for bit" in alone.stdout + alone.stderr
    resumed_train = [r for r in read_jsonl(tmp_path / "alone" / "metrics.jsonl") if "update" in r]
    assert [r["episode"] for r in resumed_train] == list(range(32, 257, 32))
    assert all(r["sac/buffer_size"] == 64 for r in resumed_train[2:])  # the pooled buffer, full from the first
    resumed = torchrun(2, str(REPO / "sac_rlhf_multigpu.py"), *flags, "--output-dir", stopped, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert records(stopped, ("episode", "objective/", "eval/", "loss/", "sac/")) == records(
        full, ("episode", "objective/", "eval/", "loss/", "sac/")
    )


def test_a_two_process_checkpoint_resumed_by_one_process_goes_on_with_its_trained_state(tmp_path, monkeypatch):
    """A checkpoint written by two processes (each rank its own shards, torch.distributed.checkpoint) resumed by one:
    the models and the optimizer are resharded into the one process. With the same responses (fixed sampling), the
    resumed one-process run writes the records and the final policy of the two-process run never stopped, up to float
    rounding: it went on from the trained state the two processes saved, not from a fresh one."""
    flags = [*SMALL, "--total-episodes", "128", "--eval-every", "64", "--save-every", "32"]
    sampled = [str(REPO / "tests" / "fixed_sampling.py"), "4", str(REPO / "rloo_rlhf_multigpu.py"), *flags]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert torchrun(2, *sampled, "--output-dir", full, cwd=tmp_path).returncode == 0
    interrupt_after_first_checkpoint(torchrun_command(2, *sampled, "--output-dir", stopped), stopped)
    assert len(read_jsonl(stopped / "metrics.jsonl")) < len(read_jsonl(full / "metrics.jsonl"))
    monkeypatch.setattr(torch, "multinomial", inverse_cdf_sampler(4))
    code, _, stderr = run_main("rloo_rlhf_multigpu.py", *flags, "--output-dir", stopped, "--resume", cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    assert_close_records(records(stopped), records(full), tol=1e-5)
    for name, weight in policy_weights(full).items():
        torch.testing.assert_close(policy_weights(stopped)[name], weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("script", SCRIPTS)
def test_memory_flags_change_no_number_beyond_float_noise(script, tmp_path):
    """--gradient-checkpointing (layers recomputed in the backward pass) and --rollout-micro-batch-size 5 (no-grad
    forward passes over 5 rows at a time, a last slice of 1) give the same run up to float noise."""
    flags = [*SMALL, "--total-episodes", "64", "--eval-every", "64"]
    assert run_main(script, *flags, "--output-dir", tmp_path / "plain", cwd=tmp_path)[0] == 0
    memory = ["--gradient-checkpointing", "--rollout-micro-batch-size", "5"]
    code, _, stderr = run_main(script, *flags, *memory, "--output-dir", tmp_path / "memory", cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    assert_close_records(records(tmp_path / "plain"), records(tmp_path / "memory"), tol=1e-4)


def test_gradient_checkpointing_recomputes_every_layer_and_keeps_the_kv_cache(worlds, monkeypatch):
    """On every fixture architecture: with a gradient, each decoder layer runs under torch.utils.checkpoint and the
    gradient is the one without; without a gradient (sampling) nothing is checkpointed and the KV cache still works."""
    import ppo_rlhf_multigpu as ppo

    checkpointed = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: checkpointed.append(1) or checkpoint(*a, **k)
    )
    for world in worlds.values():
        plain = ppo.AutoModelForCausalLM.from_pretrained(world.policy).eval()
        recomputed = ppo.AutoModelForCausalLM.from_pretrained(world.policy).eval()
        ppo.enable_gradient_checkpointing(recomputed)
        query, query_mask = ppo.left_pad([[3, 4, 5], [6, 7]], 0, "cpu")
        responses = torch.tensor([[8, 9, 10], [11, 12, 13]])
        grads = []
        for model in [plain, recomputed]:
            logprobs, _ = ppo.forward_logprobs(
                model, query, query_mask, responses, torch.ones_like(responses), 1.0, NO_AUTOCAST
            )
            logprobs.sum().backward()
            grads.append([p.grad for p in model.parameters()])
        assert len(checkpointed) == plain.config.num_hidden_layers, world.arch
        for g_plain, g_recomputed in zip(*grads, strict=True):
            torch.testing.assert_close(g_recomputed, g_plain)
        checkpointed.clear()
        args = ppo.Args(response_length=5, stop_at_eos=False)
        samples = [
            ppo.generate(m, query, query_mask, args, -1, torch.Generator().manual_seed(0), NO_AUTOCAST)
            for m in [plain, recomputed]
        ]
        assert torch.equal(samples[0], samples[1]) and not checkpointed


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A short RLOO run with a checkpoint, marked as stopped (INCOMPLETE), and its flags."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    flags = [*SMALL, "--total-episodes", "64", "--eval-every", "64", "--save-every", "32", "--output-dir", str(run)]
    assert run_script("rloo_rlhf_multigpu.py", *flags, cwd=run.parent).returncode == 0
    (run / "INCOMPLETE").write_text("as if stopped\n")
    return run, flags


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--resume", "--output-dir", "{run}x"], "--resume: --output-dir {run}x holds no checkpoint"),
        (["--resume", "--learning-rate", "1e-3"], "--resume: --learning-rate 0.001 (the run's: 0.0003): these would"),
        (["--resume", "--overwrite-output-dir"], "--resume continues a run and --overwrite-output-dir replaces it"),
        (["--rollout-micro-batch-size", "0"], "--rollout-micro-batch-size must be in [1, inf)"),
        (["--save-every", "-1"], "--save-every must be in [0, inf)"),
    ],
)
def test_bad_resume_and_memory_flags_end_in_one_line(flags, message, stopped_run):
    run, base = stopped_run
    before = (run / "metrics.jsonl").read_text()
    code, _, stderr = run_main("rloo_rlhf_multigpu.py", *base, *[f.format(run=run) for f in flags], cwd=run.parent)
    assert code != 0 and message.format(run=run) in stderr and "Traceback" not in stderr, stderr
    assert (run / "metrics.jsonl").read_text() == before  # nothing of the run was touched


def test_a_finished_run_is_not_resumed_and_batches_must_split_over_the_processes(stopped_run, tmp_path):
    run, flags = stopped_run
    finished = tmp_path / "finished"
    shutil.copytree(run, finished)
    (finished / "INCOMPLETE").unlink()
    code, _, stderr = run_main("rloo_rlhf_multigpu.py", *flags, "--output-dir", finished, "--resume", cwd=run.parent)
    assert code != 0 and "has finished; there is nothing to resume" in stderr
    result = torchrun(
        3, str(REPO / "ppo_rlhf_multigpu.py"), "--batch-size", "32", "--output-dir", tmp_path / "x", cwd=tmp_path
    )
    assert result.returncode != 0 and "--batch-size 32 does not split over 3 processes" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_is_written_each_time_the_episodes_pass_a_multiple_of_save_every(script, tmp_path, monkeypatch):
    """--save-every 32 with batches of 16: after the update that reaches episode 32, not after 16 or 48 (nor after the
    last, 64, which saves the model instead)."""
    saved = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: saved.append(os.path.basename(b)) or replace(a, b))
    flags = [*SMALL, "--batch-size", "16", "--total-episodes", "64", "--eval-every", "64", "--save-every", "32"]
    code, _, stderr = run_main(script, *flags, "--no-save-model", "--output-dir", tmp_path / "run", cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    assert saved.count("checkpoint") == 1, saved


class Touch:
    """A pickled object that, unpickled, creates a file: what a checkpoint file from elsewhere could hold."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_resume_runs_no_code_from_a_checkpoint_file_and_says_it_does_not_load(stopped_run, tmp_path):
    """--resume reads run.pt and each rank's file with torch.load(weights_only=True): tensors and plain data only, so
    a file that holds a pickled call (a damaged or foreign checkpoint, or a malicious one) runs nothing and ends in one
    line; so does a damaged rank's file, read before the records are cut back to the checkpoint (they stay whole)."""
    run, flags = stopped_run
    marker = tmp_path / "ran"
    for name in ["run.pt", "rank0.pt"]:
        copy = tmp_path / name
        shutil.copytree(run, copy)
        records = (copy / "metrics.jsonl").read_bytes()
        if name == "run.pt":
            torch.save({"loop": {}, "payload": Touch(marker)}, copy / "checkpoint" / name)
        else:
            (copy / "checkpoint" / name).write_bytes((copy / "checkpoint" / name).read_bytes()[:100])  # cut short
        code, _, stderr = run_main("rloo_rlhf_multigpu.py", *flags, "--output-dir", copy, "--resume", cwd=tmp_path)
        assert code != 0 and not marker.exists(), stderr[-2000:]
        assert f"--resume: {copy / 'checkpoint' / name} does not load" in stderr, stderr[-2000:]
        assert "Traceback" not in stderr and (copy / "metrics.jsonl").read_bytes() == records, stderr[-2000:]


def test_a_checkpoint_is_on_disk_before_it_replaces_the_last_one(tmp_path, monkeypatch):
    """A crash (a power cut, not only Ctrl-C) must leave a whole checkpoint whose records exist: the records it counts
    (metrics.jsonl, samples.jsonl) and every file of the new checkpoint are synced before the renames that replace the
    last one (checkpoint/ to checkpoint.old/, checkpoint.tmp/ to checkpoint/), and the run folder after them
    (os.replace alone can leave an empty or old file behind a power cut)."""
    events = []
    fsync, replace = os.fsync, os.replace

    def synced(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", os.path.basename(b))) or replace(a, b))
    out = tmp_path / "run"
    flags = [*SMALL, "--total-episodes", "96", "--eval-every", "64", "--save-every", "32", "--no-save-model"]
    open_files = len(os.listdir("/proc/self/fd"))
    code, _, stderr = run_main("rloo_rlhf_multigpu.py", *flags, "--output-dir", out, cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    assert len(os.listdir("/proc/self/fd")) == open_files  # every file and folder it synced is closed again
    saves = [i for i, event in enumerate(events) if event == ("replace", "checkpoint")]
    assert len(saves) == 2  # after updates 1 and 2 (not after the last)
    for i in saves:
        before = set(events[max(j for j in [-1, *saves] if j < i) + 1 : i])
        assert {("fsync", "metrics.jsonl"), ("fsync", "samples.jsonl"), ("fsync", "run.pt")} <= before
        assert {("fsync", "rank0.pt"), ("fsync", "__0_0.distcp")} <= before  # each rank's file and shards
        assert events[i + 1] == ("fsync", "run")  # the folder, so the renames themselves are durable
    assert ("replace", "checkpoint.old") in events[saves[0] : saves[1]]  # the second save kept the first till then
    assert sorted(os.listdir(out / "checkpoint")) == [".metadata", "__0_0.distcp", "rank0.pt", "run.pt"]


@pytest.mark.parametrize("script", [*SCRIPTS, "grpo_rlhf_multigpu.py"])
def test_the_process_group_waits_30_minutes_on_gloo_for_cpu_tensors(script, monkeypatch):
    """setup_distributed under torchrun: gloo on the CPU (and for a GPU run's CPU tensors), with an explicit 30-minute
    timeout for a collective (NCCL's default is 10, which a long evaluation or checkpoint could pass)."""
    twin = importlib.import_module(script.removesuffix(".py"))
    calls = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert twin.setup_distributed(twin.Args(cuda=False)) == (1, 2)
    assert calls == [(("gloo",), {"timeout": datetime.timedelta(minutes=30)})]
    monkeypatch.setenv("WORLD_SIZE", "1")  # a plain `python` run: process 0 of 1, nothing set up
    monkeypatch.setenv("RANK", "0")
    assert twin.setup_distributed(twin.Args(cuda=False)) == (0, 1) and len(calls) == 1


@pytest.mark.parametrize("script", [*SCRIPTS, "grpo_rlhf_multigpu.py"])
def test_what_a_checkpoint_keeps_beside_dcp_comes_back_exactly(script):
    """state_of and load_state, each twin's copy, for every kind of state a checkpoint keeps beside DCP's: a generator
    (and one from another kind of device: a new stream seeded from it), an fp16 run's GradScaler (a bf16 or fp32 run's
    has none: left as it is), an optimizer, a tensor, and a list with a write position and its own draw stream (SAC's
    replay buffer)."""
    twin = importlib.import_module(script.removesuffix(".py"))
    generator = torch.Generator().manual_seed(3)
    saved = twin.state_of(generator)
    expected = torch.rand(4, generator=generator)
    twin.load_state(generator, saved)
    assert torch.equal(torch.rand(4, generator=generator), expected)
    twin.load_state(generator, torch.arange(5, dtype=torch.uint8))  # another device's state: seeded from it
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=torch.Generator().manual_seed(10)))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    scaler.scale(torch.ones(()))  # (its state exists once it has scaled)
    saved = twin.state_of(scaler)
    fresh = torch.amp.GradScaler("cpu")
    twin.load_state(fresh, saved)
    assert fresh.get_scale() == 1024.0 and fresh.state_dict()["growth_interval"] == 7
    twin.load_state(fresh, twin.state_of(torch.amp.GradScaler("cpu", enabled=False)))  # nothing to restore
    assert fresh.get_scale() == 1024.0
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.grad = torch.ones(3)
    optimizer.step()
    other = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    twin.load_state(other, twin.state_of(optimizer))
    assert torch.equal(other.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    tensor = torch.tensor([0.0, 2.0])
    saved = twin.state_of(tensor)
    tensor.zero_()
    twin.load_state(tensor, saved)
    assert tensor.tolist() == [0.0, 2.0]
    buffer, other = type("Buffer", (list,), {})([1, 2, 3]), type("Buffer", (list,), {})()  # (a list with attributes)
    buffer.next, buffer.rng, other.next, other.rng = 2, random.Random(5), 0, random.Random(0)
    twin.load_state(other, twin.state_of(buffer))
    assert other == [1, 2, 3] and other.next == 2 and other.rng.random() == buffer.rng.random()
