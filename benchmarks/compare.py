"""Head-to-head on the tinyworld: run scripts with the same flags and seeds, then write one report.

A comparison is a list of runs (--runs), each a script optionally followed by its own flags, for example
"ppo_rlhf.py" or "ppo_rlhf.py --clip-coef 1000". A script may carry a patch from experiments/ (a design that is
not in the script, kept so its result can be reproduced): "sac_rlhf.py+experiments/sac_critic_lm.patch --critic lm"
runs a patched copy written to <output-dir>/scripts/. Every run is repeated for every seed and gets the flags in
--extra; --kl-coefs turns the comparison into a KL-coefficient sweep (each run once per coefficient). Each
(run, seed) is its own process with one thread, --parallel at a time, so its wall time and peak memory are
its own. The report folder (--output-dir) then holds:

- table.md: per run, the mean and half-range over seeds of the final evaluation (proxy score, gold score,
  KL, entropy, response length), wall time, episodes per second and peak memory; for each --gold-thresholds
  value, the episode at which each seed's evaluation first reaches it and the KL there; the Gao et al. (2022) fit
  of gold score against d = sqrt(KL), its peak given only where it lies within the d the data cover; the
  best-of-n baseline;
- scores.png (proxy and gold score against episodes) and entropy.png (entropy against episodes): per run the mean
  over seeds, a dot per evaluation, shaded from the lowest to the highest seed; kl.png (both scores against
  sqrt(KL)): each seed's own path through its evaluations (thin), per run the mean over seeds of the score where
  each seed's path first reaches d (thick, over the d all its seeds reach), best-of-n and the fits; each figure's
  legend says so; summary.json (every number the table and plots use);
- runs/<run>__<seed>/: each run's own folder (args.json, metrics.jsonl, samples.jsonl, runner.json).

Best-of-n baseline: n responses per evaluation prompt from the SFT policy, keep the one the proxy RM scores
highest, report its proxy and gold scores at KL_bon(n) = log n - (n - 1) / n, the KL of best-of-n to the
policy it samples from when no two samples can be equal (a continuous distribution) and an upper bound
otherwise (Gao et al. 2022, section 2.2; Beirami et al. 2024).

Usage (the README's "Results" lists every command behind its tables; times are on two CPU cores):
  python benchmarks/compare.py --output-dir results/head_to_head                # 3 scripts x 3 seeds, ~17 min
  python benchmarks/compare.py --runs rloo_rlhf.py --kl-coefs 0 0.01 0.03 0.05 0.1 \
      --extra="--eval-every 1024" --output-dir results/kl_sweep                 # over-optimisation, ~11 min
  python benchmarks/compare.py --replot results/head_to_head                    # redraw a report, no runs, seconds
Plots need matplotlib: python -m pip install -r requirements-plots.txt (or pass --no-plots).

--replot FOLDER rewrites FOLDER's table.md and PNGs from its summary.json alone with this version of the table and
the plots (write_report, as at the end of a comparison); it loads and runs nothing and leaves summary.json as it is,
so a change to how results are shown reaches every committed results/ folder without their runs (which are not
committed). A section whose numbers an older summary.json lacks (thresholds, the sqrt(KL) law) is left out.
"""

import contextlib
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["ppo_rlhf.py", "rloo_rlhf.py", "sac_rlhf.py"]  # the default runs (results/head_to_head's command)
RUNNABLE = [*SCRIPTS, "grpo_rlhf.py"]
MIN_R2_TO_DRAW = 0.5  # kl.png draws a Gao et al. fit only where it explains at least half the variance
RUNNER_FLAGS = ["--seed", "--output-dir", "--overwrite-output-dir", "--save-model", "--no-save-model"]


@dataclass
class Args:
    runs: list[str] = field(default_factory=lambda: list(SCRIPTS))
    """what to compare: each a script of this repository, optionally followed by its own flags, quoted
    (e.g. --runs rloo_rlhf.py "rloo_rlhf.py --kl-estimator k3 --kl-in loss")"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds, the same for every run"""
    extra: str = ""
    """flags added to every run, written --extra="--flag value" (e.g. --extra="--total-episodes 4096")"""
    kl_coefs: list[float] = field(default_factory=list)
    """KL-coefficient sweep: run every entry of --runs once per coefficient (adds --kl-coef to it)"""
    best_of_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256])
    """best-of-n baseline sizes (each dividing the next); pass --best-of-n with no value to skip"""
    gold_thresholds: list[float] = field(default_factory=lambda: [1.5, 1.9])
    """eval gold scores whose first crossing the table reports per seed (episodes, and the KL there)"""
    output_dir: str = "runs/compare"
    """report folder (table.md, plots, summary.json, runs/); must not exist yet unless --resume"""
    resume: bool = False
    """reuse the finished runs already in --output-dir (a run is finished once its runner.json exists),
    start the others, and rewrite the report"""
    parallel: int = 2
    """runs at a time (each with one thread)"""
    plots: bool = True
    """draw the PNGs (needs matplotlib)"""
    replot: str = ""
    """redraw the report folder given here (table.md and the PNGs) from its summary.json alone, running nothing
    (takes no other flag but --no-plots)"""


def fail(message):
    raise SystemExit(f"error: {message}")


