"""What a run will compute, without running anything: the table's rows and the matrix's cells.

A *row* is one model of the S2L table (the pre-trained model, or a shaker on some
data); a table run computes every (domain, row) pair. A *planned cell* is one
entry of the defense x attack matrix: (defense, row, measure, domain, seed).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from attacks.base import FinetuneData
from defenses.base import DEFENSES
from s2l_guard.config import Config
from s2l_guard.data import ImageDataset
from s2l_guard.errors import ConfigError
from s2l_guard.results import POOLED

from .settings import check_plugins, defense_settings


def derive_seed(seed: int, *labels: object) -> int:
    """A seed for one (domain, row, ...) that does not shift when other cells are added."""
    digest = hashlib.sha256(json.dumps([seed, *map(str, labels)]).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def attack_seed(config: Config) -> int:
    """The seed of the attack's randomness (SP sets, fine-tunes, candidates, bootstrap) on the model
    [run] seed made: draw 0 is the seed itself (so a single-draw run keeps its cache keys), draw k
    a seed derived from both."""
    return config.run.seed if config.run.draw == 0 else derive_seed(config.run.seed, "draw", config.run.draw)


class DataKind(str, Enum):
    """What a row's shaker trains on; written to results.json as its value."""

    NONE = "-"  # no data: the pre-trained model, Gaussian shaking
    SP = "SP"  # the domain's SP set
    OOD = "OoD"  # real images of a public domain: the paper's control
    OOD_GEN = "OoD-gen"  # the model's own generations of a public domain's prompt
    MEMBERS = "members"  # the domain's real members: the oracle SP set, an upper bound

    def __str__(self) -> str:
        return self.value


_SUFFIX = {DataKind.SP: "", DataKind.OOD: "-ood", DataKind.OOD_GEN: "-ood-gen", DataKind.MEMBERS: "-members"}


def row_label(shaker: str, data: DataKind) -> str:
    """A fine-tune row's label: the shaker, suffixed by what it trains on (lora, lora-ood, lora-members)."""
    return shaker + _SUFFIX[DataKind(data)]


CONTROL_SUFFIX = "-control"


def control_label(config: Config) -> str:
    """The calibrated positive control's row label ("" when [attack] control_steps is 0)."""
    return config.attack.control_shaker + CONTROL_SUFFIX if config.attack.control_steps else ""


def trains_on_members(label: str) -> bool:
    """Whether the row of ``label`` fine-tunes on the real members (an oracle row or the control)."""
    return label.endswith((_SUFFIX[DataKind.MEMBERS], CONTROL_SUFFIX))


@dataclass(frozen=True)
class Row:
    """One row of the S2L table: a shaker on some data (or none: the pre-trained model)."""

    label: str
    shaker: str | None
    data: DataKind
    overrides: tuple[tuple[str, Any], ...] = ()  # settings changed from the config's (Gaussian sigma, ablated rank)
    draw: int = 0
    variant: str = ""  # an adaptive attacker's change to the SP request ([adaptive] variants)

    @property
    def sigma(self) -> float | None:
        return dict(self.overrides).get("sigma")


def gaussian_row(sigma: float, draw: int) -> Row:
    return Row(f"gaussian-{sigma:g}-draw{draw}", "gaussian", DataKind.NONE, (("sigma", sigma),), draw)


def plan_rows(config: Config, *, adaptive: bool = False) -> list[Row]:
    """The table's rows; ``adaptive`` adds the requests of an attacker who knows a fine-tune filter."""
    a = config.attack
    fine_tunes = [
        (DataKind.OOD, a.ood_shakers),
        (DataKind.OOD_GEN, a.ood_generated_shakers),
        (DataKind.SP, a.shakers),
        (DataKind.MEMBERS, a.member_shakers),
    ]
    rows = [Row("pretrained", None, DataKind.NONE)]
    rows += [Row(row_label(name, kind), name, kind) for kind, names in fine_tunes for name in names]
    if a.control_steps:
        budget = (("steps", a.control_steps), ("learning_rate", a.control_learning_rate))
        rows.append(Row(control_label(config), a.control_shaker, DataKind.MEMBERS, budget))
    if adaptive:
        rows += [Row(f"{name}-{v}", name, DataKind.SP, variant=v) for name in config.adaptive.shakers for v in config.adaptive.variants]
    rows += [gaussian_row(s, d) for s in a.gaussian_sigmas for d in range(a.gaussian_draws)]
    return rows


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


def resolve_threat_model(name: str, defense) -> str:
    """``auto``: an API defense is attacked through its API (finetune-api), any other under open-weights."""
    if name != "auto":
        return name
    return "finetune-api" if {"finetune", "generate"} & set(defense.points) else "open-weights"


