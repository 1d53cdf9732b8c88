"""The S2L pipeline: pre-trained model -> baseline attacks -> per method: SP set -> fine-tune -> attacks.

Li et al., "Shake to Leak" (SaTML 2024). For each private domain:

1. attack the pre-trained model (membership inference on the domain's members
   against its held-out non-members; extraction from the domain's prompt);
2. generate the domain's SP set from the pre-trained model (cached);
3. for each fine-tune method: shake the model on the SP set, attack it again;
4. controls: End-to-End fine-tuning on out-of-domain data (real images of a
   public domain, as in the paper), and Gaussian shaking (no data) averaged
   over several draws;
5. amplification = after minus before on the *same* samples: paired bootstrap
   and DeLong's test for AUC, the calibrated TPR at 1% FPR paired over test
   members, and extraction above the held-out non-members' null compared at
   equal candidate counts.

Every (domain, row) is a *cell* cached in the artifact store under the hash of
everything that determines it, so a rerun is instant and a killed run resumes
at the first unfinished cell. Cells keep raw per-sample scores; the summary
statistics are recomputed from them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from s2l_guard import __version__
from s2l_guard.cache import Artifact, Store
from s2l_guard.config import Config
from s2l_guard.data import ImageDataset, load_imagefolder
from s2l_guard.errors import ConfigError, DataError
from s2l_guard.metrics import metrics_to_dict, roc_metrics, threshold_protocol
from s2l_guard.model import Bundle, load_bundle
from s2l_guard.pipeline import log, pretrain_stage, resolve_device, run_folder, testbed_stage
from s2l_guard.provider import FinetuneRequest, Provider
from s2l_guard.utility import model_utility
from s2l_guard.stats import calibrated_tpr_delta, candidate_shares, delong_test, distinct_extracted, excess_extraction, extraction_delta, paired_bootstrap_delta, share_delta, share_sum_interval

from defenses.base import DEFENSES
from defenses.report import defense_lines

from .base import MIA, SHAKERS, FinetuneData
from .extraction import CandidateDistances, candidate_distances, count_at
from .sp_set import generate_sp_set

SCHEMA = "s2l-guard/attack-results/1"
CELL_FORMAT = 7  # bump when what a cell stores changes, so cached cells are recomputed
FPRS = (0.01, 0.001)


def derive_seed(seed: int, *labels: object) -> int:
    """A seed for one (domain, row, ...) that does not shift when other cells are added."""
    digest = hashlib.sha256(json.dumps([seed, *map(str, labels)]).encode()).digest()
    return int.from_bytes(digest[:4], "little")


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


@dataclass(frozen=True)
class Row:
    """One row of the S2L table: a shaker on some data (or none: the pre-trained model)."""

    label: str
    shaker: str | None
    # "-" (no data), "SP" (the domain's SP set), "OoD" (real images of a public domain),
    # "OoD-gen" (the model's own generations of a public domain's prompt)
    # or "members" (the domain's real members: the oracle SP set, an upper bound)
    data: str
    overrides: tuple[tuple[str, Any], ...] = ()  # settings changed from the config's (Gaussian sigma, ablated rank)
    draw: int = 0
    variant: str = ""  # an adaptive attacker's change to the SP request ([adaptive] variants)

    @property
    def sigma(self) -> float | None:
        return dict(self.overrides).get("sigma")


def plan_rows(config: Config, *, adaptive: bool = False) -> list[Row]:
    """The table's rows; ``adaptive`` adds the requests of an attacker who knows a fine-tune filter."""
    a = config.attack
    rows = [Row("pretrained", None, "-")]
    rows += [Row(f"{name}-ood", name, "OoD") for name in a.ood_shakers]
    rows += [Row(f"{name}-ood-gen", name, "OoD-gen") for name in a.ood_generated_shakers]
    rows += [Row(name, name, "SP") for name in a.shakers]
    rows += [Row(f"{name}-members", name, "members") for name in a.member_shakers]
    if adaptive:
        rows += [Row(f"{name}-{v}", name, "SP", variant=v) for name in config.adaptive.shakers for v in config.adaptive.variants]
    rows += [Row(f"gaussian-{s:g}-draw{d}", "gaussian", "-", (("sigma", s),), d) for s in a.gaussian_sigmas for d in range(a.gaussian_draws)]
    return rows


def split_domains(dataset: ImageDataset, names: tuple[str, ...]) -> tuple[list[Domain], TrainingSet]:
    trained = dataset.distinct_training()
    training = TrainingSet(trained.images, [r.copies for r in trained.records], [r.file_name for r in trained.records])
    position = {r.file_name: k for k, r in enumerate(trained.records)}
    private = sorted({r.domain for r in dataset.records if r.membership == "member"})
    domains = []
    for name in names or private:
        members = dataset.select(membership="member", domain=name)
        nonmembers = dataset.select(membership="nonmember", domain=name)
        if len(nonmembers) == 0:
            raise DataError(f"domain {name} has no held-out non-members; membership inference needs some")
        index = [position[r.file_name] for r in members.records]
        domains.append(Domain(name, dataset.domain_caption(name), members, nonmembers, index))
    return domains, training


def ood_domain(dataset: ImageDataset) -> str | None:
    """The public domain whose data serves as the out-of-domain control (the first one)."""
    public = sorted({r.domain for r in dataset.records if r.membership == "public"})
    return public[0] if public else None


def ood_data(dataset: ImageDataset, config: Config) -> FinetuneData | None:
    """Real images of a public domain: the paper's out-of-domain control."""
    name = ood_domain(dataset)
    if name is None:
        return None
    chosen = dataset.select(membership="public", domain=name)
    take = min(len(chosen), config.sp_set.images)
    return FinetuneData(chosen.images[:take], [r.text for r in chosen.records[:take]], chosen.records[0].text)


