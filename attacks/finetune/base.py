"""What every fine-tune shaker shares: settings, the generic ``shake``, and composition.

A fine-tune method is three small hooks around the one training loop
(:func:`s2l_guard.training.train`):

- :meth:`FinetuneMethod.rewrite`: the captions it trains on and the prompt that
  targets the domain afterwards (DreamBooth's instance prompt, Textual
  Inversion's placeholder);
- :meth:`FinetuneMethod.prior`: DreamBooth's prior-preservation data, if any;
- :meth:`FinetuneMethod.adapt`: what it changes in the (cloned) bundle, i.e. the
  trainable parameters, a per-step hook, the files it exports and how it
  finalizes (e.g. fusing LoRA).

``shake`` runs them in that order, trains with AdamW and returns a
:class:`~attacks.base.ShakeResult`. A combination (``dreambooth+lora``) is the
rewrite and prior of all its parts and the adaptations of those that train
parameters, so each combination is a few lines.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from attacks.base import FinetuneData, Shaker, ShakeResult, StepCallback
from s2l_guard.errors import S2LError, SettingsError
from s2l_guard.model import Bundle
from s2l_guard.training import PriorPreservation, TrainSettings, train


def setting(default: Any, **checks: Any) -> Any:
    """A settings field whose range/choice checks live in its metadata.

    The config loader reads the same metadata (``ge``, ``gt``, ``le``, ``lt``,
    ``choices``) to validate ``[shakers.<name>]`` tables with the file and line;
    :meth:`FinetuneSettings.__post_init__` checks every key (``each_gt`` and
    ``nonempty`` too) whichever way the settings are built.
    """
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=checks)
    return field(default=default, metadata=checks)


@dataclass(frozen=True)
class FinetuneSettings:
    """Training settings every fine-tune method has (defaults sized for the digits testbed).

    The S2L paper fine-tunes Stable Diffusion with AdamW at a constant learning
    rate of 1e-6, batch 4, gradient clipping 1.0, for 100 epochs of the SP set.
    The testbed's defaults are its gentle counterpart, chosen in docs/calibration:
    100 steps (16 epochs of a 100-image SP set) at rates ten times below those
    at which the methods make the model forget.
    """

    steps: int = setting(100, ge=1)
    batch_size: int = setting(16, ge=1)
    learning_rate: float = setting(1e-4, gt=0.0)
    weight_decay: float = setting(0.0, ge=0.0)  # AdamW's decoupled weight decay
    grad_clip: float = setting(1.0, ge=0.0)  # max global gradient norm; 0 disables clipping
    caption_dropout: float = setting(0.0, ge=0.0, le=1.0)  # share of captions replaced by ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            problem = _check(getattr(self, f.name), f.metadata)
            if problem:
                raise SettingsError(f"{type(self).__qualname__}.{f.name} = {getattr(self, f.name)!r}: {problem}")


def _check(value: Any, checks: dict) -> str | None:
    if "choices" in checks and value not in checks["choices"]:
        return f"must be one of {', '.join(map(repr, checks['choices']))}"
    bounds = {"ge": (lambda a, b: a >= b, ">="), "gt": (lambda a, b: a > b, ">"),
              "le": (lambda a, b: a <= b, "<="), "lt": (lambda a, b: a < b, "<")}  # fmt: skip
    for key, (ok, sign) in bounds.items():
        if key in checks and not ok(value, checks[key]):
            return f"must be {sign} {checks[key]}"
    if "each_gt" in checks and not all(item > checks["each_gt"] for item in value):
        return f"every item must be > {checks['each_gt']}"
    if checks.get("nonempty") and not value:
        return "must not be empty"
    return None


def settings_view(cls: type, settings: Any) -> Any:
    """``cls`` (a Settings dataclass) filled from the same-named fields of ``settings``.

    A combination's settings hold the fields of all its parts; each part reads its own.
    """
    names = {f.name for f in dataclasses.fields(settings)}
    return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls) if f.name in names})


@dataclass
class Adaptation:
    """What a method changed in the bundle for training, and what it does before and after.

    ``trainable`` is keyed by :meth:`Bundle.named_parameters` names; ``parameter_count`` is
    how many numbers really train (Textual Inversion trains only the new rows of its
    embedding matrix, so it differs from the size of ``trainable`` there).
    """

    trainable: dict[str, torch.nn.Parameter]
    parameter_count: int
    after_step: list[Callable[[], None]] = field(default_factory=list)  # run after every optimiser step
    exports: list[Callable[[Path], dict[str, str]]] = field(default_factory=list)  # folder -> {role: path}
    finalize: list[Callable[[], None]] = field(default_factory=list)  # run once training is over

    @classmethod
    def of(cls, trainable: dict[str, torch.nn.Parameter], **hooks) -> "Adaptation":
        """An adaptation that trains all of ``trainable``."""
        return cls(trainable, sum(p.numel() for p in trainable.values()), **hooks)

    def __add__(self, other: "Adaptation") -> "Adaptation":
        shared = sorted(set(self.trainable) & set(other.trainable))
        if shared:
            raise S2LError(f"two combined methods both train {shared[:2]}; a combination must train disjoint parameters")
        return Adaptation(
            {**self.trainable, **other.trainable},
            self.parameter_count + other.parameter_count,
            self.after_step + other.after_step,
            self.exports + other.exports,
            self.finalize + other.finalize,
        )


class FinetuneMethod(Shaker):
    """A fine-tune shaker: rewrite the captions, adapt the bundle, train, finalize.

    Subclasses set ``name``, ``paper``, ``summary``, ``threat_models`` and ``Settings``
    (a frozen :class:`FinetuneSettings` subclass) and implement :meth:`adapt`.
    """

    Settings: ClassVar[type[FinetuneSettings]] = FinetuneSettings
    tiny_settings: ClassVar[dict] = {"steps": 3, "batch_size": 2}

    def rewrite(self, data: FinetuneData) -> FinetuneData:
        """The data with the captions the method trains on and the prompt that targets the domain.

        Args:
            data: the fine-tuning data as given.
        Returns:
            the same images; captions and prompt as the method uses them (default: unchanged).
        """
        return data

    def prior(self, bundle: Bundle, data: FinetuneData, *, seed: int) -> PriorPreservation | None:
        """DreamBooth's prior-preservation data, or None (the default) for no prior term."""
        return None

    @abstractmethod
    def adapt(self, bundle: Bundle, data: FinetuneData) -> Adaptation:
        """Prepare ``bundle`` (a private clone) for training and say what trains.

        Args:
            bundle: the clone being shaken; the method may add tokens, adapters or processors.
            data: the fine-tuning data as given (not rewritten).
        Returns:
            the trainable parameters and the method's hooks.
        """

    def target_prompt(self, data: FinetuneData) -> str:
        """The prompt that targets the domain in the shaken model (e.g. for step callbacks)."""
        return self.rewrite(data).prompt

    def shake(
        self,
        bundle: Bundle,
        data: FinetuneData | None,
        *,
        seed: int,
        callback: StepCallback | None = None,
        callback_every: int = 0,
        export_dir: str | Path | None = None,
    ) -> ShakeResult:
        """Fine-tune a copy of ``bundle`` on ``data``.

        Args:
            bundle: the pre-trained model; never modified.
            data: images in [0, 1] with captions and the domain prompt.
            seed: seeds every random draw (class-image sampling, batches, noise, timesteps).
            callback: called as ``callback(step, bundle)`` every ``callback_every`` steps with
                the model being trained, in eval mode (adapters and hooks not yet fused).
            callback_every: 0 never calls ``callback``.
            export_dir: where to write the method's own files (LoRA weights, learned
                embeddings, hypernetwork); listed by role in ``ShakeResult.files``.
        Returns:
            the shaken bundle, the prompt that targets the domain in it, the number of
            trained parameters and the per-step losses.
        Raises:
            S2LError: no data, or data the method cannot use (the message names the fix).
        """
        _check_data(self.name, data)
        s = self.settings
        shaken = bundle.clone()
        target = self.rewrite(data)
        prior = self.prior(shaken, data, seed=seed)  # sampled from the pre-trained weights
        with torch.random.fork_rng(devices=[]):  # new layers (LoRA A, hypernetwork MLPs) draw from the global RNG
            torch.manual_seed(seed)
            adaptation = self.adapt(shaken, data)
        optimizer = torch.optim.AdamW(adaptation.trainable.values(), lr=s.learning_rate, weight_decay=s.weight_decay)
        settings = TrainSettings(steps=s.steps, batch_size=s.batch_size, caption_dropout=s.caption_dropout, grad_clip=s.grad_clip or None, seed=seed)
        trained = train(
            shaken, target.images, target.captions, trainable=adaptation.trainable, optimizer=optimizer,
            settings=settings, on_step=_every(callback, callback_every, shaken), description=self.name,
            prior=prior, after_step=_chain(adaptation.after_step),
        )  # fmt: skip
        files = {}
        if export_dir is not None:  # before finalizing: LoRA exports its unfused adapters
            Path(export_dir).mkdir(parents=True, exist_ok=True)
            for export in adaptation.exports:
                files.update(export(Path(export_dir)))
        for finalize in adaptation.finalize:
            finalize()
        return ShakeResult(shaken.eval(), target.prompt, adaptation.parameter_count, trained.losses, files)


