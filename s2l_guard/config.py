"""TOML configuration parsed into frozen dataclasses.

A profile may start with ``extends = "other.toml"`` (a path relative to the
file); it then states only the keys that differ. The built-in defaults below
are the ``standard`` profile. Every problem in a file is collected and raised
once, each naming the key, the file and (where found) the line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from .errors import ConfigError


def _opt(default: Any, **checks: Any) -> Any:
    """A dataclass field with range/choice checks kept in its metadata."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=checks)
    return field(default=default, metadata=checks)


@dataclass(frozen=True)
class RunConfig:
    """Where artifacts go and which seed and device every stage uses."""

    seed: int = _opt(0, ge=0)
    store: str = ".s2l-cache"  # content-addressed artifact store (relative to the cwd)
    out_dir: str = "runs"  # human-readable outputs: reports, results
    device: str = _opt("auto", choices=("auto", "cpu", "cuda", "mps"))
    # Processes that compute a table's cells side by side; 0 (auto): one per CPU thread, one
    # thread each, and one on a GPU. Results do not depend on it beyond float roundoff.
    workers: int = _opt(0, ge=0)
    # Where those cells are computed: "local" (worker processes on this machine) or "ray" (Ray
    # tasks on a local Ray instance, or on the cluster at ray_address: "auto", "ray://head:10001").
    executor: str = _opt("local", choices=("local", "ray"))
    ray_address: str = ""
    # A model to audit instead of pre-training the testbed one: a diffusers-format folder
    # (docs/model-folders.md), and the labelled data set its private domains come from
    # (docs/testbed.md layout; empty = the testbed, for a model trained on it).
    model: str = ""
    data: str = ""
    # Which draw of the attack's randomness (SP sets, fine-tune noise, extraction candidates,
    # bootstrap) runs on the model that `seed` made; draw 0 uses `seed` itself ([matrix] draws).
    draw: int = _opt(0, ge=0)


