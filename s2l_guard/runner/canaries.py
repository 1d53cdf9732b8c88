"""A one-run privacy audit with canaries (Steinke, Nasr and Jagielski, NeurIPS 2023).

``canaries`` canaries are each put in a DP defense's training data with probability 1/2,
independently, and the defense trains once, as it would for release. Every canary is scored; the
auditor guesses "in" for the best-scoring (and, with canary images, "out" for as many of the
worst-scoring) and abstains on the rest. Under (epsilon, delta)-DP the number of correct guesses v
of r is no more likely than under randomized response with accuracy e^eps / (1 + e^eps), plus a
delta term (the paper's Theorem 3.1 and its p-value), so the largest epsilon at which v correct
guesses still have a p-value below 1 - confidence is a lower bound on the run's epsilon, with that
confidence. A bound above the epsilon a run claims means the run does not give the privacy it
claims: the check the accountant's number cannot do on itself (opacus issue 820: DP-LoRA silently
training without the promised privacy).

Two kinds of canary:

* ``gradient`` (the default): Dirac gradient canaries inside the DP optimizer, scored on its
  privatized gradients (:mod:`s2l_guard.gradient_canaries`). White-box and the strongest: with the
  noise off they separate perfectly on any model.
* ``image``: random black-and-white patterns, unlike any digit, each with its own caption, scored
  by how much training lowered their denoising loss on the released model. Black-box, and only as
  strong as the model's memorization of them (on the smoke model, too weak to catch a run without
  noise: docs/defenses.md).

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
GRADIENT_METHOD = ("one-run audit (Steinke, Nasr and Jagielski 2023) with Dirac gradient canaries: each in the data set with "
                   "probability 1/2, scored by the summed privatized gradient in its coordinate")  # fmt: skip
IMAGE_METHOD = ("one-run audit (Steinke, Nasr and Jagielski 2023) with canary images: each trained on with probability 1/2, "
                "scored by how much training lowered its denoising loss")  # fmt: skip


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


SIDES = ("both", "in")


def check_counts(canaries: int, guesses: int, sides: str = "both") -> None:
    if sides not in SIDES:
        raise SettingsError(f"guess sides {sides!r} is unknown; use one of {', '.join(SIDES)}")
    if sides == "both" and (guesses < 2 or guesses % 2 or guesses > canaries):
        raise SettingsError(
            f"guesses = {guesses} must be even, at least 2 and at most the {canaries} canaries; e.g. --guesses {max(2, canaries // 2 // 2 * 2)}"
        )
    if sides == "in" and not 1 <= guesses <= canaries:
        raise SettingsError(f"guesses = {guesses} must be at least 1 and at most the {canaries} canaries; e.g. --guesses {max(1, canaries // 5)}")


def one_run_bound(scores, included, *, guesses: int, delta: float, confidence: float = 0.95, sides: str = "both") -> dict:
    """Guess "in" for the top ``guesses // 2`` scores and "out" for the bottom ``guesses // 2``
    (higher = more likely trained on), count the right guesses, and bound epsilon from below.

    ``sides = "in"``: guess "in" for the top ``guesses`` only. For canaries joining batches by
    Poisson sampling, whose included ones may never be drawn: those leave no trace, so they sit
    among the lowest scores and spoil "out" guesses, while the top scores stay informative.
    """
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    check_counts(m, guesses, sides)
    if len(included) != m:
        raise SettingsError(f"{m} scores but {len(included)} inclusion bits; give one per canary")
    order = np.argsort(-scores, kind="stable")
    if sides == "both":
        half = guesses // 2
        right = int(included[order[:half]].sum() + (~included[order[-half:]]).sum())
    else:
        right = int(included[order[:guesses]].sum())
    return {
        "epsilon": epsilon_from_guesses(m, guesses, right, delta=delta, confidence=confidence),
        "canaries": m,
        "included": int(included.sum()),
        "guesses": guesses,
        "sides": sides,
        "correct": right,
        "delta": delta,
        "confidence": confidence,
        "method": "one-run audit (Steinke, Nasr and Jagielski 2023): canaries each in the data set with probability 1/2; "
        + ("the top and bottom halves of the guesses judged" if sides == "both" else "the top scores guessed in")
        + ", the rest abstained",
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
    import opacus.optimizers.optimizer_fast_gradient_clipping as ghost_optimizer  # imports the function by name

    modules = (dp_optimizer, ghost_optimizer)
    originals = [module._generate_noise for module in modules]
    for module in modules:
        module._generate_noise = lambda std, reference, **kwargs: torch.zeros_like(reference)
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module._generate_noise = original


KINDS = ("gradient", "image")
DEFAULT_COUNTS = {"gradient": (200, 80), "image": (200, 100)}  # (canaries, guesses) per kind


def audit_defense(config: Config, *, kind: str = "gradient", canaries: int | None = None, guesses: int | None = None,
                  confidence: float = 0.95, broken: bool = False) -> dict:  # fmt: skip
    """Train ``config``'s DP defense once with canaries and bound its epsilon from below.

    ``kind``: ``"gradient"``, Dirac gradient canaries added to the DP optimizer's clipped sum and
    scored on its privatized gradients (:mod:`s2l_guard.gradient_canaries`: white-box, the
    strongest); ``"image"``, canary images added to the training data and scored by the loss
    attack on the released model (black-box: weaker, it needs a model that memorizes them).
    ``broken``: the positive control, the same run with the noise switched off (the claim unchanged).
    """
    from defenses.base import DEFENSES
    from s2l_guard import gradient_canaries
    from s2l_guard.cache import Store
    from s2l_guard.data import load_imagefolder
    from s2l_guard.runtime import log, resolve_device

    from .plan import derive_seed
    from .settings import defense_settings
    from .stages import defense_context, fresh_bundle, testbed_stage

    if kind not in KINDS:
        raise SettingsError(f"canary kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    canaries = canaries or DEFAULT_COUNTS[kind][0]
    guesses = guesses or DEFAULT_COUNTS[kind][1]
    sides = "in" if kind == "gradient" else "both"
    check_counts(canaries, guesses, sides)
    if kind == "image":
        canary_captions(canaries)  # at most 676 have a caption of their own
    name = config.defense.name
    defense = DEFENSES.get(name)(defense_settings(config, name))
    claimed = getattr(defense.settings, "target_epsilon", None)
    if claimed is None:
        raise SettingsError(f"defense {name} claims no epsilon to audit; use dp_sgd or private_finetune ([defense] name)")
    seed = derive_seed(config.run.seed, "canaries")
    dataset = load_imagefolder(testbed_stage(Store(config.run.store), config).path)
    included = np.random.default_rng(seed).random(canaries) < 0.5
    device = resolve_device(config.run.device)
    start = time.perf_counter()
    log(f"audit: training {name} once with {int(included.sum())} of {canaries} {kind} canaries{' and the noise switched off' if broken else ''}")
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="s2l-audit-")))
        if broken:
            stack.enter_context(noise_switched_off())
        if kind == "gradient":
            recorder = stack.enter_context(gradient_canaries.recording(included, seed))
            training_set = dataset
        else:
            patterns = canary_images(canaries, tuple(dataset.images.shape[1:]), seed)
            training_set = with_canaries(dataset, patterns, included)
        bundle, summary = defense.pretrain(defense_context(config, training_set, device, workdir, store=Store(config.run.store)))
    if kind == "gradient":
        scores, how = recorder.scores, GRADIENT_METHOD
    else:
        untrained = fresh_bundle(config, dataset, device).eval()
        scores = canary_scores(bundle.eval(), untrained, patterns.to(device), seed=seed, timesteps=config.model.num_train_timesteps)
        how = IMAGE_METHOD
    privacy = summary.get("privacy", {})
    result = one_run_bound(scores, included, guesses=guesses, delta=privacy.get("delta", 1e-5), confidence=confidence, sides=sides)
    return result | {"defense": name, "kind": kind, "method": how, "claimed_epsilon": claimed, "broken": broken,
                     "caught": result["epsilon"] > claimed, "noise_multiplier": privacy.get("noise_multiplier"),
                     "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def format_audit(result: dict) -> str:
    verdict = "CAUGHT: the run leaks more than it claims" if result["caught"] else "consistent with the claim"
    return (f"{result['defense']}{' (noise switched off)' if result['broken'] else ''}: claimed epsilon {result['claimed_epsilon']:g}; "
            f"one-run audit ({result['kind']} canaries) lower bound {result['epsilon']:.2f} at {result['confidence']:.0%} confidence "
            f"({result['correct']} of {result['guesses']} guesses right, {result['canaries']} canaries, {result['included']} trained on, "
            f"delta {result['delta']:.2g}) - {verdict}")  # fmt: skip


__all__ = ["audit_defense", "canary_images", "epsilon_from_guesses", "format_audit", "noise_switched_off", "one_run_bound", "p_value"]
