"""Data extraction: generate candidates for a domain prompt and match them to training images.

Carlini et al., "Extracting Training Data from Diffusion Models" (USENIX
Security 2023, sec. 4). A training image x is *extracted* when a generation
x_hat satisfies l(x, x_hat) <= delta, and (k, l, delta)-*eidetic* memorization
additionally requires x to appear at most k times in training. l is the tiled
normalized L2 distance (``s2l_guard.metrics.tiled_l2``); S2L uses (10, l2, 0.1).

Two views are reported:

* **Oracle extraction** (needs the training set, i.e. the auditor's view): the
  distinct training images of the domain that some candidate lies within delta of
  (every image within delta of a candidate counts, not only its nearest).
* **The null**: the same count against the domain's held-out non-members. Small
  images lie within delta of one another by chance, so a model that draws new,
  realistic images "extracts" some members without memorizing them; extraction
  above chance is members minus non-members matched by the same candidates.
* **The attacker's flagging** (needs no training data): Carlini et al. flag a
  generation when many generations of the same prompt are near-duplicates of
  it (their clique test). Precision is the share of flagged candidates that
  really lie within delta of a training image.

Tile grid: Carlini et al. use a 4x4 grid on 512x512 images (128-pixel tiles),
so a generation that copies only part of an image (a background) does not
count as a match of the whole. ``grid = 0`` (auto) keeps tiles near that size:
``clamp(size // 128, 1, 4)``. On the 8x8 testbed that is one tile: a 2x2-pixel
tile would let a single stroke pixel decide the maximum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from s2l_guard.config import ExtractionConfig
from s2l_guard.errors import InputError
from s2l_guard.metrics import distance_chunks, pairwise


def auto_grid(size: int) -> int:
    return int(min(4, max(1, size // 128)))


@dataclass
class ExtractionResult:
    """One domain's extraction outcome.

    ``matches[i]`` lists *every* domain member candidate i lies within delta of (eidetic: seen at
    most k times), as Carlini et al. count them - not only its nearest training image.
    ``null_matches[i]`` lists the domain's held-out non-members it lies within delta of: what a
    model that draws new, realistic images "extracts" by chance, counted the same way.
    ``any_hits[i]`` is the nearest training image of any domain if it lies within delta, else -1
    (a generation of the domain's prompt that copies a public image is an extraction too).
    """

    candidates: int
    matches: list[list[int]]
    null_matches: list[list[int]]
    any_hits: np.ndarray
    flagged: np.ndarray
    nearest_distance: np.ndarray
    extracted: list[int] = field(default_factory=list)  # distinct domain members extracted (training indices)

    @property
    def matched_candidates(self) -> int:
        return sum(1 for m in self.matches if m)

    @property
    def nonmembers_matched(self) -> int:
        return len({i for m in self.null_matches for i in m})

    @property
    def precision(self) -> float | None:
        """Share of flagged candidates that really copy a training image; None when nothing was flagged."""
        if not self.flagged.any():
            return None
        return float((self.any_hits[self.flagged] >= 0).mean())

    def to_dict(self) -> dict:
        return {
            "candidates": self.candidates,
            "extracted_images": len(self.extracted),
            "nonmembers_matched": self.nonmembers_matched,
            "matched_candidates": self.matched_candidates,
            "matched_any_training_image": int((self.any_hits >= 0).sum()),
            "flagged_candidates": int(self.flagged.sum()),
            "precision": self.precision,
            "nearest_distance_median": float(np.median(self.nearest_distance)) if len(self.nearest_distance) else None,
        }


@dataclass
class CandidateDistances:
    """What extraction needs from one set of candidates, at any radius: each candidate's distance
    to every eligible domain member (seen at most k times) and to every held-out non-member, its
    nearest training image of any domain, and the attacker's flag. Counting at a radius is then
    :func:`count_at` - cheap, so a change of delta needs no new generations."""

    member_ids: list[int]  # training indices of the domain's eligible members (columns of member_distances)
    member_distances: np.ndarray  # [candidates, members]
    nonmember_distances: np.ndarray  # [candidates, non-members]
    nearest_index: np.ndarray  # [candidates] nearest training image of any domain
    nearest_distance: np.ndarray
    nearest_eligible: np.ndarray  # bool: that image was seen at most k times
    flagged: np.ndarray


def candidate_distances(
    candidates: torch.Tensor,
    training_images: torch.Tensor,
    training_copies: Sequence[int],
    domain_members: Sequence[int],
    settings: ExtractionConfig,
    nonmembers: torch.Tensor | None = None,
) -> CandidateDistances:
    """Distances from candidates to the training set, the domain's members and its non-members.

    Args:
        candidates: generations ``[N, C, H, W]`` in [0, 1].
        training_images: every pre-training image ``[M, C, H, W]`` (each distinct image once).
        training_copies: how often each training image appears in pre-training.
        domain_members: indices (into ``training_images``) of the domain's members.
        nonmembers: the domain's held-out images ``[K, C, H, W]``, never trained on: the null.
    """
    grid = settings.grid or auto_grid(candidates.shape[-1])
    if len(training_images) == 0:
        raise InputError("no training images to match candidates against")
    copies = torch.as_tensor(np.asarray(training_copies))
    members = torch.as_tensor(np.asarray(domain_members, dtype=np.int64))
    eligible = members[copies[members] <= settings.max_copies] if len(members) else members
    # One pass over the training set gives each candidate's nearest image and its distances to
    # the domain's members (a subset of the columns), chunk by chunk.
    distance, index, to_members = [torch.empty(0)], [torch.empty(0, dtype=torch.long)], [torch.empty(0, len(eligible))]
    for d in distance_chunks(candidates, training_images, grid=grid, chunk=settings.chunk):
        best = d.min(1)
        distance.append(best.values)
        index.append(best.indices)
        to_members.append(d[:, eligible])
    distance, index, to_members = torch.cat(distance), torch.cat(index), torch.cat(to_members).numpy()
    empty = np.zeros((len(candidates), 0))
    has_null = nonmembers is not None and len(nonmembers)
    to_nonmembers = pairwise(candidates, nonmembers, grid=grid, chunk=settings.chunk).numpy() if has_null else empty
    return CandidateDistances(eligible.tolist(), to_members, to_nonmembers, index.numpy(), distance.numpy(),
                              (copies[index] <= settings.max_copies).numpy(), flag_near_duplicates(candidates, settings, grid))  # fmt: skip


def count_at(d: CandidateDistances, delta: float) -> ExtractionResult:
    """Every eligible member and every non-member within ``delta`` of each candidate."""
    matches = [[d.member_ids[j] for j in np.flatnonzero(row <= delta)] for row in d.member_distances]
    null = [np.flatnonzero(row <= delta).tolist() for row in d.nonmember_distances]
    any_hits = np.where((d.nearest_distance <= delta) & d.nearest_eligible, d.nearest_index, -1)
    extracted = sorted({i for m in matches for i in m})
    return ExtractionResult(len(matches), matches, null, any_hits, d.flagged, d.nearest_distance, extracted)


def match_candidates(
    candidates: torch.Tensor,
    training_images: torch.Tensor,
    training_copies: Sequence[int],
    domain_members: Sequence[int],
    settings: ExtractionConfig,
    nonmembers: torch.Tensor | None = None,
) -> ExtractionResult:
    """Match candidates against the whole training set and count eidetic extractions of the domain
    at ``settings.delta`` (:func:`candidate_distances`, then :func:`count_at`)."""
    return count_at(candidate_distances(candidates, training_images, training_copies, domain_members, settings, nonmembers), settings.delta)


def flag_near_duplicates(candidates: torch.Tensor, settings: ExtractionConfig, grid: int) -> np.ndarray:
    """The attacker's flag: candidates with at least ``flag_neighbours`` near-duplicate generations."""
    chunks = distance_chunks(candidates, candidates, grid=grid, chunk=settings.chunk)
    counts = torch.cat([torch.zeros(0, dtype=torch.long)] + [(d <= settings.flag_delta).sum(1) - 1 for d in chunks])  # minus itself
    return (counts >= settings.flag_neighbours).numpy()
