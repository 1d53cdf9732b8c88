"""Typed results: a table cell, a matrix cell, its status and an amplification, as frozen dataclasses.

results.json stays the interchange format (schema "s2l-guard/matrix/1", docs/results.md);
these classes are how code reads and writes its cells. ``GateCell.from_dict(c).to_dict()``
gives back ``c`` key for key and in the same order, so a matrix written through them is
byte-identical to one written before they existed. A :class:`TableCell` is what the store
keeps of one (domain, row) of the S2L table: raw scores, from which every statistic is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Mapping

import numpy as np

POOLED = "all"  # the domain name of a cell pooled over every attacked domain


class Status(str, Enum):
    """What happened to a cell; written to results.json as its value."""

    OK = "ok"
    FAILED = "failed"  # the cell (or its table, or its baseline) crashed or is missing
    REFUSED = "refused"  # the provider refused the fine-tune request: nothing to attack
    NOT_RUN = "not-run"  # the threat model or the config rules the measure out

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Amplification:
    """After minus before on the same samples: the estimate, its 95% interval and test."""

    before: float
    after: float
    delta: float
    ci95: tuple[float, float] | None
    p_value: float | None
    method: str  # how the interval and the test were obtained (e.g. paired bootstrap, 2000 resamples)

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> Amplification:
        """From a results.json entry, or from a longer :class:`~s2l_guard.stats.DeltaTest` dict."""
        ci = entry.get("ci95")
        return cls(entry["before"], entry["after"], entry["delta"], None if ci is None else (ci[0], ci[1]),
                   entry.get("p_value"), entry.get("method", ""))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"before": self.before, "after": self.after, "delta": self.delta,
                "ci95": None if self.ci95 is None else list(self.ci95), "p_value": self.p_value, "method": self.method}  # fmt: skip


@dataclass(frozen=True)
class RowInfo:
    """What the S2L table says of a cell's row: the shaker and the data it trained on."""

    shaker: str | None
    data: str | None  # a DataKind value ("SP", "OoD", ...), "-" for no data
    variant: str = ""  # an adaptive attacker's change to the SP request


@dataclass(frozen=True)
class Timing:
    """A per-domain cell's compute time, and whether it came from the cache."""

    seconds: float | None
    cached: bool | None


@dataclass(frozen=True)
class GateCell:
    """One (defense, attack, measure, domain, seed, draw) of the matrix, as measured.

    ``metrics`` and ``samples`` keep results.json's nested shape (docs/results.md), which
    differs by measure; the properties read the parts every consumer needs.
    """

    id: str
    defense: str
    threat_model: str | None
    attack: str  # the S2L table's row label; "-" for utility
    measure: str  # an MIA name, "extraction" or "utility"
    domain: str
    seed: int
    status: Status
    reason: str | None = None
    row: RowInfo | None = None  # None where the table never reached the row
    metrics: Mapping[str, Any] | None = None
    samples: Mapping[str, Any] | None = None
    refused_domains: tuple[str, ...] | None = None  # pooled cells only
    timing: Timing | None = None  # per-domain cells only
    draw: int = 0  # the attack's draw on the model of `seed` (results.json before draws: 0)

    @property
    def key(self) -> tuple[str, str, str, str, int, int]:
        return (self.defense, self.attack, self.measure, self.domain, self.seed, self.draw)

    @property
    def gate_id(self) -> str:
        """The id of the gate that judges this cell with every other replicate and draw of it."""
        return f"{self.defense}-utility" if self.measure == "utility" else "-".join((self.defense, self.attack, self.measure, self.domain))

    @property
    def pooled(self) -> bool:
        return self.domain == POOLED

    @property
    def measured(self) -> bool:
        """Whether the gates judge it: it ran, or the provider refused the request (a pass)."""
        return self.status in (Status.OK, Status.REFUSED)

    def metric(self, name: str) -> Any:
        return (self.metrics or {}).get(name)

    @property
    def amplification(self) -> Amplification | None:
        """The headline amplification: AUC for an MIA, extraction above the null for extraction."""
        entry = self.metric("extraction_amplification" if self.measure == "extraction" else "auc_amplification")
        return None if entry is None else Amplification.from_dict(entry)

    @classmethod
    def from_dict(cls, c: Mapping[str, Any]) -> GateCell:
        row = RowInfo(c["shaker"], c["data"], c.get("variant", "")) if "shaker" in c else None
        refused = c.get("refused_domains")
        timing = Timing(c.get("seconds"), c.get("cached")) if "seconds" in c or "cached" in c else None
        return cls(c["id"], c["defense"], c["threat_model"], c["attack"], c["measure"], c["domain"], c["seed"], Status(c["status"]),
                   c.get("reason"), row, c.get("metrics"), c.get("samples"), None if refused is None else tuple(refused), timing,
                   c.get("draw", 0))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "defense": self.defense, "threat_model": self.threat_model, "attack": self.attack,
                               "measure": self.measure, "domain": self.domain, "seed": self.seed}  # fmt: skip
        if self.draw:  # written only when drawn, so a single-draw matrix reads as it always did
            out["draw"] = self.draw
        if self.row is not None:
            out.update(shaker=self.row.shaker, data=self.row.data, variant=self.row.variant)
        out["status"] = self.status.value
        if self.reason is not None:
            out["reason"] = self.reason
        if self.metrics is not None:
            out["metrics"] = dict(self.metrics)
        if self.samples is not None:
            out["samples"] = dict(self.samples)
        if self.refused_domains is not None:
            out["refused_domains"] = list(self.refused_domains)
        if self.timing is not None:
            out.update(seconds=self.timing.seconds, cached=self.timing.cached)
        return out


