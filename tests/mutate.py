"""Mutation testing for the RLHF scripts: does the test suite notice when the algorithm is subtly wrong?

The tool makes one small change at a time (a *mutant*) to a script, runs that script's tests on it, and
reports the mutants that no test notices (*survivors*): each one is a line whose behaviour the tests do not
pin down. Standard library only; pytest runs as a subprocess in private copies of the repository.

Usage (from the repository root):
    python tests/mutate.py --list                                   # what would be mutated; no tests run
    python tests/mutate.py --scripts rloo_rlhf.py --limit 6 -- tests/test_rloo.py -k "leave_one_out"
    python tests/mutate.py --jobs 2 --report runs/mutate/report.md  # the full campaign (hours on a small CPU)

Options:
    --scripts S [S ...]     scripts to mutate (default: the four plain files, those that exist)
    --functions F [F ...]   top-level functions/classes mutated in every script, besides the "ALGO LOGIC"
                            section and the training loop (default: CORE_HELPERS below)
    --max-per-line K        at most K mutants per line, spread over the operators (default 2)
    --limit N               at most N mutants in all, spread evenly over the scripts and over each script
    --only-lines REGEX      only lines whose text matches REGEX (re.search)
    --scale-only            in a `_multigpu` twin, only its scale lines: those its plain file does not hold (what
                            `diff X_rlhf.py X_rlhf_multigpu.py` marks as added or changed)
    --operators OP [OP ...] only these operators (names as in --list), e.g. `--operators rate drop-scale swap swap-args`
    --seed S                seed of the per-line choice of mutants (default 0)
    --jobs J                mutants tested in parallel, each worker in its own copy (default 1)
    --timeout-factor F      a mutant times out after F x the baseline time + 30 s (default 2.0)
    --report FILE           write the Markdown report to FILE (default: stdout) and the JSON beside it
    --list                  list the mutants with counts per script and per operator, and stop
    -- ARGS                 pytest arguments that replace the default test selection

What is mutated, per script (found with `ast`, so it follows the code when it moves):
  * the bodies of the top-level functions and classes between the marker line "# ==== ALGO LOGIC: ..." and the
    next marker line ("# ==== RLHF CORE", "# ==== TRY NOT TO MODIFY") or 'if __name__';
  * the bodies of the shared helpers named by --functions, where the script has them;
  * the training loop: `def main()` (or the `if __name__ == "__main__":` block) from its first `for update in` loop
    to its end.
Blank and comment lines, docstrings, string literals, and statements that only log or stop (logger.*, print,
fail, raise SystemExit) are left alone.

Operators, one token changed per mutant (with `tokenize`, so the rest of the file keeps its text): binary + <-> -
(and += <-> -=; add-sub), binary * <-> / (and *= <-> /=; mul-div), < <-> <= (lt-le), > <-> >= (gt-ge),
== <-> != (eq-ne), and <-> or (and-or), True <-> False (true-false), min <-> max (min-max), unary minus dropped
(unary-minus), int n -> n + 1 and 1 -> 0 (int+1), float x -> 2x and 0.0 -> 1.0 (float*2), .sum <-> .mean (sum-mean),
reversed(...) -> (...) (reversed), and deletion of a one-line simple statement, replaced by `pass` (delete).

Operators on one expression of one line, found with `ast` (bugs a test hides when its inputs make the wrong line give
the right answer: a rate of 0.5, a temperature of 1, one model standing in for two):
  * rate: a rate r -> (1 - r): a name or `args.<name>` in RATE_NAMES (tau, ref_sync_mix, gamma, lam) and the weight
    (last positional argument) of a lerp, lerp_ or lerp_parameters call, e.g. `args.tau` -> `(1 - args.tau)`;
  * drop-scale: a multiplication or division by a flag deleted: `x * f` -> `x`, `f * x` -> `x`, `x / f` -> `x`,
    where a flag is `args.<anything>`, a name in FLAG_NAMES (temperature, kl_coef, alpha, beta, gamma, ...), or an
    expression of flags and numbers (`-kl_coef`, `(alpha + beta)`), e.g. `/ temperature`, `* args.vf_coef`;
  * swap: a name (read) or `args.<name>` replaced by another of the same kind (SWAP_KINDS: policy <-> ref_policy,
    reward_model <-> gold_model / value_model, critic <-> critic_target, logprobs <-> ref_logprobs / old_logprobs /
    new_logprobs, values <-> returns, scores <-> rewards, kl_in_reward <-> kl_in_loss, alpha <-> beta, gamma <-> lam,
    clip_coef <-> vf_clip_coef, num_ppo_epochs <-> num_minibatches, the batch sizes, ...) that the same function (or
    the main block) also names, or an Args field;
  * swap-args: two arguments of one call that are names of the same kind (or such names indexed, `logprobs[i]`)
    exchanged, e.g. `lerp_parameters(critic_target, critic, tau)` -> `lerp_parameters(critic, critic_target, tau)`.
One mutant per distinct mutated line; mutants that do not compile are dropped. With --max-per-line K each line gets
at most K mutants, drawn round-robin over its operators in a seeded order, so adding an operator changes which
mutants a line gets; --operators restricts the draw to the operators named.

Tests, per script X_rlhf.py or its twin X_rlhf_multigpu.py (default): tests/test_X.py, tests/test_common.py and every
other tests/test_*.py that names the script or its module, except test_compare.py, test_tinyworld.py and
test_fixtures.py; the parametrizations of test_common.py for the other scripts are deselected with -k. The tests of the
text itself (the same helpers in a tier, the same ALGO LOGIC in a file and its twin) are always deselected: a mutant of
one script's copy breaks them whatever the mutant does.

Statuses: killed (a test failed; the first failing test is named), timeout and error (pytest could not run the
tests, e.g. a collection error) also count as killed; survived (every test passed).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import difflib
import io
import json
import keyword
import os
import queue
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SCRIPTS = ["ppo_rlhf.py", "rloo_rlhf.py", "sac_rlhf.py", "grpo_rlhf.py"]
CORE_HELPERS = [
    "generate",
    "response_mask",
    "forward_logp_all",
    "forward_logprobs",
    "get_scores",
    "masked_mean",
    "rollout",
    "batch_stats",
    "evaluate",
    "lerp_parameters",
    "check_finite",
]
ALGO_START = " ALGO LOGIC"  # in the section's marker line, "# ==== ALGO LOGIC: ... ===="
ALGO_END = (" RLHF CORE", " TRY NOT TO MODIFY", "if __name__")
NOT_DEFAULT_TESTS = {"test_compare.py", "test_tinyworld.py", "test_fixtures.py"}
# Tests of the text itself (the same helpers in every script of a tier, the same ALGO LOGIC in a file and its twin,
# no scale code in a plain file): a mutant of one copy breaks them whatever the mutant does, so none of them counts.
TEXT_EQUALITY_TESTS = [
    "tests/test_tiers.py::test_a_plain_file_and_its_twin_hold_the_same_algo_logic",
    "tests/test_tiers.py::test_each_tier_shares_its_core_plumbing_and_loop_lines_word_for_word",
    "tests/test_tiers.py::test_a_plain_file_holds_no_scale_code_and_refuses_scale_flags",
    "tests/test_tiers.py::test_a_twin_adds_scale_code_and_nothing_else",
]
COPY_IGNORE = {".git", "runs", "__pycache__", ".pytest_cache", "wandb", ".venv", "venv"}  # runs/ covers results/*/runs
TEST_ENV = {
    "OMP_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}  # no .pyc: two same-size mutants written in one second would share one

SWAPS = {  # token text -> (operator, replacement), for tokens that are swapped whatever their context
    "<": ("lt-le", "<="),
    "<=": ("lt-le", "<"),
    ">": ("gt-ge", ">="),
    ">=": ("gt-ge", ">"),
    "==": ("eq-ne", "!="),
    "!=": ("eq-ne", "=="),
    "and": ("and-or", "or"),
    "or": ("and-or", "and"),
    "True": ("true-false", "False"),
    "False": ("true-false", "True"),
    "min": ("min-max", "max"),
    "max": ("min-max", "min"),
    "+=": ("add-sub", "-="),
    "-=": ("add-sub", "+="),
    "*=": ("mul-div", "/="),
    "/=": ("mul-div", "*="),
}
BINARY_SWAPS = {"+": ("add-sub", "-"), "-": ("add-sub", "+"), "*": ("mul-div", "/"), "/": ("mul-div", "*")}
TOKEN_OPERATORS = [
    "add-sub",
    "mul-div",
    "lt-le",
    "gt-ge",
    "eq-ne",
    "and-or",
    "true-false",
    "min-max",
    "unary-minus",
    "int+1",
    "float*2",
    "sum-mean",
    "reversed",
    "delete",
]
# Operators found with `ast` (expressions rather than tokens): see rate_mutations, scale_mutations, swap_mutations.
RATE_NAMES = {"tau", "ref_sync_mix", "gamma", "lam"}  # a rate r in [0, 1], as a name or as args.<name>: r -> 1 - r
LERP_CALLS = {"lerp", "lerp_", "lerp_parameters"}  # their last positional argument is a rate, whatever its name
FLAG_NAMES = {  # scalar settings that scale a term; `args.<anything>` is one too
    "temperature",
    "kl_coef",
    "kl_in_reward",
    "kl_in_loss",
    "alpha",
    "beta",
    "gamma",
    "lam",
    "tau",
    "vf_coef",
    "clip_coef",
    "vf_clip_coef",
    "target_entropy_scale",
    "weight",
}
SWAP_KINDS = [  # names of the same kind: a mutant puts one where another stood (args.<name> too, for Args fields)
    {"policy", "ref_policy"},  # causal LMs
    {"reward_model", "gold_model", "value_model", "reward_copy"},  # sequence classifiers
    {"critic", "critic_target"},
    {"logprobs", "ref_logprobs", "old_logprobs", "new_logprobs"},  # per-token log-probs [batch, time]
    {"logp", "ref_logp"},  # whole-vocabulary log-probs [batch, time, vocab]
    {"seq_logprobs", "old_seq_logprobs"},
    {"values", "old_values", "new_values", "returns"},
    {"scores", "rewards"},
    {"kl_in_reward", "kl_in_loss"},
    {"alpha", "beta"},
    {"gamma", "lam"},
    {"clip_coef", "vf_clip_coef"},
    {"learning_rate", "q_learning_rate"},
    {"num_ppo_epochs", "num_minibatches"},  # counts
    {"local_batch_size", "minibatch_size", "micro_batch_size", "local_minibatch_size"},
]
AST_OPERATORS = ["rate", "drop-scale", "swap", "swap-args"]
OPERATORS = TOKEN_OPERATORS + AST_OPERATORS
FSTRING_START = getattr(tokenize, "FSTRING_START", None)  # Python 3.12+ tokenizes the inside of f-strings
FSTRING_END = getattr(tokenize, "FSTRING_END", None)


@dataclass
class Mutant:
    script: str
    line: int  # 1-based
    where: str  # the function, class or "main loop" holding the line
    operator: str
    change: str  # e.g. "`-` -> `+`"
    original: str  # the whole original line, without its newline
    mutated: str  # the whole mutated line
    status: str = ""  # killed, survived, timeout, error (filled in when tested)
    test: str = ""  # the first failing test, or what went wrong
    duration_s: float = 0.0


@dataclass
class Worker:
    repo: Path  # a private copy of the repository
    basetemp: Path  # pytest's --basetemp, so parallel runs never share temporary folders
    pristine: dict = field(default_factory=dict)  # script -> its unmutated text


# ------------------------------------------------------------------------------------------------
# Which lines are mutated
# ------------------------------------------------------------------------------------------------
def algo_section(lines):
    """(first, last) line numbers of the top-level "ALGO LOGIC" section, or None when there is no marker."""
    start = next((i for i, line in enumerate(lines, 1) if line.startswith("#") and ALGO_START in line), None)
    if start is None:
        return None
    ends = (
        i
        for i, line in enumerate(lines, 1)
        if i > start and line.startswith(("#", "if __name__")) and any(e in line for e in ALGO_END)
    )
    end = next(ends, len(lines) + 1)
    return start, end


def is_main_block(node):
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def training_loop_start(main):
    """Line of the first `for update in ...` loop of the main block, or None."""
    for node in ast.walk(main):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and node.target.id == "update":
            return node.lineno
    return None


def target_regions(tree, lines, functions):
    """[(name, first line, last line)] of the code to mutate: bodies of the chosen definitions and the main loop."""
    section = algo_section(lines)
    regions = []
    mains = []  # `def main()` and the `if __name__ == "__main__":` block: the one holding the training loop
    for node in tree.body:
        if is_main_block(node) or (isinstance(node, ast.FunctionDef) and node.name == "main"):
            mains.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            in_section = section is not None and section[0] < node.lineno < section[1]
            if in_section or node.name in functions:
                regions.append((node.name, node.body[0].lineno, node.end_lineno))
    loops = [(training_loop_start(node), node.end_lineno) for node in mains if training_loop_start(node) is not None]
    if not loops:
        print("warning: no `for update in` loop in main() or the main block; no main loop is mutated", flush=True)
    regions += [("main loop", start, end) for start, end in loops[:1]]
    return regions


def is_quiet_statement(node):
    """A docstring or bare string, or a statement that only logs or stops: logger.*, print, fail, raise SystemExit."""
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
        return True
    if isinstance(node, ast.Raise):
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        return isinstance(exc, ast.Name) and exc.id == "SystemExit"
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        func = node.value.func
        while isinstance(func, ast.Attribute):
            func = func.value
        is_method = isinstance(node.value.func, ast.Attribute)
        return isinstance(func, ast.Name) and ((func.id == "logger" and is_method) or func.id in ("print", "fail"))
    return False


def quiet_lines(tree):
    """Line numbers of every statement that is_quiet_statement, all of their physical lines."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and is_quiet_statement(node):
            skipped.update(range(node.lineno, node.end_lineno + 1))
    return skipped