def check_args(args):
    """Every check before anything runs, so a bad flag costs nothing (as in the scripts)."""
    if not args.runs or not args.seeds:
        fail("--runs and --seeds need at least one value each")
    for run in args.runs:
        script, _, patch = (shlex.split(run) or [""])[0].partition("+")
        if script not in RUNNABLE:
            fail(f"--runs: '{run}' must start with one of {', '.join(RUNNABLE)}")
        if patch and not (patch.startswith("experiments/") and os.path.isfile(os.path.join(REPO, patch))):
            fail(f"--runs: '{run}': {patch} is not a patch in this repository's experiments/ folder")
        if patch:
            apply_patch(script, patch, None)  # a dry run: a patch that no longer applies fails here
    for flags, flag in [(shlex.split(run)[1:], "--runs") for run in args.runs] + [(shlex.split(args.extra), "--extra")]:
        owned = [f for f in flags if f.split("=")[0] in RUNNER_FLAGS]
        if owned:
            fail(f"{flag}: {owned[0]} is set by the runner for every run (use --seeds and --output-dir); remove it")
        if args.kl_coefs and any(f.split("=")[0] in ("--kl-coef", "--kl-target") for f in flags):
            fail(f"--kl-coefs sets a fixed --kl-coef itself: remove --kl-coef / --kl-target from {flag}")
    labels = expand_runs(args)
    folders = [run_folder(args, label, seed) for label in labels for seed in args.seeds]
    if len(set(folders)) < len(folders):
        fail("--runs, --kl-coefs or --seeds repeat themselves: two runs would share a folder; give each once")
    sizes = sorted(args.best_of_n)
    if sizes and (sizes[0] < 1 or any(b % a for a, b in zip(sizes, sizes[1:]))):
        fail(f"--best-of-n {args.best_of_n}: sizes must be >= 1, each dividing the next (e.g. 1 2 4 8 16)")
    if args.parallel < 1:
        fail(f"--parallel must be at least 1 (got {args.parallel})")
    if os.path.exists(args.output_dir) and os.listdir(args.output_dir) and not args.resume:
        fail(
            f"--output-dir {args.output_dir} already exists and is not empty: choose another folder, "
            "or pass --resume to reuse its finished runs"
        )
    if args.plots and importlib.util.find_spec("matplotlib") is None:
        fail("plots need matplotlib: python -m pip install -r requirements-plots.txt (or pass --no-plots)")
    for label in labels:  # --resume may only reuse runs made with the same flags
        for seed in args.seeds:
            runner = os.path.join(run_folder(args, label, seed), "runner.json")
            if os.path.exists(runner):
                with open(runner) as f:
                    old = shlex.split(json.load(f)["command"])[1:]
                if old != shlex.split(shown_command(run_command(args, label, seed)))[1:]:
                    fail(
                        f"--resume: {os.path.dirname(runner)} was made with other flags ({shlex.join(old[1:])}); "
                        "use another --output-dir"
                    )


def cpu_model():
    """The CPU's model name (Linux), for the record: runs repeat bit for bit only on the same machine type."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            return names[0]
    return platform.processor() or "CPU model unknown"


def expand_runs(args):
    """The labelled runs of this comparison: --runs, times --kl-coefs when sweeping."""
    if not args.kl_coefs:
        return list(args.runs)
    return [f"{run} --kl-coef {coef:g}" for run in args.runs for coef in args.kl_coefs]


def file_name(text):
    """text with every run of characters other than letters, digits and dots as one underscore."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", text)


def run_folder(args, label, seed):
    slug = file_name(label.replace("_rlhf.py", "")).strip("_")
    return os.path.join(args.output_dir, "runs", f"{slug}__{seed}")


def script_path(args, script):
    """The script a run executes: a repository script, or its patched copy in <output-dir>/scripts/."""
    if "+" not in script:
        return os.path.join(REPO, script)
    return os.path.join(args.output_dir, "scripts", file_name(script.removesuffix(".patch")))


def apply_patch(script, patch, out):
    """Write script with patch applied to out (None: only check that it applies); fail with patch's message."""
    where = ["--dry-run"] if out is None else ["--output", out]
    # --fuzz 0: every context line must match, so a patch never lands on a script that has changed around it.
    cmd = ["patch", "--quiet", "--force", "--fuzz", "0", *where, os.path.join(REPO, script), os.path.join(REPO, patch)]
    result = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        fail(f"--runs: {patch} does not apply to {script} ({(result.stdout + result.stderr).strip()[:300]})")


def write_patched_scripts(args):
    """Each patched run's script in <output-dir>/scripts/, beside a link to the tinyworld (the scripts look there)."""
    os.makedirs(os.path.join(args.output_dir, "scripts"), exist_ok=True)
    tinyworld = os.path.join(args.output_dir, "scripts", "tinyworld")
    if not os.path.lexists(tinyworld):
        os.symlink(os.path.join(REPO, "tinyworld"), tinyworld)
    for script in {shlex.split(run)[0] for run in args.runs if "+" in shlex.split(run)[0]}:
        apply_patch(*script.split("+"), script_path(args, script) + ".py")


def run_command(args, label, seed):
    """The command line of one (run, seed): the runner's flags, then --extra, then the run's own flags."""
    script, *flags = shlex.split(label)
    return [
        sys.executable,
        script_path(args, script) + (".py" if "+" in script else ""),
        "--seed",
        str(seed),
        "--output-dir",
        run_folder(args, label, seed),
        "--overwrite-output-dir",
        "--no-save-model",
        *shlex.split(args.extra),
        *flags,
    ]


def shown_command(cmd):
    """A run's command as the records keep it: the script relative to the repository (not this machine's path to
    it or to python); the run's --output-dir as it was given."""
    return shlex.join(["python", os.path.relpath(cmd[1], REPO), *cmd[2:]])


