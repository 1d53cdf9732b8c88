"""Dirac gradient canaries: the white-box one-run audit of DP-SGD.

A gradient canary is an example whose gradient is ``C`` (the clipping bound) in one coordinate of
the trained parameters and zero in every other: the example DP-SGD finds hardest to hide, since
nothing else need push that coordinate the same way (the "Dirac canary" of Nasr et al. 2023,
"Tight Auditing of Differentially Private Machine Learning"; its one-run use is section 6 of
Steinke, Nasr and Jagielski 2023). Each canary is in the data set with probability 1/2
(``included``, the auditor's secret); an included canary joins every logical batch with the rows'
own sampling rate and its gradient is added to opacus' sum of clipped gradients just before the
noise - what opacus would have added for it, since clipping leaves a gradient of norm ``C`` as it
is. Every canary is scored by the sum over steps of the *privatized* gradient in its coordinate:
the output of the mechanism whose epsilon the accountant states, so a correct run's scores obey
the claim and :func:`s2l_guard.runner.canaries.one_run_bound` bounds its epsilon from below.

Unlike canary images, these need no model that memorizes: with the noise switched off the
in-canaries' scores stand about ``C x steps x sample_rate`` above the others, whatever the model.

Use: ``with recording(included, seed) as canaries: train_private(...)``; the DP training inside
attaches them to its optimizer (:meth:`GradientCanaries.attach`, called by ``privacy.DPHooks``),
and ``canaries.scores`` holds one score per canary afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import S2LError, SettingsError

POOL = 20  # canaries are placed in the quietest of POOL x as many random coordinates
_ACTIVE: list[GradientCanaries] = []  # the canaries the next DP training carries (set by recording())


@dataclass
class GradientCanaries:
    """One audit's canaries: which are in the data set, where they sit, and their scores."""

    included: np.ndarray  # bool, one per canary: trained on (with the rows' sampling rate) or not
    seed: int  # places the canaries and draws their Poisson sampling
    scores: np.ndarray = field(init=False)  # per canary: the summed privatized gradient in its coordinate
    joined: int = 0  # canary-steps: how many times an included canary joined a logical batch
    steps: int = 0  # logical steps the canaries were added to
    sample_rate: float = float("nan")
    attached: bool = False

    def __post_init__(self) -> None:
        self.included = np.asarray(self.included, dtype=bool)
        self.scores = np.zeros(len(self.included))

    def attach(self, optimizer, *, sample_rate: float) -> None:
        """Add the canaries to ``optimizer``'s (an opacus ``DPOptimizer``) steps and score them."""
        if self.attached:
            raise S2LError("gradient canaries audit one DP training, but this run trained privately twice; audit each training on its own")
        params = list(optimizer.params)
        count = len(self.included)
        total = sum(p.numel() for p in params)
        if count > total:
            raise SettingsError(f"{count} gradient canaries need as many trained coordinates, but only {total} are trained; use fewer canaries")
        generator = torch.Generator().manual_seed(self.seed)
        pool = torch.randperm(total, generator=generator)[: min(total, POOL * count)]  # distinct coordinates to choose from
        rng = np.random.default_rng(self.seed + 1)
        bound = float(optimizer.max_grad_norm)
        add_noise = optimizer.add_noise
        places = []

        def add_canaries_then_noise() -> None:
            if not places:  # the first step: its rows' clipped sum shows where real gradients are small
                places.extend(_quietest(params, pool, count))
            joins = torch.from_numpy(self.included & (rng.random(count) < sample_rate)).to(torch.float32) * bound
            for p, which, where in places:
                p.summed_grad.view(-1).index_add_(0, where, joins[which].to(p.device, p.summed_grad.dtype))
            add_noise()  # p.grad = summed_grad + noise, still unscaled by the batch size
            for p, which, where in places:
                self.scores[which.numpy()] += p.grad.detach().reshape(-1)[where].double().cpu().numpy()
            self.joined += int((joins > 0).sum())
            self.steps += 1

        optimizer.add_noise = add_canaries_then_noise  # the instance's pre_step calls it between clipping and scaling
        self.sample_rate = sample_rate
        self.attached = True


def _quietest(params, pool: torch.Tensor, count: int) -> list[tuple]:
    """Where the canaries go: the ``count`` coordinates of ``pool`` with the smallest real gradient
    sum at this step, so that the rows' own gradients blur the canaries' scores least. Chosen from
    the rows alone, before any canary joins, so the choice says nothing of which are included.

    Returns, per parameter holding canaries, ``(parameter, canary numbers, flat positions)``.
    """
    sizes = [p.numel() for p in params]
    ends = torch.tensor(np.cumsum(sizes))
    owner = torch.bucketize(pool, ends, right=True)
    starts = ends - torch.tensor(sizes)
    size = torch.empty(len(pool), dtype=torch.float64)
    for k, p in enumerate(params):
        mine = owner == k
        size[mine] = p.summed_grad.detach().reshape(-1)[(pool[mine] - starts[k]).to(p.device)].abs().double().cpu()
    chosen = pool[torch.argsort(size, stable=True)[:count]]
    owner = torch.bucketize(chosen, ends, right=True)
    places = []
    for k, p in enumerate(params):
        which = torch.nonzero(owner == k).flatten()
        if len(which):
            places.append((p, which, (chosen[which] - starts[k]).to(p.device)))
    return places


@contextlib.contextmanager
def recording(included, seed: int) -> Iterator[GradientCanaries]:
    """Canaries for the one DP training run inside the ``with`` block; an error if none ran."""
    canaries = GradientCanaries(np.asarray(included, dtype=bool), seed)
    _ACTIVE.append(canaries)
    try:
        yield canaries
    finally:
        _ACTIVE.remove(canaries)
    if not canaries.attached:
        raise S2LError("gradient canaries were set up but no DP-SGD training ran to carry them; audit a DP defense (dp_sgd, private_finetune)")


def attach_active(optimizer, *, sample_rate: float) -> None:
    """Called by every DP training as it starts: attach the canaries of an enclosing :func:`recording`."""
    for canaries in _ACTIVE:
        canaries.attach(optimizer, sample_rate=sample_rate)


__all__ = ["GradientCanaries", "attach_active", "recording"]
