"""Length-grouped epoch order (dltrain.data.length_grouped, BERT's `data.order: length_grouped`)."""

from __future__ import annotations

import torch

from dltrain.data import epoch_order, length_grouped, train_index_batches

N, G, GROUP = 1000, 16, 8
LENGTHS = torch.randint(3, 60, (N,), generator=torch.Generator().manual_seed(1))


def _padded(order: torch.Tensor) -> int:
    """Tokens after padding each global batch to its longest text."""
    usable = len(order) // G * G
    return int(LENGTHS[order[:usable]].view(-1, G).amax(dim=1).sum()) * G


def test_same_examples_far_less_padding_and_deterministic():
    order = epoch_order(N, seed=3, epoch=2)
    grouped = length_grouped(order, LENGTHS, G, GROUP, seed=3, epoch=2)
    usable = N // G * G
    assert sorted(grouped[:usable].tolist()) == sorted(order[:usable].tolist())  # a reordering, nothing dropped
    real = int(LENGTHS[order[:usable]].sum())
    assert _padded(grouped) < 1.3 * real < _padded(order)  # random order pads ~1.9x here
    assert torch.equal(grouped, length_grouped(order, LENGTHS, G, GROUP, seed=3, epoch=2))
    assert not torch.equal(grouped, length_grouped(epoch_order(N, 3, 3), LENGTHS, G, GROUP, seed=3, epoch=3))
    # each mega-batch keeps its own examples: the epoch's order of mega-batches is the permutation's
    mega = G * GROUP
    assert set(grouped[:mega].tolist()) == set(order[:mega].tolist())


def test_world_sizes_accumulation_and_restarts_see_the_same_batches():
    common = dict(seed=5, epoch=1, lengths=LENGTHS, group=GROUP)

    def steps(micro, accum, world, start=0):
        per_rank = [
            list(
                train_index_batches(
                    N, micro_batch=micro, grad_accum=accum, rank=r, world=world, start_step=start, **common
                )
            )
            for r in range(world)
        ]
        out = []
        for step in range(len(per_rank[0]) // accum):
            parts = [per_rank[r][step * accum + k] for k in range(accum) for r in range(world)]
            # the global batch of this step, in the arithmetic's order (k outer, rank inner)
            out.append(sorted(torch.cat(parts).tolist()))
        return out

    one = steps(G, 1, 1)
    assert one == steps(G // 2, 1, 2) == steps(G // 4, 2, 2)
    assert steps(G, 1, 1, start=7) == one[7:]
