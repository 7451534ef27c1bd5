"""Run a script with sampling made a deterministic function of the probabilities, so that one process and several
sample the same responses and their updates can be compared number for number (tests/test_scale.py).

usage: [torchrun --nproc-per-node N] python tests/fixed_sampling.py K <script> <flags>

Row i of each sampling step takes the token at quantile (i mod K + 0.5) / K of its distribution (the inverse CDF):
K = 1 takes the median token; K = --rloo-k gives the K copies of a prompt (consecutive rows) K different responses.
A rank's rows of a rollout are a run of whole prompts, so a row's place among its prompt's copies does not depend on
the number of processes.
"""

import runpy
import sys

import torch


def inverse_cdf_sampler(k):
    """A stand-in for torch.multinomial(probs, 1, generator=...) that draws nothing at random."""

    def sample(probs, num_samples, generator=None):
        quantiles = (torch.arange(len(probs), device=probs.device) % k + 0.5) / k  # [batch]
        return (probs.cumsum(-1) < quantiles[:, None]).sum(-1, keepdim=True).clamp(max=probs.shape[-1] - 1)

    return sample


if __name__ == "__main__":
    torch.multinomial = inverse_cdf_sampler(int(sys.argv[1]))
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