class Combination(FinetuneMethod):
    """Several methods at once: every part's rewrite and prior, the adaptations of ``trains``.

    ``dreambooth+lora`` trains LoRA adapters with DreamBooth's instance prompt and prior
    (diffusers' ``train_dreambooth_lora.py``): DreamBooth is in ``parts`` but not in ``trains``.
    """

    parts: ClassVar[tuple[type[FinetuneMethod], ...]]
    trains: ClassVar[tuple[type[FinetuneMethod], ...]]

    def _part(self, cls: type[FinetuneMethod]) -> FinetuneMethod:
        return cls(settings_view(cls.Settings, self.settings))

    def rewrite(self, data: FinetuneData) -> FinetuneData:
        for cls in self.parts:
            data = self._part(cls).rewrite(data)
        return data

    def prior(self, bundle: Bundle, data: FinetuneData, *, seed: int) -> PriorPreservation | None:
        priors = [p for p in (self._part(cls).prior(bundle, data, seed=seed) for cls in self.parts) if p is not None]
        return priors[0] if priors else None

    def adapt(self, bundle: Bundle, data: FinetuneData) -> Adaptation:
        adaptations = [self._part(cls).adapt(bundle, data) for cls in self.trains]
        total = adaptations[0]
        for adaptation in adaptations[1:]:
            total = total + adaptation
        return total


