"""Test helpers: the repo root, a subprocess runner, and builders for tiny offline "worlds".

A *world* is everything an RLHF script needs for one run: a policy folder, a reward model folder,
an optional gold reward model folder, and train / eval prompt files. The builders below make tiny
random-weight worlds for several real Hugging Face architectures, entirely offline (no download):
a word-level tokenizer made with the `tokenizers` library, then models built from a config.

Tests import from here (``from tests.helpers import REPO, World, run_script``); the pytest fixtures
that build the worlds once per session live in ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OFFLINE_ENV = dict(  # the tests run on the CPU, offline, with no tracking: in run_script's children and in-process
    CUDA_VISIBLE_DEVICES="",
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    WANDB_MODE="disabled",
)
"""The repository root (the folder holding the three scripts)."""

ARCHS = ["llama", "gpt2", "gpt_neox", "qwen2"]
"""Architectures with a fixture world; `gpt2` is the one whose tokenizer has no pad token."""

TOKENIZER_OF = {"llama": "word", "gpt2": "word_no_pad", "gpt_neox": "word", "qwen2": "bpe"}
"""Which tokenizer each arch world uses (see make_tokenizer and make_bpe_tokenizer)."""

SEED = 1234

TINY = [  # a two-update run: batch 16 divides every script's batch constraint (PPO minibatches, RLOO's k = 4)
    "--total-episodes",
    "32",
    "--batch-size",
    "16",
    "--eval-every",
    "16",
    "--eval-size",
    "8",
    "--response-length",
    "6",
]
"""Flags of a tiny run, for the tests of every script."""

NO_AUTOCAST = contextlib.nullcontext()
"""The `autocast` argument of the scripts' helpers when a test runs them in fp32."""


@dataclass(frozen=True)
class World:
    """Paths (strings, ready for the command line) to one complete set of script inputs."""

    arch: str  # "llama", "gpt2", "gpt_neox", "qwen2", or "tinyworld"
    policy: str  # folder for --model-name (AutoModelForCausalLM + tokenizer)
    reward: str  # folder for --reward-model-name (AutoModelForSequenceClassification, 1 label)
    dataset: str  # .jsonl for --dataset, one {"prompt": ...} per line
    eval_dataset: str  # .jsonl for --eval-dataset
    gold: str | None = None  # folder for --gold-reward-model-name; None = pass "None"
    has_pad_token: bool = True  # False: tokenizer.pad_token is None (GPT-2 style, EOS doubles as pad)

    def args(self) -> list[str]:
        """The common model and data flags of a script run in this world."""
        return [
            "--model-name",
            self.policy,
            "--reward-model-name",
            self.reward,
            "--gold-reward-model-name",
            self.gold if self.gold is not None else "None",
            "--dataset",
            self.dataset,
            "--eval-dataset",
            self.eval_dataset,
        ]


def run_script(script: str, *args: str, cwd: str | os.PathLike | None = None, timeout: float = 600):
    """Run ``python REPO/script *args`` on the CPU, offline; return the CompletedProcess (no assert).

    stdout and stderr are captured as text. ``cwd`` defaults to the current directory, so pass a
    tmp_path to keep a default ``runs/`` folder out of the repository.
    """
    # One thread: tiny models run fastest on it, and it never oversubscribes a busy machine.
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(script: str, *args: str, cwd: str | os.PathLike | None = None):
    """Run REPO/script's ``__main__`` in this process (runpy), as ``python script *args`` would; no assert.

    Returns (exit code, stdout, stderr). An exception that escapes the script comes back as its traceback in
    stderr with exit code 1, as the interpreter would print it. Much faster than run_script for runs that stop
    early or are small, and a test can patch torch (e.g. record what an optimizer is given) around the call.
    """
    import contextlib
    import io
    import runpy
    import signal
    import traceback

    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    argv, cwd_before, handler = sys.argv, os.getcwd(), signal.getsignal(signal.SIGINT)
    try:
        sys.argv = [str(REPO / script), *map(str, args)]
        os.chdir(cwd or cwd_before)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                runpy.run_path(str(REPO / script), run_name="__main__")
            except SystemExit as e:  # what the interpreter does with it
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except Exception:
                code = 1
                traceback.print_exc()
    finally:
        sys.argv = argv
        os.chdir(cwd_before)
        signal.signal(signal.SIGINT, handler)
    return code, stdout.getvalue(), stderr.getvalue()


