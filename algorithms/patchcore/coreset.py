"""PatchCore's k-center-greedy coreset, without a temporary per selected point.

anomalib's ``KCenterGreedy`` allocates a new N x d difference tensor and an N x 1
distance tensor for every selected point. On glibc that pattern either fragments the
heap (with the default dynamic mmap threshold the resident set grew by GBs in some
fits) or, with a fixed threshold, maps and faults in every temporary afresh (6x slower:
13.6 s instead of 2.2 s for 1,279 of 25,600 points, 8 million page faults). This loop
runs the same operations in the same order into buffers allocated once, so it selects
the same indices bit for bit (``tests/test_anomalib_algos.py`` checks it against
anomalib) and allocates nothing per iteration.
"""

from __future__ import annotations

import torch


def k_center_greedy(features: torch.Tensor, n_select: int) -> list[int]:
    """Indices of ``n_select`` points chosen greedily, each the farthest from those chosen so far.

    The first point is ``torch.randint(high=len(features))`` from the global generator, as in
    anomalib; a point's distance is the Euclidean norm to its nearest chosen point.
    """
    n = features.shape[0]
    idx = torch.randint(high=n, size=(1,), device=features.device).squeeze()
    chosen = [idx]
    diff = torch.empty_like(features)
    dist = torch.empty((n, 1), dtype=features.dtype, device=features.device)
    nearest: torch.Tensor | None = None
    for _ in range(n_select - 1):
        torch.sub(features, features[idx].squeeze(), out=diff)
        torch.linalg.vector_norm(diff, ord=2, dim=1, keepdim=True, out=dist)
        if nearest is None:
            nearest = dist.clone()
        else:
            torch.minimum(nearest, dist, out=nearest)
        idx = torch.max(nearest.squeeze(1), dim=0).indices
        nearest.scatter_(0, idx.reshape(1, 1), 0.0)
        chosen.append(idx)
    return torch.stack(chosen).cpu().tolist()


def coreset(embedding: torch.Tensor, sampling_ratio: float) -> torch.Tensor:
    """The rows of ``embedding`` that anomalib's ``KCenterGreedy(embedding, sampling_ratio)``
    selects: a sparse random projection (anomalib's, eps 0.9), then :func:`k_center_greedy`."""
    from anomalib.models.components.dimensionality_reduction import SparseRandomProjection

    n_select = int(embedding.shape[0] * sampling_ratio)
    if n_select <= 0:
        raise ValueError(f"coreset_sampling_ratio {sampling_ratio} keeps no patch of {embedding.shape[0]}; "
                         "raise it or use more training images")
    if embedding.ndim == 2:
        projection = SparseRandomProjection(eps=0.9)
        projection.fit(embedding)
        features = projection.transform(embedding)
    else:
        features = embedding.reshape(embedding.shape[0], -1)
    return embedding[k_center_greedy(features, n_select)]
