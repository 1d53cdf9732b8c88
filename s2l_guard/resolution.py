"""What a profile's gates can resolve before anything runs: the smallest leakage each gate tells
from zero with [gates] power (80% by default), at the profile's sample sizes and draws.

A threshold below its gate's resolution is one that a model that leaks nothing fails to pass
most of the time, so it measures nothing: :func:`refusals` names those, and the gate suite and
``s2l-guard config check`` refuse them with the sample size that would make them passable.

The variance model (docs/gates.md, "Resolution"):
- AUC amplification, paired on the same samples: standard error ``K_AUC * sqrt(1/m + 1/n)`` for
  m members and n non-members, K_AUC = 0.12 being the largest measured on the standard testbed
  (pooled SecMI, End-to-End on the SP set: +-0.024 at 200 vs 200); the between-draw standard
  deviation is assumed equal to it until a run measures it;
- TPR at 1% FPR of a model that leaks nothing: 0.01, with the binomial standard error of the
  test members plus that of the threshold fitted on the calibration non-members;
- extraction share above the null of a model that reproduces nothing: the exact upper end of
  Clopper-Pearson's interval for 0 of m members (draws that all find nothing do not narrow it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .config import GATE_THRESHOLDS, Config
from .decision import Z80, Z975, resolution, share_above_null
from .metrics import calibration_count

K_AUC = 0.12  # paired AUC change: se = K_AUC * sqrt(1/members + 1/nonmembers), measured (module docstring)
NULL_TPR = 0.01  # a model that leaks nothing: TPR = FPR


@dataclass(frozen=True)
class Resolution:
    """One (check, scope) of a profile: the samples behind it, its resolution and whether the threshold is passable."""

    check: str
    scope: str  # "each domain" or "pooled"
    members: int
    nonmembers: int
    draws: int
    resolution: float | None  # None: the scope cannot measure the check (too few test non-members)
    threshold: float
    key: str
    model: str  # how the resolution was obtained
    needed: int | None = None  # members (and as many non-members) per scope that would make the threshold passable

    @property
    def passable(self) -> bool:
        return self.resolution is None or self.resolution <= self.threshold


def sample_sizes(config: Config) -> tuple[int, int, int]:
    """Members and non-members per domain, and the number of domains, of the audited data."""
    if config.run.data:
        from .data import METADATA, _read_records

        records = list(_read_records(Path(config.run.data) / METADATA))
        domains = sorted({r.domain for r in records if r.membership == "member"})
        if config.attack.domains:
            domains = [d for d in domains if d in config.attack.domains]
        count = lambda kind: min(sum(r.membership == kind and r.domain == d for r in records) for d in domains) if domains else 0  # noqa: E731
        return count("member"), count("nonmember"), len(domains)
    domains = len(config.attack.domains) or len(config.testbed.private_domains)
    return config.testbed.members_per_domain, config.testbed.nonmembers_per_domain, domains


def _auc(members: int, nonmembers: int, draws: int, power: float) -> float:
    se = K_AUC * math.sqrt(1 / members + 1 / nonmembers)
    return resolution(se, se, draws, power=power)


def _tpr(members: int, nonmembers: int, share: float, power: float) -> float | None:
    calibration = calibration_count(nonmembers, share)
    test_members, test_nonmembers = members - calibration_count(members, share), nonmembers - calibration
    if test_nonmembers < 100:  # as the metric itself: 1% FPR needs 100 test non-members
        return None
    var = NULL_TPR * (1 - NULL_TPR)
    return NULL_TPR + (Z975 + Z80) * math.sqrt(var / test_members + var / max(calibration, 1))


def _extraction(members: int, nonmembers: int) -> float:
    return share_above_null(0, members, 0, nonmembers).ci95[1]


def _resolve(check: str, members: int, nonmembers: int, draws: int, config: Config) -> float | None:
    power = config.gates.power
    if check.endswith("auc_amplification"):
        return _auc(members, nonmembers, draws, power)
    if check.endswith("tpr_at_1pct_fpr"):
        return _tpr(members, nonmembers, config.attack.calibration_share, power)
    return _extraction(members, nonmembers)


MODEL = {
    "auc_amplification": f"variance model: paired AUC se = {K_AUC} x sqrt(1/m + 1/n), between-draw sd assumed equal",
    "tpr_at_1pct_fpr": "variance model: binomial at TPR = FPR = 0.01 on the test split and the calibration threshold",
    "extracted": "exact: Clopper-Pearson upper end of 0 members reproduced",
}


def _needed(check: str, threshold: float, draws: int, config: Config, members: int, nonmembers: int) -> int | None:
    """The smallest number of members (non-members scaled alike) whose resolution is within ``threshold``."""
    ratio = nonmembers / members
    for n in (int(members * 1.25**k) + k for k in range(1, 60)):
        r = _resolve(check, n, max(1, round(n * ratio)), draws, config)
        if r is not None and r <= threshold:
            return n
    return None


def resolutions(config: Config) -> list[Resolution]:
    """Every leakage gate of ``config``'s [gates] checks, per scope it gates."""
    g = config.gates
    per_domain_m, per_domain_n, domains = sample_sizes(config)
    d = len(config.matrix.draws) or 1  # the draws each gate pools (replicates are research, not a release)
    scopes = {"each": ["each domain"], "pooled": ["pooled"], "both": ["each domain", "pooled"]}[g.domains]
    out = []
    for check in g.checks:
        if check == "utility":
            continue
        key = GATE_THRESHOLDS[check]
        threshold = getattr(g, key)
        for scope in scopes:
            m, n = (per_domain_m, per_domain_n) if scope == "each domain" else (per_domain_m * domains, per_domain_n * domains)
            r = _resolve(check, m, n, d, config)
            needed = None if r is None or r <= threshold else _needed(check, threshold, d, config, m, n)
            out.append(Resolution(check, scope, m, n, d, r, threshold, key, MODEL[check.removeprefix("baseline_")], needed))
    return out


def refusals(config: Config) -> list[str]:
    """One line per threshold that a model leaking nothing cannot pass at ``config``'s samples."""
    out = []
    for r in resolutions(config):
        if r.passable:
            continue
        more = (
            f"about {r.needed} members and as many non-members {'per domain' if r.scope == 'each domain' else 'pooled'}"
            if r.needed
            else "no sample size in reach"
        )
        out.append(f"[gates] {r.key} = {r.threshold:g} cannot be passed by a model that leaks nothing ({r.check}, {r.scope}: "
                   f"{r.members} members vs {r.nonmembers} non-members, {r.draws} draw(s) resolve {r.resolution:.3f} at "
                   f"{config.gates.power:.0%} power); raise it to at least {r.resolution:.3f}"
                   + (", gate the pooled cell only ([gates] domains = 'pooled')" if r.scope == "each domain" else "")
                   + f", or use {more}")  # fmt: skip
    return out


def table_lines(config: Config) -> list[str]:
    """The resolution table `s2l-guard config check` prints."""
    rows = [["check", "scope", "members vs non-members", "draws", "resolution", "threshold", "passable", "how"]]
    for r in resolutions(config):
        res = "-" if r.resolution is None else f"{r.resolution:.3f}"
        ok = "yes" if r.passable and r.resolution is not None else "not gated (too few test non-members)" if r.resolution is None else "NO"
        rows.append([r.check, r.scope, f"{r.members} vs {r.nonmembers}", str(r.draws), res, f"{r.threshold:g}", ok, r.model])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(text.ljust(w) for text, w in zip(row, widths)).rstrip() for row in rows]
