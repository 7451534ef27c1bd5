"""Race our PPO and RLOO against TRL 0.19.1's PPOTrainer and RLOOTrainer at identical settings on the tinyworld:
whole-process wall time, and the gold score of each saved policy, judged by one code path. (An issue asks ours to
take at most half of TRL's wall time with an equal or better gold score.)

For each algorithm it runs our plain script and TRL's trainer, each in its own process with OMP_NUM_THREADS=--threads
and no GPU visible (CUDA_VISIBLE_DEVICES=""), offline (HF_HUB_OFFLINE=1), one process at a time, and times each whole
process from outside: interpreter start, imports, model loading, training and saving. TRL runs in a virtual
environment of its own (benchmarks/requirements-trl.txt; this repository never depends on trl and this file never
imports it in the project's venv): --trl-python runs this same file's `trl-driver` subcommand on a JSON config the
race writes. Then this process scores every saved policy with ppo_rlhf.py's own functions: one response to each of
the first --eval-size prompts of tinyworld/prompts_eval.jsonl (our scripts' `evaluate` with --seed --score-seed,
temperature 1, up to 24 new tokens, stopped at EOS, batches of 64), and reports
- gold: the mean score of tinyworld/gold_reward_model on prompt + response;
- proxy: the mean score of the RM trained against (tinyworld/reward_model), without the missing-EOS penalty;
- kl: the mean sequence KL to tinyworld/sft: the sum over response tokens of log pi - log pi_ref of the sampled tokens;
- eos: the share of responses that ended with EOS.
With the default seed this is our scripts' own final evaluation, so on our rows `check` (our run's last eval/gold_scores
minus the scorer's gold) must be ~0: a test of the scorer.

Settings. Ours: PPO `--total-episodes 1024 --num-minibatches 1 --num-ppo-epochs 4 --batch-size 64 --response-length
24`, RLOO its defaults (16,384 episodes, batch 64, --rloo-k 4, one epoch), both with --eval-every = --total-episodes
and --ours-extra. TRL's config is built from the Args our script parses from those very flags: learning_rate (linear
decay to 0 per update, no warmup, as ours), AdamW (adam_epsilon 1e-5, weight_decay 0, betas 0.9/0.999), kl_coef, the
KL in the reward with k1 (or PPO's k3; RLOO token_level_kl=False: summed per sequence, as ours), missing_eos_penalty,
temperature, response_length, stop at EOS (stop_token="eos"), the batch (per_device_train_batch_size, one process, no
gradient accumulation, local_rollout_forward_batch_size = batch), num_ppo_epochs, num_mini_batches, cliprange, PPO's
vf_coef, cliprange_value, gamma, lam, whiten_rewards (advantages whitened on both sides), RLOO's rloo_k and
normalize_advantage (normalize_reward off), fp32 (bf16=False: TRL's on-policy default is bf16), the seed, a separate
frozen reference, PPO's value model (a copy of the RM, as ours), prompts left-truncated to --max-prompt-length with
BOS kept. A flag of ours that TRL cannot express (--kl-in loss, --clip-mode one-sided, --ref-sync-every, --kl-target,
a reward function, RLOO's k2/k3) stops the race before it starts.

What cannot be matched, and why:
- gradient clipping: TRL 0.19.1's PPO and RLOO loops call optimizer.step() themselves, so TrainingArguments'
  max_grad_norm is never applied; ours clips at --max-grad-norm 1.0. One norm per step, not a speed factor; to race
  without it, pass --ours-extra="--max-grad-norm None".
- evaluation: ours always evaluates before and after training (128 prompts, gold RM included), and nothing turns that
  off without editing the script; the race passes --eval-every = --total-episodes, so those two are all. TRL's
  num_sample_generations=0: it evaluates nothing. Our wall time therefore holds work TRL's does not: biased against us.
- the prompt stream: TRL batches a shuffled DataLoader with drop_last (PPO: 6 batches of 64 per pass over the 400
  prompts, 16 left out each pass; RLOO: 25 batches of 16); ours reshuffles a stream of all prompts. Other random order.
- TRL's implementation, kept as TRL runs it (not settings): its PPO adds the RM score one token after the EOS (where
  its value mask ends), ours at the EOS; its RLOO clears EOS from the generation config, so it always samples
  --response-length tokens and truncates after, while ours stops once every row has ended; it prints a log line every
  update; it reads any sampled <pad> as padding (attention mask = ids != pad), ours by position; it divides logits by
  temperature + 1e-7; it computes the rollout log-probs from generate's scores, ours in a second forward pass.
- the tokenizer: transformers 4.x's AutoTokenizer cannot load the tinyworld's (tokenizer_config.json names
  transformers 5's TokenizersBackend class), so the driver loads the same tokenizer.json as PreTrainedTokenizerFast
  (the same ids). The models load unchanged: their logits under transformers 4.53.3 equal those under 5.23.

Usage: python benchmarks/trl_race.py                 (the full race, about 8 min on an idle two-core machine)
       python benchmarks/trl_race.py --repeats 3     (median wall time of 3 runs each, about 23 min)
       python benchmarks/trl_race.py --ppo-episodes 128 --rloo-episodes 128   (a smoke test of every path, untimed)
Setup (once, a venv apart from the project's, ignored by git): python -m venv .venv-trl &&
       .venv-trl/bin/pip install -r benchmarks/requirements-trl.txt   (torch: the CPU wheel, as the project's)
Give the race the machine to itself; OMP_NUM_THREADS of this process does not matter (--threads sets the runs').
"""