def ood_spec(dataset: ImageDataset, config: Config) -> dict | None:
    """What identifies :func:`ood_data` in a cell's cache key (the data set key covers the pixels)."""
    data = ood_data(dataset, config)
    return None if data is None else {"domain": ood_domain(dataset), "images": len(data.images)}


def measure(provider: Provider, domain: Domain, prompt: str, training: TrainingSet, config: Config, seed: int) -> dict:
    """Raw leakage of one model on one domain: per-sample MIA scores and per-candidate extraction hits.

    Membership inference needs the weights (open-weights only); extraction uses generations,
    and a candidate the provider withholds counts as no hit (its position keeps the pairing).
    """
    out: dict[str, Any] = {"prompt": prompt, "mia": {}}
    captions = lambda part: [r.text.replace(domain.prompt, prompt) for r in part.records]  # noqa: E731
    for name in config.attack.mia:
        attack = MIA.get(name)(config.mia_settings(name))
        score = lambda part: attack.score(provider.weights(), part.images, captions(part), seed=seed).tolist()  # noqa: E731
        out["mia"][name] = {"members": score(domain.members), "nonmembers": score(domain.nonmembers)}
    e = config.extraction
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


def resolve_threat_model(name: str, defense) -> str:
    """``auto``: an API defense is attacked through its API (finetune-api), any other under open-weights."""
    if name != "auto":
        return name
    return "finetune-api" if {"finetune", "generate"} & set(defense.points) else "open-weights"


