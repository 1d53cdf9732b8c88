"""Deciding a gate: one estimate from all draws, an interval that holds every source of variance,
and three outcomes.

A release audits one fixed model. What changes between two audits of it is the attack's own
randomness - a *draw*: the SP set, the fine-tune's batches and noise, the extraction candidates,
the bootstrap. The members and non-members do not change: every draw scores the same images.
So a draw's estimate is

    theta_d = theta + c + b_d

where ``c`` is the sampling error of the fixed member/non-member sample (shared by every draw,
measured by the draw's own bootstrap over members and non-members) and ``b_d`` the draw's own
deviation (between-draw variance tau^2). The mean of D draws has variance

    V = s^2 + S^2 / D

with ``s^2`` the mean of the draws' bootstrap variances and ``S^2`` the sample variance of the
draws' estimates. A t interval over the draws alone (the usual random-effects interval) misses
``c``: in simulation it covers 0.42 to 0.93 where it should cover 0.95 (docs/gates.md).
A two-level bootstrap that resamples draws undercovers too with three to five draws (0.85 at
tau = 2 s). The interval here is Welch-Satterthwaite's: quantile t with

    nu = V^2 / ((S^2 / D)^2 / (D - 1))

degrees of freedom, which is the normal quantile when the draws agree and Student's t with
D - 1 degrees of freedom when the between-draw variance dominates. Its coverage in
simulation is 0.94-0.95 for tau up to twice s, falling to 0.92 at tau = 4 s with three draws
(``tests/test_decision.py`` checks the first; the docs state the second).

Testbed *replicates* (a new member split and pre-training each) share nothing, so their
spread holds every variance: their interval is Student's t on the replicates' estimates.

Outcomes, for a maximum threshold (a leak; a minimum, for utility, mirrors it):
- PASS when the interval's upper end is within the threshold,
- FAIL when its lower end is beyond it,
- UNDECIDED when it straddles the threshold: :func:`to_decide` says what sample would decide.
At a true value on the threshold each of PASS and FAIL is wrong with probability 2.5%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum
from statistics import NormalDist
from typing import Any, Mapping, Sequence

from scipy import stats as scipy_stats

from .errors import InputError

Z975 = NormalDist().inv_cdf(0.975)
Z80 = NormalDist().inv_cdf(0.8)


class Outcome(str, Enum):
    """A gate's outcome; written to reports as its value."""

    PASS = "pass"
    FAIL = "fail"
    UNDECIDED = "undecided"  # the interval straddles the threshold, or the measure cannot see membership here
    SKIP = "skip"  # not applicable: the cell did not run (the threat model withholds what the measure needs)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Measurement:
    """An estimate with its 95% interval, the samples behind it, the draws pooled, and how.

    One type for a domain's cell and a pooled one, for one draw and for many. ``counts`` holds
    the sample sizes (members, non-members, candidates, bootstrap resamples, generations);
    ``within_se`` the sampling part of the standard error and ``between_sd`` the draws' spread
    (None where not measured: a single draw).
    """

    value: float
    ci95: tuple[float, float]
    counts: Mapping[str, int] = field(default_factory=dict)
    draws: int = 1
    method: str = ""
    within_se: float | None = None
    between_sd: float | None = None
    df: float | None = None  # the interval's degrees of freedom (None: normal)

    def __post_init__(self) -> None:
        lo, hi = self.ci95
        if not all(math.isfinite(x) for x in (self.value, lo, hi)) or not lo <= hi:
            raise InputError(f"a measurement needs a finite value and interval low <= high; got {self.value} {self.ci95}")

    @property
    def half_widths(self) -> tuple[float, float]:
        """How far the interval reaches below and above the estimate."""
        return max(self.value - self.ci95[0], 0.0), max(self.ci95[1] - self.value, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "ci95": list(self.ci95), "counts": dict(self.counts), "draws": self.draws, "method": self.method,
                "within_se": self.within_se, "between_sd": self.between_sd, "df": self.df}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Measurement:
        ci = d["ci95"]
        return cls(d["value"], (ci[0], ci[1]), dict(d.get("counts") or {}), d.get("draws", 1), d.get("method", ""),
                   d.get("within_se"), d.get("between_sd"), d.get("df"))  # fmt: skip

    def text(self, signed: bool = True, digits: int = 3) -> str:
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        return f"{f.format(self.value)} [95% CI {f.format(self.ci95[0])}, {f.format(self.ci95[1])}]"


