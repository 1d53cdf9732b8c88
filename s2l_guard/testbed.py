"""The embedded testbed: scikit-learn's handwritten digits as a private/public data set.

Each digit class is a *domain*. A private domain plays the part of a
celebrity in web data: a few tens of distinct member images, some of them
duplicated ``copies`` times, plus as many held-out non-members of the same
domain that pre-training never sees. Public domains are trained on in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import TestbedConfig
from .data import Record, write_imagefolder
from .errors import DataError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def domain_name(digit: int) -> str:
    return f"digit{digit}"


@dataclass(frozen=True)
class Assignment:
    """Where one digits image goes: its source index, domain, membership and copies."""

    index: int
    digit: int
    membership: str
    copies: int


def split_digits(labels: np.ndarray, config: TestbedConfig, seed: int) -> list[Assignment]:
    """Assign images to members, held-out non-members and public data. Pure and seeded.

    Each domain draws from its own generator seeded with ``(seed, digit)``, so
    adding a domain does not reshuffle the others.

    Raises:
        DataError: when a class has fewer images than the split asks for.
    """
    out: list[Assignment] = []
    for digit in config.private_domains:
        pool = _shuffled(labels, digit, seed)
        need = config.members_per_domain + config.nonmembers_per_domain
        if len(pool) < need:
            raise DataError(f"digit {digit} has {len(pool)} images but members_per_domain + nonmembers_per_domain = {need}; lower them in [testbed]")
        duplicated = round(config.duplicated_share * config.members_per_domain)
        for rank, index in enumerate(pool[: config.members_per_domain]):
            out.append(Assignment(int(index), digit, "member", config.copies if rank < duplicated else 1))
        for index in pool[config.members_per_domain : need]:
            out.append(Assignment(int(index), digit, "nonmember", 0))
    for digit in config.public_domains:
        pool = _shuffled(labels, digit, seed)
        take = len(pool) if config.public_per_domain == 0 else config.public_per_domain
        if take > len(pool):
            raise DataError(f"digit {digit} has {len(pool)} images, fewer than public_per_domain = {take}; lower it")
        out.extend(Assignment(int(index), digit, "public", 1) for index in pool[:take])
    return out


def _shuffled(labels: np.ndarray, digit: int, seed: int) -> np.ndarray:
    pool = np.flatnonzero(labels == digit)
    return np.random.default_rng([seed, digit]).permutation(pool)


def build_testbed(folder: str | Path, config: TestbedConfig, seed: int) -> Path:
    """Write the digits testbed as an imagefolder data set (8x8 grey PNGs)."""
    from sklearn.datasets import load_digits  # ships inside scikit-learn: no download

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    plan = split_digits(digits.target, config, seed)
    records = [
        Record(
            file_name=f"{a.membership}/{domain_name(a.digit)}-{a.index:04d}.png",
            text=config.caption.format(name=DIGIT_NAMES[a.digit]),
            domain=domain_name(a.digit),
            membership=a.membership,
            copies=a.copies,
        )
        for a in plan
    ]
    return write_imagefolder(folder, images[[a.index for a in plan]], records)


def unused_digits(config: TestbedConfig, seed: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The digits images the testbed leaves out: real images no stage ever trains or attacks on.

    They stand in for what a provider keeps to calibrate its own filters (benign
    users' fine-tuning data). Returns ``[N, 1, 8, 8]`` float images in [0, 1] quantised
    like the testbed's PNGs, their domain captions and their digits.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    used = {a.index for a in split_digits(digits.target, config, seed)}
    left = np.array([i for i in range(len(digits.target)) if i not in used], dtype=np.int64)
    images = np.rint(digits.images[left] * (255.0 / 16.0)) / 255.0
    labels = digits.target[left]
    captions = [config.caption.format(name=DIGIT_NAMES[d]) for d in labels]
    return images[:, None].astype(np.float32), captions, labels
