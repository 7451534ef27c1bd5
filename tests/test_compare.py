"""Tests of benchmarks/compare.py: its math (the Gao et al. fit, KL of best-of-n) and the runner end to end
on a tiny budget on the tinyworld (table, plots, summary, best-of-n, refusals, --resume)."""

import importlib.util
import json
import math
import os

import pytest

from tests.helpers import REPO, read_jsonl, run_script

spec = importlib.util.spec_from_file_location("compare", REPO / "benchmarks" / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

TINY = "--total-episodes 32 --batch-size 16 --eval-every 16 --eval-size 8 --response-length 8"


def run_compare(*flags):
    return run_script("benchmarks/compare.py", *flags)  # CPU, offline, one thread, as for the scripts


def test_gao_fit_recovers_the_curve_it_was_made_from():
    a, b = 1.3, 0.6
    points = [(d, d * (a - b * math.log(d))) for d in [0.3, 0.7, 1.0, 1.6, 2.2, 3.1]]
    fit = compare.fit_gao(points + [(0.0, 0.0)])  # d = 0 says nothing about a or b and is skipped
    assert fit["a"] == pytest.approx(a, abs=1e-9) and fit["b"] == pytest.approx(b, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit["points"] == 6 and fit["max_d"] == 3.1
    assert fit["peak_d"] == pytest.approx(math.exp(a / b - 1))  # where d (a - b log d) is largest ...
    ds = [fit["peak_d"] * (1 + e) for e in (-1e-3, 0.0, 1e-3)]
    gains = [d * (a - b * math.log(d)) for d in ds]
    assert gains[1] > gains[0] and gains[1] > gains[2]
    assert fit["peak_gain"] == pytest.approx(gains[1])  # ... and what it is there (b d*)
    assert compare.fit_gao(points[:3]) is None  # too few points
    for slope in (0.5, 0.7, 3.0):  # gains that only rise: no peak to report (and no overflow finding none)
        rising = compare.fit_gao([(d, slope * d) for d in [0.5, 1.0, 1.5, 2.0]])
        assert rising["b"] == pytest.approx(0.0, abs=1e-9) and rising["peak_d"] is None
    assert compare.fit_gao([(d, 0.0) for d in [0.5, 1.0, 1.5, 2.0]])["r2"] is None  # nothing to explain


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_kl_bon_is_the_kl_of_best_of_n_and_bounds_it(n):
    """Exact KL(best-of-n || pi) on a categorical pi with distinct scores: q_i = F_i^n - F_{i-1}^n."""

    def exact(p):  # p sorted by increasing score
        cdf, kl = 0.0, 0.0
        for pi in p:
            q = (cdf + pi) ** n - cdf**n
            kl += q * math.log(q / pi) if q > 0 else 0.0
            cdf += pi
        return kl

    uniform = [1 / 20000] * 20000  # many equally likely outcomes: the formula is the limit
    assert exact(uniform) == pytest.approx(compare.kl_bon(n), abs=1e-3)
    skewed = [0.5, 0.2, 0.2, 0.1]  # few outcomes: best-of-n moves less than the formula says
    assert exact(skewed) <= compare.kl_bon(n) + 1e-12


def test_thresholds_table_gives_each_seeds_first_crossing_and_the_kl_there():
    evals = [  # two seeds: (episode, gold score, KL)
        [(0, 0.5, 0.0), (16, 1.2, 0.31), (32, 2.5, 0.77), (48, 0.1, 0.9)],  # crosses 1.0 at 16, 2.0 at 32
        [(0, 1.0, 0.0), (16, 0.9, 0.5), (32, 1.1, 0.66), (48, 1.9, 0.7)],  # at 0 already (the start counts), never 2
    ]
    records = [[{"episode": e, "eval/gold_scores": g, "eval/kl": k} for e, g, k in seed] for seed in evals]
    summary = {"gold_thresholds": [1.0, 2.0], "runs": {"x": {"seeds": [{"evals": r} for r in records]}}}
    rows = compare.threshold_table(summary)
    assert "| run | episodes to gold 1 | KL there | episodes to gold 2 | KL there |" in rows
    assert "| x | 16, 0 (mean 8 ± 8) | 0.3, 0.0 | 32, never (mean 32) | 0.8, - |" in rows


def test_variety_table_interpolates_each_seed_at_the_matched_kl():
    def ev(kl, d2, sim):
        return {"eval/kl": kl, "eval/distinct_1": 0.5, "eval/distinct_2": d2, "eval/self_similarity": sim,
                "eval/entropy": 1.0}  # fmt: skip

    runs = {  # final mean KLs: a 3.0, b 1.5, the matched KL; a's seeds cross 1.5 between KL 1 and 2, and 0 and 3
        "a": {"seeds": [{"evals": [ev(0, 0.9, 0.1), ev(1.0, 0.8, 0.2), ev(2.0, 0.6, 0.4), ev(3.0, 0.5, 0.6)]},
                        {"evals": [ev(0, 0.9, 0.1), ev(3.0, 0.6, 0.4), ev(1.0, 0.0, 0.0), ev(3.0, 0.5, 0.6)]}]},
        "b": {"seeds": [{"evals": [ev(0, 0.9, 0.1), ev(1.5, 0.7, 0.3)]},
                        {"evals": [ev(0, 0.9, 0.1), ev(1.0, 0.7, 0.3)]}]},  # never reaches 1.5: its last
    }  # fmt: skip
    assert compare.at_kl(runs["a"]["seeds"][0]["evals"], 1.5, "eval/distinct_2") == pytest.approx(0.7)
    assert compare.at_kl(runs["a"]["seeds"][1]["evals"], 1.5, "eval/distinct_2") == pytest.approx(0.75)  # first
    rows = compare.variety_table({"runs": runs})
    assert "matched KL 1.25" in rows[0]  # b's final mean: (1.5 + 1.0) / 2
    assert rows[4].startswith("| a | 0.50 ± 0.00 | 0.76 ± 0.01 |")  # at 1.25: 0.75 and 0.775
    assert rows[5].startswith("| b | 0.50 ± 0.00 | 0.72 ± 0.02 | 0.28 ± 0.02 | 1.00 ± 0.00 | 1.25 ± 0.25 |")
    assert compare.variety_table({"runs": {"c": {"seeds": [{"evals": [{"eval/kl": 0.0}]}]}}}) == []  # older runs


def test_kl_sweep_expands_every_run_once_per_coefficient():
    args = compare.Args(runs=["rloo_rlhf.py", "ppo_rlhf.py --clip-coef 1000"], kl_coefs=[0.0, 0.05])
    assert compare.expand_runs(args) == [
        "rloo_rlhf.py --kl-coef 0",
        "rloo_rlhf.py --kl-coef 0.05",
        "ppo_rlhf.py --clip-coef 1000 --kl-coef 0",
        "ppo_rlhf.py --clip-coef 1000 --kl-coef 0.05",
    ]
    assert compare.expand_runs(compare.Args()) == ["ppo_rlhf.py", "rloo_rlhf.py", "sac_rlhf.py"]


def test_runner_end_to_end_on_a_tiny_budget(tmp_path):
    out = tmp_path / "report"
    runs = ["rloo_rlhf.py", "sac_rlhf.py --n-step 2", "sac_rlhf.py+experiments/sac_critic_lm.patch --critic lm"]
    thresholds = ["--gold-thresholds", "-0.2", "0.1"]
    result = run_compare(
        "--runs",
        *runs,
        "--seeds",
        "1",
        "2",
        f"--extra={TINY}",
        "--best-of-n",
        "1",
        "2",
        "4",
        *thresholds,
        "--output-dir",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for png in ["scores.png", "kl.png", "entropy.png"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    table = (out / "table.md").read_text()
    assert summary["seeds"] == [1, 2] and set(summary["runs"]) == set(runs)
    assert summary["pooled_fit"] is None  # pooling across runs is for KL sweeps only
    for label, folder in [("rloo_rlhf.py", "rloo"), ("sac_rlhf.py --n-step 2", "sac_n_step_2")]:
        finals = []
        for seed in (1, 2):
            run_dir = out / "runs" / f"{folder}__{seed}"
            args = json.loads((run_dir / "args.json").read_text())
            assert args["seed"] == seed and args["total_episodes"] == 32 and args["eval_size"] == 8
            evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval/scores" in r]
            assert [e["episode"] for e in evals] == [0, 16, 32]
            finals.append(evals[-1])
            runner = json.loads((run_dir / "runner.json").read_text())
            assert runner["wall_s"] > 0 and 50 < runner["peak_rss_mib"] < 4096
        # the table's row is the mean and half-range of what the runs wrote
        proxy = [e["eval/scores"] for e in finals]
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        assert row.split(" | ")[1] == f"{sum(proxy) / 2:.2f} ± {abs(proxy[0] - proxy[1]) / 2:.2f}"
    command = json.loads((out / "runs" / "sac_n_step_2__1" / "runner.json").read_text())["command"]
    assert command.endswith("--n-step 2") and "--total-episodes 32" in command  # --extra, then the run's own flags
    assert command.startswith("python sac_rlhf.py ") and str(REPO) not in command  # no machine's paths in the records
    # A patched run: the script of experiments/, applied to a copy in the report folder, ran with its own flag.
    patched = json.loads(
        (out / "runs" / "sac_experiments_sac_critic_lm.patch_critic_lm__2" / "runner.json").read_text()
    )
    assert (
        patched["command"].endswith("--critic lm")
        and (out / "scripts" / "sac_rlhf.py_experiments_sac_critic_lm.py").exists()
    )
    # The thresholds table (its cells are checked in test_thresholds_table_gives_each_seeds_first_crossing) has a
    # row per run and two columns per threshold.
    thresholds_part = table.split("Episodes until")[1].splitlines()
    assert "| run | episodes to gold -0.2 | KL there | episodes to gold 0.1 | KL there |" in thresholds_part
    assert all(any(line.startswith(f"| {label} |") for line in thresholds_part) for label in runs)
    assert "sqrt(KL) law" in table and set(summary["runs"]["rloo_rlhf.py"]["sqrt_kl_law"]) == {"scores", "gold_scores"}
    bon = summary["best_of_n"]
    assert [r["n"] for r in bon] == [1, 2, 4]
    assert [r["kl"] for r in bon] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])
    # groups of 2n are unions of two groups of n of the same pool, so the picked proxy score cannot fall
    assert bon[0]["scores"] <= bon[1]["scores"] <= bon[2]["scores"]

    # --resume redoes only the unfinished runs (here one whose runner.json is gone) and rewrites the report
    before = (out / "runs" / "rloo__1" / "runner.json").read_text()
    evals = lambda folder: [r for r in read_jsonl(out / "runs" / folder / "metrics.jsonl") if "eval/scores" in r]
    first_evals = evals("rloo__2")
    (out / "runs" / "rloo__2" / "runner.json").unlink()
    (out / "table.md").unlink()
    again = run_compare(
        "--runs",
        *runs,
        "--seeds",
        "1",
        "2",
        f"--extra={TINY}",
        "--best-of-n",
        "--no-plots",
        "--output-dir",
        str(out),
        "--resume",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done:") == 1 and "done: rloo_rlhf.py (seed 2)" in again.stdout
    assert (out / "runs" / "rloo__1" / "runner.json").read_text() == before
    assert evals("rloo__2") == first_evals  # on the CPU with one thread a run is reproduced to the last digit
    assert "| rloo_rlhf.py |" in (out / "table.md").read_text() and "Best-of-n" not in (out / "table.md").read_text()
    # ... but never mixes runs made with other flags into one table
    other = run_compare(
        "--runs",
        *runs,
        "--seeds",
        "1",
        "2",
        f"--extra={TINY} --temperature 0.7",
        "--best-of-n",
        "--no-plots",
        "--output-dir",
        str(out),
        "--resume",
    )
    assert other.returncode != 0 and "--resume" in other.stderr and "other flags" in other.stderr


def test_kl_sweep_end_to_end(tmp_path):
    result = run_compare(
        "--runs",
        "rloo_rlhf.py",
        "--kl-coefs",
        "0",
        "0.5",
        "--seeds",
        "3",
        f"--extra={TINY}",
        "--best-of-n",
        "--no-plots",
        "--output-dir",
        str(tmp_path / "sweep"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for coef, folder in [(0.0, "rloo_kl_coef_0__3"), (0.5, "rloo_kl_coef_0.5__3")]:
        assert json.loads((tmp_path / "sweep" / "runs" / folder / "args.json").read_text())["kl_coef"] == coef
    table = (tmp_path / "sweep" / "table.md").read_text()
    assert "| rloo_rlhf.py --kl-coef 0 |" in table and "| rloo_rlhf.py --kl-coef 0.5 |" in table
    # the sweep's pooled fit is the fit of every run's (sqrt(KL), gold gain) points together
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    points = [
        (math.sqrt(max(e["eval/kl"], 0.0)), e["eval/gold_scores"] - s["evals"][0]["eval/gold_scores"])
        for run in summary["runs"].values()
        for s in run["seeds"]
        for e in s["evals"][1:]
    ]
    assert len(points) == 4 and summary["pooled_fit"] == compare.fit_gao(points)


def test_a_failing_run_stops_the_comparison_with_its_error(tmp_path):
    result = run_compare(
        "--runs",
        "rloo_rlhf.py --rloo-k 1",
        "--seeds",
        "1",
        f"--extra={TINY}",
        "--best-of-n",
        "--no-plots",
        "--output-dir",
        str(tmp_path / "report"),
    )
    assert result.returncode != 0
    assert "--rloo-k must be in [2, inf)" in result.stderr and "exit code" in result.stderr  # the script's own words
    assert not (tmp_path / "report" / "table.md").exists()
    assert not list((tmp_path / "report" / "runs").glob("*/runner.json"))


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--runs", "dpo.py"], "--runs"),
        (["--runs", "rloo_rlhf.py --seed 7"], "--seed"),
        (["--extra=--output-dir x"], "--output-dir"),
        (["--seeds", "1", "1"], "--seeds"),
        (["--kl-coefs", "0", "0.1", "--extra=--kl-coef 0.2"], "--kl-coefs"),
        (["--best-of-n", "2", "3", "6"], "--best-of-n"),  # 2 does not divide 3: groups would not nest
        (["--best-of-n", "1", "2", "--extra=--gamma 0.9"], "--best-of-n"),  # a flag RLOO (and the baseline) lacks
        (["--parallel", "0"], "--parallel"),
        (["--runs", "sac_rlhf.py+README.md"], "--runs"),  # a patch must come from experiments/
        (["--runs", "ppo_rlhf.py+experiments/sac_critic_lm.patch"], "does not apply"),  # checked before any run
    ],
)
def test_bad_flags_fail_before_anything_runs(tmp_path, flags, named):
    if not any(f.startswith("--extra") for f in flags):
        flags = flags + [f"--extra={TINY}"]  # should a check regress, the runs stay tiny
    if "--best-of-n" not in flags:
        flags = flags + ["--best-of-n"]
    result = run_compare(*flags, "--output-dir", str(tmp_path / "report"))
    assert result.returncode != 0 and named in result.stderr
    assert not (tmp_path / "report").exists()


def test_an_existing_report_folder_is_not_touched(tmp_path):
    (tmp_path / "table.md").write_text("mine")
    result = run_compare(f"--extra={TINY}", "--best-of-n", "--output-dir", str(tmp_path))
    assert result.returncode != 0 and "--output-dir" in result.stderr and "--resume" in result.stderr
    assert os.listdir(tmp_path) == ["table.md"] and (tmp_path / "table.md").read_text() == "mine"


def test_every_experiment_patch_still_applies_to_its_script():
    """experiments/ keeps designs that are not in the scripts; a script change that breaks one fails here."""
    patches = sorted((REPO / "experiments").glob("*.patch"))
    assert patches
    for patch in patches:
        script = patch.read_text().splitlines()[0].removeprefix("--- a/")
        compare.apply_patch(script, f"experiments/{patch.name}", None)  # a dry run; SystemExit if it does not apply


def test_sqrt_kl_law_fit_finds_the_slope_and_where_the_line_stops_holding():
    line = [(d, 0.8 * d) for d in [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]]
    fit = compare.fit_sqrt_kl_law(line + [(0.0, 0.0)])  # d = 0 carries no information and is skipped
    assert fit["slope"] == pytest.approx(0.8) and fit["r2"] == pytest.approx(1.0) and fit["points"] == 6
    assert fit["holds_to_d"] == 3.0 and fit["slope_there"] == pytest.approx(0.8) and fit["max_d"] == 3.0
    # over-optimisation: past d = 3 the gain falls; the law holds to 3 (with its slope there), not over all points
    bent = line + [(3.5, 1.0), (4.0, 0.0), (4.5, -1.0)]
    fit = compare.fit_sqrt_kl_law(bent)
    assert fit["holds_to_d"] == 3.0 and fit["slope_there"] == pytest.approx(0.8) and fit["r2"] < 0.5
    assert fit["slope"] == pytest.approx(sum(d * r for d, r in bent) / sum(d * d for d, _ in bent))
    assert compare.fit_sqrt_kl_law(line[:3]) is None  # too few points


def test_replot_redraws_a_report_from_its_summary_alone(tmp_path):
    """--replot rewrites table.md and the PNGs from summary.json (no run folders: the committed results have none);
    with nothing changed in the code, the table is the one the comparison wrote, and summary.json is left alone."""
    committed = REPO / "results" / "head_to_head"
    folder = tmp_path / "head_to_head"
    folder.mkdir()
    (folder / "summary.json").write_bytes((committed / "summary.json").read_bytes())
    result = run_compare("--replot", str(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(folder)) == ["entropy.png", "kl.png", "scores.png", "summary.json", "table.md"]
    for png in ["scores.png", "kl.png", "entropy.png"]:
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "table.md").read_text() == (committed / "table.md").read_text()
    assert (folder / "summary.json").read_bytes() == (committed / "summary.json").read_bytes()
    # only a report folder, and no flag that would make or change runs
    assert "no summary.json" in run_compare("--replot", str(tmp_path)).stderr
    refused = run_compare("--replot", str(folder), "--seeds", "1")
    assert refused.returncode != 0 and "no other flag" in refused.stderr


A, B = 1.3, 0.6  # a Gao curve R(d) = d (A - B log d) with its peak at d* = exp(A / B - 1) = 3.21


def run_on_curve(ds_per_seed):
    """A run whose seeds' gold scores lie on the curve at the given d = sqrt(KL) after a start at 0, with its fit."""
    seeds = []
    for seed, ds in enumerate(ds_per_seed):
        evals = [{"episode": 0, "eval/kl": 0.0, "eval/scores": 0.0, "eval/gold_scores": 0.0, "eval/entropy": 1.5}]
        evals += [
            {"episode": 16 * (j + 1), "eval/kl": d * d, "eval/scores": d, "eval/gold_scores": d * (A - B * math.log(d)),
             "eval/entropy": 1.5 - 0.1 * j}
            for j, d in enumerate(ds)
        ]  # fmt: skip
        seeds.append({"seed": seed + 1, "evals": evals})
    points = [(math.sqrt(e["eval/kl"]), e["eval/gold_scores"]) for s in seeds for e in s["evals"][1:]]
    return {"seeds": seeds, "start": seeds[0]["evals"][0], "gao_fit": compare.fit_gao(points)}


def test_a_fits_peak_is_reported_only_within_the_data():
    """A Gao fit's peak d* is a finding only between the smallest and the largest d its points cover: beyond them it
    is the fit's extrapolation, below them its guess between the start and the first evaluation."""
    within, beyond, below = (
        run_on_curve([ds]) for ds in ([0.5, 1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.34], [4, 5, 6, 7])
    )
    for run in (within, beyond, below):  # the same curve, so the same peak, wherever the data lie
        assert run["gao_fit"]["peak_d"] == pytest.approx(math.exp(A / B - 1))
    assert compare.fit_d_range([within]) == pytest.approx((0.5, 4.0))
    assert compare.peak_in_data(within["gao_fit"], (0.5, 4.0)) == pytest.approx((3.21, 1.93), abs=5e-3)
    assert compare.peak_in_data(beyond["gao_fit"], (0.1, 0.34)) is None
    assert compare.peak_in_data(below["gao_fit"], (4.0, 7.0)) is None
    rising = {
        "seeds": within["seeds"],
        "gao_fit": compare.fit_gao([(d, 0.8 * d + 0.1 * d * d) for d in [0.5, 1, 2, 4]]),
    }
    assert rising["gao_fit"]["b"] < 0  # no maximum at all
    runs = {"within": within, "beyond": beyond, "below": below, "rising": rising, "few": {**within, "gao_fit": None}}
    rows = compare.gao_table({"runs": runs, "pooled_fit": None})
    assert "| within | 1.300 | 0.600 | 3.21 | 1.93 | 0.50 | 4.00 | 1.00 | 5 |" in rows
    assert "| beyond | 1.300 | 0.600 | beyond largest d | - | 0.10 | 0.34 | 1.00 | 4 |" in rows
    assert "| below | 1.300 | 0.600 | below smallest d | - | 4.00 | 7.00 | 1.00 | 4 |" in rows
    assert next(row for row in rows if row.startswith("| rising |")).split(" | ")[3:5] == ["none", "-"]
    assert "| few | - | - | - | - | - | - | - | too few |" in rows
    assert sum("3.21" in row for row in rows) == 1  # the peak outside the data is printed nowhere
    pooled = compare.gao_table({"runs": {"beyond": beyond}, "pooled_fit": beyond["gao_fit"]})
    assert "| all runs pooled | 1.300 | 0.600 | beyond largest d | - | 0.10 | 0.34 | 1.00 | 4 |" in pooled
    assert compare.gao_table({"runs": {"few": {"gao_fit": None}}, "pooled_fit": None}) == []


def test_mean_against_sqrt_kl_is_taken_where_each_seed_first_reaches_d():
    """kl.png's mean line: each seed's score where its path first reaches d, averaged at equal d, over the d that
    every seed reaches, so it cannot fold back the way the mean of x and of y at equal evaluations does."""
    back = ([0.0, 2.0, 1.0, 3.0], [0.0, 2.0, 5.0, 3.0])  # goes back in d after its second evaluation
    assert compare.first_reach(*back, 1.0) == pytest.approx(1.0)  # on the way out, not 5.0 on the way back
    assert compare.first_reach(*back, 2.5) == pytest.approx(3.5)  # between (1, 5) and (3, 3)
    assert compare.first_reach(*back, 3.5) is None and compare.first_reach([1.0, 2.0], [0.0, 1.0], 0.5) is None
    straight = ([0.0, 1.0, 2.0], [0.0, 1.0, 2.0])
    grid, means = compare.mean_first_reach([back, straight], points=5)
    assert grid == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])  # up to the smaller of the seeds' largest d
    assert means == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert grid == sorted(grid)  # in d, never backwards
    assert compare.mean_first_reach([back, ([0.0, 0.0], [0.0, 1.0])]) == ([], [])  # a seed that never moves


def legend_texts(monkeypatch, summary, tmp_path):
    """Every legend entry of each figure plot() saves, by file name."""
    import matplotlib.figure

    texts, save = {}, matplotlib.figure.Figure.savefig

    def record(fig, path, **kwargs):
        texts[os.path.basename(path)] = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        save(fig, path, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    compare.plot(summary, str(tmp_path))
    return texts


def synthetic_summary(ds_per_seed, pooled=True):
    """Two runs on the Gao curve (run_on_curve), best-of-n, and a pooled fit over both runs' points."""
    runs = {"x.py": run_on_curve(ds_per_seed), "y.py": run_on_curve([[d * 1.1 for d in ds] for ds in ds_per_seed])}
    evals = [e for r in runs.values() for s in r["seeds"] for e in s["evals"][1:]]
    points = [(math.sqrt(e["eval/kl"]), e["eval/gold_scores"]) for e in evals]
    bon = [{"n": n, "kl": compare.kl_bon(n), "scores": 1.0, "gold_scores": 1.0} for n in (1, 2, 4)]
    pooled_fit = compare.fit_gao(points) if pooled else None
    return {"seeds": list(range(1, len(ds_per_seed) + 1)), "runs": runs, "pooled_fit": pooled_fit, "best_of_n": bon}


def test_every_figure_says_what_its_lines_bands_and_dots_are(monkeypatch, tmp_path):
    seeds = [[0.5, 1.0, 1.5], [0.6, 1.2, 0.9, 1.8], [0.4, 1.6]]  # d to 1.98 at most: the curve's peak, 3.21, is beyond
    texts = legend_texts(monkeypatch, synthetic_summary(seeds), tmp_path)
    assert set(texts) == {"scores.png", "kl.png", "entropy.png"}
    for png in ["scores.png", "entropy.png"]:
        assert {"x.py", "y.py"} <= set(texts[png])
        assert "line: mean over the 3 seeds, a dot per evaluation" in texts[png]
        assert "band: from the lowest to the highest seed" in texts[png]
    kl = "\n".join(texts["kl.png"])
    assert "thin line: one seed, a dot per evaluation" in kl and "thick line: mean over seeds" in kl
    assert "first reaches d" in kl and "best-of-n" in kl and "fit d (a - b log d)" in kl
    assert "fit over all runs' points (R^2 1.00, no peak within the d seen, 0.40 to 1.98)" in kl and "3.21" not in kl
    seeds = [[0.5, 2.0, 4.0], [1.0, 3.0, 5.0], [0.8, 4.5]]
    kl = "\n".join(legend_texts(monkeypatch, synthetic_summary(seeds), tmp_path)["kl.png"])
    assert "peak at d = 3.21" in kl
    # one seed: no band and no mean to explain, only the seed's own line
    texts = legend_texts(monkeypatch, synthetic_summary([[0.5, 1.0, 1.5, 2.0]], pooled=False), tmp_path)
    assert "line: the one seed, a dot per evaluation" in texts["scores.png"]
    assert not any("band" in t or "mean" in t for t in texts["scores.png"] + texts["kl.png"])


@pytest.mark.parametrize(
    "folder", sorted(p.name for p in (REPO / "results").iterdir() if (p / "summary.json").exists())
)
def test_every_committed_table_is_what_replot_writes_from_its_summary(tmp_path, folder):
    """A committed results/ table.md is the report of its summary.json with this compare.py: a change to the table
    code must come with `--replot` of every results folder (the runs themselves are not committed)."""
    (tmp_path / "summary.json").write_bytes((REPO / "results" / folder / "summary.json").read_bytes())
    compare.replot(str(tmp_path), plots=False)
    assert (tmp_path / "table.md").read_text() == (REPO / "results" / folder / "table.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["summary.json", "table.md"]


def test_the_second_race_patch_traced_targets_follow_the_retrace_recursion(tmp_path):
    """experiments/sac_second_race.patch's --trace targets (results/sac_race2), against the recursion written out one
    response and one step at a time: G_t = r_t + g [V(s_{t+1}) - c_{t+1} (Qbar(s_{t+1}, a_{t+1}) - G_{t+1})] cut at n
    steps (G = r + g V at the last), c = pi(a|s) (tree-backup) or min(1, pi(a|s) / mu(a|s)) (Retrace), 0 past the end;
    at n = 1 the script's own one-step target."""
    compare.apply_patch("sac_rlhf.py", "experiments/sac_second_race.patch", str(tmp_path / "patched.py"))
    spec = importlib.util.spec_from_file_location("patched", tmp_path / "patched.py")
    patched = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(patched)
    torch = patched.torch
    g = torch.Generator().manual_seed(0)
    rows, width, vocab, alpha, beta, gamma = 3, 6, 5, 0.1, 0.05, 0.9
    logp, ref = (torch.log_softmax(torch.randn(rows, width, vocab, generator=g), -1) for _ in range(2))
    q, scores = torch.randn(rows, width, 2, vocab, generator=g), torch.randn(rows, generator=g)
    responses = torch.randint(0, vocab, (rows, width), generator=g)
    mask = torch.ones(rows, width)
    mask[1, 4:], mask[2, 2:] = 0, 0  # responses of 6, 4 and 2 tokens
    mu = torch.log_softmax(torch.randn(rows, width, vocab, generator=g), -1).gather(-1, responses[..., None])[..., 0]
    q_min = q.min(2).values
    values = (logp.exp() * (q_min - (alpha + beta) * logp + beta * ref)).sum(-1)  # V(s_t), the state before token t

    def recursion(trace, n):
        out = torch.zeros(rows, width)
        for b in range(rows):
            end = int(mask[b].sum())
            reward = [0.0] * (end - 1) + [scores[b].item()]
            value = lambda t: values[b, t].item() if t < end else 0.0  # noqa: E731
            pi = lambda t: logp[b, t, responses[b, t]].exp().item()  # noqa: E731
            c = lambda t: 0.0 if t >= end else pi(t) if trace == "tree" else min(1.0, pi(t) / mu[b, t].exp().item())  # noqa: E731

            def ret(t, k):
                if k == 1 or t + 1 >= end:
                    return reward[t] + gamma * value(t + 1)
                q_next = q_min[b, t + 1, responses[b, t + 1]].item()
                return reward[t] + gamma * (value(t + 1) - c(t + 1) * (q_next - ret(t + 1, k - 1)))

            for t in range(end):
                out[b, t] = ret(t, n)
        return out

    for trace in ["tree", "retrace"]:
        for n in [1, 2, 3, 8]:
            got = patched.traced_targets(q, logp, ref, scores, mask, alpha, beta, gamma, n, responses, mu * mask, trace)
            torch.testing.assert_close(got, recursion(trace, n), rtol=1e-5, atol=1e-5)
    one_step = patched.critic_targets(q, logp, ref, scores, mask, alpha, beta, gamma, 1)
    torch.testing.assert_close(
        patched.traced_targets(q, logp, ref, scores, mask, alpha, beta, gamma, 1, responses, mu, "retrace"), one_step
    )