def deletable_lines(tree, lines):
    """Lines holding exactly one whole simple statement (not `pass`), which can become `pass`."""
    statements_per_line = Counter()
    candidates = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.stmt):
            continue
        statements_per_line[node.lineno] += 1
        line = lines[node.lineno - 1]
        whole_line = node.col_offset == len(line) - len(line.lstrip())
        is_simple = not hasattr(node, "body") and not isinstance(node, ast.Pass)  # compound statements have a body
        if is_simple and node.lineno == node.end_lineno and whole_line:
            candidates.add(node.lineno)
    return {n for n in candidates if statements_per_line[n] == 1 and not lines[n - 1].rstrip().endswith(":")}


# ------------------------------------------------------------------------------------------------
# Mutation operators
# ------------------------------------------------------------------------------------------------
def code_tokens(source):
    """{line: [(token, previous significant token, next significant token)]} of single-line code tokens.

    Tokens inside f-strings (Python 3.12+) are left out: changing them only changes a message.
    """
    significant = []
    depth = 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == FSTRING_START:
            depth += 1
        elif tok.type == FSTRING_END:
            depth -= 1
            significant.append(tok)  # an f-string ends an operand, like a string
        elif tok.type in (tokenize.OP, tokenize.NAME, tokenize.NUMBER, tokenize.STRING) and depth == 0:
            significant.append(tok)
    by_line = {}
    for i, tok in enumerate(significant):
        if tok.type != FSTRING_END and tok.start[0] == tok.end[0]:
            previous = significant[i - 1] if i > 0 else None
            following = significant[i + 1] if i + 1 < len(significant) else None
            by_line.setdefault(tok.start[0], []).append((tok, previous, following))
    return by_line


