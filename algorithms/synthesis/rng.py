"""The seeding rule: every synthesis draw derives from (seed, epoch, sample index)."""

from __future__ import annotations

import numpy as np


def rng_for(seed: int, epoch: int, index: int) -> np.random.Generator:
    """A generator owned by one (seed, epoch, index) triple.

    The stream does not depend on the order in which samples are drawn, on the number of
    DataLoader workers, or on any global state, so a run repeats exactly. All three values
    must be non-negative integers.
    """
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), int(index)])))