import contextlib
import importlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Literal

import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS = os.path.relpath(os.path.abspath(__file__), REPO)  # benchmarks/trl_race.py
SCRIPTS = {"ppo": "ppo_rlhf.py", "rloo": "rloo_rlhf.py"}


@dataclass
class Args:
    algos: list[Literal["ppo", "rloo"]] = field(default_factory=lambda: ["ppo", "rloo"])
    """algorithms to race"""
    sides: list[Literal["ours", "trl"]] = field(default_factory=lambda: ["ours", "trl"])
    """whose runs to make (both for a race)"""
    ppo_episodes: int = 1024
    """PPO's --total-episodes (its other race flags: --num-minibatches 1 --num-ppo-epochs 4, batch 64, 24 tokens)"""
    rloo_episodes: int = 16384
    """RLOO's --total-episodes (its default; the rest of RLOO's defaults too)"""
    ours_extra: str = ""
    """more flags for both of our scripts, written --ours-extra="--flag value"; TRL's config follows them"""
    repeats: int = 1
    """runs of each side; the table gives the median wall time (the first run's policy is scored)"""
    threads: int = 1
    """OMP_NUM_THREADS of every run, ours and TRL's"""
    trl_python: str = ".venv-trl/bin/python"
    """the python of a venv holding benchmarks/requirements-trl.txt (never the project's); relative to the repository"""
    output_dir: str | None = None
    """where runs, logs and results.json go; default runs/trl_race__<time>"""
    eval_size: int = 128
    """scoring: the first N prompts of tinyworld/prompts_eval.jsonl"""
    score_seed: int = 1
    """scoring: the --seed of our scripts' evaluation (1: our runs', so on our rows it is their final evaluation)"""
    score_batch_size: int = 64
    """scoring: prompts sampled at once (64 = our scripts' --batch-size, so the samples are our evaluation's)"""


def race_flags(algo, args):
    """Our script's flags for this race, --output-dir excluded."""
    episodes = args.ppo_episodes if algo == "ppo" else args.rloo_episodes
    flags = ["--total-episodes", str(episodes), "--eval-every", str(episodes)]
    if algo == "ppo":
        flags += ["--num-minibatches", "1", "--num-ppo-epochs", "4", "--batch-size", "64", "--response-length", "24"]
    return flags + shlex.split(args.ours_extra)