def ends_operand(tok):
    """Whether an operator right after `tok` is binary (`a - b`) rather than unary (`(-b`, `= -b`, `return -b`)."""
    if tok is None:
        return False
    if tok.type == tokenize.NAME:
        return not keyword.iskeyword(tok.string) or tok.string in ("True", "False", "None")
    return tok.type in (tokenize.NUMBER, tokenize.STRING, FSTRING_END) or tok.string in (")", "]", "}")


def number_replacements(text):
    """[(operator, new text)] for a number literal: int n -> n + 1 (and 1 -> 0), float x -> 2x (0.0 -> 1.0)."""
    if text[-1] in "jJ":
        return []
    try:
        value = int(text, 0)
    except ValueError:
        value = float(text)
        return [("float*2", "1.0" if value == 0 else repr(2 * value))]
    return [("int+1", str(value + 1))] + ([("int+1", "0")] if value == 1 else [])


def token_replacements(tok, previous, following):
    """[(operator, new text)] for one token in its context; "" as new text deletes the token."""
    text = tok.string
    if tok.type == tokenize.NUMBER:
        return number_replacements(text)
    if text in BINARY_SWAPS:
        if ends_operand(previous):
            return [BINARY_SWAPS[text]]
        return [("unary-minus", "")] if text == "-" else []
    if text in SWAPS and tok.type in (tokenize.OP, tokenize.NAME):
        return [SWAPS[text]]
    after_dot = previous is not None and previous.string == "."
    if text in ("sum", "mean") and after_dot:
        return [("sum-mean", "mean" if text == "sum" else "sum")]
    if text == "reversed" and following is not None and following.string == "(" and not after_dot:
        return [("reversed", "")]
    return []