@dataclass(frozen=True)
class PlannedCell:
    """What identifies a cell; ``measure`` is an MIA name, "extraction" or "utility"."""

    defense: str
    attack: str  # the S2L table's row label: pretrained, lora, gaussian-0.0008-draw1, end2end-perturb, ...
    measure: str
    domain: str
    seed: int  # the testbed replicate ([matrix] replicates; [run] seed)
    many_seeds: bool = False
    draw: int = 0  # the attack's draw ([matrix] draws; [run] draw)
    many_draws: bool = False
    base_attack: str = ""  # an adaptive request's plain SP attack (its positive control), else the attack itself
    oracle: str = ""  # the oracle row that shows the instrument sees leakage on this model ("": none planned)
    weights_of: str = "none"  # the defense whose weights the model has: itself if it changes the training recipe

    @property
    def gate_id(self) -> str:
        """The gate's id: one gate pools every replicate and draw of the cell."""
        parts = [self.defense, self.attack, self.measure, self.domain] if self.measure != "utility" else [self.defense, "utility"]
        return "-".join(parts)

    @property
    def id(self) -> str:
        return self.gate_id + (f"-seed{self.seed}" if self.many_seeds else "") + (f"-draw{self.draw}" if self.many_draws else "")

    @property
    def gate_key(self) -> tuple[str, str, str, str]:
        return (self.defense, self.attack, self.measure, self.domain)


def seeds(config: Config) -> list[int]:
    """The testbed replicates the matrix runs ([matrix] replicates, else [run] seed)."""
    return list(config.matrix.replicates) or [config.run.seed]


def draws(config: Config) -> list[int]:
    """The attack draws on each model ([matrix] draws, else [run] draw)."""
    return list(config.matrix.draws) or [config.run.draw]


def units(config: Config) -> list[tuple[int, int]]:
    """Every (replicate, draw) the matrix measures."""
    return [(seed, draw) for seed in seeds(config) for draw in draws(config)]


def defended_config(config: Config, defense: str, seed: int, draw: int = 0) -> Config:
    """The config of one defense's table in the matrix ("name" or "name@threat-model"):
    [matrix] rows replace [attack]'s."""
    m = config.matrix
    name, _, threat_model = defense.partition("@")
    attack = {"shakers": list(m.shakers), "member_shakers": list(m.member_shakers), "ood_shakers": [],
              "ood_generated_shakers": [], "gaussian_sigmas": list(m.gaussian_sigmas)}  # fmt: skip
    return config.replace(run={"seed": seed, "draw": draw}, defense={"name": name, "threat_model": threat_model or config.defense.threat_model},
                          attack=attack)  # fmt: skip


def domain_names(config: Config) -> list[str]:
    """The attacked domains: [attack] domains, else every private domain of the data set."""
    if config.attack.domains:
        return list(config.attack.domains)
    if config.run.data:  # read from the metadata only: the images are loaded when the tables run
        from s2l_guard.data import METADATA, _read_records

        path = Path(config.run.data) / METADATA
        if not path.is_file():
            raise ConfigError(f"[run] data = {config.run.data!r} has no {METADATA}; see docs/testbed.md for the layout")
        return sorted({r.domain for r in _read_records(path) if r.membership == "member"})
    return [f"digit{d}" for d in config.testbed.private_domains]


def _table_plan(config: Config) -> tuple[list, list[str], bool]:
    """The rows one defense's table runs, every MIA the config names (those the threat model
    rules out still get cells: they are reported as not run) and whether the defense changes the
    weights (acts on training); ``config`` is checked by :func:`plan`."""
    defense = DEFENSES.get(config.defense.name)(defense_settings(config, config.defense.name))
    if config.run.model and "training" in defense.points:
        raise ConfigError(f"[matrix] defenses lists {defense.name}, a pre-training recipe, which cannot be applied to a given "
                          f"model ([run] model / --model); remove it here, or gate it on the testbed model")  # fmt: skip
    threat_model = resolve_threat_model(config.defense.threat_model, defense)
    adaptive = threat_model != "open-weights" and "finetune" in defense.points
    return plan_rows(config, adaptive=adaptive), list(config.attack.mia), "training" in defense.points


def oracle_row(row: Row, member_shakers: tuple[str, ...], control: str = "") -> str:
    """The row that shows the instrument sees leakage for ``row``: the calibrated control where one
    is planned, else its method fine-tuned on the real members, else the first oracle method's (""
    when the matrix plans none). The pre-trained row and Gaussian rows take the first."""
    if control:
        return control
    if row.shaker in member_shakers:
        return row_label(row.shaker, DataKind.MEMBERS)
    return row_label(member_shakers[0], DataKind.MEMBERS) if member_shakers else ""


def plan(config: Config, defenses: list[str] | None = None) -> list[PlannedCell]:
    """Every cell the matrix of ``config`` will report, without running anything."""
    config = check_plugins(config)
    out = []
    many, many_draws = len(seeds(config)) > 1, len(draws(config)) > 1
    for seed, draw in units(config):
        for defense in defenses or config.matrix.defenses:
            defended = defended_config(config, defense, seed, draw)
            rows, mias, trains = _table_plan(defended)
            weights = defense if trains else "none"
            for row in rows:
                oracle = oracle_row(row, defended.attack.member_shakers, control_label(defended))
                for measure in mias + ["extraction"]:
                    base = row.shaker if row.variant else row.label
                    out += [PlannedCell(defense, row.label, measure, d, seed, many, draw, many_draws, base, oracle, weights)
                            for d in domain_names(config) + [POOLED]]  # fmt: skip
            out.append(PlannedCell(defense, "-", "utility", POOLED, seed, many, draw, many_draws))
    return out
