"""benchmarks/bench.py: its model-FLOP count against torch's own FLOP counter on the tinyworld models."""

import importlib.util
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # bench.py imports compare.py from its own folder
spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.parametrize(
    "name, auto_class", [("sft", AutoModelForCausalLM), ("reward_model", AutoModelForSequenceClassification)]
)
def test_forward_and_backward_flops_match_torchs_flop_counter(name, auto_class):
    """2 FLOPs per matmul parameter per token plus attention, and a backward pass of twice the forward: within 6% of
    what torch.utils.flop_counter counts for the same passes (it skips the embedding and elementwise work too)."""
    path = str(REPO / "tinyworld" / name)
    model = auto_class.from_pretrained(path)
    ids = torch.randint(4, 80, (4, 30), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids)
    modelled = bench.forward_flops(bench.model_shape(path, auto_class), 4, 30)
    assert modelled == pytest.approx(counter.get_total_flops(), rel=0.06)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.sum().backward()
    assert 3 * modelled == pytest.approx(counter.get_total_flops(), rel=0.06)
    # sampling with a KV cache computes about half the attention pairs of a full forward, and the same matmuls
    assert bench.forward_flops(bench.model_shape(path, auto_class), 4, 30, kv_cache=True) < modelled


def test_the_profile_splits_the_loop_by_model_and_counts_each_models_forward_passes():
    """benchmarks/profile_update.py on RLOO (fixed-length 4-token responses, 2 updates): 4 sampling passes, one
    log-prob pass in the rollout and one in the update per update, one reference and one reward pass; setup and the
    evaluations apart, every part of the loop timed, and the script's own functions put back afterwards."""
    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("profile_update", REPO / "benchmarks" / "profile_update.py")
    profiler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profiler)
    rloo = importlib.import_module("rloo_rlhf")
    generate, evaluate = rloo.generate, rloo.evaluate
    args = profiler.Args(total_episodes=32, batch_size=16, extra="--response-length 4 --no-stop-at-eos")
    times, counts, updates = profiler.profile_script("rloo_rlhf.py", args, [])
    assert updates == 2
    assert counts["policy forward passes"] == 2 * (4 + 1 + 1)
    assert counts["reference forward passes"] == counts["reward model forward passes"] == 2
    assert "gold model forward passes" not in counts  # the gold model reads only the evaluations
    parts = {"sampling: policy forward", "sampling: the rest", "no grad: policy forward", "no grad: reference forward"}
    parts |= {"no grad: reward model forward", "with grad: policy forward", "backward", "optimizer step"}
    assert parts | {"the loop's own code", "setup", "evaluation"} == set(times)
    assert all(seconds > 0 for seconds in times.values())
    assert rloo.generate is generate and rloo.evaluate is evaluate
    assert torch.nn.Module.__call__ is torch.nn.Module._wrapped_call_impl


def test_the_sampling_pass_scores_the_sampled_tokens_as_the_full_pass_does_in_fp32():
    """benchmarks/sampling_logprobs.py: the log-probs the KV-cache sampling loop computed for the tokens it drew are
    the full forward pass's up to fp32 rounding, and under bf16 autocast differ by more (what the benchmark reports)."""
    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("sampling_logprobs", REPO / "benchmarks" / "sampling_logprobs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = str(REPO / "tinyworld" / "sft")
    tokenizer, policy = module.AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    texts = module.script.load_prompts(str(REPO / "tinyworld" / "prompts_train.jsonl"), "--dataset")
    prompts = module.script.tokenize_prompts(tokenizer, texts[:8], 16, "--dataset")
    args = module.Args(batch_size=8, response_length=6, repeats=1)
    fp32, bf16 = (module.compare(policy, tokenizer, prompts, args, p) for p in ["fp32", "bf16"])
    assert fp32["max dlogp"] < 1e-4 and fp32["max dentropy"] < 1e-4
    assert bf16["max dlogp"] > 1e-3  # bf16's 8-bit mantissa, in other matrix shapes
    assert module.table([fp32, bf16]).splitlines()[2].startswith("| fp32 | ")


def test_the_trl_race_gives_trl_our_settings_and_refuses_what_trl_cannot_do():
    """benchmarks/trl_race.py (TRL itself is not installed here): TRL's config is read from the Args our script parses
    from the race's flags, so a renamed flag or a changed default of ours changes (or stops) the race, never leaves TRL
    on settings of its own."""
    spec = importlib.util.spec_from_file_location("trl_race", REPO / "benchmarks" / "trl_race.py")
    race = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(race)
    sys.path.insert(0, str(REPO))
    for algo in ["ppo", "rloo"]:
        script = importlib.import_module(f"{algo}_rlhf")
        args = race.Args(ours_extra="--learning-rate 1e-4 --kl-coef 0.07 --response-length 20")
        ours = race.tyro.cli(script.Args, args=race.race_flags(algo, args))
        trl = race.trl_config(algo, ours, "runs/x")["trl"]
        assert (trl["learning_rate"], trl["kl_coef"], trl["response_length"]) == (1e-4, 0.07, 20)
        assert trl["total_episodes"] == {"ppo": 1024, "rloo": 16384}[algo] and trl["per_device_train_batch_size"] == 64
        assert trl["num_ppo_epochs"] == ours.num_ppo_epochs and trl["cliprange"] == ours.clip_coef
        refused = race.tyro.cli(script.Args, args=[*race.race_flags(algo, args), "--kl-in", "loss"])
        with pytest.raises(SystemExit, match="no equivalent of --kl-in loss"):
            race.trl_config(algo, refused, "runs/x")