def gate_cells(results: Mapping[str, Any]) -> list[GateCell]:
    """The cells of a matrix's results.json content, typed."""
    return [GateCell.from_dict(c) for c in results["cells"]]


class CellIndex(dict):
    """Cells by (defense, attack, measure, domain, seed, draw), and their groups by the first four
    - a gate's replicates and draws - built once on first use (a gate reads several groups, and
    scanning every cell for each made judging a large matrix quadratic)."""

    def group(self, key: tuple) -> list[GateCell]:
        if "_groups" not in self.__dict__:
            groups: dict[tuple, list[GateCell]] = {}
            for full, cell in sorted(self.items(), key=lambda kv: kv[0][4:]):
                groups.setdefault(full[:4], []).append(cell)
            self.__dict__["_groups"] = groups
        return self.__dict__["_groups"].get(tuple(key), [])

    def __setitem__(self, key, value) -> None:
        self.__dict__.pop("_groups", None)  # a changed cell set regroups
        super().__setitem__(key, value)


def cells_by_key(results: Mapping[str, Any]) -> CellIndex:
    """The cells by (defense, attack, measure, domain, seed, draw)."""
    return CellIndex((c.key, c) for c in gate_cells(results))


@dataclass(frozen=True)
class TableCell:
    """One (domain, row) of the S2L table as measured: each MIA's per-sample scores of the
    domain's members and non-members, the extraction counted at the configured radius, and how
    the row's model was made. ``runner/summaries.py`` draws every statistic from these."""

    row: str  # the row's label, e.g. "lora", "end2end-ood", "gaussian-0.0008-draw1"
    shaker: str | None  # None for the pre-trained model
    data: str | None  # a DataKind value ("SP", "OoD", ...): what the row fine-tuned on
    status: Status = Status.OK
    reason: str | None = None  # why a cell is not OK
    sigma: float | None = None  # Gaussian rows
    variant: str | None = None  # an adaptive attacker's change to the SP request
    prompt: str | None = None  # the domain's prompt in this model (Textual Inversion's token)
    trainable_parameters: int | None = None
    mia: Mapping[str, Mapping[str, list[float]]] = field(default_factory=dict)  # name -> members / nonmembers scores
    extraction: Mapping[str, Any] | None = None  # runner.cells.extraction_at's counts and the raw distances
    trajectory: tuple[Mapping[str, Any], ...] | None = None  # fine-tuned rows: the primary MIA's AUC every few steps
    evidence: Any = None  # what a fine-tune filter saw
    images: int | None = None  # images in the fine-tune request
    final_loss: float | None = None  # mean of the last 10 training losses
    seconds: float | None = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    def scores(self, mia: str) -> tuple[np.ndarray, np.ndarray]:
        """Members' and non-members' scores under ``mia`` (higher = more likely a member)."""
        return np.asarray(self.mia[mia]["members"]), np.asarray(self.mia[mia]["nonmembers"])

    @classmethod
    def from_dict(cls, c: Mapping[str, Any]) -> TableCell:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in c.items() if k in known}
        values["status"] = Status(c.get("status") or "ok")
        if values.get("trajectory") is not None:
            values["trajectory"] = tuple(values["trajectory"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The cell as cell.json holds it (every field; ``None`` where a cell has no such part)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(status=self.status.value, mia=dict(self.mia), trajectory=None if self.trajectory is None else list(self.trajectory))
        return out