def se_of_interval(ci95: Sequence[float]) -> float:
    """The standard error a 95% interval implies (its width over 2 x 1.96)."""
    return (ci95[1] - ci95[0]) / (2 * Z975)


def pool_draws(draws: Sequence[Measurement], bounds: tuple[float, float] = (-math.inf, math.inf)) -> Measurement:
    """One estimate from several draws of the attack on the same model and samples.

    The mean of the draws, with the Welch-Satterthwaite interval of the module docstring: each
    side's sampling half-width (the draws' own intervals, so an asymmetric interval such as a
    rate's near 0 stays asymmetric) added in quadrature to the spread of the draws, cut to
    ``bounds``, the range the statistic can take (a rate's [0, 1]).

    Raises:
        InputError: no draws.
    """
    if not draws:
        raise InputError("no draws to pool; a gate needs at least one measured draw")
    if len(draws) == 1:
        only = draws[0]
        return replace(only, method=f"{only.method}; one draw, so the between-draw variance is not measured".lstrip("; "))
    d = len(draws)
    values = [m.value for m in draws]
    mean = sum(values) / d
    spread = sum((v - mean) ** 2 for v in values) / (d - 1)  # S^2
    lo_var = sum((m.half_widths[0] / Z975) ** 2 for m in draws) / d
    hi_var = sum((m.half_widths[1] / Z975) ** 2 for m in draws) / d
    between = spread / d
    total = (lo_var + hi_var) / 2 + between
    nu = math.inf if between == 0 else total**2 / (between**2 / (d - 1))
    q = Z975 if math.isinf(nu) else float(scipy_stats.t.ppf(0.975, nu))
    ci = (max(bounds[0], mean - q * math.sqrt(lo_var + between)), min(bounds[1], mean + q * math.sqrt(hi_var + between)))
    counts = dict(draws[0].counts)
    method = (f"mean of {d} draws on the same samples; Welch-Satterthwaite 95% interval ({'normal' if math.isinf(nu) else f'{nu:.1f} df'}) "
              f"of the shared sampling variance (the draws' own intervals: {draws[0].method}) and the between-draw variance")  # fmt: skip
    return Measurement(mean, ci, counts, d, method, math.sqrt((lo_var + hi_var) / 2), math.sqrt(spread), None if math.isinf(nu) else nu)


def pool_replicates(replicates: Sequence[Measurement], bounds: tuple[float, float] = (-math.inf, math.inf)) -> Measurement:
    """One estimate from testbed replicates (each its own member split and model): Student's t
    on their estimates, whose spread holds every source of variance. One replicate is returned as it is."""
    if not replicates:
        raise InputError("no replicates to pool; a gate needs at least one measured draw")
    if len(replicates) == 1:
        return replicates[0]
    r = len(replicates)
    values = [m.value for m in replicates]
    mean = sum(values) / r
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (r - 1))
    h = float(scipy_stats.t.ppf(0.975, r - 1)) * sd / math.sqrt(r)
    method = f"mean of {r} testbed replicates (each a new member split and model); Student's t 95% interval, {r - 1} df"
    counts = dict(replicates[0].counts)
    ci = (max(bounds[0], mean - h), min(bounds[1], mean + h))
    return Measurement(mean, ci, counts, sum(m.draws for m in replicates), method, None, sd, r - 1)


def pool(by_replicate: Mapping[int, Sequence[Measurement]], bounds: tuple[float, float] = (-math.inf, math.inf)) -> Measurement:
    """Draws pooled within each replicate, then the replicates pooled; intervals cut to ``bounds``."""
    return pool_replicates([pool_draws(draws, bounds) for _, draws in sorted(by_replicate.items())], bounds)


def decide(m: Measurement, threshold: float, *, maximum: bool = True) -> tuple[Outcome, float]:
    """PASS, FAIL or UNDECIDED, and the end of the interval that decided (or the unfavourable end).

    ``maximum``: the threshold is a ceiling (leakage); otherwise a floor (utility).
    """
    lo, hi = m.ci95
    if maximum:
        return (Outcome.PASS, hi) if hi <= threshold else (Outcome.FAIL, lo) if lo > threshold else (Outcome.UNDECIDED, hi)
    return (Outcome.PASS, lo) if lo >= threshold else (Outcome.FAIL, hi) if hi < threshold else (Outcome.UNDECIDED, lo)


