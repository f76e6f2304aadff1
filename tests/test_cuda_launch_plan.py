"""The CUDA kernel's launch plan (which tensors and chunks each launch covers), checked on the CPU:
the plan is host code shared by adan_cuda.cu and the ``_cuda_launch_plan`` test op, so the multi-tensor
plumbing is verified where no GPU is present."""
import random

import pytest
import torch

from adan_plugin import _ext

pytestmark = pytest.mark.skipif(not _ext.extension_loaded(), reason="adan_plugin._C is not built")


def plan(numels):
    flat = torch.ops.adan_plugin._cuda_launch_plan(numels)
    max_tensors, max_blocks, chunk = flat[:3]
    launches, i = [], 3
    while i < len(flat):
        n_slots = flat[i]
        slots = flat[i + 1:i + 1 + n_slots]
        i += 1 + n_slots
        n_blocks = flat[i]
        blocks = [(flat[i + 1 + 2 * b], flat[i + 2 + 2 * b]) for b in range(n_blocks)]
        i += 1 + 2 * n_blocks
        launches.append((slots, blocks))
    return (max_tensors, max_blocks, chunk), launches


def check_plan(numels):
    (max_tensors, max_blocks, chunk), launches = plan(numels)
    covered = []
    for slots, blocks in launches:
        assert 1 <= len(slots) <= max_tensors and 1 <= len(blocks) <= max_blocks
        used = {s for s, _ in blocks}
        assert used == set(range(len(slots))), "every slot has a block and every block a valid slot"
        for s, c in blocks:
            t = slots[s]
            assert 0 <= c * chunk < numels[t]
            covered.append((t, c))
    want = [(t, c) for t, n in enumerate(numels) for c in range(-(-n // chunk))]
    assert sorted(covered) == want, "each chunk of each non-empty tensor exactly once"
    return (max_tensors, max_blocks, chunk), launches


def test_limits_match_the_kernel_argument():
    (max_tensors, max_blocks, chunk), _ = plan([1])
    assert (max_tensors, max_blocks, chunk) == (32, 320, 65536)


def test_edges_of_slots_and_blocks():
    (max_tensors, max_blocks, chunk), _ = plan([1])
    cases = [
        [],
        [0, 0],
        [1],
        [chunk - 1, chunk, chunk + 1],
        [chunk * max_blocks],                       # exactly one full launch
        [chunk * max_blocks, 1],                    # the next tensor starts a new launch
        [chunk * max_blocks + 1],                   # one chunk spills over
        [chunk * (max_blocks - 1), chunk * 2, 5],   # a tensor split across launches, then another
        [1] * max_tensors,                          # exactly the slots of one launch
        [1] * (max_tensors + 1),
        [0, 3] * (3 * max_tensors),                 # empty tensors take no slot
        [chunk * 3 * max_blocks + 7] + [1] * 40,    # one tensor over several launches
    ]
    for numels in cases:
        check_plan(numels)
    _, launches = check_plan([chunk * max_blocks + 1])
    assert [len(b) for _, b in launches] == [max_blocks, 1]
    _, launches = check_plan([1] * (max_tensors + 1))
    assert [len(s) for s, _ in launches] == [max_tensors, 1]


def test_a_tensor_over_2_31_elements_is_planned_to_its_last_chunk():
    # The plan's side only: the kernel's int64 offset (chunk index x chunk size) is not exercised here.
    numel = 2**31 + 12345
    (_, _, chunk), launches = check_plan([7, numel, 3])
    last_chunk = max(c for slots, blocks in launches for s, c in blocks if slots[s] == 1)
    assert last_chunk * chunk < numel <= (last_chunk + 1) * chunk and last_chunk * chunk >= 2**31


def test_random_lists():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randrange(0, 120)
        numels = [rng.choice([0, 1, rng.randrange(1, 5000), rng.randrange(1, 65536 * 40)]) for _ in range(n)]
        check_plan(numels)
