"""The DP guarantee a run asks for, checked on its own: light (no opacus), so the DP defenses
register, and their settings are validated, without loading the privacy engine."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SettingsError

ACCOUNTANTS = ("rdp", "prv")
# opacus' per-sample gradient engines that run the testbed UNet through the same step and agree
# (tests/test_privacy.py): "ghost" clipping takes each example's gradient norm without its
# gradient, then backpropagates the clipped loss a second time. "ew" (expanded weights) fails
# on the UNet with a view-size error.
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")
# opacus' PRV noise search overflows and runs for many minutes far above this (e.g. epsilon 1e3).
PRV_MAX_EPSILON = 100.0


@dataclass(frozen=True)
class PrivacySettings:
    """The DP guarantee to train for and how to compute it."""

    target_epsilon: float = 10.0  # > 0; inf: the same recipe (clipping included) without noise, no privacy
    delta: float = 0.0  # 0: 1 / (10 N) for N training rows; must be below 1 / N
    max_grad_norm: float = 1.0  # per-sample clipping bound C
    accountant: str = "rdp"  # "rdp" or "prv" (opacus accountants)
    physical_batch_size: int = 64  # memory bound: logical Poisson batches are split into physical ones
    grad_sample_mode: str = "hooks"  # how opacus computes per-sample gradients (benchmarks/dp_step.py times each)
    # K timesteps and noises per example, their gradients averaged before clipping (DPDM, Dockhorn et
    # al. 2023): a less noisy per-example gradient at no privacy cost, for K x the compute and memory
    noise_multiplicity: int = 1

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise SettingsError(f"privacy accountant {self.accountant!r} is unknown; use one of {', '.join(ACCOUNTANTS)}")
        if not self.target_epsilon > 0:
            raise SettingsError(f"privacy target_epsilon must be > 0 (or inf: no noise), got {self.target_epsilon}; use e.g. 1 to 10")
        if self.accountant == "prv" and PRV_MAX_EPSILON < self.target_epsilon < float("inf"):
            raise SettingsError(
                f"privacy target_epsilon = {self.target_epsilon} is beyond what opacus' PRV accountant can "
                f"calibrate (<= {PRV_MAX_EPSILON:g}); use accountant = 'rdp' for such budgets"
            )
        if not 0 <= self.delta < 1:
            raise SettingsError(f"privacy delta must be in [0, 1), got {self.delta}; use 0 for 1 / (10 N)")
        if not self.max_grad_norm > 0:
            raise SettingsError(f"privacy max_grad_norm must be > 0, got {self.max_grad_norm}; use e.g. 1.0")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise SettingsError(f"privacy grad_sample_mode {self.grad_sample_mode!r} is unknown; use one of {', '.join(GRAD_SAMPLE_MODES)}")
        if self.noise_multiplicity > 1 and self.grad_sample_mode == "ghost":
            raise SettingsError("privacy noise_multiplicity > 1 averages per-sample gradients, which ghost clipping never forms; "
                                "use grad_sample_mode = 'hooks'")  # fmt: skip
        if self.noise_multiplicity < 1:
            raise SettingsError(f"privacy noise_multiplicity must be >= 1, got {self.noise_multiplicity}; 1 draws one noise per example")
        if self.physical_batch_size < 1:
            raise SettingsError(f"privacy physical_batch_size must be >= 1, got {self.physical_batch_size}")
