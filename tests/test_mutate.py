"""tests/mutate.py's operators found with `ast` (rate, drop-scale, swap, swap-args), on a small source text."""

from tests import mutate

SOURCE = '''"""A module."""
import torch


# ==== ALGO LOGIC: a stand-in for a script's algorithm section ====
def update(critic, critic_target, args, logits, temperature, kl_coef, gamma, logprobs, ref_logprobs):
    lerp_parameters(critic_target, critic, args.tau)
    critic_target.weight.lerp_(critic.weight, 0.5)
    probs = logits.float() / temperature
    loss = args.vf_coef * probs + -kl_coef * probs.sum()
    kl = kl_penalty(logprobs, ref_logprobs, "k1")
    discounted = gamma**2 * loss
    label = "é" + str(gamma)
    print(f"{ref_logprobs} {temperature / 2}")
    tag = f"{gamma / temperature} {logprobs}"
    return critic(probs), kl, discounted, label


# ==== RLHF CORE: the end of the section ====
def untouched(logprobs, ref_logprobs, tau):
    return lerp_parameters(logprobs, ref_logprobs, tau)
'''


def mutated_lines(operators):
    mutants, _ = mutate.script_mutants("x_rlhf.py", SOURCE, set(), 100, 0, operators=operators)
    assert {m.operator for m in mutants} <= operators
    return {(m.operator, m.mutated.strip()) for m in mutants}


def test_rate_replaces_a_rate_by_one_minus_it():
    assert mutated_lines({"rate"}) == {
        ("rate", "lerp_parameters(critic_target, critic, (1 - args.tau))"),  # args.tau, also the lerp's weight
        ("rate", "critic_target.weight.lerp_(critic.weight, (1 - 0.5))"),  # a lerp_ weight, whatever it is
        ("rate", "discounted = (1 - gamma)**2 * loss"),
        ("rate", 'label = "é" + str((1 - gamma))'),  # columns are characters, not UTF-8 bytes
    }  # nothing from the f-strings, nor from the function outside the section


def test_drop_scale_deletes_a_multiplication_or_division_by_a_flag():
    assert mutated_lines({"drop-scale"}) == {
        ("drop-scale", "probs = logits.float()"),  # `/ temperature`
        ("drop-scale", "loss = probs + -kl_coef * probs.sum()"),  # `args.vf_coef *`
        ("drop-scale", "loss = args.vf_coef * probs + probs.sum()"),  # `-kl_coef *`
        ("drop-scale", "discounted = loss"),  # `gamma**2 *`: flags and numbers
    }  # nothing from the f-strings


def test_swap_puts_a_name_of_the_same_kind_in_its_place_and_swap_args_exchanges_two():
    lines = mutated_lines({"swap", "swap-args"})
    assert ("swap-args", "lerp_parameters(critic, critic_target, args.tau)") in lines
    assert ("swap", "lerp_parameters(critic, critic, args.tau)") in lines
    assert ("swap", "lerp_parameters(critic_target, critic_target, args.tau)") in lines
    assert ("swap-args", 'kl = kl_penalty(ref_logprobs, logprobs, "k1")') in lines
    assert ("swap", 'kl = kl_penalty(logprobs, logprobs, "k1")') in lines
    assert ("swap", "return critic_target(probs), kl, discounted, label") in lines
    assert not any("kl_coef" in line and op == "swap" and "vf_coef" not in line for op, line in lines if "loss" in line)
    assert not any(line.startswith(("print", "tag")) for _, line in lines)  # a quiet line; f-strings


def test_the_operators_compile_and_list_counts_every_operator(capsys):
    mutants, targets = mutate.script_mutants("x_rlhf.py", SOURCE, set(), 1, 0)
    assert targets == 9 and len(mutants) == 9  # one per line (but the print) with --max-per-line 1
    per_operator, _ = mutate.script_mutants("x_rlhf.py", SOURCE, set(), 100, 0)
    for m in per_operator:
        compile(SOURCE.replace(m.original, m.mutated, 1), "x_rlhf.py", "exec")
    mutate.list_mutants({"x_rlhf.py": per_operator}, {"x_rlhf.py": targets})
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("operators: ") and all(f" {op} " in last for op in mutate.AST_OPERATORS)


def test_scale_only_mutates_the_lines_a_twin_adds_or_changes_and_nothing_else():
    plain = SOURCE
    twin = SOURCE.replace("    kl = kl_penalty(", "    kl = all_reduce(logprobs)\n    kl = kl_penalty(").replace(
        "discounted = gamma**2 * loss", "discounted = gamma**2 * loss / world_size"
    )
    numbers = mutate.scale_line_numbers(twin, plain)
    assert sorted(twin.splitlines()[n - 1].strip() for n in numbers) == [
        "discounted = gamma**2 * loss / world_size",
        "kl = all_reduce(logprobs)",
    ]
    mutants, targets = mutate.script_mutants("x_rlhf_multigpu.py", twin, set(), 100, 0, numbers=numbers)
    assert targets == 2 and mutants and {m.line for m in mutants} == numbers
    options, _ = mutate.parse_args(["--scale-only", "--scripts", "rloo_rlhf_multigpu.py", "--list"])
    per_script, _ = mutate.collect_mutants(mutate.REPO, options)
    plain_lines = set((mutate.REPO / "rloo_rlhf.py").read_text().splitlines())
    assert per_script["rloo_rlhf_multigpu.py"]  # e.g. the loop's all_gather and sync_gradients lines
    assert all(m.original not in plain_lines for m in per_script["rloo_rlhf_multigpu.py"])