@dataclass(frozen=True)
class TestbedConfig:
    """How the digits data set is split into private, public and held-out images."""

    __test__ = False  # not a pytest test class despite its name

    private_domains: tuple[int, ...] = _opt((5, 6, 7, 8, 9), each_ge=0, each_le=9)
    public_domains: tuple[int, ...] = _opt((0, 1, 2, 3, 4), each_ge=0, each_le=9)
    members_per_domain: int = _opt(40, ge=1)  # distinct member images per private domain
    nonmembers_per_domain: int = _opt(40, ge=1)  # held-out images, never trained on
    public_per_domain: int = _opt(0, ge=0)  # 0 = every image of a public domain
    duplicated_share: float = _opt(0.5, ge=0.0, le=1.0)  # share of members duplicated
    copies: int = _opt(4, ge=1)  # copies of a duplicated member in pre-training
    caption: str = "a handwritten digit {name}"  # {name}: the digit as a word


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the testbed model (ignored when a local model folder is audited)."""

    block_out_channels: tuple[int, ...] = _opt((32, 64), each_ge=8)
    layers_per_block: int = _opt(1, ge=1)
    attention_head_dim: int = _opt(8, ge=1)
    norm_num_groups: int = _opt(16, ge=1)
    text_hidden_size: int = _opt(64, ge=8)
    text_layers: int = _opt(2, ge=1)
    text_heads: int = _opt(4, ge=1)
    max_tokens: int = _opt(8, ge=4)  # caption length, including start and end tokens
    num_train_timesteps: int = _opt(1000, ge=10)
    beta_schedule: str = _opt("linear", choices=("linear", "scaled_linear", "squaredcos_cap_v2"))


@dataclass(frozen=True)
class PretrainConfig:
    """The denoising-loss training run that makes the testbed model."""

    steps: int = _opt(1000, ge=1)
    batch_size: int = _opt(128, ge=1)
    learning_rate: float = _opt(1e-3, gt=0.0)
    weight_decay: float = _opt(0.0, ge=0.0)
    caption_dropout: float = _opt(0.1, ge=0.0, le=1.0)  # enables classifier-free guidance
    grad_clip: float = _opt(1.0, gt=0.0)
    # Decaying the rate at the end, as real pre-training runs do, keeps a later gentle
    # fine-tune from acting as the missing decay (which raises MIA for any data).
    # Stable Diffusion v1's recipe is "constant_with_warmup" (diffusers get_scheduler names).
    lr_schedule: str = _opt("cosine", choices=("constant", "constant_with_warmup", "cosine", "linear"))
    warmup_steps: int = _opt(0, ge=0)
    checkpoint_every: int = _opt(250, ge=1)
    train_text_encoder: bool = False  # SD kept its CLIP encoder frozen; so do we by default
    # An exponential moving average of the weights (diffusers EMAModel, with SD's warm-up
    # min(decay, (1 + step) / (10 + step))); 0 keeps none. SD v1 releases the EMA weights.
    ema_decay: float = _opt(0.0, ge=0.0, lt=1.0)
    release: str = _opt("raw", choices=("raw", "ema"))  # which weights the bundle holds


@dataclass(frozen=True)
class ReportConfig:
    """The memorization report written after pre-training."""

    samples_per_domain: int = _opt(100, ge=1)
    sampler_steps: int = _opt(50, ge=1)
    guidance_scale: float = _opt(3.0, ge=1.0)
    loss_timesteps: tuple[int, ...] = _opt((50, 100, 200, 400), each_ge=0)
    loss_draws: int = _opt(4, ge=1)  # noise draws per timestep for the denoising loss
    extraction_delta: float = _opt(0.09, gt=0.0)  # normalized-L2 radius of an extraction (see ExtractionConfig.delta)
    batch_size: int = _opt(256, ge=1)
    bootstrap: int = _opt(1000, ge=100)  # resamples behind every confidence interval


ALL_SHAKERS = (
    "end2end", "dreambooth", "textual_inversion", "hypernetwork", "lora",
    "dreambooth+hypernetwork", "dreambooth+lora", "textual_inversion+lora",
)  # fmt: skip


@dataclass(frozen=True)
class AttackConfig:
    """Which S2L attacks run, on which domains, and how their statistics are computed."""

    domains: tuple[str, ...] = ()  # private domains to attack; empty = every private domain
    shakers: tuple[str, ...] = ALL_SHAKERS  # fine-tune methods run on each domain's SP set
    # Controls: these methods also train on real out-of-domain images (the paper's control) and on the
    # model's own generations of a public domain. An SP row is compared with its own method's control
    # where one ran (else End-to-End's): full and parameter-efficient fine-tuning forget differently.
    ood_shakers: tuple[str, ...] = ("end2end", "lora")
    ood_generated_shakers: tuple[str, ...] = ("end2end", "lora")
    # Oracle rows: these methods fine-tuned on the domain's real members, i.e. an SP set that
    # reproduced every member. An upper bound on S2L, and a positive control for the gates.
    member_shakers: tuple[str, ...] = ()
    # The calibrated positive control (row "<control_shaker>-control"): that method fine-tuned on the
    # domain's real members for control_steps at control_learning_rate, a budget strong enough that
    # its effect exceeds the release gates' threshold (docs/attacks.md: 500 steps at 1e-4 on the
    # testbed). Release gates take it as their control; 0 steps: the oracle rows at each method's own
    # budget are the control.
    control_shaker: str = "end2end"
    control_steps: int = _opt(0, ge=0)
    control_learning_rate: float = _opt(1e-4, gt=0.0)
    # Membership inference attacks, the first one primary (trajectories, the table's main column).
    # "all": every other registered attack (s2l-guard plugins), so a new one joins without an edit.
    mia: tuple[str, ...] = ("secmi", "pia", "pian", "loss", "all")
    gaussian_sigmas: tuple[float, ...] = _opt((2e-4, 8e-4, 3.2e-3), each_ge=0.0)  # empty: no Gaussian shaking
    gaussian_draws: int = _opt(3, ge=1)  # Gaussian shaking is averaged over this many draws
    calibration_share: float = _opt(0.5, gt=0.0, lt=1.0)  # members/non-members used to fit thresholds
    bootstrap: int = _opt(1000, ge=100)
    trajectory_every: int = _opt(25, ge=0)  # > 0: measure leakage every N fine-tuning steps


@dataclass(frozen=True)
class AblationConfig:
    """The swept values of `s2l-guard ablate` (the paper's parameter-count and Gaussian figures)."""

    lora_ranks: tuple[int, ...] = _opt((1, 2, 4, 8, 16, 32), each_ge=1)
    ti_tokens: tuple[int, ...] = _opt((1, 2, 3), each_ge=1)  # "a handwritten digit" + 3 vectors fill 8 tokens
    gaussian_sigmas: tuple[float, ...] = _opt((2e-4, 4e-4, 8e-4, 1.6e-3, 3.2e-3), each_ge=0.0)
    gaussian_draws: int = _opt(3, ge=1)


@dataclass(frozen=True)
class SPSetConfig:
    """The synthetic private set each domain's fine-tuning uses (S2L step 1)."""

    images: int = _opt(100, ge=1)
    prompt_templates: tuple[str, ...] = ("{prompt}",)  # {prompt}: the domain's prompt; cycled over the images
    negative_prompt: str = ""
    guidance_scale: float = _opt(3.0, ge=1.0)
    sampler_steps: int = _opt(50, ge=1)
    batch_size: int = _opt(256, ge=1)


@dataclass(frozen=True)
class ExtractionConfig:
    """Candidate generation and (k, l2, delta)-eidetic matching (Carlini et al. 2023)."""

    candidates: int = _opt(100, ge=1)  # generations per domain and model
    # Match radius (tiled normalized L2). Carlini et al. use 0.1 on 512x512 Stable Diffusion images;
    # on the 8x8 testbed 0.1 lets generations match held-out digits by chance; 0.09 keeps that
    # null at most 1 in 120 (docs/calibration, issue 12). Applied when a cell is read.
    delta: float = _opt(0.09, gt=0.0)
    max_copies: int = _opt(10, ge=1)  # k: only images seen at most k times count
    grid: int = _opt(0, ge=0)  # tile grid; 0 = auto: clamp(image size // 128, 1, 4)
    flag_delta: float = _opt(0.1, gt=0.0)  # near-duplicate radius between generations (attacker's flag)
    flag_neighbours: int = _opt(3, ge=1)  # near-duplicates needed to flag a generation
    guidance_scale: float = _opt(3.0, ge=1.0)
    sampler_steps: int = _opt(50, ge=1)
    batch_size: int = _opt(256, ge=1)
    chunk: int = _opt(1024, ge=1)  # candidates compared at once (memory bound)


THREAT_MODEL_CHOICES = ("auto", "open-weights", "finetune-api", "generate-api")


@dataclass(frozen=True)
class DefenseConfig:
    """Which defense the provider deploys, and what the attacker may touch (docs/defenses.md)."""

    name: str = "none"  # a registered defense; its settings live in [defenses.<name>]
    # auto: open-weights for a defense of the training recipe (or none), finetune-api for an API defense
    threat_model: str = _opt("auto", choices=THREAT_MODEL_CHOICES)


@dataclass(frozen=True)
class AdaptiveConfig:
    """Fine-tune requests of an attacker who knows the fine-tune API filter (run only against one)."""

    variants: tuple[str, ...] = _opt(("perturb", "mix", "subset"), choices_each=("perturb", "mix", "subset"))
    shakers: tuple[str, ...] = ("end2end", "lora")
    noise: float = _opt(0.1, gt=0.0)  # perturb: std of Gaussian pixel noise added to the SP images (images in [0, 1])
    real_share: float = _opt(0.5, gt=0.0, lt=1.0)  # mix: share of the request that is real public images
    images: int = _opt(10, ge=1)  # subset: how many SP images the request sends


@dataclass(frozen=True)
class UtilityConfig:
    """What the model is still good for, measured beside leakage (testbed: digits evaluator)."""

    samples_per_domain: int = _opt(100, ge=1)
    sampler_steps: int = _opt(50, ge=1)
    guidance_scale: float = _opt(3.0, ge=1.0)
    # A local transformers vision model folder (e.g. a CLIP vision tower saved with its image
    # processor) whose pooled output is the Frechet distance's feature space, as Inception is FID's;
    # "": the digits classifier on the testbed, the model's own VAE encoder (or pixels) otherwise.
    feature_model: str = ""


# Keys added after runs were published: left out of run hashes and artifact keys while they hold
# their default, so those runs' folders and cached artifacts stay valid.
UNHASHED_DEFAULTS = {("utility", "feature_model"): "", ("run", "draw"): 0, ("matrix", "draws"): (), ("matrix", "replicates"): (),
                     ("attack", "control_shaker"): "end2end", ("attack", "control_steps"): 0, ("attack", "control_learning_rate"): 1e-4}  # fmt: skip
# Keys that were renamed or replaced, with what to write instead
RENAMED = {
    ("matrix", "seeds"): "[matrix] seeds is now replicates (a new member split and pre-training each: is the testbed's finding "
    "robust?) or draws (the attack's randomness on one fixed model: what a release gates); docs/gates.md",
    ("gates", "max_extracted"): "[gates] max_extracted (a count against 0, which no model can pass) is now max_extracted_share "
    "(the share of members extracted above the held-out null, judged by its upper confidence bound)",
    ("gates", "max_baseline_extracted"): "[gates] max_baseline_extracted is now max_baseline_extracted_share (a share of members, "
    "judged by its upper confidence bound)",
}


@dataclass(frozen=True)
class MatrixConfig:
    """The defense x attack matrix (`s2l-guard matrix`, `pytest suites/`): which defenses, seeds and rows.

    Its rows replace [attack]'s row lists; every other setting (MIA, extraction, method
    settings) is [attack]'s, so the matrix reuses the cells a table run already cached.
    """

    # a registered defense, attacked under its `auto` threat model, or "<name>@<threat model>"
    # (e.g. "finetune_filter@open-weights": an API defense protects nothing against the weights)
    defenses: tuple[str, ...] = ("none", "dedup", "anneal", "dp_sgd", "private_finetune", "finetune_filter",
                                 "output_filter", "finetune_filter@open-weights")  # fmt: skip
    # Testbed replicates: each a new member split and pre-training ([run] seed = the replicate).
    # They answer a research question - is the testbed's finding robust? - and a given model
    # ([run] model) has none. Empty: [run] seed only.
    replicates: tuple[int, ...] = _opt((), each_ge=0)
    # Draws of the attack's randomness on each model: its own SP set, fine-tune seed, extraction
    # candidates and bootstrap ([run] draw). A gate pools every draw into one decision. Empty: [run] draw only.
    draws: tuple[int, ...] = _opt((), each_ge=0)
    shakers: tuple[str, ...] = ("end2end", "lora")  # S2L methods, each fine-tuned on the domain's SP set
    member_shakers: tuple[str, ...] = ("end2end",)  # oracle rows (see [attack] member_shakers)
    gaussian_sigmas: tuple[float, ...] = _opt((8e-4,), each_ge=0.0)  # Gaussian shaking, [attack] gaussian_draws draws each


GATE_CHECKS = ("auc_amplification", "tpr_at_1pct_fpr", "extracted", "utility", "baseline_tpr_at_1pct_fpr", "baseline_extracted")
# the [gates] key holding each check's threshold
GATE_THRESHOLDS = {"auc_amplification": "max_auc_amplification", "tpr_at_1pct_fpr": "max_tpr_at_1pct_fpr",
                   "extracted": "max_extracted_share", "utility": "min_utility",
                   "baseline_tpr_at_1pct_fpr": "max_baseline_tpr_at_1pct_fpr", "baseline_extracted": "max_baseline_extracted_share"}  # fmt: skip
GATE_MODES = ("compare", "release")


@dataclass(frozen=True)
class GatesConfig:
    """Release thresholds (docs/gates.md). A gate passes when the measurement stays within its threshold."""

    checks: tuple[str, ...] = _opt(GATE_CHECKS, choices_each=GATE_CHECKS)  # which gates run
    # The question the gates answer (docs/gates.md): "compare" - does a defense lower leakage that
    # the undefended model shows? "release" - is the model under audit safe, and could the
    # instrument have seen leakage on it (its own oracle row)?
    mode: str = _opt("compare", choices=GATE_MODES)
    # interval: PASS when the unfavourable end of the 95% interval (pooled over draws) is within the
    # threshold, FAIL when the favourable end is beyond it, else UNDECIDED; point: the estimate decides
    compare: str = _opt("interval", choices=("interval", "point"))
    # gate every private domain, the pool, or both; the pool by default: 40 vs 40 per domain cannot resolve an AUC change of 0.05
    domains: str = _opt("pooled", choices=("each", "pooled", "both"))
    max_auc_amplification: float = 0.05  # AUC after shaking minus before, paired on the same samples
    max_tpr_at_1pct_fpr: float = _opt(0.2, ge=0.0, le=1.0)  # of the shaken model
    # share of a domain's members the shaken model reproduces above the held-out null (Clopper-Pearson based interval)
    max_extracted_share: float = _opt(0.1, ge=0.0, le=1.0)
    min_utility: float = _opt(0.5, ge=0.0, le=1.0)  # conditional accuracy of the deployed model's generations
    # The model as released, before any shaking (the pre-trained row): its own leakage.
    max_baseline_tpr_at_1pct_fpr: float = _opt(0.2, ge=0.0, le=1.0)
    max_baseline_extracted_share: float = _opt(0.1, ge=0.0, le=1.0)  # share of members extracted above the held-out null
    # Positive control, pooled over domains: under mode = "compare" the same attack must raise the
    # undefended model's (defense none) leakage, under "release" the oracle row (the same method on
    # the real members) must raise the audited model's - by more than this (by the lower end of its
    # interval, or the estimate under compare = "point"); else the gate errors: it cannot tell a safe
    # model from an insensitive test.
    control_min_amplification: float = 0.0
    # The measures gated (empty: every [attack] mia and extraction). A measure that cannot see
    # membership on the model is better reported than gated: its gates could only be UNDECIDED.
    measures: tuple[str, ...] = ()
    # The blind baseline (a classifier on the images alone) fires when the lower end of its AUC's
    # 95% interval exceeds 0.5 + blind_margin: members and non-members then differ without the
    # model, and no MIA gate on that data passes.
    blind_margin: float = _opt(0.05, ge=0.0, le=0.5)
    # `s2l-guard config check`: a threshold below the gate's resolution at this power is refused
    power: float = _opt(0.8, gt=0.0, lt=1.0)


@dataclass(frozen=True)
class Config:
    """The resolved configuration: every section, plus the file it came from.

    ``shakers``, ``mia`` and ``defenses`` hold per-plugin settings tables (``[shakers.lora]``,
    ``[mia.secmi]``) as written; the runner checks them against each plugin's own ``Settings``
    (``s2l_guard.runner.settings``), since the plugins live above this module.
    """

    run: RunConfig = field(default_factory=RunConfig)
    testbed: TestbedConfig = field(default_factory=TestbedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    sp_set: SPSetConfig = field(default_factory=SPSetConfig)
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    utility: UtilityConfig = field(default_factory=UtilityConfig)
    matrix: MatrixConfig = field(default_factory=MatrixConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    shakers: dict[str, dict[str, Any]] = field(default_factory=dict)
    mia: dict[str, dict[str, Any]] = field(default_factory=dict)
    defenses: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = field(default="<defaults>", compare=False)
    # "shakers.lora" -> "profile.toml:12": where each plugin table was written, for the runner's error messages
    plugin_origins: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source != "<defaults>" else "defaults"

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-ready data (``source`` excluded)."""
        data = dataclasses.asdict(self)
        data.pop("source")
        data.pop("plugin_origins")
        return json.loads(json.dumps(data))

    def measured_dict(self) -> dict[str, Any]:
        """``to_dict`` less what decides how fast, not what, a run measures ([run] workers, executor) and the keys of
        :data:`UNHASHED_DEFAULTS` at their default: run folders and some artifact keys are hashed on it."""
        data = self.to_dict()
        for how in ("workers", "executor", "ray_address"):
            data["run"].pop(how)
        for (section, key), default in UNHASHED_DEFAULTS.items():
            if data[section][key] == default:
                data[section].pop(key)
        return data

    def section(self, name: str) -> dict[str, Any]:
        return self.to_dict()[name]

    def to_toml(self) -> str:
        """The resolved config as TOML, printed into every output."""
        lines = [f"# resolved from {self.source}"]
        for section, values in self.to_dict().items():
            if section in PLUGIN_TABLES:
                for name, table in values.items():
                    lines.append(f'\n[{section}."{name}"]')
                    lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
                continue
            lines.append(f"\n[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        return "\n".join(lines) + "\n"

    def replace(self, **sections: dict[str, Any]) -> "Config":
        """A copy with some keys of some sections changed (validated like a file)."""
        raw = self.to_dict()
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return _build(raw, {}, self.source)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):  # TOML spells them inf and nan; JSON cannot
        return str(value)
    return json.dumps(value)


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "testbed": TestbedConfig,
    "model": ModelConfig,
    "pretrain": PretrainConfig,
    "report": ReportConfig,
    "attack": AttackConfig,
    "ablation": AblationConfig,
    "sp_set": SPSetConfig,
    "extraction": ExtractionConfig,
    "defense": DefenseConfig,
    "adaptive": AdaptiveConfig,
    "utility": UtilityConfig,
    "matrix": MatrixConfig,
    "gates": GatesConfig,
}
PLUGIN_TABLES = ("shakers", "mia", "defenses")  # [shakers.<name>] / [mia.<name>] / [defenses.<name>]: one table each


def settings_from_table(cls: type, values: dict[str, Any]):
    """Build a plugin's Settings from its table, already checked with :func:`check_table`."""
    hints = typing.get_type_hints(cls)
    return cls(**{key: check_value(value, hints[key], _metadata(cls, key))[0] for key, value in values.items()})


def _metadata(cls: type, key: str) -> typing.Mapping:
    return {f.name: f.metadata for f in dataclasses.fields(cls)}[key]


def load_config(path: str | Path) -> Config:
    """Read a TOML profile (following ``extends``) into a validated :class:`Config`.

    Raises:
        ConfigError: listing every unknown key, wrong type and out-of-range value.
    """
    path = Path(path)
    origins: dict[tuple[str, str], Path] = {}
    raw = _read_chain(path, origins, seen=())
    return _build(raw, origins, str(path))


def _read_chain(path: Path, origins: dict, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        hint = f" (extended from {seen[-1]})" if seen else ""
        raise ConfigError(f"config file {path} not found{hint}; pass an existing .toml file, e.g. configs/standard.toml")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle ({' -> '.join(map(str, seen))}); remove one 'extends'")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax at that position") from None
    base: dict[str, Any] = {}
    parent = raw.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: 'extends' must be a file name string, got {parent!r}")
        base = _read_chain(path.parent / parent, origins, seen + (path.resolve(),))
    for section, values in raw.items():
        if isinstance(values, dict):
            for key in values:
                origins[(section, key)] = path
            base.setdefault(section, {})
            if isinstance(base[section], dict):
                base[section] = _merge(base[section], values, depth=2 if section in PLUGIN_TABLES else 1)
                continue
        origins[(section, "")] = path
        base[section] = values
    return base


def _merge(base: dict, override: dict, *, depth: int) -> dict:
    """Keys of ``override`` win; at depth 2 a method table ([shakers.lora]) merges key by key,
    so a profile that sets one key of a method keeps the keys its base set."""
    out = dict(base)
    for key, value in override.items():
        if depth > 1 and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, depth=depth - 1)
        else:
            out[key] = value
    return out


def _where(origins: dict, section: str, key: str, default: str) -> str:
    path = origins.get((section, key)) or origins.get((section, ""))
    if path is None:
        return default
    line = _find_line(path, key or section)
    return f"{path}:{line}" if line else str(path)


def _find_line(path: Path, key: str) -> int | None:
    pattern = re.compile(rf"^\s*(\[)?{re.escape(key)}\s*(=|\])")
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if pattern.match(line):
            return number
    return None


def _build(raw: dict[str, Any], origins: dict, source: str) -> Config:
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for section, values in raw.items():
        where = _where(origins, section, "", source)
        if section not in SECTIONS and section not in PLUGIN_TABLES:
            known = ", ".join(list(SECTIONS) + list(PLUGIN_TABLES))
            problems.append(f"{where}: unknown section [{section}]; known: {known}")
        elif not isinstance(values, dict):
            problems.append(f"{where}: '{section}' must be a table [{section}], got {values!r}")
    for section, cls in SECTIONS.items():
        values = raw.get(section, {})
        if isinstance(values, dict):
            kwargs = check_table(cls, values, f"[{section}]", section, origins, source, problems)
            if not problems:
                sections[section] = cls(**kwargs)
    plugin_origins: dict[str, str] = {}
    for table in PLUGIN_TABLES:
        sections[table] = _plugin_tables(table, raw.get(table, {}), origins, source, problems, plugin_origins)
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in {source}: " + "; ".join(problems))
    config = Config(**sections, source=source, plugin_origins=plugin_origins)
    _check_cross_section(config)
    return config


def check_table(cls: type, values: dict, label: str, section: str, origins: dict, source: str, problems: list) -> dict:
    """Validate one table against a dataclass; append problems, return the accepted values."""
    kwargs = {}
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        where = _where(origins, section, key, source)
        if (section, key) in RENAMED:
            problems.append(f"{where}: {RENAMED[section, key]}")
            continue
        if key not in known or not known[key].init:
            near = _closest(key, known)
            problems.append(f"{where}: unknown key '{key}' in {label}{near}; known: {', '.join(known)}")
            continue
        value, problem = check_value(value, hints[key], known[key].metadata)
        if problem:
            problems.append(f"{where}: {label} {key} = {values[key]!r}: {problem}")
        else:
            kwargs[key] = value
    return kwargs


def _plugin_tables(table: str, tables: Any, origins: dict, source: str, problems: list, plugin_origins: dict) -> dict[str, dict]:
    """``[shakers.<name>]`` tables, kept as written: each must be a table of settings. Whether the
    name is registered and the keys are its Settings fields is the runner's check."""
    if not isinstance(tables, dict):
        return {}
    out = {}
    for name, values in tables.items():
        where = _where(origins, table, name, source)
        if not isinstance(values, dict):
            problems.append(f"{where}: [{table}.{name}] must be a table of settings")
            continue
        plugin_origins[f"{table}.{name}"] = where
        out[name] = values
    return out


def _closest(key: str, known: dict) -> str:
    import difflib

    match = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def check_value(value: Any, hint: Any, checks: typing.Mapping) -> tuple[Any, str | None]:
    """Coerce a TOML value to the field's type; return (value, problem or None)."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        inner = typing.get_args(hint)[0]
        if not isinstance(value, list):
            return value, f"expected a list of {inner.__name__}"
        items = []
        for item in value:
            item, problem = _check_scalar(item, inner, {})
            if problem:
                return value, f"list item {item!r}: {problem}"
            items.append(item)
        for item in items:
            if "each_ge" in checks and item < checks["each_ge"]:
                return value, f"every item must be >= {checks['each_ge']}"
            if "each_le" in checks and item > checks["each_le"]:
                return value, f"every item must be <= {checks['each_le']}"
            if "choices_each" in checks and item not in checks["choices_each"]:
                return value, f"every item must be one of {', '.join(map(repr, checks['choices_each']))}"
        return tuple(items), None
    return _check_scalar(value, hint, checks)


def _check_scalar(value: Any, hint: type, checks: typing.Mapping) -> tuple[Any, str | None]:
    if hint is bool:
        if not isinstance(value, bool):
            return value, "expected true or false"
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return value, "expected an integer"
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, "expected a number"
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            return value, "expected a string"
    if "choices" in checks and value not in checks["choices"]:
        return value, f"must be one of {', '.join(map(repr, checks['choices']))}"
    if "ge" in checks and value < checks["ge"]:
        return value, f"must be >= {checks['ge']}"
    if "gt" in checks and value <= checks["gt"]:
        return value, f"must be > {checks['gt']}"
    if "le" in checks and value > checks["le"]:
        return value, f"must be <= {checks['le']}"
    if "lt" in checks and value >= checks["lt"]:
        return value, f"must be < {checks['lt']}"
    return value, None


def _check_cross_section(config: Config) -> None:
    """Checks that need more than one key at a time."""
    t, m = config.testbed, config.model
    problems = []
    overlap = set(t.private_domains) & set(t.public_domains)
    if overlap:
        problems.append(f"[testbed] domains {sorted(overlap)} are both private and public; list each digit once")
    if len(set(t.private_domains)) != len(t.private_domains):
        problems.append("[testbed] private_domains lists a digit twice")
    if not t.private_domains:
        problems.append("[testbed] private_domains is empty; name at least one digit to audit")
    if "{name}" not in t.caption:
        problems.append("[testbed] caption must contain '{name}' so each domain has its own prompt")
    for width in m.block_out_channels:
        if width % m.norm_num_groups:
            problems.append(f"[model] block_out_channels {width} is not divisible by norm_num_groups {m.norm_num_groups}")
    if m.text_hidden_size % m.text_heads:
        problems.append(f"[model] text_hidden_size {m.text_hidden_size} is not divisible by text_heads {m.text_heads}")
    if any(step >= m.num_train_timesteps for step in config.report.loss_timesteps):
        problems.append(f"[report] loss_timesteps must be < [model] num_train_timesteps ({m.num_train_timesteps})")
    if config.pretrain.release == "ema" and not config.pretrain.ema_decay:
        problems.append("[pretrain] release = 'ema' needs an EMA; set ema_decay (e.g. 0.99) or release = 'raw'")
    if config.pretrain.warmup_steps >= config.pretrain.steps:
        problems.append(f"[pretrain] warmup_steps ({config.pretrain.warmup_steps}) must be < steps ({config.pretrain.steps})")
    private = [f"digit{d}" for d in t.private_domains]
    unknown = [d for d in config.attack.domains if d not in private]
    if unknown and not config.run.data:  # a user's data set names its own domains, checked when it is read
        problems.append(f"[attack] domains {unknown} are not private testbed domains; choose from {private}")
    mx = config.matrix
    if len(set(mx.defenses)) != len(mx.defenses):
        problems.append("[matrix] defenses lists a defense twice")
    for name in ("replicates", "draws"):
        if len(set(getattr(mx, name))) != len(getattr(mx, name)):
            problems.append(f"[matrix] {name} lists a value twice")
    if config.run.model and len(mx.replicates) > 1:
        problems.append("[matrix] replicates re-draw the testbed and pre-train a model per replicate, which a given model "
                        "([run] model) cannot; vary the attack with [matrix] draws instead")  # fmt: skip
    for entry in mx.defenses:
        threat_model = entry.partition("@")[2]
        if "@" in entry and threat_model not in THREAT_MODEL_CHOICES:
            problems.append(f"[matrix] defenses {entry!r}: the threat model after '@' must be one of {', '.join(THREAT_MODEL_CHOICES)}")
    bad_templates = [tpl for tpl in config.sp_set.prompt_templates if "{prompt}" not in tpl]
    if bad_templates or not config.sp_set.prompt_templates:
        problems.append(f"[sp_set] every prompt template needs '{{prompt}}', got {list(config.sp_set.prompt_templates)}")
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in {config.source}: " + "; ".join(problems))