def trl_config(algo, ours, run_dir):
    """The driver's config: TRL's PPOConfig / RLOOConfig keywords built from our parsed Args (`ours`), and the models,
    prompts and prompt length the driver loads. Stops on a setting of ours that TRL cannot express."""
    kl_estimators = ("k1", "k3") if algo == "ppo" else ("k1",)
    unmatched = {
        "--kl-in loss": ours.kl_in != "reward",
        f"--kl-estimator {ours.kl_estimator}": ours.kl_estimator not in kl_estimators,
        "--clip-mode one-sided": ours.clip_mode != "two-sided",
        "--ref-sync-every": ours.ref_sync_every != 0,
        "--kl-target": getattr(ours, "kl_target", None) is not None,
        "a reward function": ours.reward_model_name.rpartition(":")[0].endswith(".py"),
        f"--mixed-precision {ours.mixed_precision}": ours.mixed_precision not in ("auto", "no"),
    }
    if any(unmatched.values()):
        said = ", ".join(k for k, v in unmatched.items() if v)
        raise SystemExit(f"error: TRL 0.19.1's {algo.upper()} trainer has no equivalent of {said}; race without it")
    trl = {
        "output_dir": run_dir,
        "seed": ours.seed,
        "learning_rate": ours.learning_rate,
        "lr_scheduler_type": "linear",  # ours: lr * (1 - (update - 1) / updates); TRL steps it once per update
        "warmup_steps": 0,
        "optim": "adamw_torch",
        "adam_epsilon": 1e-5,
        "weight_decay": 0.0,
        "per_device_train_batch_size": ours.batch_size,
        "gradient_accumulation_steps": 1,
        "local_rollout_forward_batch_size": ours.batch_size,
        "total_episodes": ours.total_episodes,
        "num_ppo_epochs": ours.num_ppo_epochs,
        "kl_coef": ours.kl_coef,
        "cliprange": ours.clip_coef,
        "response_length": ours.response_length,
        "temperature": ours.temperature,
        "stop_token": "eos" if ours.stop_at_eos else None,
        "missing_eos_penalty": ours.missing_eos_penalty if ours.stop_at_eos else None,
        "num_sample_generations": 0,  # no evaluation during training (see the docstring)
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "sft_model_path": ours.model_name,
        "reward_model_path": ours.reward_model_name,
    }
    if algo == "ppo":
        trl |= {"num_mini_batches": ours.num_minibatches, "vf_coef": ours.vf_coef, "cliprange_value": ours.vf_clip_coef}
        trl |= {"gamma": ours.gamma, "lam": ours.lam, "whiten_rewards": ours.whiten_rewards}
        trl |= {"kl_estimator": ours.kl_estimator}
    else:  # RLOO: one optimizer step per pass over the batch, as ours (local batch = per device x minibatches)
        trl |= {"num_mini_batches": 1, "rloo_k": ours.rloo_k, "normalize_advantage": ours.normalize_advantage}
        trl |= {"normalize_reward": False, "token_level_kl": False}
    keys = ["model_name", "reward_model_name", "dataset", "eval_dataset", "eval_size", "max_prompt_length"]
    return {"algo": algo, **{k: getattr(ours, k) for k in keys}, "trl": trl}


def run_child(cmd, log_path, env):
    """Run cmd from the repository root with its output in log_path; its wall seconds and peak RSS (MiB), measured
    from outside. Stops with the log's tail if it fails."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # the rusage of this child alone
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"error: {shown(cmd)} failed (exit {os.waitstatus_to_exitcode(status)}):\n{tail}")
    return wall, usage.ru_maxrss / 1024


def shown(cmd):
    """A command as the records keep it: relative to the repository, `python` for ours, `TRL_PYTHON` for TRL's venv."""
    first = "python" if cmd[0] == sys.executable else "TRL_PYTHON"
    return shlex.join([first, *cmd[1:]])