def describe(old, new):
    return f"`{old}` -> `{new}`" if new else f"drop `{old}`"


def line_candidates(script, number, where, line, tokens, deletable, expressions=()):
    """Every mutant of one line, before the compile check; `expressions` from expression_candidates."""
    mutants = [Mutant(script, number, where, op, change, line, mutated) for op, change, mutated in expressions]
    mutants += token_candidates(script, number, where, line, tokens, deletable)
    unique = {}
    for mutant in mutants:  # one mutant per mutated text (two operators can make the same line)
        unique.setdefault(mutant.mutated, mutant)
    return list(unique.values())


def token_candidates(script, number, where, line, tokens, deletable):
    """The mutants of the token operators (TOKEN_OPERATORS) of one line."""
    mutants = []
    for tok, previous, following in tokens:
        for operator, new in token_replacements(tok, previous, following):
            start, end = tok.start[1], tok.end[1]
            mutated = line[:start] + new + line[end:]
            mutants.append(Mutant(script, number, where, operator, describe(tok.string, new), line, mutated))
    if deletable:
        indent = line[: len(line) - len(line.lstrip())]
        mutants.append(Mutant(script, number, where, "delete", "statement -> `pass`", line, indent + "pass"))
    return mutants


def char_col(line, byte_col):
    """The character column of a UTF-8 byte offset in `line` (ast gives byte offsets)."""
    return len(line.encode()[:byte_col].decode(errors="ignore"))


def node_span(node, lines):
    """(line, first column, end column) in characters of a node on one line, or None when it spans several."""
    if node.lineno != node.end_lineno:
        return None
    line = lines[node.lineno - 1]
    return node.lineno, char_col(line, node.col_offset), char_col(line, node.end_col_offset)


def node_text(node, lines):
    span = node_span(node, lines)
    return None if span is None else lines[span[0] - 1][span[1] : span[2]]


def is_args_field(node):
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args"


def is_flag(node):
    """A scalar setting: args.<field>, a FLAG_NAMES name, or -flag / flag op flag-or-number (e.g. `(alpha + beta)`)."""
    if is_args_field(node) or (isinstance(node, ast.Name) and node.id in FLAG_NAMES):
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return is_flag(node.operand)
    if isinstance(node, ast.BinOp):
        leaves = (node.left, node.right)
        return any(is_flag(x) for x in leaves) and all(is_flag(x) or isinstance(x, ast.Constant) for x in leaves)
    return False


def parenthesised(node, text):
    """`text` (the source of `node`) safe to put where a binary operation stood."""
    atoms = (ast.Name, ast.Attribute, ast.Call, ast.Subscript, ast.Constant)
    return text if isinstance(node, atoms) else f"({text})"


def rate_mutations(tree, lines):
    """[(node, operator, new text, change)]: r -> (1 - r) for a rate (RATE_NAMES, args.<rate>, a lerp's weight)."""
    rates = {}
    for node in ast.walk(tree):
        if swappable_name(node) in RATE_NAMES:  # a name read, or args.<name>
            rates[id(node)] = node
        elif isinstance(node, ast.Call) and node.args and not isinstance(node.args[-1], ast.Starred):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in LERP_CALLS and len(node.args) >= (2 if isinstance(func, ast.Attribute) else 3):
                rates[id(node.args[-1])] = node.args[-1]
    out = []
    for node in rates.values():
        text = node_text(node, lines)
        if text is not None:
            out.append((node, "rate", f"(1 - {text})", f"`{text}` -> `1 - {text}`"))
    return out


def scale_mutations(tree, lines):
    """[(node, operator, new text, change)]: x * flag -> x, flag * x -> x, x / flag -> x (see is_flag)."""
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div))):
            continue
        symbol = "*" if isinstance(node.op, ast.Mult) else "/"
        pairs = [(node.left, node.right, f"{symbol} {{}}")]  # (kept, dropped, how the change reads)
        if symbol == "*":
            pairs.append((node.right, node.left, "{} *"))
        for kept, dropped, shape in pairs:
            if is_flag(dropped) and not is_flag(kept):
                kept_text, dropped_text = node_text(kept, lines), node_text(dropped, lines)
                if kept_text is not None and dropped_text is not None:
                    change = f"drop `{shape.format(parenthesised(dropped, dropped_text))}`"
                    out.append((node, "drop-scale", parenthesised(kept, kept_text), change))
    return out