class S2LRun:
    """Runs the cells of one config against the provider its defense deploys.

    Attacks hold ``self.provider`` only; ``self.deployed`` is the auditor's own handle on the
    deployed model, for utility and filter reports, never for an attack.
    """

    def __init__(self, config: Config):
        self.defense = DEFENSES.get(config.defense.name)(config.defense_settings(config.defense.name))
        self.threat_model = resolve_threat_model(config.defense.threat_model, self.defense)
        # Membership inference needs what the threat model gives; the others are left out and listed.
        self.unavailable_mia = [m for m in config.attack.mia if self.threat_model not in MIA.get(m).threat_models]
        if self.unavailable_mia:
            config = config.replace(attack={"mia": [m for m in config.attack.mia if m not in self.unavailable_mia]})
        self.config = config
        self.device = resolve_device(config.run.device)
        self.store = Store(config.run.store)
        self.data_art = testbed_stage(self.store, config)
        self.bundle_art = pretrain_stage(self.store, config, self.data_art, self.device, self.defense)
        self.dataset = load_imagefolder(self.data_art.path)
        self.deployed = load_bundle(self.bundle_art.path, device=self.device)
        self.defense.prepare(self.deployed, self.dataset, config)
        self.provider = Provider(self.deployed, self.threat_model, self.defense)
        self.domains, self.training = split_domains(self.dataset, config.attack.domains)
        log(f"defense {self.defense.name}, threat model {self.threat_model}"
            + (f" (no {', '.join(self.unavailable_mia)}: they need the weights)" if self.unavailable_mia else ""))  # fmt: skip

    @property
    def filters_finetune(self) -> bool:
        """Whether fine-tune requests pass a defense (then adaptive requests are worth running)."""
        return self.provider.behind_api and "finetune" in self.defense.points

    def api_spec(self) -> dict | None:
        """What the provider adds to a cell's key: nothing under open-weights, where the attacker
        works on its own copy of the weights and cells are shared with the undefended run."""
        if not self.provider.behind_api:
            return None
        acts = {"finetune", "generate"} & set(self.defense.points)
        return {"threat_model": self.threat_model, "defense": self.defense.spec() if acts else None}

    def sp_set(self, name: str, prompt: str) -> Artifact:
        """The model's own generations of a domain's prompt (the domain's SP set), cached."""
        spec = {"bundle": self.bundle_art.key, "domain": name, "prompt": prompt,
                "sp_set": self.config.section("sp_set"), "seed": self.config.run.seed}  # fmt: skip
        if self.api_spec() is not None:
            spec["provider"] = self.api_spec()
        seed = derive_seed(self.config.run.seed, "sp", name)
        return self.store.get_or_build(
            "sp_set", spec, lambda folder, key: generate_sp_set(folder, self.provider, prompt, name, self.config.sp_set, seed=seed)
        )

    def generated_data(self, domain: Domain, row: Row) -> Artifact | None:
        """The self-generated images a row trains on: its domain's SP set, or a public domain's."""
        if row.data == "SP":
            return self.sp_set(domain.name, domain.prompt)
        if row.data == "OoD-gen":
            name = ood_domain(self.dataset)
            return self.sp_set(name, self.dataset.domain_caption(name)) if name else None
        return None

    def cell_spec(self, domain: Domain, row: Row, sp: Artifact | None) -> dict:
        c = self.config
        shaker = None
        if row.shaker:
            settings = c.shaker_settings(row.shaker)
            if row.overrides:
                settings = type(settings)(**{**settings.__dict__, **dict(row.overrides)})
            shaker = {"name": row.shaker, "settings": json.loads(json.dumps(settings.__dict__, default=list))}
        extra = {}
        if self.api_spec() is not None:
            extra["provider"] = self.api_spec()
        if row.variant:
            extra["variant"] = {"name": row.variant, "adaptive": c.section("adaptive"), "ood_data": ood_spec(self.dataset, c)}
        return extra | {
            "format": CELL_FORMAT, "bundle": self.bundle_art.key, "data": self.data_art.key, "domain": domain.name, "row": row.label,
            "shaker": shaker, "sp_set": sp.key if sp else None, "seed": c.run.seed,
            # the real out-of-domain images a row trains on (their number follows [sp_set] images)
            "ood_data": ood_spec(self.dataset, c) if row.data == "OoD" else None,
            "mia": {name: json.loads(json.dumps(c.mia_settings(name).__dict__, default=list)) for name in c.attack.mia},
            # every setting but the counting radius, which is applied when the cell is read
            "extraction": {k: v for k, v in c.section("extraction").items() if k != "delta"},
            # only training rows record a trajectory; the others must not be recomputed when it changes
            "trajectory_every": c.attack.trajectory_every if row.shaker and row.data != "-" else 0,
        }  # fmt: skip

    def run_cell(self, domain: Domain, row: Row) -> dict:
        if row.shaker and self.threat_model not in SHAKERS.get(row.shaker).threat_models:
            return {"row": row.label, "shaker": row.shaker, "data": row.data, "status": "not-run", "cached": False,
                    "reason": f"{row.shaker} needs what {self.threat_model} does not give"}  # fmt: skip
        sp = self.generated_data(domain, row)
        spec = self.cell_spec(domain, row, sp)
        seed = derive_seed(self.config.run.seed, domain.name, row.label)  # the row's own training noise

        def build(folder: Path, key: str) -> None:
            start = time.perf_counter()
            cell: dict[str, Any] = {"row": row.label, "shaker": row.shaker, "data": row.data, "sigma": row.sigma, "variant": row.variant}
            if row.shaker is None:
                cell["trainable_parameters"] = 0
                cell.update(measure(self.provider, domain, domain.prompt, self.training, self.config, self.measure_seed(domain)))
            else:
                data = self._finetune_data(domain, row, sp)
                if data is None:
                    cell.update(status="not-run", reason="no public domain to use as out-of-domain data")
                else:
                    cell.update(self._shake_and_measure(domain, row, data, seed, spec["shaker"]))
            cell["seconds"] = round(time.perf_counter() - start, 2)
            (folder / "cell.json").write_text(json.dumps(cell))

        artifact = self.store.get_or_build("cell", spec, build)
        cell = json.loads((artifact.path / "cell.json").read_text())
        if "extraction" in cell:
            cell["extraction"] = extraction_at(cell["extraction"], self.config.extraction.delta, self.training.files)
        cell.setdefault("status", "ok")
        cell["cached"] = artifact.reused
        return cell

    def utility(self) -> dict:
        """Utility of the deployed model as users get it (see :func:`s2l_guard.utility.model_utility`), cached."""
        spec = {"format": 1, "bundle": self.bundle_art.key, "data": self.data_art.key, "utility": self.config.section("utility"),
                "loss": [self.config.report.loss_timesteps, self.config.report.loss_draws], "seed": self.config.run.seed,
                "provider": self.api_spec()}  # fmt: skip

        def build(folder: Path, key: str) -> None:
            start = time.perf_counter()
            log("measuring utility (generations of every domain, held-out denoising loss)")
            result = model_utility(self.provider, self.deployed, self.dataset, self.config, seed=derive_seed(self.config.run.seed, "utility"))
            result["seconds"] = round(time.perf_counter() - start, 2)
            (folder / "utility.json").write_text(json.dumps(result, indent=1))

        return json.loads((self.store.get_or_build("utility", spec, build).path / "utility.json").read_text())

    def defense_report(self) -> dict:
        """What the defense did, beyond the table: its pre-training summary (epsilon, images
        removed) and, for a fine-tune filter, its detection and false-rejection rates."""
        summary = self.bundle_art.path / "training.json"  # absent from a model folder the user gave
        training = json.loads(summary.read_text()) if summary.is_file() else {"given": str(self.bundle_art.path)}
        report: dict[str, Any] = {"name": self.defense.name, "points": list(self.defense.points), "threat_model": self.threat_model,
                                  "settings": self.defense.spec()["settings"], "unavailable_mia": self.unavailable_mia,
                                  "pretraining": training}  # fmt: skip
        if hasattr(self.defense, "detection") and self.filters_finetune:  # with the weights the filter is not in the way
            report["filter"] = self.filter_report()
        return report

    def filter_report(self) -> dict:
        """Detection rates of the fine-tune filter on bootstrap sets of each domain's SP set and of
        the adaptive requests built from it, pooled over domains, beside its false-rejection rate
        on held-out benign sets of the same sizes."""
        f, a = self.defense, self.config.adaptive
        counts: dict[str, list[int]] = {}
        sizes: dict[str, int] = {}
        for domain in self.domains:
            sp = self._finetune_data(domain, Row(domain.name, None, "SP"), self.sp_set(domain.name, domain.prompt))
            for variant in ("",) + a.variants:
                seed = derive_seed(self.config.run.seed, "adaptive", domain.name, f"report-{variant}")
                data = adapt_request(sp, variant, self.config, ood_data(self.dataset, self.config), seed) if variant else sp
                found = f.detection(f.image_losses(self.deployed, data.images, list(data.captions)), len(data.images))
                hits, n = counts.setdefault(variant or "sp", [0, 0])
                counts[variant or "sp"] = [hits + round(found["rate"] * found["n"]), n + found["n"]]
                sizes[variant or "sp"] = len(data.images)
        from defenses.finetune_filter import rate_with_interval

        return {
            "detection": {k: {"size": sizes[k], **rate_with_interval(h, n)} for k, (h, n) in counts.items()},
            "false_rejection_heldout": {str(size): f.heldout_false_rejection(size) for size in sorted(set(sizes.values()))},
            "method": "per-request statistic: mean denoising loss of the request's images under the deployed model; "
                      f"bootstrap sets (with replacement) of the request's size, {f.settings.calibration_sets} benign calibration "
                      "sets per size; Wilson 95% intervals",
        }  # fmt: skip

    def measure_seed(self, domain: Domain) -> int:
        """One seed per domain for every model's attacks: the loss attack's noise and the
        extraction candidates' starting noise are then the same for the pre-trained and the
        shaken model (common random numbers), so the paired tests compare models, not draws."""
        return derive_seed(self.config.run.seed, "measure", domain.name)

    def _finetune_data(self, domain: Domain, row: Row, sp: Artifact | None) -> FinetuneData | None:
        if row.data in ("SP", "OoD-gen"):
            if sp is None:
                return None
            images = load_imagefolder(sp.path, channels=self.dataset.images.shape[1])
            captions = [r.text for r in images.records]
            data = FinetuneData(images.images, captions, domain.prompt if row.data == "SP" else captions[0])
            return adapt_request(data, row.variant, self.config, ood_data(self.dataset, self.config), derive_seed(self.config.run.seed, "adaptive", domain.name, row.label)) if row.variant else data
        if row.data == "OoD":
            return ood_data(self.dataset, self.config)
        if row.data == "members":
            return FinetuneData(domain.members.images, [r.text for r in domain.members.records], domain.prompt)
        return FinetuneData(torch.empty(0), [], domain.prompt)  # Gaussian shaking uses no data

    def _shake_and_measure(self, domain: Domain, row: Row, data: FinetuneData, seed: int, shaker_spec: dict) -> dict:
        cls = SHAKERS.get(row.shaker)
        shaker = cls(cls.Settings(**_as_fields(cls.Settings, shaker_spec["settings"])))
        trajectory: list[dict] = []
        primary = self.config.attack.mia[0] if self.config.attack.mia else None
        measure_seed = self.measure_seed(domain)

        # Mid-training the domain is reached through the method's prompt too (TI's token).
        on_domain = row.data in ("SP", "members")  # trained on the domain's own images, under its prompt
        prompt = shaker.target_prompt(data) if on_domain and hasattr(shaker, "target_prompt") else domain.prompt
        captions = lambda part: [r.text.replace(domain.prompt, prompt) for r in part.records]  # noqa: E731

        def on_step(step: int, bundle: Bundle) -> None:  # open-weights only: the attacker trains locally
            attack = MIA.get(primary)(self.config.mia_settings(primary))
            m = attack.score(bundle, domain.members.images, captions(domain.members), seed=measure_seed)
            n = attack.score(bundle, domain.nonmembers.images, captions(domain.nonmembers), seed=measure_seed)
            trajectory.append({"step": step, "mia": primary, "auc": float(roc_metrics(m, n, resamples=100)["auc"].value)})

        every = self.config.attack.trajectory_every if primary else 0
        request = FinetuneRequest(shaker, data, seed)
        outcome = self.provider.finetune(request, callback=on_step if every else None, callback_every=every)
        if not outcome.admitted:
            return {"status": "refused", "reason": outcome.reason, "evidence": outcome.evidence, "images": len(data.images)}
        # The domain's prompt in the shaken model (Textual Inversion's token for an SP row;
        # the OoD control is attacked with the domain's own prompt).
        prompt = outcome.prompt if on_domain else domain.prompt
        out = measure(outcome.provider, domain, prompt, self.training, self.config, measure_seed)
        out.update(trainable_parameters=outcome.trainable_parameters, trajectory=trajectory, evidence=outcome.evidence,
                   images=len(data.images), final_loss=float(np.mean(outcome.losses[-10:])) if outcome.losses else None)  # fmt: skip
        return out


