"""Up-front checks that a model and a data set fit each other, before any cell computes.

A mismatch found inside a cell surfaces as a tensor error (an einsum over 768 vs 3072
positions) once per cell; found here, it is one line per problem naming both sides and the
fix, with nothing computed.
"""

from __future__ import annotations

from attacks.s2l import Domain
from s2l_guard.config import Config
from s2l_guard.data import ImageDataset
from s2l_guard.metrics import calibration_count
from s2l_guard.model import Bundle

from .settings import shaker_settings


def compatibility_problems(bundle: Bundle, dataset: ImageDataset, domains: list[Domain], config: Config) -> list[str]:
    """Each way ``bundle`` cannot run on ``dataset``'s attacked ``domains`` under ``config``, one line each."""
    problems = _image_problems(bundle, dataset) + _prompt_problems(bundle, domains, config) + _timestep_problems(bundle, config)
    return problems + _sample_problems(domains)


def _sample_problems(domains: list[Domain]) -> list[str]:
    """Thresholds are fitted on one part of each class and judged on the other: two of each at least."""
    return [
        f"domain {d.name} has {len(d.members)} member(s) and {len(d.nonmembers)} held-out non-member(s); the calibrated "
        "threshold needs at least 2 of each (one part to fit it, one to test it): add images to the data set"
        for d in domains
        if min(len(d.members), len(d.nonmembers)) < 2
    ]


def sample_warnings(domains: list[Domain], config: Config) -> list[str]:
    """Statistics the data is too small to resolve: reported as such, worth knowing before the run."""
    pooled = sum(len(d.nonmembers) for d in domains)
    test = pooled - calibration_count(pooled, config.attack.calibration_share)
    if test >= 100:
        return []
    return [
        f"{pooled} held-out non-members over the attacked domains leave about {test} for testing, under the 100 that TPR at "
        "1% FPR needs: it will be reported as unresolvable (and its gates skipped); add non-members to resolve it"
    ]


def _image_problems(bundle: Bundle, dataset: ImageDataset) -> list[str]:
    channels, height, width = dataset.images.shape[1:]
    want = (bundle.image_channels, bundle.image_size, bundle.image_size)
    if (channels, height, width) == want:
        return []
    how = (
        f"UNet sample_size {bundle.unet.config.sample_size} x VAE scale factor {bundle.vae_scale_factor}" if bundle.vae is not None else "pixel space"
    )
    return [
        f"the data's images are {channels}x{height}x{width} (channels x height x width) but the model takes {'x'.join(map(str, want))} ({how}); "
        "resize or convert the data set to the model's shape, or audit a model trained at the data's"
    ]


def _timestep_problems(bundle: Bundle, config: Config) -> list[str]:
    """The utility's denoising loss is read at [report] loss_timesteps of the model's own schedule."""
    steps = bundle.scheduler.config.num_train_timesteps
    outside = [t for t in config.report.loss_timesteps if not 0 <= t < steps]
    if not outside:
        return []
    return [
        f"[report] loss_timesteps {outside} lie outside this model's timesteps 0..{steps - 1}; scale them to its schedule (the defaults assume 1000)"
    ]


def _prompt_problems(bundle: Bundle, domains: list[Domain], config: Config) -> list[str]:
    """Prompts longer than the tokenizer holds would be cut silently (two domains could then share
    one prompt); Textual Inversion's learned vectors lengthen a prompt by ``num_vectors - 1``."""
    tokenizer, problems = bundle.tokenizer, []
    limit = tokenizer.model_max_length
    learned = {name: shaker_settings(config, name) for name in config.attack.shakers if "textual_inversion" in name}
    for domain in domains:
        length = len(tokenizer(domain.prompt).input_ids)
        if length > limit:
            problems.append(
                f"domain {domain.name}'s prompt {domain.prompt!r} is {length} tokens but the model's tokenizer holds {limit}; shorten its captions"
            )
            continue
        for name, settings in learned.items():
            vectors = settings.num_vectors
            word = settings.initializer_token or domain.prompt.split()[-1]
            with_vectors = length - len(tokenizer(word, add_special_tokens=False).input_ids) + vectors
            if with_vectors > limit:
                problems.append(
                    f"{name}: domain {domain.name}'s prompt {domain.prompt!r} with {vectors} learned vectors is {with_vectors} tokens "
                    f"but the tokenizer holds {limit}; set [shakers.{name}] num_vectors <= {vectors - (with_vectors - limit)} or shorten its captions"
                )
    return problems