def swappable_name(node):
    """The name of a Name (read) or args.<field> node, or None."""
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
        return node.id
    return node.attr if is_args_field(node) else None


def kind_of(name):
    return next((kind for kind in SWAP_KINDS if name in kind), None)


def scopes(tree):
    """[(scope node, its names)]: every function (its own names, nested ones included) and the module (the rest)."""
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    inside = set()
    result = []
    for function in functions:
        names = {n.id for n in ast.walk(function) if isinstance(n, ast.Name)}
        names |= {a.arg for a in ast.walk(function) if isinstance(a, ast.arg)}
        result.append((function, names))
        inside |= {id(n) for n in ast.walk(function)}
    module_names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in inside}
    result.append((tree, module_names))
    return result


def args_fields(tree):
    """The fields of the scripts' `Args` dataclass (the flags), for args.<name> swaps."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Args":
            return {x.target.id for x in node.body if isinstance(x, ast.AnnAssign) and isinstance(x.target, ast.Name)}
    return set()


def swap_mutations(tree, lines):
    """[(node, operator, new text, change)]: a name for another of its SWAP_KINDS kind that its scope knows (swap),
    and two arguments of one call that are names of the same kind, exchanged (swap-args)."""
    fields = args_fields(tree)
    out = []
    for scope, names in scopes(tree):
        nested = {
            id(n) for f in ast.walk(scope) if f is not scope and isinstance(f, ast.FunctionDef) for n in ast.walk(f)
        }
        nodes = [n for n in ast.walk(scope) if id(n) not in nested]
        for node in nodes:
            name = swappable_name(node)
            kind = kind_of(name) if name else None
            if kind is None:
                continue
            known = fields if is_args_field(node) else names
            prefix = "args." if is_args_field(node) else ""
            for other in sorted((kind & known) - {name}):
                out.append((node, "swap", prefix + other, f"`{prefix}{name}` -> `{prefix}{other}`"))
        for call in [n for n in nodes if isinstance(n, ast.Call)]:
            arguments = [a for a in call.args if not isinstance(a, ast.Starred)]
            for i, a in enumerate(arguments):
                for b in arguments[i + 1 :]:
                    base_a, base_b = (x.value if isinstance(x, ast.Subscript) else x for x in (a, b))
                    name_a, name_b = swappable_name(base_a), swappable_name(base_b)
                    if name_a is None or name_b is None or name_a == name_b or kind_of(name_a) is not kind_of(name_b):
                        continue
                    if kind_of(name_a) is None or a.lineno != b.end_lineno:
                        continue
                    text_a, text_b = node_text(a, lines), node_text(b, lines)
                    if text_a is None or text_b is None:
                        continue
                    out.append(((a, b), "swap-args", (text_b, text_a), f"`{text_a}, {text_b}` -> `{text_b}, {text_a}`"))
    return out


def in_fstring(tree):
    """ids of the nodes inside f-strings (their names only change a message)."""
    return {id(n) for j in ast.walk(tree) if isinstance(j, ast.JoinedStr) for n in ast.walk(j)}


def expression_candidates(tree, lines):
    """{line: [(operator, change, mutated line)]} of the operators found with `ast` (AST_OPERATORS)."""
    skipped = in_fstring(tree)
    by_line = {}
    for node, operator, new, change in (
        rate_mutations(tree, lines) + scale_mutations(tree, lines) + swap_mutations(tree, lines)
    ):
        if operator == "swap-args":
            (a, b), (new_a, new_b) = node, new
            if id(a) in skipped:
                continue
            number, a0, a1 = node_span(a, lines)
            _, b0, b1 = node_span(b, lines)
            line = lines[number - 1]
            mutated = line[:a0] + new_a + line[a1:b0] + new_b + line[b1:]
        else:
            span = node_span(node, lines)
            if span is None or id(node) in skipped:
                continue
            number, start, end = span
            line = lines[number - 1]
            mutated = line[:start] + new + line[end:]
        if mutated != line:
            by_line.setdefault(number, []).append((operator, change, mutated))
    return by_line


def spread_over_operators(candidates, rng):
    """The candidates reordered round-robin over their operators (in a random operator order)."""
    by_operator = {}
    for mutant in candidates:
        by_operator.setdefault(mutant.operator, []).append(mutant)
    groups = list(by_operator.values())
    rng.shuffle(groups)
    for group in groups:
        rng.shuffle(group)
    ordered = []
    for i in range(max(map(len, groups), default=0)):
        ordered += [group[i] for group in groups if i < len(group)]
    return ordered


def compiles(lines, number, mutated_line, script):
    source = "\n".join(lines[: number - 1] + [mutated_line] + lines[number:]) + "\n"
    try:
        compile(source, script, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return False
    return True


def scale_line_numbers(twin_source, plain_source):
    """The 1-based numbers of the twin's lines that its plain file does not hold (added or changed in the diff)."""
    twin, plain = twin_source.splitlines(), plain_source.splitlines()
    matcher = difflib.SequenceMatcher(None, plain, twin, autojunk=False)
    return {j + 1 for tag, _, _, j1, j2 in matcher.get_opcodes() if tag != "equal" for j in range(j1, j2)}


