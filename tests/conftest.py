"""Session fixtures: tiny offline worlds of real architectures for running the RLHF scripts.

Fixtures (all paths are strings; see `tests.helpers.World`):
  worlds             session  dict arch -> World, for arch in ARCHS ("llama", "gpt2", "gpt_neox", "qwen2")
  world              test     parametrized over ARCHS (ids = arch names): a test taking it runs once per arch
  mismatched_reward  session  folder of a 1-label reward model whose tokenizer has a different vocabulary
  tinyworld          test     World of the committed REPO/tinyworld artifacts (gold set; paths only)

World fields: arch, policy, reward, dataset, eval_dataset, gold (None for the arch worlds),
has_pad_token (False only for gpt2); `world.args()` gives the five model/data flags.
Helpers for tests: `from tests.helpers import REPO, ARCHS, World, run_script`.

Every arch world uses one word-level tokenizer (left padding; no tokens added automatically).
llama, gpt_neox, qwen2: distinct <pad>/<bos>/<eos>/<unk>. gpt2: GPT-2 style, a single <|endoftext|>
is bos/eos/unk and pad_token is None (config.pad_token_id None). gpt_neox and qwen2 have an
embedding matrix larger than the tokenizer, as the real checkpoints do. Policy and reward model of
an arch are random (fixed seeds) and share the tokenizer files; all worlds share the prompt files
(32 train, 16 eval prompts of 2-5 words).
"""

import os

import pytest
import torch

from tests.helpers import ARCHS, OFFLINE_ENV, build_mismatched_reward, build_worlds
from tests.helpers import tinyworld as _tinyworld


@pytest.fixture(scope="session")
def worlds(tmp_path_factory):
    return build_worlds(tmp_path_factory.mktemp("worlds"))


@pytest.fixture(params=ARCHS, ids=ARCHS)
def world(request, worlds):
    return worlds[request.param]


@pytest.fixture(scope="session")
def mismatched_reward(tmp_path_factory):
    return build_mismatched_reward(tmp_path_factory.mktemp("mismatch"))


@pytest.fixture
def tinyworld():
    return _tinyworld()


# Tests that run a script in this process (tests.helpers.run_main) see the same environment as run_script's.
os.environ.update(OFFLINE_ENV)
# One thread, like the scripts run_script starts: two busy processes with two threads each on a two-core machine
# slow each other down many times over.
torch.set_num_threads(1)
