"""Where a script's training time goes: each model's forward passes, sampling, backward passes, optimizer steps.

Runs one plain script in this process, its functions and models wrapped by timers (nothing in the script changes), and
splits the wall time of the training loop (setup and evaluations excluded) into exclusive parts:

- `sampling: <model> forward`: the forward passes of `generate` (one per new token, with the KV cache);
- `sampling: the rest`: the rest of `generate` (softmax, the finiteness check, multinomial, the masks), in Python;
- `no grad: <model> forward`, `with grad: <model> forward`: every other forward pass of each model, in the rollout
  (log-probs, reference, reward, value) or in the update (the losses' passes and, for SAC, the targets');
- `backward`, `optimizer step` (the gradient clip included);
- `the loop's own code`: everything else in the loop (advantages, losses, statistics, logging, Python overhead).

It also counts the calls per update: forward passes per model, `Tensor.item()` (each one a host synchronisation on a
GPU) and `bool(tensor)` inside `generate` (another: the script's finiteness and EOS checks, two per token, and
transformers' own). On the CPU a synchronisation
costs nothing beyond the work it waits for; on a GPU each one stalls the launch queue.

With --ops N it also runs each script once more under torch.profiler (no timers of its own) and prints the N operators
with the most time, each with its share of the run (setup and evaluations included), and the matrix products' rate
against this machine's fp32 matmul peak (bench.py's 2048 x 2048 measure, with the same threads): when `aten::mm` is most
of the time at near the peak, the run is compute-bound and only fewer FLOPs make it faster.

Usage: python benchmarks/profile_update.py                                  (each plain script on the tinyworld)
       python benchmarks/profile_update.py --scripts ppo_rlhf.py --hidden-size 512 --layers 8   (random 21M models)
       python benchmarks/profile_update.py --scripts ppo_rlhf.py --ops 8 --extra="--num-minibatches 1"   (operators)
Threads: OMP_NUM_THREADS (default 1, as the scripts); give the measured run the machine to itself.
"""

import contextlib
import functools
import importlib
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import tyro
from torch.utils.flop_counter import FlopCounterMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the scripts import as modules
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # bench.py's random models
from bench import build_random_models, matmul_peak_gflops  # noqa: E402


@dataclass
class Args:
    scripts: list[str] = field(default_factory=lambda: ["ppo_rlhf.py", "rloo_rlhf.py", "grpo_rlhf.py", "sac_rlhf.py"])
    """plain scripts to profile"""
    total_episodes: int = 256
    """episodes of the profiled run (the table gives the mean per update)"""
    batch_size: int = 64
    """responses per rollout (the scripts' default)"""
    extra: str = ""
    """extra flags passed to every script, written --extra="--flag value" """
    hidden_size: int | None = None
    """None: the tinyworld models; else a random Llama policy and reward model of this width (and --layers)"""
    layers: int = 8
    """layers of the random models (--hidden-size 512 --layers 8: 21M matmul parameters each)"""
    ops: int = 0
    """0: no operator table; N: the N operators with the most time, from a second run under torch.profiler"""


def script_argv(script, args, models, folder):
    """The profiled run's command line: the given batch and episodes, 8 evaluation prompts, no evaluation in the loop,
    nothing saved, a run folder in `folder`, then the models and --extra."""
    argv = [script, "--output-dir", os.path.join(folder, "run"), "--no-save-model", "--eval-size", "8"]
    argv += ["--total-episodes", str(args.total_episodes), "--batch-size", str(args.batch_size)]
    return argv + ["--eval-every", str(10**9), *models, *args.extra.split()]


