"""How much a model memorized each private domain: the baseline S2L starts from.

Two views per private domain:

* **Denoising loss** of members against held-out non-members of the same
  domain (lower on members = the model fits what it saw better than what it
  did not), with the naive loss-threshold AUC as a single number.
* **Generations**: sample the domain's prompt and measure each generation's
  normalized L2 distance to the nearest member and, as a control, to the
  nearest held-out non-member. A generation much closer to a member than any
  non-member is ever approached reproduces that member; a member with a
  generation within ``extraction_delta`` counts as extracted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .config import ReportConfig
from .data import ImageDataset
from .metrics import auc, bootstrap, nearest
from .model import Bundle
from .sampling import sample
from .training import denoising_losses

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75)


EXAMPLES = 8  # closest generation/member pairs kept per domain for the figure


def memorization_report(
    bundle: Bundle, dataset: ImageDataset, config: ReportConfig, *, seed: int
) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Measure memorization of every private domain (those with members).

    Returns:
        The report (JSON-ready), and per domain the generations closest to a member,
        those members and the distances, for a figure.
    """
    domains = sorted({r.domain for r in dataset.records if r.membership == "member"})
    out: dict[str, Any] = {"method": _method(config), "domains": {}}
    examples = {}
    for k, domain in enumerate(domains):
        members = dataset.select(membership="member", domain=domain)
        nonmembers = dataset.select(membership="nonmember", domain=domain)
        out["domains"][domain], examples[domain] = _domain_report(bundle, members, nonmembers, config, seed=seed + 7919 * k)
    return out, examples


def _domain_report(bundle: Bundle, members: ImageDataset, nonmembers: ImageDataset, config: ReportConfig, *, seed: int):
    loss_args = dict(timesteps=config.loss_timesteps, draws=config.loss_draws, seed=seed, batch_size=config.batch_size)
    loss_in = denoising_losses(bundle, members.images, [r.text for r in members.records], **loss_args).numpy()
    loss_out = denoising_losses(bundle, nonmembers.images, [r.text for r in nonmembers.records], **loss_args).numpy()
    copies = np.array([r.copies for r in members.records])
    boot = dict(resamples=config.bootstrap, seed=seed)

    prompt = members.records[0].text
    generated = sample(
        bundle, [prompt] * config.samples_per_domain, steps=config.sampler_steps,
        guidance_scale=config.guidance_scale, seed=seed, batch_size=config.batch_size,
    )  # fmt: skip
    d_member, which = nearest(generated, members.images)
    d_nonmember, _ = nearest(generated, nonmembers.images) if len(nonmembers) else (torch.full_like(d_member, np.nan), None)
    close = d_member <= config.extraction_delta
    extracted = sorted({int(i) for i in which[close]})
    closest = d_member.argsort()[:EXAMPLES]
    example = (generated[closest], members.images[which[closest]], d_member[closest])
    report = {
        "prompt": prompt,
        "members": len(members),
        "nonmembers": len(nonmembers),
        "duplicated_members": int((copies > 1).sum()),
        "denoising_loss": {
            "member_mean": bootstrap(np.mean, loss_in, **boot).to_dict(),
            "nonmember_mean": bootstrap(np.mean, loss_out, **boot).to_dict(),
            "gap_nonmember_minus_member": bootstrap(lambda a, b: b.mean() - a.mean(), loss_in, loss_out, **boot).to_dict(),
            "member_mean_duplicated": float(loss_in[copies > 1].mean()) if (copies > 1).any() else None,
            "member_mean_single": float(loss_in[copies == 1].mean()) if (copies == 1).any() else None,
            "loss_auc": bootstrap(lambda a, b: auc(-a, -b), loss_in, loss_out, **boot).to_dict(),
        },
        "generations": {
            "count": len(generated),
            "nearest_member_quantiles": _quantiles(d_member),
            "nearest_nonmember_quantiles": _quantiles(d_nonmember),
            "within_delta_of_member": int(close.sum()),
            "within_delta_of_nonmember": int((d_nonmember <= config.extraction_delta).sum()),
            "extracted_members": len(extracted),
            "extracted_duplicated": int(sum(copies[i] > 1 for i in extracted)),
            "extracted_files": [members.records[i].file_name for i in extracted],
        },
    }
    return report, example


def _quantiles(d: torch.Tensor) -> dict[str, float]:
    values = np.quantile(d.numpy(), QUANTILES)
    return {f"q{int(q * 100):02d}": float(v) for q, v in zip(QUANTILES, values)}


def _method(config: ReportConfig) -> str:
    return (
        f"denoising loss: mean over t in {list(config.loss_timesteps)} x {config.loss_draws} seeded noise draws per image; "
        f"loss AUC: members vs held-out non-members of the same domain, lower loss = member; "
        f"generations: {config.samples_per_domain} per domain, DDIM {config.sampler_steps} steps, "
        f"guidance {config.guidance_scale}; distance: normalized L2 (RMS of [0,1] pixel differences, grid 1); "
        f"extracted: a member with a generation within {config.extraction_delta}; "
        f"intervals: 95% percentile bootstrap, {config.bootstrap} resamples"
    )


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of the memorization report."""
    head = (
        f"{'domain':<8} {'members':>7} {'dup':>4} {'loss member':>12} {'loss non':>9} {'loss AUC [95% CI]':>24} "
        f"{'gen->member q10/q50':>20} {'gen->non q10/q50':>17} {'extracted':>9}"
    )
    lines = [head, "-" * len(head)]
    for domain, r in report["domains"].items():
        loss, gen = r["denoising_loss"], r["generations"]
        loss_auc = loss["loss_auc"]
        m, n = gen["nearest_member_quantiles"], gen["nearest_nonmember_quantiles"]
        lines.append(
            f"{domain:<8} {r['members']:>7} {r['duplicated_members']:>4} {loss['member_mean']['value']:>12.4f} "
            f"{loss['nonmember_mean']['value']:>9.4f} {loss_auc['value']:>8.3f} [{loss_auc['ci95'][0]:.3f}, {loss_auc['ci95'][1]:.3f}] "
            f"{m['q10']:>9.3f}/{m['q50']:.3f} {n['q10']:>10.3f}/{n['q50']:.3f} "
            f"{gen['extracted_members']:>4}/{r['members']}"
        )
    lines.append(f"method: {report['method']}")
    return "\n".join(lines)
