"""Every registered plugin - shaker, membership inference attack, defense - meets the common contract.

The lists come from the registries, so a new plugin file is checked here without an edit:
metadata, a frozen Settings whose defaults are valid, and its place in `s2l-guard plugins`.
Each kind's behaviour on tiny models is tested registry-wide in its own file (test_mia.py
runs every attack with the settings it carries).
"""

import dataclasses
import re

import pytest

from s2l_guard.cli import main
from s2l_guard.config import Config
from s2l_guard.errors import ConfigError
from s2l_guard.registry import THREAT_MODELS
from s2l_guard.runner.settings import REGISTRIES, check_plugins

EVERY_PLUGIN = [(table, name) for table, registry in REGISTRIES.items() for name in registry.names()]


@pytest.mark.parametrize("table, name", EVERY_PLUGIN, ids=lambda x: str(x))
def test_every_plugin_declares_its_metadata_and_valid_default_settings(table, name):
    cls = REGISTRIES[table].get(name)
    assert cls.name == name and cls.paper and cls.summary
    assert cls.threat_models and set(cls.threat_models) <= set(THREAT_MODELS)
    assert dataclasses.is_dataclass(cls.Settings) and cls.Settings.__dataclass_params__.frozen
    assert isinstance(cls(), cls)  # the defaults are valid settings


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