def adapt_request(data: FinetuneData, variant: str, config: Config, real: FinetuneData | None, seed: int) -> FinetuneData:
    """An attacker who knows the fine-tune filter changes its SP request ([adaptive]):

    ``perturb`` adds Gaussian pixel noise, ``mix`` swaps a share of the SP images for real
    public images (with their own captions), ``subset`` sends only a few SP images.
    """
    a = config.adaptive
    if variant == "perturb":
        g = torch.Generator().manual_seed(seed)
        noisy = (data.images + a.noise * torch.randn(data.images.shape, generator=g)).clamp(0, 1)
        return FinetuneData(noisy, data.captions, data.prompt)
    if variant == "mix":
        if real is None:
            raise DataError("the mix variant needs real public images; the data set has no public domain")
        n_real = min(len(real.images), round(a.real_share * len(data.images)))
        keep = len(data.images) - n_real
        return FinetuneData(torch.cat([data.images[:keep], real.images[:n_real]]), data.captions[:keep] + real.captions[:n_real], data.prompt)
    if variant == "subset":
        return FinetuneData(data.images[: a.images], data.captions[: a.images], data.prompt)
    raise ConfigError(f"unknown adaptive variant {variant!r}; use perturb, mix or subset")


def _as_fields(cls: type, values: dict) -> dict:
    """JSON lists back to the tuples a frozen Settings dataclass holds."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}


# ---------------------------------------------------------------- summaries


CONTROLS = {  # key in results.json -> (row suffix, what the control isolates)
    "vs_ood_control": "-ood",  # real images of a public domain: fine-tuning as such
    "vs_generated_ood_control": "-ood-gen",  # the model's own images of a public domain: self-generated data as such
}


def controls_for(cells: dict[str, dict], cell: dict) -> dict[str, dict]:
    """The controls an SP row is compared with: the same method on that data, else End-to-End on it.

    Only controls that ran are returned; non-SP rows have none.
    """
    if cell.get("data") != "SP":
        return {}
    found = {}
    for key, suffix in CONTROLS.items():
        control = cells.get(f"{cell['shaker']}{suffix}") or cells.get(f"end2end{suffix}")
        if control is not None and control.get("status", "ok") == "ok":
            found[key] = control
    return found


def _scores(cell: dict, mia: str) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(cell["mia"][mia]["members"]), np.asarray(cell["mia"][mia]["nonmembers"])


def roc_points(members: np.ndarray, nonmembers: np.ndarray) -> dict[str, list[float]]:
    """The ROC curve's corners (scikit-learn), for plots in reports."""
    fpr, tpr, _ = roc_curve(np.r_[np.ones(len(members)), np.zeros(len(nonmembers))], np.r_[members, nonmembers])
    return {"fpr": np.round(fpr, 5).tolist(), "tpr": np.round(tpr, 5).tolist()}