class Profile:
    """Exclusive wall time per label: a label's time excludes the labels entered inside it."""

    def __init__(self):
        self.time, self.stack, self.mark = defaultdict(float), [], time.perf_counter()

    def enter(self, label):
        now = time.perf_counter()
        if self.stack:
            self.time[self.stack[-1]] += now - self.mark
        if self.stack and self.stack[-1] in ("setup", "evaluation"):
            label = self.stack[-1]  # everything inside setup or an evaluation stays there
        self.stack.append(label)
        self.mark = now

    def leave(self):
        now = time.perf_counter()
        self.time[self.stack.pop()] += now - self.mark
        self.mark = now

    @contextlib.contextmanager
    def timed(self, label):
        self.enter(label)
        try:
            yield
        finally:
            self.leave()

    def wrap(self, fn, label):
        """fn, timed under `label` (a string, or a function of fn's arguments returning one)."""

        @functools.wraps(fn)
        def timed_fn(*args, **kwargs):
            with self.timed(label(*args, **kwargs) if callable(label) else label):
                return fn(*args, **kwargs)

        return timed_fn


def profile_script(script, args, models):
    """{label: seconds}, {counter: count} and the number of updates of one profiled run."""
    module = importlib.import_module(script.removesuffix(".py"))
    profile, names = Profile(), {}  # names: id(model or backbone) -> its name
    counts = Counter()

    def phase(name):
        if "generate" in profile.stack:
            return f"sampling: {name} forward"
        return f"{'with grad' if torch.is_grad_enabled() else 'no grad'}: {name} forward"

    def name_models(name, model):
        if isinstance(model, torch.nn.Module):
            names[id(model)] = name
            backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
            if isinstance(backbone, torch.nn.Module) and name not in ("policy", "reference"):
                names[id(backbone)] = name  # RMs and value models are read through their backbone

    original_call = torch.nn.Module.__call__

    def call(self, *a, **k):
        name = names.get(id(self))
        if name is None and type(self).__name__ == "SoftQNetwork":
            name = "critic or its target"
        if name is None or (profile.stack and profile.stack[-1].endswith(" forward")):
            return original_call(self, *a, **k)  # a submodule, or a backbone inside its own model's call
        if "evaluation" not in profile.stack and "setup" not in profile.stack:
            counts[f"{name} forward passes"] += 1
        with profile.timed(phase(name)):
            return original_call(self, *a, **k)

    original_load_models, original_critic_base = module.load_models, getattr(module, "load_critic_base", None)

    def load_models(run_args):
        loaded = original_load_models(run_args)
        for name, model in zip(["policy", "reference", "reward model", "gold model"], loaded[3:], strict=True):
            name_models(name, model)
        return loaded

    def load_critic_base(*a, **k):
        model = original_critic_base(*a, **k)
        if script.startswith("ppo"):  # (SAC's critic is named by its class: it wraps this model)
            name_models("value model", model)
        return model

    original_item, original_bool = torch.Tensor.item, torch.Tensor.__bool__

    def item(self):
        counts["Tensor.item() calls"] += "evaluation" not in profile.stack and "setup" not in profile.stack
        return original_item(self)

    def to_bool(self):
        counts["bool(tensor) in generate"] += "generate" in profile.stack and "evaluation" not in profile.stack
        return original_bool(self)

    patches = {
        "load_models": profile.wrap(load_models, "setup"),
        "load_prompts": profile.wrap(module.load_prompts, "setup"),
        "tokenize_prompts": profile.wrap(module.tokenize_prompts, "setup"),
        "generate": profile.wrap(module.generate, "generate"),
        "evaluate": profile.wrap(module.evaluate, "evaluation"),
        "optimizer_step": profile.wrap(module.optimizer_step, "optimizer step"),
    }
    if original_critic_base is not None:
        patches["load_critic_base"] = profile.wrap(load_critic_base, "setup")
    saved = {name: getattr(module, name) for name in patches}
    original_backward = torch.Tensor.backward
    with tempfile.TemporaryDirectory() as folder:
        sys.argv = script_argv(script, args, models, folder)
        try:
            for name, fn in patches.items():
                setattr(module, name, fn)
            torch.nn.Module.__call__ = call
            torch.Tensor.backward = profile.wrap(original_backward, "backward")
            torch.Tensor.item, torch.Tensor.__bool__ = item, to_bool
            quiet = open(os.devnull, "w")  # noqa: SIM115 (the script's progress bar and lines: only the table prints)
            with (
                quiet,
                contextlib.redirect_stdout(quiet),
                contextlib.redirect_stderr(quiet),
                profile.timed("the loop's own code"),
            ):
                module.main()
        finally:
            torch.nn.Module.__call__, torch.Tensor.backward = original_call, original_backward
            torch.Tensor.item, torch.Tensor.__bool__ = original_item, original_bool
            for name, fn in saved.items():
                setattr(module, name, fn)
    times = dict(profile.time)
    times["sampling: the rest"] = times.pop("generate", 0.0)
    return times, counts, args.total_episodes // args.batch_size