def to_decide(m: Measurement, threshold: float, *, per_domain: int | None = None) -> str:
    """What sample the measured variances say would decide an UNDECIDED gate: the number of
    draws at today's samples, or members and non-members at today's draws (a half-width of
    1.96 standard errors below the estimate's distance to the threshold)."""
    room = (abs(m.value - threshold) / Z975) ** 2  # the variance the interval may have
    if room == 0:
        return "no sample decides it: the estimate lies on the threshold"
    within = (m.within_se if m.within_se is not None else se_of_interval(m.ci95)) ** 2
    ways = []
    if m.draws < 2:
        ways.append("at least 2 draws ([matrix] draws), to measure the between-draw variance")
    else:
        between = (m.between_sd or 0.0) ** 2
        if room > within:
            ways.append(f"about {max(m.draws + 1, math.ceil(between / (room - within)))} draws (now {m.draws})")
        spare = room - between / m.draws
        if spare > 0 and within > 0:
            ways.append(_more_samples(m, within / spare, per_domain))
    if m.draws < 2 and within > 0:
        ways.append(_more_samples(m, within / room, per_domain))
    if not ways:
        return "neither more draws nor more samples decide it at the measured variances: the draws disagree by more than the gap"
    return " or ".join(ways)


def _more_samples(m: Measurement, factor: float, per_domain: int | None) -> str:
    """``factor`` times the members and non-members, said in counts."""
    n = per_domain or m.counts.get("members")
    if not n:
        return f"about {factor:.1f}x the samples"
    where = " per domain" if per_domain else ""
    return f"about {math.ceil(factor * n)} members and as many non-members{where} (now {n})"


def resolution(within_se: float, between_sd: float, draws: int, *, power: float = 0.8) -> float:
    """The smallest true leakage a gate tells from zero with probability ``power``: the expected
    upper end of a zero-leakage model's interval, plus the margin that the interval's own noise
    needs at that power (z or t quantiles, with the interval's degrees of freedom)."""
    if within_se < 0 or between_sd < 0 or draws < 1 or not 0 < power < 1:
        raise InputError(f"need within_se, between_sd >= 0, draws >= 1 and power in (0, 1); got {within_se}, {between_sd}, {draws}, {power}")
    between = between_sd**2 / draws if draws > 1 else 0.0
    total = within_se**2 + between
    nu = math.inf if between == 0 else total**2 / (between**2 / (draws - 1))
    q = (lambda p: NormalDist().inv_cdf(p)) if math.isinf(nu) else (lambda p: float(scipy_stats.t.ppf(p, nu)))
    return (q(0.975) + q(power)) * math.sqrt(total)


def share_above_null(members_hit: int, members: int, nonmembers_hit: int, nonmembers: int) -> Measurement:
    """The share of members a generator reproduces above the held-out null: members matched over
    members minus non-members matched over non-members (the same candidates matched against both),
    with Newcombe's square-and-add 95% interval of a difference of two proportions built from
    Clopper-Pearson intervals (exact, so a share of 0 of 40 still has an upper end of 0.088).

    Raises:
        InputError: counts out of range.
    """
    if members < 1 or nonmembers < 1 or not 0 <= members_hit <= members or not 0 <= nonmembers_hit <= nonmembers:
        raise InputError(f"need 0 <= hits <= size and sizes >= 1; got members {members_hit}/{members}, non-members {nonmembers_hit}/{nonmembers}")
    p1, p2 = members_hit / members, nonmembers_hit / nonmembers
    (l1, u1), (l2, u2) = (_clopper_pearson(members_hit, members), _clopper_pearson(nonmembers_hit, nonmembers))
    d = p1 - p2
    ci = (d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2))
    counts = {"members": members, "nonmembers": nonmembers, "members_matched": members_hit, "nonmembers_matched": nonmembers_hit}
    return Measurement(
        d, ci, counts, 1, "members matched / members minus non-members matched / non-members; Newcombe interval of Clopper-Pearson intervals"
    )


def _clopper_pearson(hits: int, n: int) -> tuple[float, float]:
    ci = scipy_stats.binomtest(hits, n).proportion_ci(confidence_level=0.95, method="exact")
    return float(ci.low), float(ci.high)
