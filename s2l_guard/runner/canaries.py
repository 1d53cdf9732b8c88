"""A one-run privacy audit with canaries (Steinke, Nasr and Jagielski, NeurIPS 2023).

``canaries`` images - random black-and-white patterns, unlike any digit, so a model that
memorizes one can tell it from the rest - are each added to a DP defense's training data with
probability 1/2, independently, and the defense trains once, as it would for release. The loss
attack then scores every canary (by how much training lowered its loss); the auditor guesses "in" for the ``guesses / 2`` best-scoring,
"out" for the ``guesses / 2`` worst-scoring, and abstains on the rest. Under (epsilon, delta)-DP
the number of correct guesses v of r is no more likely than under randomized response with
accuracy e^eps / (1 + e^eps), plus a delta term (the paper's Theorem 3.1 and its p-value), so
the largest epsilon at which v correct guesses still have a p-value below 1 - confidence is a
lower bound on the run's epsilon, with that confidence. A bound above the epsilon a run claims
means the run does not give the privacy it claims: the check the accountant's number cannot do
on itself (opacus issue 820: DP-LoRA silently training without the promised privacy).

One run audits weakly: with every guess right the bound reaches only about log(r / 3), so a
claim is testable up to that size (r = 100 guesses: about 3.5).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binom

from s2l_guard.config import Config
from s2l_guard.data import ImageDataset, Record
from s2l_guard.errors import SettingsError

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def canary_captions(count: int) -> list[str]:
    """A two-letter code per canary ("aa", "ab", ...): two byte tokens each, so even the testbed's
    8-token prompts hold it, and a model that memorizes a canary ties it to its own prompt."""
    if count > len(LETTERS) ** 2:
        raise SettingsError(f"at most {len(LETTERS) ** 2} canaries have their own two-letter caption, got {count}")
    return [LETTERS[i // len(LETTERS)] + LETTERS[i % len(LETTERS)] for i in range(count)]


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses right] for an (epsilon, delta)-DP run with m canaries: the
    randomized-response tail, plus delta times 2m times the largest tail slope below v."""
    q = 1.0 / (1.0 + math.exp(-epsilon))  # randomized response's accuracy at epsilon
    tail = binom.sf(v - 1, r, q)
    below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))  # P[v - i <= X < v] for i = 1..v
    slope = float(np.max(below / np.arange(1, v + 1))) if v > 0 else 0.0
    return min(1.0, float(tail) + slope * delta * 2 * m)