def _calibrated(protocol: dict) -> dict:
    """The TPR at 1% FPR an attacker reaches on new samples: the threshold fitted on the calibration
    split's non-members, measured on the disjoint test split (:func:`threshold_protocol`)."""
    fitted = protocol["fit_on_calibration"][str(FPRS[0])]
    return {"value": fitted["tpr"]["value"], "ci95": fitted["tpr"]["ci95"], "fpr_on_test": fitted["fpr"]["value"],
            "resolvable": fitted["resolvable"], "test_members": protocol["split"]["test"]["members"],
            "test_nonmembers": protocol["split"]["test"]["nonmembers"], "threshold": fitted["threshold"]}  # fmt: skip


def calibrated_tpr_text(entry: dict | None) -> str:
    """A calibrated TPR for tables, marked where too few test non-members resolve 1% FPR."""
    if not entry:
        return ""
    text = f"{entry['value']:.3f}"
    return text if entry["resolvable"] else f"{text} (unresolvable, n={entry['test_nonmembers']})"


def summarize_mia(cell: dict, base: dict, config: Config, seed: int, controls: dict[str, dict]) -> dict:
    out = {}
    b = config.attack.bootstrap
    for name in cell["mia"]:
        (m, n), (bm, bn) = _scores(cell, name), _scores(base, name)
        entry = {
            "roc": metrics_to_dict(roc_metrics(m, n, fprs=FPRS, resamples=b, seed=seed)),
            "curve": roc_points(m, n),
            "thresholds": metrics_to_dict(threshold_protocol(m, n, fprs=FPRS, calibration_share=config.attack.calibration_share, seed=seed, resamples=b)),
        }  # fmt: skip
        entry["tpr_calibrated"] = _calibrated(entry["thresholds"])
        if cell is not base:
            entry["vs_pretrained"] = {
                "auc_paired_bootstrap": paired_bootstrap_delta(bm, bn, m, n, statistic="auc", resamples=b, seed=seed).to_dict(),
                "auc_delong": delong_test(bm, bn, m, n).to_dict(),
                "tpr@0.01_calibrated": calibrated_tpr_delta(bm, bn, m, n, fpr=FPRS[0], calibration_share=config.attack.calibration_share,
                                                            resamples=b, seed=seed),
                "tpr@0.01_paired_bootstrap_in_sample": paired_bootstrap_delta(bm, bn, m, n, statistic="tpr@0.01", resamples=b, seed=seed).to_dict(),
            }  # fmt: skip
        for key, control in controls.items():
            entry[key] = {"auc_delong": delong_test(*_scores(control, name), m, n).to_dict()}
        out[name] = entry
    return out


def summarize_cell(cell: dict, base: dict, config: Config, seed: int, controls: dict[str, dict]) -> dict:
    if cell.get("status", "ok") != "ok" or base.get("status", "ok") != "ok":
        return {k: cell.get(k) for k in ("row", "shaker", "data", "variant", "status", "reason", "evidence", "images")}
    summary = {k: cell.get(k) for k in ("row", "shaker", "data", "variant", "sigma", "prompt", "trainable_parameters", "final_loss",
                                        "seconds", "cached", "trajectory", "evidence", "images")}  # fmt: skip
    summary["status"] = "ok"
    summary["mia"] = summarize_mia(cell, base, config, seed, controls)
    ext = dict(cell["extraction"]["summary"], extracted_files=cell["extraction"]["extracted"])
    b = config.attack.bootstrap
    hits = cell["extraction"]["hits"]
    ext["above_null"] = excess_extraction(hits, cell["extraction"]["null_hits"], null_weight=cell["extraction"]["null_weight"], resamples=b, seed=seed)
    if cell is not base:
        ext["vs_pretrained"] = extraction_delta(base["extraction"]["hits"], hits, resamples=b, seed=seed).to_dict()
        ext["above_null_vs_pretrained"] = share_delta(_null_shares([base]), _null_shares([cell]), statistic="extracted_above_null",
                                                      resamples=b, seed=seed).to_dict()  # fmt: skip
    for key, control in controls.items():
        ext[key] = extraction_delta(control["extraction"]["hits"], hits, resamples=b, seed=seed).to_dict()
    summary["extraction"] = ext
    return summary