def profile_ops(script, args, models):
    """The script run once under torch.profiler (its operators' self time), then once more counting the matrix
    products' FLOPs (torch.utils.flop_counter: a count, so that run's time does not matter; with_flops=True in the
    profiler would slow every small operator it times)."""
    module = importlib.import_module(os.path.splitext(script)[0])
    results = []
    for counter in [
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]),
        FlopCounterMode(display=False),
    ]:
        with tempfile.TemporaryDirectory() as folder:
            sys.argv = script_argv(script, args, models, folder)
            quiet = open(os.devnull, "w")  # noqa: SIM115
            with quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), counter:
                module.main()
        results.append(counter)
    profiler, flops = results
    matmul = sum(
        n
        for op, n in flops.get_flop_counts()["Global"].items()
        if str(op).startswith(("aten.mm", "aten.addmm", "aten.bmm"))
    )
    return profiler.key_averages(), matmul


def print_ops(events, matmul_flops, n, peak):
    total = sum(e.self_cpu_time_total for e in events)  # microseconds
    print(f"\n| operator (the whole run, {total / 1e6:.1f} s) | self time % | calls |")
    print("| --- | --- | --- |")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:n]:
        print(f"| `{e.key}` | {100 * e.self_cpu_time_total / total:.1f} | {e.count} |")
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / 1e6
    print(
        f"\nMatrix products (aten::mm, addmm, bmm): {matmul_flops / 1e9:.0f} GFLOP in {mm:.2f} s, "
        f"{matmul_flops / mm / 1e9:.0f} GFLOP/s; this machine's fp32 matmul peak, measured now: {peak:.0f} GFLOP/s"
    )


def main(args):
    with tempfile.TemporaryDirectory() as folder:
        models = build_random_models(args, folder) if args.hidden_size else []
        threads = torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS") else 1
        world = f"random Llama models, hidden {args.hidden_size}, {args.layers} layers" if models else "the tinyworld"
        print(f"{world}; batch {args.batch_size}, {args.total_episodes} episodes; {threads} thread(s); {args.extra}")
        for script in args.scripts:
            times, counts, updates = profile_script(script, args, models)
            loop = {k: v for k, v in times.items() if k not in ("setup", "evaluation")}
            total = sum(loop.values())
            print(
                f"\n### {script}: {total / updates * 1e3:.0f} ms per update, {args.batch_size * updates / total:.1f} "
                f"episodes/s (setup {times.get('setup', 0):.1f} s and evaluations {times.get('evaluation', 0):.1f} s "
                "excluded)\n"
            )
            print("| part of the training loop | ms per update | share % |")
            print("| --- | --- | --- |")
            for label, seconds in sorted(loop.items(), key=lambda kv: -kv[1]):
                print(f"| {label} | {seconds / updates * 1e3:.1f} | {100 * seconds / total:.1f} |")
            print("\n| calls per update | count |")
            print("| --- | --- |")
            for label, count in sorted(counts.items()):
                print(f"| {label} | {count / updates:.1f} |")
            if args.ops:
                print_ops(*profile_ops(script, args, models), args.ops, matmul_peak_gflops())


if __name__ == "__main__":
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)
    main(tyro.cli(Args))