def trl_versions(trl_python, env):
    """The versions in the TRL venv (and a check that it imports)."""
    probe = "import json, accelerate, datasets, torch, transformers, trl\n"
    probe += "print(json.dumps({m.__name__: m.__version__ for m in (trl, transformers, torch, accelerate, datasets)}))"
    if not os.path.isfile(trl_python):
        raise SystemExit(f"error: --trl-python {trl_python}: no such file; make the venv (see this file's docstring)")
    done = subprocess.run([trl_python, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: --trl-python {trl_python} cannot import TRL's stack:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


# ==== SCORING: every saved policy, ours and TRL's, by our scripts' own functions (the project's venv) ====
def load_judges(args, ours):
    """What scoring needs besides the policy: the script module, tokenizer, reference, proxy and gold RMs, prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    script = importlib.import_module("ppo_rlhf")  # the shared core: every script holds the same text
    tokenizer = AutoTokenizer.from_pretrained(ours.model_name)
    fp32 = {"dtype": torch.float32}
    ref = AutoModelForCausalLM.from_pretrained(ours.model_name, **fp32).eval()
    proxy = AutoModelForSequenceClassification.from_pretrained(ours.reward_model_name, **fp32).eval()
    gold = AutoModelForSequenceClassification.from_pretrained(ours.gold_reward_model_name, **fp32).eval()
    prompts = script.load_prompts(ours.eval_dataset, "--eval-dataset", args.eval_size)
    eval_ids = script.tokenize_prompts(tokenizer, prompts, ours.max_prompt_length, "--eval-dataset")
    return SimpleNamespace(script=script, tokenizer=tokenizer, ref=ref, proxy=proxy, gold=gold, eval_ids=eval_ids)


def score_policy(model_dir, args, judges):
    """Mean gold and proxy scores, sequence KL to the reference, EOS rate and response length of one response per
    evaluation prompt, sampled from the saved policy in model_dir: our scripts' own `evaluate` (fp32, temperature 1, up
    to 24 tokens, EOS stops; the proxy score without the missing-EOS penalty)."""
    import torch
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # What evaluate reads of the flags: its sampling seed is --seed + 12345, its batches --batch-size prompts.
    flags = SimpleNamespace(seed=args.score_seed, batch_size=args.score_batch_size, response_length=24, temperature=1.0)
    flags.stop_at_eos, flags.missing_eos_penalty = True, None
    models = (policy, judges.ref, judges.proxy, judges.gold, judges.tokenizer, judges.eval_ids, flags)
    record, _ = judges.script.evaluate(*models, torch.device("cpu"), contextlib.nullcontext())
    keys = {"gold": "gold_scores", "proxy": "scores", "kl": "kl", "eos": "eos_rate", "length": "response_length"}
    return {name: record[f"eval/{key}"] for name, key in keys.items()}


def last_record(path, key):
    """The value of `key` in the last record of a metrics.jsonl that has it (None if none does)."""
    value = None
    with open(path) as f:
        for record in map(json.loads, f):
            value = record.get(key, value)
    return value


# ==== THE RACE ====
def main(args):
    out = os.path.abspath(args.output_dir or os.path.join("runs", f"trl_race__{int(time.time())}"))
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"error: --output-dir {args.output_dir} is not empty; choose another folder")
    os.chdir(REPO)  # every path the runs see and the records keep is relative to the repository
    sys.path.insert(0, REPO)  # the scripts import as modules
    rel = os.path.relpath(out, REPO)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("PYTHONPATH", None)  # the TRL venv must see its own packages only
    import torch
    import transformers

    versions = {"project_venv": {"torch": torch.__version__, "transformers": transformers.__version__}}
    versions |= {"trl_venv": trl_versions(args.trl_python, env)} if "trl" in args.sides else {}
    recorded = {k: v for k, v in asdict(args).items() if k != "trl_python"} | {"output_dir": rel}  # no machine paths
    results = {"args": recorded, "versions": versions, "runs": []}

    # Every run's command first, so a setting TRL cannot take stops the race before it writes anything.
    plan, configs = [], {}
    for algo in args.algos:
        module = importlib.import_module(SCRIPTS[algo].removesuffix(".py"))
        ours = tyro.cli(module.Args, args=race_flags(algo, args))  # what our script will parse from these flags
        for side in args.sides:
            for repeat in range(1, args.repeats + 1):
                name = f"{algo}_{side}_{repeat}"
                run_dir = os.path.join(rel, name)
                if side == "ours":
                    cmd = [sys.executable, SCRIPTS[algo], *race_flags(algo, args), "--output-dir", run_dir]
                    model_dir, metrics = os.path.join(run_dir, "model"), os.path.join(run_dir, "metrics.jsonl")
                else:
                    config_path = os.path.join(rel, f"{name}.json")
                    configs[config_path] = trl_config(algo, ours, run_dir)
                    cmd = [args.trl_python, THIS, "trl-driver", config_path]
                    model_dir, metrics = os.path.join(run_dir, "model"), None
                plan.append((algo, side, repeat, name, cmd, model_dir, metrics, ours))
    os.makedirs(out, exist_ok=True)
    for config_path, config in configs.items():
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)

    for algo, side, repeat, name, cmd, *_ in plan:
        print(f"running {name}: {shown(cmd)}", flush=True)
        wall, rss = run_child(cmd, os.path.join(rel, f"{name}.log"), env)
        results["runs"].append({"algo": algo, "side": side, "repeat": repeat, "command": shown(cmd)})
        results["runs"][-1] |= {"wall_s": wall, "peak_rss_mib": rss, "log": os.path.join(rel, f"{name}.log")}
        print(f"  {wall:.1f} s, peak RSS {rss:.0f} MiB", flush=True)

    # Scoring: the first repeat's policy of each side, one code path for all.
    torch.set_num_threads(args.threads)
    judges = None
    for algo, side, repeat, _name, _cmd, model_dir, metrics, ours in plan:
        if repeat != 1:
            continue
        judges = judges or load_judges(args, ours)
        scores = score_policy(model_dir, args, judges)
        if metrics is not None:  # our run's own final evaluation: the same samples with the default seed
            scores["check"] = last_record(metrics, "eval/gold_scores") - scores["gold"]
        for run in results["runs"]:
            if (run["algo"], run["side"]) == (algo, side):
                run["scores"] = scores | {"model": model_dir}

    print(f"\n| algo | side | wall s (median of {args.repeats}) | peak RSS MiB | gold | proxy | KL | EOS | check |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    summary = {}
    for algo in args.algos:
        for side in args.sides:
            runs = [r for r in results["runs"] if (r["algo"], r["side"]) == (algo, side)]
            wall = statistics.median(r["wall_s"] for r in runs)
            s = runs[0]["scores"]
            check = f"{s['check']:+.1e}" if "check" in s else "-"
            rss = max(r["peak_rss_mib"] for r in runs)
            cells = [algo, side, f"{wall:.1f}", f"{rss:.0f}", f"{s['gold']:.3f}", f"{s['proxy']:.3f}", f"{s['kl']:.2f}"]
            print("| " + " | ".join([*cells, f"{s['eos']:.2f}", check]) + " |")
            summary[(algo, side)] = (wall, s["gold"])
    for algo in args.algos:
        if (algo, "ours") in summary and (algo, "trl") in summary:
            (ours_wall, ours_gold), (trl_wall, trl_gold) = summary[(algo, "ours")], summary[(algo, "trl")]
            speedup = trl_wall / ours_wall
            results[f"{algo}_speedup"], results[f"{algo}_gold_margin"] = speedup, ours_gold - trl_gold
            verdict = "met" if speedup >= 2 and ours_gold >= trl_gold else "not met"
            print(
                f"{algo}: TRL / ours wall time {speedup:.2f}x, gold ours - TRL {ours_gold - trl_gold:+.3f} ({verdict})"
            )
    with open(os.path.join(rel, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"records: {os.path.join(rel, 'results.json')}")


# ==== THE TRL DRIVER: runs in the TRL venv (`TRL_PYTHON benchmarks/trl_race.py trl-driver config.json`) ====
def trl_driver(config_path):
    """Train one TRL policy as the race's JSON config says, then save it (and the trainer's logs) in its output_dir."""
    import accelerate
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast

    with open(config_path) as f:
        config = json.load(f)
    out = config["trl"]["output_dir"]
    # transformers 4.x has no TokenizersBackend, the class transformers 5 wrote into tokenizer_config.json: read the
    # same tokenizer.json as the generic fast tokenizer (the same ids, BOS first, left padding).
    tokenizer = PreTrainedTokenizerFast.from_pretrained(config["model_name"], padding_side="left")

    sys.path.insert(0, REPO)  # our script's own prompt loading and truncation (it imports under transformers 4 too)
    script = importlib.import_module("ppo_rlhf")

    def prompts(path, size=None):
        """A dataset of `input_ids`: each prompt as our scripts tokenize it (BOS kept, left-truncated)."""
        ids = script.tokenize_prompts(
            tokenizer, script.load_prompts(path, path, size), config["max_prompt_length"], path
        )
        return datasets.Dataset.from_dict({"input_ids": ids})

    fp32 = {"torch_dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(config["model_name"], **fp32)
    ref_policy = AutoModelForCausalLM.from_pretrained(config["model_name"], **fp32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(config["reward_model_name"], **fp32)
    train, evaluation = prompts(config["dataset"]), prompts(config["eval_dataset"], config["eval_size"])
    common = {"processing_class": tokenizer, "reward_model": reward_model, "train_dataset": train}
    common["eval_dataset"] = evaluation  # (the trainers build an eval loader; num_sample_generations=0 never uses it)
    if config["algo"] == "ppo":
        value_model = AutoModelForSequenceClassification.from_pretrained(config["reward_model_name"], **fp32)
        trainer = trl.PPOTrainer(
            args=trl.PPOConfig(**config["trl"]), model=policy, ref_model=ref_policy, value_model=value_model, **common
        )
    else:
        trainer = trl.RLOOTrainer(
            config=trl.RLOOConfig(**config["trl"]), policy=policy, ref_policy=ref_policy, **common
        )
    trainer.train()
    trainer.save_model(os.path.join(out, "model"))
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in trainer.state.log_history)
    with open(os.path.join(out, "versions.json"), "w") as f:
        modules = (trl, transformers, torch, accelerate, datasets)
        json.dump({m.__name__: m.__version__ for m in modules} | {"threads": torch.get_num_threads()}, f, indent=2)


if __name__ == "__main__":
    if sys.argv[1:2] == ["trl-driver"]:
        trl_driver(sys.argv[2])
    else:
        main(tyro.cli(Args))