def script_mutants(script, source, functions, max_per_line, seed, only_lines=None, operators=None, numbers=None):
    """(mutants, number of target lines) of one script's source text; `operators`: only these (default: all);
    `numbers`: only these line numbers (default: all)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    tokens = code_tokens(source)
    expressions = expression_candidates(tree, lines)
    skipped = quiet_lines(tree)
    deletable = deletable_lines(tree, lines)
    mutants, targets = [], 0
    for where, first, last in target_regions(tree, lines, functions):
        for number in range(first, last + 1):
            line = lines[number - 1]
            if number in skipped or number not in tokens or (only_lines and not re.search(only_lines, line)):
                continue
            if numbers is not None and number not in numbers:
                continue
            targets += 1
            candidates = line_candidates(
                script, number, where, line, tokens[number], number in deletable, expressions.get(number, ())
            )
            if operators is not None:
                candidates = [m for m in candidates if m.operator in operators]
            rng = random.Random(f"{seed}:{script}:{number}")
            chosen = []
            for mutant in spread_over_operators(candidates, rng):
                if len(chosen) == max_per_line:
                    break
                if compiles(lines, number, mutant.mutated, script):
                    chosen.append(mutant)
            mutants += chosen
    return mutants, targets


def evenly_spaced(items, n):
    """n items spread evenly over the list (all of them when n >= len)."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def apply_limit(per_script, limit):
    """Cap the total at `limit`, dealing the places out to the scripts in turn, then spread within each script."""
    if limit is None:
        return per_script
    quota = dict.fromkeys(per_script, 0)
    left = limit
    while left > 0 and any(quota[s] < len(m) for s, m in per_script.items()):
        for script, mutants in per_script.items():
            if left > 0 and quota[script] < len(mutants):
                quota[script] += 1
                left -= 1
    return {script: evenly_spaced(mutants, quota[script]) for script, mutants in per_script.items()}


# ------------------------------------------------------------------------------------------------
# Running the tests
# ------------------------------------------------------------------------------------------------
def default_tests(repo, script, all_scripts):
    """pytest arguments selecting the tests of one script (see the module docstring)."""
    module = Path(script).stem
    own = repo / "tests" / f"test_{module.removesuffix('_multigpu').removesuffix('_rlhf')}.py"
    files = [own, repo / "tests" / "test_common.py"]
    for path in sorted((repo / "tests").glob("test_*.py")):
        if path not in files and path.name not in NOT_DEFAULT_TESTS:
            text = path.read_text()
            if script in text or module in text:
                files.append(path)
    selection = [str(path.relative_to(repo)) for path in files if path.exists()]
    others = [s for s in all_scripts if s != script]
    if others:  # test_common.py runs every script: keep only this script's parametrizations
        selection += ["-k", " and ".join(f"not {other}" for other in others)]
    return selection


def pytest_command(worker, selection):
    return [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--basetemp={worker.basetemp}",
        *selection,
        *[arg for test in TEXT_EQUALITY_TESTS for arg in ["--deselect", test]],
    ]


