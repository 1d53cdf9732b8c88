"""Coverage of four ways to pool a gate's draws into one 95% interval, in simulation (docs/gates.md).

    python docs/calibration/pooled_interval.py [--audits 4000]

An audit draws D times on one fixed sample of members and non-members: every draw shares the
sample's error c ~ N(0, s^2) and adds its own b_d ~ N(0, tau^2); each draw reports a bootstrap
interval whose standard error is itself estimated (chi-square, 200 degrees of freedom, around s).
Printed per (D, tau / s): each method's coverage of the truth and its mean half-width in units of s.

- satterthwaite: s2l_guard.decision.pool_draws, the gates' interval;
- t-over-draws: Student's t on the draws' estimates alone (a random-effects interval that
  treats the draws as independent samples);
- mover: the shared and between parts each with its own quantile (z and t), added in quadrature;
- two-level bootstrap: resample the draws, and the shared sample once per replicate.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from scipy import stats

from s2l_guard.decision import Measurement, pool_draws

Z = stats.norm.ppf(0.975)


def audit(rng: np.random.Generator, draws: int, tau: float, s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One audit's draw estimates and their reported standard errors (the truth is 0)."""
    values = rng.normal(0, s) + rng.normal(0, tau, draws)
    return values, s * np.sqrt(rng.chisquare(200, draws) / 200)


def half_widths(values: np.ndarray, ses: np.ndarray, rng: np.random.Generator) -> dict[str, tuple[float, float]]:
    d = len(values)
    pooled = pool_draws([Measurement(v, (v - Z * e, v + Z * e)) for v, e in zip(values, ses)])
    between = values.var(ddof=1) / d
    t = stats.t.ppf(0.975, d - 1)
    boot = rng.choice(values, (2000, d)).mean(1) + rng.normal(0, 1, 2000) * math.sqrt(float(np.mean(ses**2)))
    return {
        "satterthwaite": pooled.ci95,
        "t-over-draws": (values.mean() - t * math.sqrt(between), values.mean() + t * math.sqrt(between)),
        "mover": tuple(values.mean() + sign * math.sqrt(Z**2 * np.mean(ses**2) + t**2 * between) for sign in (-1, 1)),
        "two-level bootstrap": tuple(np.percentile(boot, [2.5, 97.5])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audits", type=int, default=4000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    methods = ["satterthwaite", "t-over-draws", "mover", "two-level bootstrap"]
    print("| draws | tau / s | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for draws in (2, 3, 5, 10):
        for tau in (0.0, 0.5, 1.0, 2.0, 4.0):
            hits = {m: 0 for m in methods}
            width = {m: 0.0 for m in methods}
            for _ in range(args.audits):
                for m, (lo, hi) in half_widths(*audit(rng, draws, tau), rng).items():
                    hits[m] += lo <= 0 <= hi
                    width[m] += (hi - lo) / 2
            cells = [f"{hits[m] / args.audits:.3f} ({width[m] / args.audits:.2f})" for m in methods]
            print(f"| {draws} | {tau:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
