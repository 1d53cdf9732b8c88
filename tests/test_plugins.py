"""Every registered plugin - shaker, membership inference attack, defense - meets the common contract.

The lists come from the registries, so a new plugin file is checked here without an edit:
metadata, a frozen Settings whose defaults and tiny settings are valid, its place in
`s2l-guard plugins`, and for shakers a tiny run that is deterministic and leaves its input
alone. Each kind's behaviour on tiny models is tested registry-wide in its own file too
(test_mia.py runs every attack with the settings it carries).
"""

import dataclasses
import re

import pytest
import torch

from attacks.base import SHAKERS, FinetuneData
from s2l_guard.cli import main
from s2l_guard.config import Config
from s2l_guard.errors import ConfigError
from s2l_guard.registry import THREAT_MODELS
from s2l_guard.runner.settings import REGISTRIES, check_plugins
from s2l_guard.testing import tiny_bundle

EVERY_PLUGIN = [(table, name) for table, registry in REGISTRIES.items() for name in registry.names()]


@pytest.mark.parametrize("table, name", EVERY_PLUGIN, ids=lambda x: str(x))
def test_every_plugin_declares_its_metadata_and_valid_default_settings(table, name):
    cls = REGISTRIES[table].get(name)
    assert cls.name == name and cls.paper and cls.summary
    assert cls.threat_models and set(cls.threat_models) <= set(THREAT_MODELS)
    assert dataclasses.is_dataclass(cls.Settings) and cls.Settings.__dataclass_params__.frozen
    assert isinstance(cls(), cls)  # the defaults are valid settings
    assert isinstance(cls(cls.Settings(**cls.tiny_settings)), cls)  # and so are the tests' tiny ones


@pytest.mark.parametrize("table, name", EVERY_PLUGIN, ids=lambda x: str(x))
def test_a_profile_may_set_every_plugins_settings_and_nothing_else(table, name):
    fields = {f.name: getattr(REGISTRIES[table].get(name).Settings(), f.name) for f in dataclasses.fields(REGISTRIES[table].get(name).Settings)}
    as_toml = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    check_plugins(Config().replace(**{table: {name: as_toml}}))  # its own defaults, written out, are accepted
    with pytest.raises(ConfigError, match=re.escape(f"unknown key 'no_such_setting' in [{table}.{name}]")):
        check_plugins(Config().replace(**{table: {name: {"no_such_setting": 1}}}))


def test_plugins_lists_every_registered_name(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for _, name in EVERY_PLUGIN)


@pytest.mark.parametrize("name", SHAKERS.names())
def test_every_shaker_runs_deterministically_at_its_tiny_settings_and_leaves_its_input_alone(name):
    cls = SHAKERS.get(name)
    shaker = cls(cls.Settings(**cls.tiny_settings))
    bundle = tiny_bundle(seed=0)
    before = {n: p.detach().clone() for n, p in bundle.named_parameters()}
    prompt = "a handwritten digit seven"
    images = torch.rand((4, bundle.image_channels, bundle.image_size, bundle.image_size), generator=torch.Generator().manual_seed(0))
    data = FinetuneData(images, [prompt] * 4, prompt, class_prompt="a handwritten digit") if cls.needs_data else None
    first, second = (shaker.shake(bundle, data, seed=3) for _ in range(2))
    assert all(torch.equal(p, before[n]) for n, p in bundle.named_parameters()), "the input bundle changed"
    assert first.bundle is not bundle and first.losses == second.losses
    a, b = dict(first.bundle.named_parameters()), dict(second.bundle.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "two runs with one seed differ"
    if cls.needs_data:
        assert first.prompt and len(first.losses) == shaker.settings.steps and first.trainable_parameters > 0