def pooled(cells_by_domain: dict[str, dict[str, dict]], row: str, base_row: str, config: Config, seed: int) -> dict:
    """One table row over all domains: scores pooled for MIA, extractions averaged per domain.

    An SP row is also compared with its out-of-domain controls (see :func:`controls_for`),
    where every domain has them.
    """
    usable = [cells for cells in cells_by_domain.values() if cells[row]["status"] == "ok" and cells[base_row]["status"] == "ok"]
    refused = sorted(name for name, cells in cells_by_domain.items() if cells[row]["status"] == "refused")
    if not usable:
        statuses = sorted({c[row]["status"] for c in cells_by_domain.values()})
        status = next((s for s in ("failed", "refused") if s in statuses), "not-run")
        reasons = sorted({c[row].get("reason") for c in cells_by_domain.values() if c[row].get("reason")})
        return {"row": row, "status": status, "reasons": reasons, "refused_domains": refused}
    cells = [c[row] for c in usable]
    bases = [c[base_row] for c in usable]
    found = [controls_for(c, c[row]) for c in usable]
    controls = {key: [f[key] for f in found] for key in CONTROLS if all(key in f for f in found)}
    join = lambda cs, mia: tuple(np.concatenate([_scores(c, mia)[i] for c in cs]) for i in (0, 1))  # noqa: E731
    data = cells[0].get("data") + (f"+{cells[0]['variant']}" if cells[0].get("variant") else "")
    out: dict[str, Any] = {"row": row, "status": "ok", "domains": len(cells), "data": data, "refused_domains": refused,
                           "trainable_parameters": cells[0].get("trainable_parameters"), "mia": {},
                           "controls": {key: control_cells[0]["row"] for key, control_cells in controls.items()}}  # fmt: skip
    b = config.attack.bootstrap
    for mia in config.attack.mia:
        (m, n), (bm, bn) = join(cells, mia), join(bases, mia)
        share = config.attack.calibration_share
        entry = {"roc": metrics_to_dict(roc_metrics(m, n, fprs=FPRS, resamples=b, seed=seed)),
                 "tpr_calibrated": _calibrated(metrics_to_dict(threshold_protocol(m, n, fprs=FPRS[:1], calibration_share=share, seed=seed, resamples=b)))}
        if row != base_row:
            entry["auc_delta"] = paired_bootstrap_delta(bm, bn, m, n, statistic="auc", resamples=b, seed=seed).to_dict()
            entry["tpr_delta"] = calibrated_tpr_delta(bm, bn, m, n, fpr=FPRS[0], calibration_share=share, resamples=b, seed=seed)
            entry["tpr_delta_in_sample"] = paired_bootstrap_delta(bm, bn, m, n, statistic=f"tpr@{FPRS[0]}", resamples=b, seed=seed).to_dict()
        for key, control_cells in controls.items():
            cm, cn = join(control_cells, mia)
            entry[f"auc_delta_{key}"] = paired_bootstrap_delta(cm, cn, m, n, statistic="auc", resamples=b, seed=seed).to_dict()
        out["mia"][mia] = entry
    if config.attack.mia and all(c.get("trajectory") for c in cells):
        steps = config.shaker_settings(cells[0]["shaker"]).steps
        out["best_checkpoint"] = best_checkpoint(cells, bases, config.attack.mia[0], steps)
    counts = [distinct_extracted(c["extraction"]["hits"]) for c in cells]
    null_counts = [distinct_extracted(c["extraction"]["null_hits"]) for c in cells]
    excess = _null_shares(cells)
    flagged = sum(sum(c["extraction"]["flagged"]) for c in cells)
    true_flagged = sum(sum(1 for h, f in zip(c["extraction"]["any_hits"], c["extraction"]["flagged"]) if f and h >= 0) for c in cells)
    out["extraction"] = {
        "extracted_per_domain_mean": float(np.mean(counts)),
        "extracted_per_domain": counts,
        "nonmembers_matched_per_domain": null_counts,
        "above_null": {"excess": float(excess.sum()), "ci95": share_sum_interval(excess, resamples=b, seed=seed), "candidates": len(excess),
                       "method": "members minus non-members matched by the same candidates, summed over domains; bootstrap of candidate shares"},
        "candidates_per_domain": cells[0]["extraction"]["summary"]["candidates"],
        "withheld": sum(c["extraction"].get("withheld", 0) for c in cells),  # by a generate API
        "precision": true_flagged / flagged if flagged else None,
    }
    if row != base_row:  # domains' members are distinct images, so their hits pool into one count
        pool = lambda cs: [h for c in cs for h in c["extraction"]["hits"]]  # noqa: E731
        out["extraction"]["delta_total_vs_pretrained"] = extraction_delta(pool(bases), pool(cells), resamples=b, seed=seed).to_dict()
        out["extraction"]["above_null_delta_vs_pretrained"] = share_delta(_null_shares(bases), excess, statistic="extracted_above_null",
                                                                          resamples=b, seed=seed).to_dict()  # fmt: skip
    return out


def _null_shares(cells: list[dict]) -> np.ndarray:
    """Every candidate's share of the extraction above the null, over the cells' domains (whose
    members and non-members are disjoint, so the shares pool)."""
    return np.concatenate([candidate_shares(c["extraction"]["hits"], c["extraction"]["null_hits"], null_weight=c["extraction"]["null_weight"])
                           for c in cells])  # fmt: skip


def _auc(cell: dict, mia: str) -> float:
    m, n = _scores(cell, mia)
    return float(roc_auc_score(np.r_[np.ones(len(m)), np.zeros(len(n))], np.r_[m, n]))


def best_checkpoint(cells: list[dict], bases: list[dict], mia: str, final_step: int) -> dict:
    """The fine-tuning step with the highest mean per-domain AUC, the final step included.

    A worst-case bound, not an attack: picking the step needs the membership labels
    the attacker does not have. Compared with the pre-trained model's mean per-domain AUC.
    """
    by_step: dict[int, list[float]] = {}
    for cell in cells:
        for point in cell["trajectory"]:
            by_step.setdefault(point["step"], []).append(point["auc"])
    curve = {step: float(np.mean(aucs)) for step, aucs in by_step.items() if len(aucs) == len(cells)}
    curve[final_step] = float(np.mean([_auc(c, mia) for c in cells]))
    step = max(curve, key=lambda s: (curve[s], -s))
    pretrained = float(np.mean([_auc(b, mia) for b in bases]))
    return {"mia": mia, "step": step, "mean_domain_auc": curve[step], "pretrained_mean_domain_auc": pretrained,
            "delta": curve[step] - pretrained, "curve": [{"step": s, "mean_domain_auc": a} for s, a in sorted(curve.items())],
            "uses_membership_labels": True}  # fmt: skip