def tinyworld() -> World:
    """The committed offline world in REPO/tinyworld (paths only; nothing is checked here)."""
    t = REPO / "tinyworld"
    return World(
        arch="tinyworld",
        policy=str(t / "sft"),
        reward=str(t / "reward_model"),
        gold=str(t / "gold_reward_model"),
        dataset=str(t / "prompts_train.jsonl"),
        eval_dataset=str(t / "prompts_eval.jsonl"),
    )


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------
# 48 words
WORDS = [
    "the",
    "a",
    "one",
    "two",
    "three",
    "red",
    "blue",
    "green",
    "small",
    "big",
    "happy",
    "sad",
    "cat",
    "dog",
    "bird",
    "fish",
    "tree",
    "house",
    "sun",
    "moon",
    "runs",
    "jumps",
    "sees",
    "likes",
    "eats",
    "sings",
    "sleeps",
    "walks",
    "is",
    "was",
    "and",
    "but",
    "with",
    "on",
    "under",
    "over",
    "near",
    "very",
    "quickly",
    "slowly",
    "today",
    "now",
    "here",
    "there",
    "good",
    "bad",
    "story",
    "tell",
    "me",
    "about",
]
# 24 words, none shared with WORDS: a different vocabulary of a different size
OTHER_WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
EOT = "<|endoftext|>"


def make_tokenizer(words: list[str] = WORDS, with_pad: bool = True):
    """A word-level PreTrainedTokenizerFast with left padding and no automatically added tokens.

    with_pad=True: distinct <pad> (id 0), <bos>, <eos>, <unk>, then the words.
    with_pad=False: GPT-2 style; one <|endoftext|> token is bos, eos and unk; pad_token is None.
    The same words in both variants, but not the same ids; what matters to the scripts is that a
    policy and its reward model share one tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Like GPT-2, the single end-of-text token of the no-pad variant has the last id.
    tokens = [PAD, BOS, EOS, UNK, *words] if with_pad else [*words, EOT]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    unk = UNK if with_pad else EOT
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    if with_pad:
        special = dict(pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK)
    else:
        special = dict(bos_token=EOT, eos_token=EOT, unk_token=EOT)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", model_max_length=256, **special)
    assert (tok.pad_token is None) == (not with_pad)
    return tok


# Qwen2's pre-tokenizer split (as in transformers' Qwen2Tokenizer).
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def make_bpe_tokenizer(words: list[str] = WORDS, vocab_size: int = 150):
    """A tiny byte-level BPE tokenizer in the Qwen2 style, with distinct <pad>/<bos>/<eos>/<unk>.

    Needed for the qwen2 world: for `model_type == "qwen2"`, transformers 5 AutoTokenizer always
    rebuilds a `Qwen2Tokenizer` (byte-level BPE, fixed pre-tokenizer) from tokenizer.json's vocab
    and merges, which would turn a word-level vocabulary into nonsense. The BPE is trained on the
    fixture words (deterministically); with vocab_size=150 some words take several tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK], show_progress=False)
    rng = random.Random(SEED)
    corpus = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)]
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        padding_side="left",
        model_max_length=256,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
    )


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def _config(arch: str, tok, vocab_size: int):
    """A tiny config of the real architecture, all dropouts 0, special ids from the tokenizer."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    ids = dict(
        pad_token_id=tok.pad_token_id,  # None for the GPT-2 style tokenizer, as in real GPT-2
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        vocab_size=vocab_size,
    )
    if arch == "llama":
        return LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            **ids,
        )
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            attention_dropout=0.0,
            use_sliding_window=False,
            tie_word_embeddings=True,
            **ids,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_inner=64,
            n_positions=256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            **ids,
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            classifier_dropout=0.0,
            use_parallel_residual=True,
            tie_word_embeddings=False,
            **ids,
        )
    raise ValueError(f"unknown arch {arch!r}")


# Real Pythia (GPT-NeoX) and Qwen2 checkpoints have an embedding matrix larger than the tokenizer
# (50304 vs 50277 for Pythia, 151936 vs 151665 for Qwen2.5); these fixtures mimic that (rounding up
# to the next multiple of 16), so scripts must not assume logits.shape[-1] == len(tokenizer). The
# random policies give those unused ids some probability; they decode to nothing.
PADDED_VOCAB = {"gpt_neox", "qwen2"}


def _vocab_size(arch: str, tok) -> int:
    n = len(tok)
    return (n // 16 + 1) * 16 if arch in PADDED_VOCAB else n


def build_policy(arch: str, tok, path: Path, seed: int = SEED) -> None:
    """Save a random tiny causal LM of `arch` with its tokenizer in `path`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, tok, _vocab_size(arch, tok)))
    model.save_pretrained(path)
    tok.save_pretrained(path)


def build_reward_model(arch: str, tok, path: Path, seed: int = SEED + 1, score_std: float = 1.0):
    """Save a random tiny 1-label AutoModelForSequenceClassification of `arch` with its tokenizer.

    The score head is re-initialised with std `score_std / sqrt(hidden)`, so that the scores spread
    with a standard deviation of order `score_std` (the default 0.02 init gives nearly constant
    scores), giving a short RL run a signal.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    config = _config(arch, tok, _vocab_size(arch, tok))
    config.num_labels = 1
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        model.score.weight.normal_(0.0, score_std / config.hidden_size**0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def write_prompts(path: Path, n: int, seed: int, words: list[str] = WORDS) -> None:
    """n lines of {"prompt": "..."} with 2-5 words of the fixture vocabulary."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 5)))
            f.write(json.dumps({"prompt": prompt}) + "\n")


