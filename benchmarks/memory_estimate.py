"""Per-GPU memory of the weights and optimizer state, before activations: an estimate, not a measurement.

For a policy and a reward model of one shape (Pythia-1B's or Llama-3.1-8B's), each script's models under the
precision rules of docs/usage.md: a trained model holds fp32 weights, fp32 gradients and AdamW's two fp32 moments (16
bytes per parameter); the reference is fp32 (4 bytes); the frozen reward models are held in the autocast dtype, bf16 (2
bytes). PPO's value model is a trained copy of the reward model; SAC's critic is a trained copy of it with a head of
2 x hidden x vocabulary parameters (--critic heads), and its target critic an fp32 copy. Replicated (every process
holds everything) the per-GPU figure does not change with N; sharded (FSDP2, the _multigpu twins under torchrun) every
model's state is divided by N, and while the policy samples its weights are gathered whole on each GPU (4 bytes per
parameter in fp32: FSDP gathers into a whole buffer beside the rank's shard).

Usage: python benchmarks/memory_estimate.py   (prints the markdown table docs/scale.md quotes)
"""

SHAPES = {  # name: (parameters of the model, hidden size, vocabulary)
    "1B (Pythia-1B: hidden 2048, 16 layers, vocabulary 50,304)": (1.01e9, 2048, 50304),
    "8B (Llama-3.1-8B: hidden 4096, 32 layers, vocabulary 128,256)": (8.03e9, 4096, 128256),
}
GB = 1e9


def state_bytes(script, params, hidden, vocab):
    """Bytes of every model's weights and optimizer state, all on one process (no sharding)."""
    policy, reference, reward = 16 * params, 4 * params, 2 * params
    total = policy + reference + reward
    if script == "ppo_rlhf.py":
        total += 16 * params  # the value model
    if script == "sac_rlhf.py":
        critic = params + 2 * hidden * vocab
        total += 16 * critic + 4 * critic  # the critic (trained) and its target
    return total


def main():
    scripts = ["rloo_rlhf.py, grpo_rlhf.py", "ppo_rlhf.py", "sac_rlhf.py"]
    print("| model | script | N = 1 (or replicated on N) | sharded, N = 8 | sharded, N = 8, while sampling |")
    print("| --- | --- | --- | --- | --- |")
    for shape, (params, hidden, vocab) in SHAPES.items():
        for script in scripts:
            total = state_bytes(script, params, hidden, vocab)
            sharded = total / 8
            sampling = sharded + 4 * params  # the policy's fp32 weights gathered whole, in a buffer beside its shard
            print(f"| {shape} | `{script}` | {total / GB:.1f} | {sharded / GB:.1f} | {sampling / GB:.1f} |")


if __name__ == "__main__":
    main()