def _check_data(name: str, data: FinetuneData | None) -> None:
    if data is None:
        raise S2LError(f"{name} fine-tunes on data; pass FinetuneData (the SP set) to shake()")
    if len(data.images) == 0 or len(data.images) != len(data.captions):
        raise S2LError(f"{name}: FinetuneData needs one caption per image, got {len(data.images)} images and {len(data.captions)} captions")


def _every(callback: StepCallback | None, every: int, bundle: Bundle) -> Callable[[int, float], None] | None:
    if callback is None or every <= 0:
        return None

    def on_step(step: int, loss: float) -> None:
        if step % every == 0:
            training = {name: module.training for name, module in bundle.modules().items()}
            bundle.eval()  # the callback measures the model, so no dropout while it does
            try:
                callback(step, bundle)
            finally:
                for name, module in bundle.modules().items():
                    module.train(training[name])

    return on_step


def _chain(hooks: list[Callable[[], None]]) -> Callable[[], None] | None:
    if not hooks:
        return None

    def run_all() -> None:
        for hook in hooks:
            hook()

    return run_all


def parameters_with_prefix(bundle: Bundle, *prefixes: str) -> dict[str, torch.nn.Parameter]:
    """The bundle's parameters whose names start with any of ``prefixes``."""
    return {name: p for name, p in bundle.named_parameters() if name.startswith(prefixes)}