def build_worlds(root: Path, archs: list[str] = ARCHS) -> dict[str, World]:
    """Build every arch's world under root; all of them share the prompt files."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dataset, eval_dataset = root / "prompts_train.jsonl", root / "prompts_eval.jsonl"
    write_prompts(dataset, 32, SEED)
    write_prompts(eval_dataset, 16, SEED + 1)
    tokenizers = {
        "word": make_tokenizer(with_pad=True),
        "word_no_pad": make_tokenizer(with_pad=False),
        "bpe": make_bpe_tokenizer(),
    }
    worlds = {}
    for arch in archs:
        with_pad = arch != "gpt2"
        tok = tokenizers[TOKENIZER_OF[arch]]
        policy, reward = root / arch / "policy", root / arch / "reward_model"
        build_policy(arch, tok, policy)
        build_reward_model(arch, tok, reward)
        worlds[arch] = World(
            arch, str(policy), str(reward), str(dataset), str(eval_dataset), gold=None, has_pad_token=with_pad
        )
    return worlds


def build_mismatched_reward(root: Path, arch: str = "llama") -> str:
    """A reward model whose tokenizer has a different vocabulary (words and size) from the policies'."""
    path = Path(root) / "mismatched_reward_model"
    build_reward_model(arch, make_tokenizer(OTHER_WORDS, with_pad=True), path, seed=SEED + 7)
    return str(path)


def read_jsonl(path) -> list[dict]:
    """The JSON objects of a .jsonl file, one per line."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def record_optimizer_steps(monkeypatch) -> list[dict]:
    """Patch torch.optim.Adam.step and AdamW.step to record every step a script takes, in order.

    Each entry: {"optimizer": the optimizer, "lr": its first group's learning rate, "grads": the gradients of its
    parameters as the step sees them (after any unscaling and clipping)}. The step itself still runs.
    """
    import torch

    steps = []

    def recording(step):
        def recording_step(self, *args, **kwargs):
            grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None]
            steps.append({"optimizer": self, "lr": self.param_groups[0]["lr"], "grads": grads})
            return step(self, *args, **kwargs)

        return recording_step

    # Each class's own step: torch wraps a class's step in profiling hooks once its first optimizer is made.
    originals = {cls: cls.step for cls in [torch.optim.Adam, torch.optim.AdamW]}  # before either is patched
    for cls, step in originals.items():
        monkeypatch.setattr(cls, "step", recording(step))
    return steps


SCRIPT_FILES = ("_rlhf.py", "_rlhf_multigpu.py")  # the scripts' own frames end in one of these


@contextlib.contextmanager
def profiling(profile):
    """sys.setprofile(profile) for the `with` block, after any profiler already installed (another recorder keeps
    recording, whichever was entered first)."""
    previous = sys.getprofile()

    def chained(frame, event, arg):
        if previous is not None:
            previous(frame, event, arg)
        profile(frame, event, arg)

    sys.setprofile(chained)
    try:
        yield
    finally:
        sys.setprofile(previous)


@contextlib.contextmanager
def record_calls(*names: str):
    """Record every call, made inside the `with` block, of the scripts' functions with these names (functions and
    methods defined in a REPO/*_rlhf.py or *_rlhf_multigpu.py file, e.g. in a main loop run with run_main): yields
    {name: [calls]}, each call a dict {parameter: value} of its arguments, and "return": what it returned (the values
    themselves, not copies). Uses sys.setprofile, so the main loop's own calls are seen as they are made, with no change
    to the scripts."""
    calls = {name: [] for name in names}
    open_calls = {}  # id(frame) -> its record, until it returns

    def profile(frame, event, arg):
        code = frame.f_code
        if code.co_name not in calls or not code.co_filename.endswith(SCRIPT_FILES):
            return
        if event == "call":
            open_calls[id(frame)] = dict(frame.f_locals)  # at the call: the arguments only
            calls[code.co_name].append(open_calls[id(frame)])
        elif event == "return" and id(frame) in open_calls:
            open_calls.pop(id(frame))["return"] = arg

    with profiling(profile):
        yield calls


@contextlib.contextmanager
def caller_snapshots(name: str, take):
    """At every call, made inside the `with` block, of the scripts' function `name`, append take(caller) to the yielded
    list, where caller is the calling script frame's locals (e.g. the main loop's models, as they are at that time)."""
    snapshots = []

    def profile(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_name == name and code.co_filename.endswith(SCRIPT_FILES):
            caller = frame.f_back  # the script's frame that called it (past a decorator's, e.g. torch.no_grad's)
            while not caller.f_code.co_filename.endswith(SCRIPT_FILES):
                caller = caller.f_back
            snapshots.append(take(caller.f_locals))

    with profiling(profile):
        yield snapshots
