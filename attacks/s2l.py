"""The S2L attack's own logic: who is attacked and how one model's leakage is measured.

Li et al., "Shake to Leak" (SaTML 2024). For each private domain the attacker
measures the pre-trained model (membership inference on the domain's members
against its held-out non-members; extraction from the domain's prompt), shakes
the model on the domain's SP set (`attacks/sp_set.py`, `attacks/finetune/`) and
measures it again. The runner (`s2l_guard/runner/`) plans, caches and summarises
those measurements; this module only says what one measurement is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from s2l_guard.config import ExtractionConfig
from s2l_guard.data import ImageDataset
from s2l_guard.errors import DataError
from s2l_guard.provider import Provider

from .base import MembershipInference
from .extraction import CandidateDistances, candidate_distances, count_at


@dataclass
class Domain:
    """One private domain: its prompt, members and held-out non-members."""

    name: str
    prompt: str
    members: ImageDataset
    nonmembers: ImageDataset
    member_index: list[int]  # positions of the members in the training set (for extraction)


@dataclass
class TrainingSet:
    """The distinct pre-training images and how often each was seen (extraction's reference)."""

    images: torch.Tensor
    copies: list[int]
    files: list[str]


def split_domains(dataset: ImageDataset, names: tuple[str, ...]) -> tuple[list[Domain], TrainingSet]:
    trained = dataset.distinct_training()
    training = TrainingSet(trained.images, [r.copies for r in trained.records], [r.file_name for r in trained.records])
    position = {r.file_name: k for k, r in enumerate(trained.records)}
    private = sorted({r.domain for r in dataset.records if r.membership == "member"})
    unknown = [name for name in names if name not in private]
    if unknown:
        raise DataError(f"[attack] domains names {unknown}, which have no members in the data set; its private domains are {private}")
    domains = []
    for name in names or private:
        members = dataset.select(membership="member", domain=name)
        nonmembers = dataset.select(membership="nonmember", domain=name)
        if len(nonmembers) == 0:
            raise DataError(f"domain {name} has no held-out non-members; membership inference needs some: add rows with membership 'nonmember'")
        index = [position[r.file_name] for r in members.records]
        domains.append(Domain(name, dataset.domain_caption(name), members, nonmembers, index))
    return domains, training


def measure(provider: Provider, domain: Domain, prompt: str, training: TrainingSet, mias: dict[str, MembershipInference],
            e: ExtractionConfig, seed: int) -> dict:  # fmt: skip
    """Raw leakage of one model on one domain: per-sample scores of each MIA in ``mias`` and
    each candidate's distances to the training images (extraction).

    Membership inference needs the weights (open-weights only); extraction uses generations,
    and a candidate the provider withholds counts as no hit (its position keeps the pairing).
    """
    out: dict[str, Any] = {"prompt": prompt, "mia": {}}
    captions = lambda part: [r.text.replace(domain.prompt, prompt) for r in part.records]  # noqa: E731
    for name, attack in mias.items():
        score = lambda part: attack.score(provider.weights(), part.images, captions(part), seed=seed).tolist()  # noqa: E731
        out["mia"][name] = {"members": score(domain.members), "nonmembers": score(domain.nonmembers)}
    generated = provider.generate([prompt] * e.candidates, steps=e.sampler_steps, guidance_scale=e.guidance_scale, seed=seed, batch_size=e.batch_size)
    served = generated.served.numpy()
    d = candidate_distances(generated.images, training.images, training.copies, domain.member_index, e, domain.nonmembers.images)
    # Distances, not matches: the counting radius (delta) is applied when the cell is read
    # (extraction_at), so a change of delta needs no new generations.
    rounded = lambda x: np.round(np.asarray(x, dtype=float), 5).tolist()  # noqa: E731
    out["extraction"] = {
        "served": served.tolist(),  # a generate API may withhold candidates; the others are listed in order
        "member_ids": d.member_ids, "member_distances": rounded(d.member_distances),
        "nonmember_distances": rounded(d.nonmember_distances), "null_weight": len(domain.members) / len(domain.nonmembers),
        "nearest_index": d.nearest_index.tolist(), "nearest_distance": rounded(d.nearest_distance),
        "nearest_eligible": d.nearest_eligible.tolist(), "flagged": d.flagged.tolist(),
    }  # fmt: skip
    return out


def extraction_at(raw: dict, delta: float, files: list[str]) -> dict:
    """A cell's extraction counted at ``delta``: per requested candidate the members (``hits``) and
    held-out non-members (``null_hits``) within delta, and the summary the tables print."""
    served = np.asarray(raw["served"], dtype=bool)
    d = CandidateDistances(raw["member_ids"], np.asarray(raw["member_distances"]).reshape(int(served.sum()), -1),
                           np.asarray(raw["nonmember_distances"]).reshape(int(served.sum()), -1), np.asarray(raw["nearest_index"]),
                           np.asarray(raw["nearest_distance"]), np.asarray(raw["nearest_eligible"], dtype=bool), np.asarray(raw["flagged"], dtype=bool))  # fmt: skip
    result = count_at(d, delta)
    withheld = int((~served).sum())
    return {
        "hits": _spread(result.matches, served, []),  # every domain member within delta: what "extracted" counts
        "null_hits": _spread(result.null_matches, served, []),  # the domain's held-out non-members within delta
        "null_weight": raw["null_weight"],
        "any_hits": _spread(result.any_hits, served, -1),
        "flagged": _spread(result.flagged, served, False),
        "nearest_distance": _spread(result.nearest_distance, served, None),
        "withheld": withheld,
        "extracted": [files[i] for i in result.extracted],
        "summary": dict(result.to_dict(), candidates=len(served), withheld=withheld, delta=delta),
    }


def _spread(values: np.ndarray | list, served: np.ndarray, missing: Any) -> list:
    """Per requested candidate: the served candidates' values in order, ``missing`` where withheld."""
    out = [missing] * len(served)
    for position, value in zip(np.flatnonzero(served), values.tolist() if isinstance(values, np.ndarray) else values):
        out[position] = value
    return out