def run_child(cmd, env=None):
    """Run cmd to the end; fail with its stderr unless it exits 0; return its wall seconds and peak RSS in MiB.

    Also used by bench.py. The peak RSS is this child's own (os.wait4), not the largest of all children.
    """
    start = time.time()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    with child.stderr:
        stderr = child.stderr.read()  # read before waiting, so a full pipe cannot block the child
    _, status, usage = os.wait4(child.pid, 0)  # the rusage of this child alone
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        why = (
            f"exit code {child.returncode}"
            if child.returncode > 0
            else f"killed by signal {-child.returncode} (out of memory?)"
        )
        fail(f"{shlex.join(cmd)} failed ({why}):\n{stderr[-3000:]}")
    return time.time() - start, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def run_one(args, label, seed):
    """One (run, seed) as a child process with one thread; its wall time and peak RSS go to runner.json."""
    out = run_folder(args, label, seed)
    if os.path.exists(os.path.join(out, "runner.json")):
        return  # finished in an earlier call (--resume; check_args made sure the flags match)
    cmd = run_command(args, label, seed)
    wall, peak_rss = run_child(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    with open(os.path.join(out, "runner.json"), "w") as f:  # written last: marks the run as finished
        json.dump({"command": shown_command(cmd), "wall_s": wall, "peak_rss_mib": peak_rss}, f)
    print(f"done: {label} (seed {seed}) in {wall:.0f} s", flush=True)


def load_run(args, label, seed):
    """A finished run's evaluation records, last training record and runner.json."""
    out = run_folder(args, label, seed)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(out, "runner.json")) as f:
        runner = json.load(f)
    train = [r for r in records if "objective/scores" in r]
    last = train[-1]
    return {
        "seed": seed,
        "evals": [r for r in records if "eval/scores" in r],
        "runner": runner,
        "episodes_per_s": last["episode"] / (last["time/rollout_s"] + last["time/update_s"]),
        "cuda_peak_gb": max((r.get("memory/cuda_peak_gb", 0.0) for r in train), default=0.0),
    }


def fit_gao(points):
    """Least-squares fit of R(d) = d (a - b log d) to (d, R) points; R is the gold score gain over the start.

    Linear in (a, b): R = a * d - b * d log d. Returns a, b, the peak d* = exp(a / b - 1) (where dR/dd = 0)
    with its gain b * d*, and R^2; None when the data do not allow a fit (fewer than 4 points with d > 0).
    """
    points = [(d, r) for d, r in points if d > 0]
    if len(points) < 4:
        return None
    sxx = sum(d * d for d, _ in points)
    sxy = sum(-d * d * math.log(d) for d, _ in points)
    syy = sum((d * math.log(d)) ** 2 for d, _ in points)
    bx = sum(d * r for d, r in points)
    by = sum(-d * math.log(d) * r for d, r in points)
    det = sxx * syy - sxy * sxy  # the 2 x 2 normal equations, solved by Cramer's rule
    if abs(det) < 1e-12:
        return None
    a, b = (bx * syy - by * sxy) / det, (sxx * by - sxy * bx) / det
    mean_r = sum(r for _, r in points) / len(points)
    ss_res = sum((r - d * (a - b * math.log(d))) ** 2 for d, r in points)
    ss_tot = sum((r - mean_r) ** 2 for _, r in points)
    # A peak exists only for b > 0; far beyond the data (log d* > 10, d* > 22,000) it means "none in sight".
    peak = math.exp(a / b - 1) if b > 0 and a / b - 1 < 10 else None
    return {
        "a": a,
        "b": b,
        "peak_d": peak,
        "peak_gain": b * peak if peak else None,
        "r2": 1 - ss_res / ss_tot if ss_tot > 0 else None,
        "points": len(points),
        "max_d": max(d for d, _ in points),
    }


def fit_d_range(runs):
    """The smallest and largest d = sqrt(KL) among the points fit_gao is given for these runs (every evaluation after
    the start, d > 0), from the summary's evaluations; None if there are none."""
    ds = [math.sqrt(max(e["eval/kl"], 0.0)) for run in runs for s in run["seeds"] for e in s["evals"][1:]]
    ds = [d for d in ds if d > 0]
    return (min(ds), max(ds)) if ds else None


def peak_in_data(fit, d_range):
    """The fit's peak d* and its gain there, (d*, b d*), when d* lies within the d its points cover (d_range, from
    fit_d_range); None otherwise. A peak outside them is the fit's extrapolation (beyond the largest d) or its
    interpolation between the start and the first evaluation (below the smallest), not a finding: not reported."""
    if fit and fit["peak_d"] and d_range and d_range[0] <= fit["peak_d"] <= d_range[1]:
        return fit["peak_d"], fit["peak_gain"]
    return None


def fit_sqrt_kl_law(points, min_r2=0.9):
    """Bai et al. (2022, sec. 4.3): over training the RM score grows about linearly in d = sqrt(KL). Least squares of
    the gain R = slope x d (through the start) over (d, R) points: slope and R^2 over all of them, and the widest
    range from d = 0 over which the law holds: the largest d* whose points (d <= d*, at least 4) fit such a line with
    R^2 >= min_r2, and the slope there. None with fewer than 4 points with d > 0."""
    points = sorted((d, r) for d, r in points if d > 0)
    if len(points) < 4:
        return None

    def fit(ps):
        slope = sum(d * r for d, r in ps) / sum(d * d for d, _ in ps)
        mean = sum(r for _, r in ps) / len(ps)
        ss_tot, ss_res = sum((r - mean) ** 2 for _, r in ps), sum((r - slope * d) ** 2 for d, r in ps)
        return slope, 1 - ss_res / ss_tot if ss_tot > 0 else None

    slope, r2 = fit(points)
    holds = [k for k in range(4, len(points) + 1) if (fit(points[:k])[1] or 0.0) >= min_r2]
    return {
        "slope": slope,
        "r2": r2,
        "holds_to_d": points[holds[-1] - 1][0] if holds else None,
        "slope_there": fit(points[: holds[-1]])[0] if holds else None,
        "max_d": points[-1][0],
        "points": len(points),
    }