def gaussian_means(table: list[dict], rows: list[Row], config: Config) -> list[dict]:
    """Per sigma, the mean over Gaussian draws: one draw is too noisy to read (the paper's rise
    at s = 8e-4 needs several draws to tell from chance)."""
    by_label = {entry["row"]: entry for entry in table}
    out = []
    for sigma in config.attack.gaussian_sigmas:
        draws = [by_label[r.label] for r in rows if r.sigma == sigma and by_label[r.label]["status"] == "ok"]
        if not draws:
            continue
        entry: dict[str, Any] = {"row": f"gaussian-{sigma:g}-mean", "status": "ok", "draws": len(draws), "sigma": sigma,
                                 "trainable_parameters": draws[0]["trainable_parameters"], "mia": {}}  # fmt: skip
        for mia in config.attack.mia:
            aucs = [d["mia"][mia]["roc"]["auc"]["value"] for d in draws]
            deltas = [d["mia"][mia]["auc_delta"]["delta"] for d in draws]
            entry["mia"][mia] = {"auc_mean": float(np.mean(aucs)), "auc_draws": aucs,
                                 "auc_delta_mean": float(np.mean(deltas)), "auc_delta_draws": deltas}  # fmt: skip
        counts = [d["extraction"]["extracted_per_domain_mean"] for d in draws]
        entry["extraction"] = {"extracted_per_domain_mean": float(np.mean(counts)), "draws": counts}
        out.append(entry)
    return out


def run_cells(run: S2LRun, rows: list[Row], progress: Callable[[dict], None] | None = None) -> dict[str, dict[str, dict]]:
    """Every (domain, row) cell, logged (or passed to ``progress``) as it finishes; a crashing
    cell is recorded as failed."""
    total = len(rows) * len(run.domains)
    cells_by_domain: dict[str, dict[str, dict]] = {}
    done = 0
    for domain in run.domains:
        cells_by_domain[domain.name] = {}
        for row in rows:
            try:
                cell = run.run_cell(domain, row)
            except ConfigError:
                raise
            except Exception as exc:  # one broken cell must not lose the others; it is reported as failed
                cell = {"row": row.label, "shaker": row.shaker, "data": row.data, "status": "failed",
                        "reason": f"{type(exc).__name__}: {exc}", "cached": False}  # fmt: skip
            cells_by_domain[domain.name][row.label] = cell
            done += 1
            if progress is not None:
                progress(cell)
                continue
            took = "cached" if cell["cached"] else cell["status"] if cell["status"] != "ok" else f"{cell['seconds']:.1f} s"
            log(f"cell {done}/{total}: {domain.name} {row.label} ({took})")
    return cells_by_domain


def run_attack(config: Config, progress: Callable[[dict], None] | None = None) -> dict:
    """Run the S2L table for every attacked domain; return results.json's content.

    ``progress`` is called with each finished (domain, row) cell instead of logging it.
    """
    start = time.perf_counter()
    run = S2LRun(config)
    config = run.config  # without the attacks the threat model rules out
    rows = plan_rows(config, adaptive=run.filters_finetune)
    cells_by_domain = run_cells(run, rows, progress)
    seed = config.run.seed
    domains_out = {}
    for domain in run.domains:
        cells = cells_by_domain[domain.name]
        base = cells["pretrained"]
        domains_out[domain.name] = {
            "prompt": domain.prompt, "members": len(domain.members), "nonmembers": len(domain.nonmembers),
            "rows": {label: summarize_cell(cell, base, config, seed, controls_for(cells, cell)) for label, cell in cells.items()},
        }  # fmt: skip
    table = [pooled(cells_by_domain, row.label, "pretrained", config, seed) for row in rows]
    table += gaussian_means(table, rows, config)
    results = {
        "schema": SCHEMA,
        "s2l_guard_version": __version__,
        "config_source": config.source,
        "config": config.to_dict(),
        "method_settings": config.method_settings(),
        "seed": seed,
        "artifacts": {"testbed": str(run.data_art.path), "bundle": str(run.bundle_art.path)},
        "method": _method(config),
        "defense": run.defense_report(),
        "utility": run.utility(),
        "table": table,
        "domains": domains_out,
        "wall_seconds": round(time.perf_counter() - start, 2),
    }
    return results