class Runner:
    """Runs pytest in the workers' copies and can stop every run in progress (on Ctrl-C)."""

    def __init__(self):
        self.running = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def run(self, worker, selection, timeout):
        """(exit code or None on timeout, output, seconds)."""
        env = {**os.environ, **TEST_ENV}
        start = time.time()
        process = subprocess.Popen(
            pytest_command(worker, selection),
            cwd=worker.repo,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with self.lock:
            self.running.add(process)
        try:
            output, _ = process.communicate(timeout=timeout)
            code = process.returncode
        except subprocess.TimeoutExpired:
            self.kill(process)
            output, _ = process.communicate()
            code = None
        except KeyboardInterrupt:  # pytest runs in its own session, so Ctrl-C does not reach it
            self.kill(process)
            raise
        finally:
            with self.lock:
                self.running.discard(process)
        return code, output, time.time() - start

    @staticmethod
    def kill(process):
        """Kill pytest and the scripts it started (its own process group)."""
        with contextlib.suppress(ProcessLookupError):  # it has already ended
            os.killpg(process.pid, signal.SIGKILL)

    def stop_all(self):
        self.stopping.set()
        with self.lock:
            for process in self.running:
                self.kill(process)


def first_failure(output):
    """The node id of the first FAILED or ERROR line of pytest's short summary, or ""."""
    for line in output.splitlines():
        match = re.match(r"(?:FAILED|ERROR) (\S+\.py(?:::.+?)?)(?: - .*)?$", line)
        if match:
            return match.group(1)
    return ""


def classify(code, output):
    """(status, detail) of a pytest run on a mutant."""
    if code is None:
        return "timeout", ""
    if code == 0:
        return "survived", ""
    if code == 1:
        return "killed", first_failure(output) or "(failing test not found in the output)"
    last = [line for line in output.splitlines() if line.strip()][-1:] or [""]
    return "error", f"pytest exit code {code}: {first_failure(output) or last[0].strip()}"


def make_workers(jobs, scripts):
    """A temporary folder with `jobs` copies of the repository, all copied from one snapshot of it."""
    root = Path(tempfile.mkdtemp(prefix="mutate-"))
    ignore = shutil.ignore_patterns(*COPY_IGNORE)
    workers = []
    for i in range(jobs):
        source = REPO if i == 0 else workers[0].repo
        repo = root / f"worker{i}" / "repo"
        shutil.copytree(source, repo, ignore=ignore)
        workers.append(Worker(repo, root / f"worker{i}" / "pytest"))
    for worker in workers:
        worker.pristine = {script: (workers[0].repo / script).read_text() for script in scripts}
    return root, workers


def write_mutant(worker, mutant):
    """Restore every script of the worker's copy, then write the mutated line into one."""
    for script, text in worker.pristine.items():
        (worker.repo / script).write_text(text)
    if mutant is not None:
        lines = worker.pristine[mutant.script].splitlines(keepends=True)
        ending = lines[mutant.line - 1][len(mutant.original) :]
        lines[mutant.line - 1] = mutant.mutated + ending
        (worker.repo / mutant.script).write_text("".join(lines))


def measure_baselines(runner, worker, selections):
    """Seconds taken by each script's tests on the unmutated copy; stops the tool if any of them fails."""
    baselines = {}
    for script, selection in selections.items():
        write_mutant(worker, None)
        print(f"baseline {script}: {shlex.join(['pytest', *selection])}", flush=True)
        code, output, seconds = runner.run(worker, selection, timeout=None)
        if code != 0:
            sys.exit(
                f"{output[-5000:]}\nerror: the tests of {script} fail on the unmutated code (pytest exit code "
                f"{code}, output above); fix them or choose other tests after `--`"
            )
        print(f"baseline {script}: passed in {seconds:.1f}s", flush=True)
        baselines[script] = seconds
    return baselines


def run_one_mutant(runner, workers, mutant, selection, timeout):
    """Run one mutant's tests in a free worker; fill in its status."""
    worker = workers.get()
    try:
        if runner.stopping.is_set():
            return mutant
        write_mutant(worker, mutant)
        code, output, mutant.duration_s = runner.run(worker, selection, timeout)
        if not runner.stopping.is_set():
            mutant.status, mutant.test = classify(code, output)
    finally:
        write_mutant(worker, None)
        workers.put(worker)
    return mutant


def run_campaign(mutants, selections, baselines, workers, runner, timeout_factor, save):
    """Test every mutant with len(workers) in parallel; return those finished (all of them unless interrupted).

    save(finished mutants) is called after each mutant, so a crash or a kill loses nothing already tested.
    """
    pool = queue.Queue()
    for worker in workers:
        pool.put(worker)
    done = []
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=len(workers))
    try:
        futures = [
            executor.submit(
                run_one_mutant,
                runner,
                pool,
                mutant,
                selections[mutant.script],
                timeout_factor * baselines[mutant.script] + 30,
            )
            for mutant in mutants
        ]
        for future in concurrent.futures.as_completed(futures):
            mutant = future.result()
            done.append(mutant)
            print(progress_line(len(done), len(mutants), mutant), flush=True)
            save([m for m in done if m.status])
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the tests in progress and reporting the finished mutants", flush=True)
        runner.stop_all()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    return [mutant for mutant in done if mutant.status]


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def progress_line(i, total, mutant):
    width = len(str(total))
    detail = f" ({mutant.test})" if mutant.test else ""
    return (
        f"[{i:>{width}}/{total}] {mutant.script}:{mutant.line} {mutant.operator} {mutant.change}: "
        f"{mutant.status}{detail} in {mutant.duration_s:.1f}s"
    )


def list_mutants(per_script, targets):
    for mutants in per_script.values():
        for m in mutants:
            shown = f"(deleted) {m.original.strip()}" if m.operator == "delete" else m.mutated.strip()
            print(f"{m.script}:{m.line:<4} {m.where:<22} {m.operator:<12} {m.change:<22} | {shown}")
    print()
    for script, mutants in per_script.items():
        operators = Counter(m.operator for m in mutants)
        counts = ", ".join(f"{op} {n}" for op, n in sorted(operators.items()))
        print(f"{script}: {len(mutants)} mutants on {targets[script]} target lines ({counts})")
    everything = Counter(m.operator for mutants in per_script.values() for m in mutants)
    total = sum(everything.values())
    print(f"all scripts: {total} mutants ({', '.join(f'{op} {n}' for op, n in sorted(everything.items()))})")
    print(f"operators: {', '.join(f'{op} {everything[op]}' for op in OPERATORS)}")


def code_cell(text):
    """A Markdown table cell showing `text` as code."""
    text = text.strip().replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def is_killed(mutant):
    return mutant.status in ("killed", "timeout", "error")


def kill_rate(mutants):
    return f"{100 * sum(map(is_killed, mutants)) / len(mutants):.1f}%" if mutants else "n/a"


def markdown_report(command, mutants, planned, selections, baselines, wall_s):
    out = ["# Mutation testing report", "", f"Command: `{command}`", ""]
    if len(mutants) < planned:
        out += [f"**Interrupted: {len(mutants)} of {planned} mutants tested.**", ""]
    out += [
        "| script | killed / total | kill rate | of which timeout | of which error | baseline | tests |",
        "|---|---|---|---|---|---|---|",
    ]
    for script, selection in selections.items():
        ms = [m for m in mutants if m.script == script]
        count = Counter(m.status for m in ms)
        out.append(
            f"| {script} | {sum(map(is_killed, ms))} / {len(ms)} | {kill_rate(ms)} | {count['timeout']} | "
            f"{count['error']} | {baselines[script]:.0f}s | {code_cell(shlex.join(selection))} |"
        )
    mean = sum(m.duration_s for m in mutants) / max(len(mutants), 1)
    out += [
        "",
        f"Overall: {sum(map(is_killed, mutants))} / {len(mutants)} killed, kill rate {kill_rate(mutants)}; "
        f"{wall_s / 60:.1f} min wall time, {mean:.1f}s per mutant on average.",
        "",
    ]
    survivors = sorted((m for m in mutants if m.status == "survived"), key=lambda m: (m.script, m.line, m.mutated))
    out += [f"## Surviving mutants ({len(survivors)})", ""]
    if survivors:
        out += [
            "No test noticed these changes: each is behaviour the tests do not pin down, or an equivalent change.",
            "",
            "| script:line | function | change | original line | mutated line |",
            "|---|---|---|---|---|",
        ]
        out += [
            f"| {m.script}:{m.line} | {m.where} | {m.change} | {code_cell(m.original)} | {code_cell(m.mutated)} |"
            for m in survivors
        ]
    errors = [m for m in mutants if m.status == "error"]
    if errors:
        out += ["", "## Mutants counted as killed because pytest could not run", ""]
        out += [f"- {m.script}:{m.line} {m.change}: {m.test}" for m in errors]
    return "\n".join(out) + "\n"