def kl_bon(n):
    """KL(best-of-n || pi) = log n - (n - 1) / n when no two samples can be equal; an upper bound otherwise."""
    return math.log(n) - (n - 1) / n


def best_of_n_args(args, seed):
    """The common flags of --extra, read as the scripts read them (so the baseline samples as the runs do)."""
    sys.path.insert(0, REPO)
    # The common helpers and flags are the same text in the three scripts; the twin's also read the memory flags.
    import rloo_rlhf_multigpu as common

    try:
        return common, tyro.cli(common.Args, args=shlex.split(args.extra) + ["--seed", str(seed)])
    except SystemExit:
        fail(
            f"--best-of-n: --extra='{args.extra}' has flags that not every script has; "
            "pass --best-of-n with no value to skip the baseline"
        )


def best_of_n(args, sizes, seed):
    """Best-of-n from the SFT policy on the evaluation prompts: proxy picks, gold judges.

    For each prompt, one pool of max(sizes) samples is split into max(sizes) / n disjoint groups of n; each
    group keeps its top-proxy response. Means over prompts and groups, so every n uses all samples.
    Uses the scripts' own helpers and the common flags in --extra (not a run's own flags), so the prompts,
    models and sampling are those of the runs.
    """
    import torch

    common, script_args = best_of_n_args(args, seed)
    device, autocast, tokenizer, policy, _, reward_model, gold_model = common.load_models(script_args)
    if gold_model is None:
        return None
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = common.load_prompts(script_args.eval_dataset, "--eval-dataset")[: script_args.eval_size]
    ids = common.tokenize_prompts(tokenizer, prompts, script_args.max_prompt_length, "--eval-dataset")
    pool = max(sizes)
    generator = torch.Generator(device=device).manual_seed(seed + 12345)
    proxy, gold = [], []  # [prompt, pool]
    for prompt in ids:
        p, g = [], []
        for start in range(0, pool, 256):
            query, query_mask = common.left_pad([prompt] * min(256, pool - start), pad_id, device)
            raw = common.generate(policy, query, query_mask, script_args, eos_id, generator, autocast)
            mask, responses, has_eos = common.response_mask(raw, eos_id, pad_id, script_args.stop_at_eos)
            rows, size = (query, query_mask, responses, mask), script_args.rollout_micro_batch_size  # --extra's
            score = common.chunked(size, common.get_scores, reward_model, *rows, autocast)
            if script_args.missing_eos_penalty is not None and script_args.stop_at_eos:  # as the scripts score
                score = score - script_args.missing_eos_penalty * (~has_eos).float()
            p.append(score)
            g.append(common.chunked(size, common.get_scores, gold_model, *rows, autocast))
        proxy.append(torch.cat(p))
        gold.append(torch.cat(g))
    proxy, gold = torch.stack(proxy), torch.stack(gold)
    rows = []
    for n in sorted(sizes):
        groups_p, groups_g = proxy.view(len(ids), pool // n, n), gold.view(len(ids), pool // n, n)
        best = groups_p.argmax(-1, keepdim=True)
        rows.append(
            {
                "n": n,
                "kl": kl_bon(n),
                "scores": groups_p.gather(-1, best).mean().item(),
                "gold_scores": groups_g.gather(-1, best).mean().item(),
            }
        )
    return rows


def mean_spread(xs, digits=2):
    """Mean ± half-range (max - min) / 2, or the mean alone for one value (also used by bench.py)."""
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    return f"{m:.{digits}f}" if len(xs) == 1 else f"{m:.{digits}f} ± {(max(xs) - min(xs)) / 2:.{digits}f}"


def summarise(args, labels):
    """Everything the table and plots show, from the run folders (and the best-of-n samples)."""
    command = [a for a in sys.argv[1:] if a != "--resume"]  # the command that makes this report from nothing
    summary = {
        "command": "python benchmarks/compare.py " + shlex.join(command),
        "seeds": args.seeds,
        "extra": args.extra,
        "gold_thresholds": args.gold_thresholds,
        "machine": f"{platform.machine()} ({cpu_model()}), {os.cpu_count()} CPU cores, {args.parallel} run(s) at a "
        "time, 1 thread each",
        "runs": {},
    }
    pooled = []
    for label in labels:
        runs = [load_run(args, label, seed) for seed in args.seeds]
        start = [r["evals"][0] for r in runs]
        points = []
        if all("eval/gold_scores" in e for r in runs for e in r["evals"]):
            points = [
                (math.sqrt(max(e["eval/kl"], 0.0)), e["eval/gold_scores"] - r["evals"][0]["eval/gold_scores"])
                for r in runs
                for e in r["evals"][1:]
            ]
        pooled += points
        gains = {  # (d, score gain over the seed's start) for every evaluation after the start
            key: [
                (math.sqrt(max(e["eval/kl"], 0.0)), e[key] - r["evals"][0][key]) for r in runs for e in r["evals"][1:]
            ]
            for key in ["eval/scores", "eval/gold_scores"]
            if all(key in e for r in runs for e in r["evals"])
        }
        summary["runs"][label] = {
            "seeds": runs,
            "start": {k: sum(e[k] for e in start) / len(start) for k in start[0] if k.startswith("eval/")},
            "gao_fit": fit_gao(points),
            "sqrt_kl_law": {key.removeprefix("eval/"): fit_sqrt_kl_law(pts) for key, pts in gains.items()},
        }
    # In a sweep, one fit over every run's points: the gold-vs-KL frontier that the runs trace together (the
    # KL coefficient mostly decides how far along it a run goes; Gao et al. 2022, section 3.6).
    summary["pooled_fit"] = fit_gao(pooled) if args.kl_coefs and len(labels) > 1 else None
    if args.best_of_n:
        summary["best_of_n"] = best_of_n(args, args.best_of_n, args.seeds[0])
    return summary


def write_table(summary, path):
    runs = summary["runs"]
    first = next(iter(runs.values()))
    final_episode = first["seeds"][0]["evals"][-1]["episode"]
    lines = [
        f"Command: `{summary['command']}`",
        "",
        f"Machine: {summary['machine']}. Seeds {summary['seeds']}; final evaluation at episode {final_episode} "
        f"on the evaluation prompts; mean ± half-range over seeds.",
        "",
    ]
    start = first["start"]
    lines += [
        f"Start (SFT policy): proxy score {start['eval/scores']:.2f}"
        + (f", gold score {start['eval/gold_scores']:.2f}" if "eval/gold_scores" in start else "")
        + ".",
        "",
    ]
    # Episodes to reach: the first evaluation of each seed at the first run's final mean proxy score, at a KL
    # no larger than the first run's largest final KL (so a run cannot "reach" it by drifting further).
    label0 = next(iter(runs))
    finals0 = [s["evals"][-1] for s in first["seeds"]]
    target = (sum(e["eval/scores"] for e in finals0) / len(finals0), max(e["eval/kl"] for e in finals0))
    cuda = any(s["cuda_peak_gb"] > 0 for run in runs.values() for s in run["seeds"])  # a column only on GPUs
    lines += [
        "| run | proxy score | gold score | KL | entropy | response length | wall s | training episodes/s "
        + "| peak RSS MiB "
        + ("| peak CUDA GiB " if cuda else "")
        + f"| episodes to proxy {target[0]:.2f} at KL <= {target[1]:.1f} |",
        "|" + " --- |" * (11 if cuda else 10),
    ]
    for label, run in runs.items():
        finals = [s["evals"][-1] for s in run["seeds"]]
        col = lambda k: mean_spread([e[k] for e in finals]) if all(k in e for e in finals) else "-"
        reach = []
        for s in run["seeds"]:
            hit = [e["episode"] for e in s["evals"] if e["eval/scores"] >= target[0] and e["eval/kl"] <= target[1]]
            reach.append(str(hit[0]) if hit else "never")
        lines.append(
            f"| {label} | {col('eval/scores')} | {col('eval/gold_scores')} | {col('eval/kl')} "
            f"| {col('eval/entropy')} | {col('eval/response_length')} "
            f"| {mean_spread([s['runner']['wall_s'] for s in run['seeds']], 0)} "
            f"| {mean_spread([s['episodes_per_s'] for s in run['seeds']], 1)} "
            f"| {mean_spread([s['runner']['peak_rss_mib'] for s in run['seeds']], 0)} "
            + (f"| {mean_spread([s['cuda_peak_gb'] for s in run['seeds']])} " if cuda else "")
            + f"| {', '.join(reach)} |"
        )
    lines += [
        "",
        "Training episodes/s leaves out model loading and evaluations, which wall s includes. The "
        f"episodes-to-reach column uses {label0}'s final mean proxy score and largest final KL.",
        "",
    ]
    lines += threshold_table(summary) if summary.get("gold_thresholds") else []  # not in reports made before it
    lines += gao_table(summary)
    lines += sqrt_kl_law_table(summary)
    lines += variety_table(summary)
    if summary.get("best_of_n"):
        lines += [
            f"Best-of-n from the SFT policy (proxy RM picks, gold RM judges; seed {summary['seeds'][0]}, "
            f"{max(r['n'] for r in summary['best_of_n'])} samples per evaluation prompt), plotted at "
            "KL_bon = log n - (n - 1)/n, an upper bound on its KL to the SFT policy (Beirami et al. 2024):",
            "",
            "| n | KL_bon | sqrt(KL_bon) | proxy score | gold score |",
            "|" + " --- |" * 5,
        ]
        lines += [
            f"| {r['n']} | {r['kl']:.2f} | {math.sqrt(r['kl']):.2f} | {r['scores']:.2f} | {r['gold_scores']:.2f} |"
            for r in summary["best_of_n"]
        ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


VARIETY_KEYS = ["eval/distinct_1", "eval/distinct_2", "eval/self_similarity", "eval/entropy"]


def at_kl(evals, kl, key):
    """A seed's `key` where its KL first reaches `kl`, interpolated linearly in KL between the two evaluations around
    that point (the start, KL 0, included); its last evaluation's if it never gets there."""
    for a, b in zip(evals, evals[1:]):
        if a["eval/kl"] <= kl <= b["eval/kl"]:
            weight = (kl - a["eval/kl"]) / (b["eval/kl"] - a["eval/kl"]) if b["eval/kl"] > a["eval/kl"] else 0.0
            return a[key] + weight * (b[key] - a[key])
    return evals[-1][key]


def variety_table(summary):
    """Variety (distinct-n over the evaluation responses, the mean pairwise similarity of 4 responses to one prompt,
    the per-token entropy) per run at matched KL, the lowest of the runs' mean final KLs (at_kl), then at the end."""
    runs = summary["runs"]
    if not all(k in e for run in runs.values() for s in run["seeds"] for e in s["evals"] for k in VARIETY_KEYS):
        return []
    matched = min(sum(s["evals"][-1]["eval/kl"] for s in run["seeds"]) / len(run["seeds"]) for run in runs.values())
    lines = [
        f"Variety at matched KL {matched:.2f} (the lowest mean final KL; each seed interpolated linearly in KL between "
        "the evaluations around the first point it reaches it, or its last evaluation if it never does) and at the "
        "end. distinct-n: over all evaluation responses; self-similarity: mean bigram Jaccard overlap of 4 responses "
        "to each of 16 prompts, 1 = identical:",
        "",
        "| run | distinct-1 | distinct-2 | self-similarity | entropy | final KL | final distinct-2 "
        "| final self-similarity |",
        "|" + " --- |" * 8,
    ]
    for label, run in runs.items():
        cols = [mean_spread([at_kl(s["evals"], matched, k) for s in run["seeds"]]) for k in VARIETY_KEYS]
        finals = [s["evals"][-1] for s in run["seeds"]]
        cols += [mean_spread([e[k] for e in finals]) for k in ["eval/kl", "eval/distinct_2", "eval/self_similarity"]]
        lines.append(f"| {label} | " + " | ".join(cols) + " |")
    return [*lines, ""]


def sqrt_kl_law_table(summary):
    """Per run, the fit of fit_sqrt_kl_law for the proxy and the gold score (none in reports made before it)."""
    if not any("sqrt_kl_law" in run for run in summary["runs"].values()):
        return []
    cell = lambda x, f: "-" if x is None else f.format(x)  # noqa: E731
    lines = [
        "Bai et al. (2022) sqrt(KL) law: score gain over the start = slope x sqrt(KL), least squares over every "
        "evaluation of every seed; 'holds to d': the widest range from d = 0 whose points fit such a line with "
        "R^2 >= 0.9, and the slope there:",
        "",
        "| run | score | slope | R^2 | holds to d | slope there | largest d seen | points |",
        "|" + " --- |" * 8,
    ]
    for label, run in summary["runs"].items():
        for key, fit in run.get("sqrt_kl_law", {}).items():
            if fit is None:
                lines.append(f"| {label} | {key} | - | - | - | - | - | too few |")
                continue
            lines.append(
                f"| {label} | {key} | {fit['slope']:.3f} | {cell(fit['r2'], '{:.2f}')} "
                f"| {cell(fit['holds_to_d'], '{:.2f}')} | {cell(fit['slope_there'], '{:.3f}')} | {fit['max_d']:.2f} "
                f"| {fit['points']} |"
            )
    return lines + [""]


def gao_table(summary):
    """Per run (and pooled, in a sweep) the Gao et al. fit of fit_gao, with the range of d its points cover; its peak
    only where it lies within that range (peak_in_data)."""
    runs = summary["runs"]
    if not any(run["gao_fit"] for run in runs.values()):
        return []
    lines = [
        "Gao et al. fit of the gold score gain over the start, R(d) = d (a - b log d), d = sqrt(KL), "
        "over every evaluation of every seed:",
        "",
        "| run | a | b | peak at d | peak gain | smallest d seen | largest d seen | R^2 | points |",
        "|" + " --- |" * 9,
    ]
    fits = [(label, run["gao_fit"], fit_d_range([run])) for label, run in runs.items()]
    if summary["pooled_fit"]:
        fits.append(("all runs pooled", summary["pooled_fit"], fit_d_range(runs.values())))
    for label, fit, d_range in fits:
        if fit is None:
            lines.append(f"| {label} | - | - | - | - | - | - | - | too few |")
            continue
        within = peak_in_data(fit, d_range)
        if within:
            peak, gain = f"{within[0]:.2f}", f"{within[1]:.2f}"
        elif fit["b"] <= 0:
            peak, gain = "none", "-"
        else:
            peak, gain = "below smallest d" if fit["peak_d"] and fit["peak_d"] < d_range[0] else "beyond largest d", "-"
        r2 = "-" if fit["r2"] is None else f"{fit['r2']:.2f}"
        lines.append(
            f"| {label} | {fit['a']:.3f} | {fit['b']:.3f} | {peak} | {gain} | {d_range[0]:.2f} | {fit['max_d']:.2f} "
            f"| {r2} | {fit['points']} |"
        )
    lines += [
        "",
        "Peak at d: where the fit is highest, d* = exp(a / b - 1), given only when it lies within the d its points "
        "cover (from the smallest to the largest d seen after the start), with the gain there (b d*). 'beyond "
        "largest d': the fit still rises at the largest d seen and would turn over only beyond the data, an "
        "extrapolation. 'below smallest d': its maximum falls between the start (d = 0) and the first point, where "
        "no evaluation was made. Neither is a finding. 'none': the fit has no maximum (b <= 0). kl.png draws the "
        f"runs' fits with R^2 >= {MIN_R2_TO_DRAW} (and a sweep's pooled fit) over the d their points cover.",
        "",
    ]
    return lines


def threshold_table(summary):
    """Per run and gold threshold: the first evaluated episode at which each seed's gold score reaches it, and
    its KL there (evaluations are --eval-every apart, so a crossing is known to that resolution)."""
    thresholds = summary["gold_thresholds"]
    lines = [
        "Episodes until a seed's evaluation first reaches each gold score (the KL there); the mean of episodes "
        "counts only seeds that reach it:",
        "",
        "| run | " + " | ".join(f"episodes to gold {t:g} | KL there" for t in thresholds) + " |",
        "|" + " --- |" * (1 + 2 * len(thresholds)),
    ]
    for label, run in summary["runs"].items():
        cells = []
        for t in thresholds:
            hits = [
                next((e for e in s["evals"] if e.get("eval/gold_scores", -math.inf) >= t), None) for s in run["seeds"]
            ]
            reached = [e for e in hits if e is not None]
            episodes = ", ".join(str(e["episode"]) if e else "never" for e in hits)
            cells.append(
                f"{episodes} (mean {mean_spread([e['episode'] for e in reached], 0)})" if reached else episodes
            )
            cells.append(", ".join(f"{e['eval/kl']:.1f}" if e else "-" for e in hits))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def first_reach(xs, ys, x):
    """y where the path through the points (xs, ys), in their order, first reaches x from below, interpolated linearly
    between the two points around it; None if it starts beyond x or never gets there."""
    if not xs or xs[0] > x:
        return None
    if xs[0] == x:
        return ys[0]
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        if x0 <= x <= x1:
            return y0 + (x - x0) / (x1 - x0) * (y1 - y0) if x1 > x0 else y0
    return None


def mean_first_reach(paths, points=100):
    """The mean over seeds of each seed's y where it first reaches x (first_reach), on a grid of x over the range every
    seed covers: from the largest of their first x to the smallest of their largest x. paths: one (xs, ys) per seed.
    A seed's path can go back in x (KL falls as well as rises), so the mean at equal evaluations, drawn against the
    mean x, can fold back on itself; this one cannot. Returns (grid, means), empty when the range is a point."""
    lo, hi = max(xs[0] for xs, _ in paths), min(max(xs) for xs, _ in paths)
    if hi <= lo:
        return [], []
    grid = [lo + (hi - lo) * k / (points - 1) for k in range(points - 1)] + [hi]  # hi exactly: every seed gets there
    return grid, [sum(first_reach(xs, ys, x) for xs, ys in paths) / len(paths) for x in grid]


def plot(summary, folder):
    """scores.png, kl.png and entropy.png; each says in its legend what its lines, bands, dots and fits are.

    Against episodes (scores, entropy): per run the mean over seeds at each evaluation (a dot each), shaded from the
    lowest to the highest seed. Against sqrt(KL) (kl.png): each seed's own path through its evaluations, thin and
    faint, and per run the mean over seeds where each first reaches d (mean_first_reach); best-of-n; Gao et al. fits.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    runs = summary["runs"]
    colors = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors  # one colour per run, up to 20 runs
    color = {label: colors[i % len(colors)] for i, label in enumerate(runs)}
    seeds = len(summary["seeds"])
    several = all(len(run["seeds"]) > 1 for run in runs.values())
    gray = "0.45"

    def figure(width, keys, ncol):
        """A figure whose legend, under its panels, names the runs by colour and then says what is drawn (keys)."""
        rows = len(runs) + len(keys) if ncol == 1 else max(len(runs), len(keys))
        fig = plt.figure(figsize=(width, 3.8 + 0.17 * rows + 0.2), layout="constrained")
        handles = [Line2D([], [], color=color[label], lw=2, label=label) for label in runs]
        blank = Line2D([], [], linestyle="none", label=" ")
        if ncol == 2:  # runs in the left column, what is drawn in the right
            handles += [blank] * (rows - len(runs))
            keys = keys + [blank] * (rows - len(keys))
        return fig, lambda: fig.legend(handles=handles + keys, loc="outside lower center", ncol=ncol, fontsize=7)

    def over_episodes(ax, key):
        """Per run the mean over seeds at each evaluation (dots), shaded from the lowest to the highest seed."""
        for label, run in runs.items():
            evals = [s["evals"] for s in run["seeds"]]
            if not all(key in e for ev in evals for e in ev):
                continue
            n = min(len(ev) for ev in evals)
            xs = [evals[0][j]["episode"] for j in range(n)]  # every seed evaluates at the same episodes
            ys = [[ev[j][key] for j in range(n)] for ev in evals]
            ax.plot(xs, [sum(row[j] for row in ys) / len(ys) for j in range(n)], "-o", ms=3, color=color[label])
            if len(ys) > 1:
                columns = list(zip(*ys))  # the seeds' values at each evaluation
                ax.fill_between(
                    xs, [min(c) for c in columns], [max(c) for c in columns], alpha=0.2, lw=0, color=color[label]
                )

    entry = lambda label, **style: Line2D([], [], label=label, **style)  # noqa: E731 (a legend entry, nothing drawn)
    line = (
        f"line: mean over the {seeds} seeds, a dot per evaluation"
        if several
        else "line: the one seed, a dot per evaluation"
    )
    episode_keys = [entry(line, color=gray, marker="o", ms=3)]
    if several:
        episode_keys.append(Patch(color=gray, alpha=0.3, lw=0, label="band: from the lowest to the highest seed"))

    fig, legend = figure(11, episode_keys, 2)
    axes = fig.subplots(1, 2)
    for ax, key, name in zip(axes, ["eval/scores", "eval/gold_scores"], ["proxy RM score", "gold RM score"]):
        over_episodes(ax, key)
        ax.set(xlabel="episodes (sampled responses)", ylabel=name, title=f"{name} on the evaluation prompts")
    legend()
    fig.savefig(os.path.join(folder, "scores.png"), dpi=110)

    def over_sqrt_kl(ax, key):
        """Each seed's path (thin, faint, a dot per evaluation) and per run the mean where each seed first reaches d."""
        for label, run in runs.items():
            evals = [s["evals"] for s in run["seeds"]]
            if not all(key in e for ev in evals for e in ev):
                continue
            paths = [([math.sqrt(max(e["eval/kl"], 0.0)) for e in ev], [e[key] for e in ev]) for ev in evals]
            for xs, ys in paths:
                ax.plot(xs, ys, "-o", lw=0.7, ms=2, alpha=0.3 if len(paths) > 1 else 1.0, color=color[label])
            if len(paths) > 1:
                ax.plot(*mean_first_reach(paths), "-", lw=2, color=color[label])

    bon = summary.get("best_of_n")
    gold = any("eval/gold_scores" in run["start"] for run in runs.values())
    drawn_fits = [
        label
        for label, run in runs.items()
        if run["gao_fit"] and (run["gao_fit"]["r2"] or 0.0) >= MIN_R2_TO_DRAW and "eval/gold_scores" in run["start"]
    ]
    pooled = summary.get("pooled_fit")
    pooled = pooled if pooled and pooled["r2"] is not None and gold else None
    pooled_range = fit_d_range(runs.values())
    if several:
        kl_keys = [
            entry("thick line: mean over seeds of the score where each seed's thin line first reaches d,\n"
                "up to the smallest of its seeds' largest d", color=gray, lw=2),
            entry("thin line: one seed, a dot per evaluation, in order of episodes", color=gray, lw=0.7, marker="o",
                ms=2, alpha=0.5),
        ]  # fmt: skip
    else:
        kl_keys = [entry("line: the one seed, a dot per evaluation", color=gray, lw=0.7, marker="o", ms=2)]
    if bon:
        kl_keys.append(entry("best-of-n from the SFT policy, at KL_bon (an upper bound on its KL)", color="k", ls="--",
                           marker="s", ms=3))  # fmt: skip
    if drawn_fits:
        kl_keys.append(entry(f"dotted (gold): fit d (a - b log d) of a run with R^2 >= {MIN_R2_TO_DRAW}, over the d "
                           "its points cover", color=gray, ls=":"))  # fmt: skip
    if pooled:
        peak, (lo, hi) = peak_in_data(pooled, pooled_range), pooled_range
        where = f"peak at d = {peak[0]:.2f}" if peak else f"no peak within the d seen, {lo:.2f} to {hi:.2f}"
        kl_keys.append(entry(f"dotted (gold): fit over all runs' points (R^2 {pooled['r2']:.2f}, {where})", color="k",
                           ls=":", lw=2))  # fmt: skip

    fig, legend = figure(11, kl_keys, 2)
    axes = fig.subplots(1, 2)
    for ax, key, name in zip(axes, ["eval/scores", "eval/gold_scores"], ["proxy RM score", "gold RM score"]):
        over_sqrt_kl(ax, key)
        if bon:
            bon_key = {"eval/scores": "scores", "eval/gold_scores": "gold_scores"}[key]
            ax.plot([math.sqrt(r["kl"]) for r in bon], [r[bon_key] for r in bon], "k--s", ms=3)
        if key == "eval/gold_scores":  # the Gao et al. fits that describe their data, over the d each run saw
            for label in drawn_fits:
                fit, start = runs[label]["gao_fit"], runs[label]["start"]["eval/gold_scores"]
                lo, hi = fit_d_range([runs[label]])
                ds = [lo + (hi - lo) * j / 50 for j in range(51)]
                ax.plot(ds, [start + d * (fit["a"] - fit["b"] * math.log(d)) for d in ds], ":", color=color[label])
            if pooled:  # drawn whatever its R^2 (shown): it is the sweep's headline
                start = next(iter(runs.values()))["start"]["eval/gold_scores"]
                lo, hi = pooled_range
                ds = [lo + (hi - lo) * j / 100 for j in range(101)]
                ax.plot(ds, [start + d * (pooled["a"] - pooled["b"] * math.log(d)) for d in ds], "k:", lw=2)
        ax.set(xlabel="sqrt(KL(pi || pi_ref)) (nats^0.5)", ylabel=name, title=f"{name} against sqrt(KL)")
    legend()
    fig.savefig(os.path.join(folder, "kl.png"), dpi=110)

    fig, legend = figure(7, episode_keys, 1)
    ax = fig.subplots()
    over_episodes(ax, "eval/entropy")
    ax.set(xlabel="episodes (sampled responses)", ylabel="entropy per token (nats)", title="policy entropy")
    legend()
    fig.savefig(os.path.join(folder, "entropy.png"), dpi=110)
    plt.close("all")


def write_report(summary, folder, plots=True):
    """table.md and, with plots, the PNGs of a report folder, from its summary alone."""
    write_table(summary, os.path.join(folder, "table.md"))
    if plots:
        plot(summary, folder)


def replot(folder, plots=True):
    """Rewrite folder's table.md and PNGs from its summary.json with this version of the table and the plots; no run
    is loaded or repeated and summary.json is left as it is."""
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    write_report(summary, folder, plots)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.replot:
        if args != Args(replot=args.replot, plots=args.plots):
            fail("--replot redraws a finished report from its summary.json: it takes no other flag but --no-plots")
        if not os.path.isfile(os.path.join(args.replot, "summary.json")):
            fail(f"--replot: {args.replot} has no summary.json (a report folder written by this script)")
        if args.plots and importlib.util.find_spec("matplotlib") is None:
            fail("plots need matplotlib: python -m pip install -r requirements-plots.txt (or pass --no-plots)")
        replot(args.replot, args.plots)
        print(f"rewrote {args.replot}/table.md" + (" and its plots" if args.plots else ""))
        raise SystemExit(0)
    check_args(args)
    if args.best_of_n:
        best_of_n_args(args, args.seeds[0])  # a flag it cannot read fails now, not after the runs
    labels = expand_runs(args)
    os.makedirs(os.path.join(args.output_dir, "runs"), exist_ok=True)
    write_patched_scripts(args)
    jobs = [(label, seed) for label in labels for seed in args.seeds]
    print(f"{len(jobs)} runs, {args.parallel} at a time; report in {args.output_dir}", flush=True)
    pool = ThreadPoolExecutor(args.parallel)
    try:
        for future in as_completed([pool.submit(run_one, args, *job) for job in jobs]):
            future.result()  # the first failure stops the comparison (the runs under way finish first)
    finally:
        pool.shutdown(cancel_futures=True)
    summary = summarise(args, labels)
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    write_report(summary, args.output_dir, args.plots)
    with open(os.path.join(args.output_dir, "table.md")) as f:
        print(f.read())