def epsilon_from_guesses(m: int, r: int, v: int, *, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon whose p-value for v correct of r guesses is below 1 - confidence (0 if none)."""
    if not 0 <= v <= r <= m:
        raise SettingsError(f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")
    level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:
        low, high = high, 2 * high
    for _ in range(40):  # bisection to well below the printed precision
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(m, r, v, middle, delta) < level else (low, middle)
    return low


def check_counts(canaries: int, guesses: int) -> None:
    if guesses < 2 or guesses % 2 or guesses > canaries:
        raise SettingsError(
            f"guesses = {guesses} must be even, at least 2 and at most the {canaries} canaries; e.g. --guesses {max(2, canaries // 2 // 2 * 2)}"
        )


def one_run_bound(scores, included, *, guesses: int, delta: float, confidence: float = 0.95) -> dict:
    """Guess "in" for the top ``guesses // 2`` scores and "out" for the bottom ``guesses // 2``
    (higher = more likely trained on), count the right guesses, and bound epsilon from below."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m, half = len(scores), guesses // 2
    check_counts(m, guesses)
    if len(included) != m:
        raise SettingsError(f"{m} scores but {len(included)} inclusion bits; give one per canary")
    order = np.argsort(-scores, kind="stable")
    right = int(included[order[:half]].sum() + (~included[order[-half:]]).sum())
    return {
        "epsilon": epsilon_from_guesses(m, 2 * half, right, delta=delta, confidence=confidence),
        "canaries": m,
        "included": int(included.sum()),
        "guesses": 2 * half,
        "correct": right,
        "delta": delta,
        "confidence": confidence,
        "method": "one-run audit (Steinke, Nasr and Jagielski 2023): canaries each trained on with probability 1/2, "
        "scored by how much training lowered their loss; the top and bottom halves of the guesses judged, the rest abstained",
    }


def canary_scores(trained, untrained, patterns: torch.Tensor, *, seed: int, timesteps: int = 1000) -> np.ndarray:
    """How much training lowered each canary's denoising loss under its own caption: the loss
    attack on the trained model minus the same attack (same noise) on the untrained one, so that a
    pattern that is merely easy to denoise does not pass for a memorized one. At 2%, 10% and 20%
    of the ``timesteps`` of the noise schedule, 8 noise draws each: on the smoke model this
    separated the canaries of a run without noise best among the single timesteps and the raw
    loss (docs/defenses.md)."""
    from attacks.base import MIA

    loss = MIA.get("loss")
    attack = loss(loss.Settings(timesteps=tuple(timesteps * share // 100 for share in (2, 10, 20)), draws=8))
    captions = canary_captions(len(patterns))
    return attack.score(trained, patterns, captions, seed=seed) - attack.score(untrained, patterns, captions, seed=seed)


def canary_images(count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """``count`` random black-and-white patterns of ``shape`` (C, H, W), values 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand((count, *shape), generator=generator) < 0.5).float()


def with_canaries(dataset: ImageDataset, patterns: torch.Tensor, included: np.ndarray) -> ImageDataset:
    """The data set plus the included canaries, as members seen once each (their own caption)."""
    captions = canary_captions(len(patterns))
    records = [Record(f"canary-{i}.png", captions[i], "canary", "member", 1) for i in np.flatnonzero(included)]
    return ImageDataset(dataset.records + records, torch.cat([dataset.images, patterns[torch.from_numpy(included)]]))


@contextlib.contextmanager
def noise_switched_off() -> Iterator[None]:
    """The broken-DP positive control: opacus' optimizer adds zero noise while the accountant, and
    so the claim, stay as they were - the failure an audit exists to catch."""
    import opacus.optimizers.optimizer as dp_optimizer

    original = dp_optimizer._generate_noise
    dp_optimizer._generate_noise = lambda std, reference, **kwargs: torch.zeros_like(reference)
    try:
        yield
    finally:
        dp_optimizer._generate_noise = original


def audit_defense(config: Config, *, canaries: int = 200, guesses: int = 100, confidence: float = 0.95, broken: bool = False) -> dict:
    """Train ``config``'s DP defense once with canaries and bound its epsilon from below.

    ``broken``: the positive control, the same run with the noise switched off (the claim unchanged).
    """
    from defenses.base import DEFENSES
    from s2l_guard.cache import Store
    from s2l_guard.data import load_imagefolder
    from s2l_guard.runtime import log, resolve_device

    from .plan import derive_seed
    from .settings import defense_settings
    from .stages import defense_context, fresh_bundle, testbed_stage

    check_counts(canaries, guesses)
    canary_captions(canaries)  # at most 676 have a caption of their own
    name = config.defense.name
    defense = DEFENSES.get(name)(defense_settings(config, name))
    claimed = getattr(defense.settings, "target_epsilon", None)
    if claimed is None:
        raise SettingsError(f"defense {name} claims no epsilon to audit; use dp_sgd or private_finetune ([defense] name)")
    seed = derive_seed(config.run.seed, "canaries")
    dataset = load_imagefolder(testbed_stage(Store(config.run.store), config).path)
    patterns = canary_images(canaries, tuple(dataset.images.shape[1:]), seed)
    included = np.random.default_rng(seed).random(canaries) < 0.5
    device = resolve_device(config.run.device)
    start = time.perf_counter()
    log(f"audit: training {name} once with {int(included.sum())} of {canaries} canaries{' and the noise switched off' if broken else ''}")
    with tempfile.TemporaryDirectory(prefix="s2l-audit-") as workdir, noise_switched_off() if broken else contextlib.nullcontext():
        bundle, summary = defense.pretrain(defense_context(config, with_canaries(dataset, patterns, included), device, Path(workdir)))
    untrained = fresh_bundle(config, dataset, device).eval()
    scores = canary_scores(bundle.eval(), untrained, patterns.to(device), seed=seed, timesteps=config.model.num_train_timesteps)
    privacy = summary.get("privacy", {})
    result = one_run_bound(scores, included, guesses=guesses, delta=privacy.get("delta", 1e-5), confidence=confidence)
    return result | {"defense": name, "claimed_epsilon": claimed, "broken": broken, "caught": result["epsilon"] > claimed,
                     "noise_multiplier": privacy.get("noise_multiplier"), "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def format_audit(result: dict) -> str:
    verdict = "CAUGHT: the run leaks more than it claims" if result["caught"] else "consistent with the claim"
    return (f"{result['defense']}{' (noise switched off)' if result['broken'] else ''}: claimed epsilon {result['claimed_epsilon']:g}; "
            f"one-run audit lower bound {result['epsilon']:.2f} at {result['confidence']:.0%} confidence "
            f"({result['correct']} of {result['guesses']} guesses right, {result['canaries']} canaries, {result['included']} trained on, "
            f"delta {result['delta']:.2g}) - {verdict}")  # fmt: skip


__all__ = ["audit_defense", "canary_images", "epsilon_from_guesses", "format_audit", "noise_switched_off", "one_run_bound", "p_value"]