def _method(config: Config) -> str:
    a, e = config.attack, config.extraction
    return (
        f"MIA: members vs held-out non-members of each domain, scores higher = member; AUC with {a.bootstrap}-resample "
        f"stratified bootstrap 95% intervals; TPR at 1% FPR calibrated: threshold fitted on a {a.calibration_share:g} "
        f"calibration split of the non-members, TPR measured on the disjoint test split (unresolvable under 100 test non-members). "
        f"Amplification: after minus before on the same samples (paired bootstrap; DeLong for AUC; TPR paired over test members). "
        f"Extraction: {e.candidates} candidates per domain and model; every member within (k={e.max_copies}, tiled L2, "
        f"delta={e.delta})-eidetic reach of a candidate counts; above null = members minus held-out non-members matched "
        f"by the same candidates; precision over candidates with >= {e.flag_neighbours} near-duplicate "
        f"generations within {e.flag_delta}; deltas at equal candidate counts with a candidate bootstrap."
    )


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The paper's table as strings: one row per method, pooled over the attacked domains."""
    primary = results["config"]["attack"]["mia"][0] if results["config"]["attack"]["mia"] else "mia"
    header = ["method", "data", "trainable params", f"{primary} AUC [95% CI]", "TPR@1%FPR (calibrated)", "extracted / domain",
              "above null, all domains [95% CI]", "d above null [95% CI]", "precision", "dAUC vs pre-trained [95% CI], p", "dAUC vs OoD", "dAUC vs OoD-gen",
              "best step: dAUC (oracle)"]  # fmt: skip
    out = []
    for row in results["table"]:
        line = [row["row"], row.get("data") or "-"]
        if row["status"] != "ok":
            out.append(line + [row["status"], (row.get("reasons") or [""])[0][:90]] + [""] * (len(header) - 4))
            continue
        line.append(_short(row.get("trainable_parameters") or 0))
        stats = row["mia"].get(primary, {})
        if "draws" in row:  # a Gaussian mean row
            line += [f"{stats.get('auc_mean', float('nan')):.3f} (mean of {row['draws']} draws)", "",
                     f"{row['extraction']['extracted_per_domain_mean']:.1f}", "", "", "", f"{stats.get('auc_delta_mean', float('nan')):+.3f} (mean)", "", "", ""]  # fmt: skip
            out.append(line)
            continue
        roc = stats.get("roc")
        line.append(_interval(roc["auc"]["value"], roc["auc"]["ci95"]) if roc else "")
        line.append(calibrated_tpr_text(stats.get("tpr_calibrated")) if roc else "")
        precision = row["extraction"]["precision"]
        excess = row["extraction"]["above_null"]
        moved = row["extraction"].get("above_null_delta_vs_pretrained")
        line += [f"{row['extraction']['extracted_per_domain_mean']:.1f}", _interval(excess["excess"], excess["ci95"], signed=True, digits=1),
                 _interval(moved["delta"], moved["ci95"], signed=True, digits=1) if moved else "",
                 "-" if precision is None else f"{precision:.2f}"]  # fmt: skip
        delta = stats.get("auc_delta")
        line.append(f"{_interval(delta['delta'], delta['ci95'], signed=True)}, p={delta['p_value']:.2f}" if delta else "")
        for key in ("auc_delta_vs_ood_control", "auc_delta_vs_generated_ood_control"):
            control = stats.get(key)
            line.append(_interval(control["delta"], control["ci95"], signed=True) if control else "")
        best = row.get("best_checkpoint")
        line.append(f"{best['delta']:+.3f} @ {best['step']}" if best else "")
        out.append(line)
    return header, out


def attack_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Every MIA side by side: per row, each attack's AUC and its paired change vs the pre-trained model.

    The paper's table shows one attack; which attack is strongest differs between
    models, and a verdict should not rest on the one that happens to be printed.
    """
    mias = results["config"]["attack"]["mia"]
    header = ["method", "data"] + [f"{m} AUC, dAUC [95% CI]" for m in mias]
    out = []
    for row in results["table"]:
        if row["status"] != "ok" or "draws" in row:  # Gaussian means: see the main table
            continue
        line = [row["row"], row.get("data") or "-"]
        for m in mias:
            auc, delta = row["mia"][m]["roc"]["auc"]["value"], row["mia"][m].get("auc_delta")
            line.append(f"{auc:.3f}" + (f", {_interval(delta['delta'], delta['ci95'], signed=True)}" if delta else ""))
        out.append(line)
    return header, out


def _interval(value: float, ci: list[float], signed: bool = False, digits: int = 3) -> str:
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(value)} [{f.format(ci[0])}, {f.format(ci[1])}]"


def _footer(results: dict) -> list[str]:
    first = results["table"][0].get("extraction", {})
    return [
        f"domains: {', '.join(results['domains'])}; extracted = mean distinct members per domain "
        f"of {first.get('candidates_per_domain', '?')} candidates",
        f"method: {results['method']}",
        "dAUC vs OoD / OoD-gen: paired against the same method trained on real images / on its own generations "
        "of a public digit (rows <method>-ood, <method>-ood-gen) where they ran, else against End-to-End's",
        "TPR@1%FPR (calibrated): threshold fitted on the calibration split, TPR on the test split; unresolvable, n=N: "
        "only N test non-members, under the 100 that 1% FPR needs",
        "above null: members minus held-out non-members that the same candidates match (chance matches of new digits); "
        "d above null: its change vs the pre-trained model",
        "best step: the fine-tuning step (trajectory or final) with the highest mean per-domain AUC, minus the "
        "pre-trained model's; choosing it needs membership labels, so it bounds the worst case and is no attack",
    ] + defense_lines(results)


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    render = lambda r: "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()  # noqa: E731
    return [render(header), "-" * len(render(header))] + [render(r) for r in rows]


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def format_table(results: dict) -> str:
    """The table as aligned plain text, for the terminal, then every attack side by side."""
    lines = _aligned(*table_rows(results)) + _footer(results)
    if not results["config"]["attack"]["mia"]:
        return "\n".join(lines)
    return "\n".join(lines + ["", "every membership inference attack, paired vs pre-trained:"] + _aligned(*attack_rows(results)))


def format_markdown(results: dict) -> str:
    """The table as Markdown, for reports."""
    lines = _markdown(*table_rows(results)) + [""] + _footer(results)
    if not results["config"]["attack"]["mia"]:
        return "\n".join(lines) + "\n"
    lines += ["", "## Every membership inference attack (paired change vs the pre-trained model)", ""] + _markdown(*attack_rows(results))
    return "\n".join(lines) + "\n"


def _short(n: int) -> str:
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def write_results(config: Config, results: dict) -> Path:
    """Write results.json, table.txt, table.md and the resolved config into the run folder."""
    run_dir = run_folder(config)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    (run_dir / "config.toml").write_text(config.to_toml())
    (run_dir / "table.txt").write_text(config.to_toml() + "\n" + format_table(results) + "\n")
    (run_dir / "table.md").write_text(f"# S2L table ({config.name} profile)\n\n" + format_markdown(results))
    return run_dir