def write_json(path, command, mutants, selections, baselines):
    """Every tested mutant with its status, and per script the tests, the baseline time and the counts."""
    summary = {
        script: {
            "tests": selection,
            "baseline_s": baselines[script],
            "total": sum(m.script == script for m in mutants),
            "killed": sum(m.script == script and is_killed(m) for m in mutants),
        }
        for script, selection in selections.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    mutants = sorted(mutants, key=lambda m: (m.script, m.line, m.mutated))
    path.write_text(
        json.dumps({"command": command, "scripts": summary, "mutants": [asdict(m) for m in mutants]}, indent=1) + "\n"
    )


def write_report(report_path, json_path, report):
    if report_path is None:
        print("\n" + report, flush=True)
    else:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(report)
        print(f"report: {report_path}", flush=True)
    print(f"every mutant and its status: {json_path}", flush=True)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def parse_args(argv):
    """(options, pytest arguments after `--`, or None)."""
    pytest_args = None
    if "--" in argv:
        pytest_args = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="See the module docstring of tests/mutate.py for details."
    )
    parser.add_argument("--scripts", nargs="+", default=[s for s in DEFAULT_SCRIPTS if (REPO / s).exists()])
    parser.add_argument("--functions", nargs="*", default=CORE_HELPERS)
    parser.add_argument("--max-per-line", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--only-lines", default=None, metavar="REGEX")
    parser.add_argument("--scale-only", action="store_true")
    parser.add_argument("--operators", nargs="+", default=None, choices=OPERATORS, metavar="OP")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--timeout-factor", type=float, default=2.0)
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument("--list", action="store_true")
    options = parser.parse_args(argv)
    if options.jobs < 1 or options.max_per_line < 1 or (options.limit is not None and options.limit < 1):
        parser.error("--jobs, --max-per-line and --limit must be at least 1")
    if options.scale_only and not all(s.endswith("_multigpu.py") for s in options.scripts):
        parser.error("--scale-only mutates the twins' scale lines: pass --scripts X_rlhf_multigpu.py ...")
    if pytest_args is not None and not pytest_args:
        parser.error("nothing after `--`: give the pytest arguments to use, or leave out `--`")
    return options, pytest_args


def collect_mutants(repo, options):
    """({script: mutants}, {script: number of target lines}) from the scripts' text in `repo`."""
    per_script, targets = {}, {}
    for script in options.scripts:
        source = (repo / script).read_text()
        numbers = None
        if options.scale_only:
            numbers = scale_line_numbers(source, (repo / script.replace("_multigpu", "")).read_text())
        per_script[script], targets[script] = script_mutants(
            script,
            source,
            set(options.functions),
            options.max_per_line,
            options.seed,
            options.only_lines,
            None if options.operators is None else set(options.operators),
            numbers,
        )
    return apply_limit(per_script, options.limit), targets


def json_path_for(report):
    """Beside the report (report.md -> report.json), or under the git-ignored runs/ when it goes to stdout."""
    if report is None:
        return REPO / "runs" / "mutate" / time.strftime("mutants-%Y%m%d-%H%M%S.json")
    return report.with_suffix(".json") if report.suffix != ".json" else report.with_suffix(".mutants.json")


def main(argv):
    options, pytest_args = parse_args(argv)
    missing = [s for s in options.scripts if not (REPO / s).exists()]
    if missing:
        sys.exit(f"error: no such script in {REPO}: {', '.join(missing)}")
    command = shlex.join(["python", "tests/mutate.py", *argv])
    if options.list:
        list_mutants(*collect_mutants(REPO, options))
        return
    root, workers = make_workers(options.jobs, options.scripts)
    try:
        per_script, _ = collect_mutants(workers[0].repo, options)  # from the snapshot the workers test
        mutants = [m for ms in per_script.values() for m in ms]
        all_scripts = sorted(p.name for p in workers[0].repo.glob("*_rlhf.py"))
        selections = {s: pytest_args or default_tests(workers[0].repo, s, all_scripts) for s in options.scripts}
        print(
            f"{len(mutants)} mutants ({', '.join(f'{s} {len(m)}' for s, m in per_script.items())}), "
            f"{options.jobs} worker(s) in {root}",
            flush=True,
        )
        json_path = json_path_for(options.report)
        runner = Runner()
        start = time.time()
        baselines = measure_baselines(runner, workers[0], selections)

        def save(done):
            write_json(json_path, command, done, selections, baselines)

        finished = run_campaign(mutants, selections, baselines, workers, runner, options.timeout_factor, save)
        finished.sort(key=lambda m: (m.script, m.line, m.mutated))
        report = markdown_report(command, finished, len(mutants), selections, baselines, time.time() - start)
        write_json(json_path, command, finished, selections, baselines)
        write_report(options.report, json_path, report)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
