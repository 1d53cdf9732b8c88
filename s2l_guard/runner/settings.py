"""The plugins a config names, checked against the registries, and their settings built.

`s2l_guard.config` reads and checks the core sections only: it sits below the plugins and
cannot know which attacks and defenses are registered. Every runner entry point calls
:func:`check_plugins` before it plans or runs anything, so an unknown method or a bad
``[shakers.<name>]`` key is still one line naming the problem, before any work.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from attacks.base import MIA, SHAKERS
from defenses.base import DEFENSES
from s2l_guard.config import Config, check_table, settings_from_table
from s2l_guard.errors import ConfigError

REGISTRIES = {"shakers": SHAKERS, "mia": MIA, "defenses": DEFENSES}  # plugin table -> registry
ALL = "all"  # in [attack] mia / shakers and [matrix] defenses: every registered one not named before it


def check_plugins(config: Config) -> Config:
    """Raise a ConfigError listing every unregistered name and every bad plugin setting; else return
    ``config`` with each ``"all"`` expanded to the registered names (see :func:`expand_all`)."""
    problems: list[str] = []
    for table, registry in REGISTRIES.items():
        for name, values in getattr(config, table).items():
            where = config.plugin_origins.get(f"{table}.{name}", config.source)
            try:
                cls = registry.get(name)
            except ConfigError as exc:
                problems.append(f"{where}: [{table}.{name}]: {exc}")
                continue
            before = len(problems)
            kwargs = check_table(cls.Settings, values, f"[{table}.{name}]", table, {}, where, problems)
            if len(problems) == before:
                try:
                    cls.Settings(**kwargs)
                except (ValueError, TypeError) as exc:  # a Settings' own __post_init__ check
                    problems.append(f"{where}: [{table}.{name}]: {exc}")
    a, mx = config.attack, config.matrix
    shakers = a.shakers + a.ood_shakers + a.ood_generated_shakers + a.member_shakers + config.adaptive.shakers
    shakers += (a.control_shaker,) if a.control_steps else ()
    named = (("attack", "shakers", shakers), ("attack", "mia", a.mia), ("defense", "defenses", (config.defense.name,)),
             ("matrix", "shakers", mx.shakers + mx.member_shakers),
             ("matrix", "defenses", tuple(entry.partition("@")[0] for entry in mx.defenses)))  # fmt: skip
    for section, table, names in named:
        for name in dict.fromkeys(names):
            if name == ALL:
                continue
            try:
                REGISTRIES[table].get(name)
            except ConfigError as exc:
                problems.append(f"[{section}] {table}: {exc}")
    if a.control_steps and a.control_shaker in SHAKERS.names():
        fields = {f.name for f in dataclasses.fields(SHAKERS.get(a.control_shaker).Settings)}
        if not {"steps", "learning_rate"} <= fields:
            problems.append(f"[attack] control_shaker = {a.control_shaker!r} has no steps or learning rate to set; "
                            "name a fine-tune method (e.g. 'end2end')")  # fmt: skip
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in {config.source}: " + "; ".join(problems))
    return expand_all(config)


def expand_all(config: Config) -> Config:
    """``"all"`` in a list: the names before it in their order, then every other registered one,
    sorted - so a new attack file joins every profile that says ``all`` without an edit.
    Fine-tune lists take the shakers that train on data (Gaussian shaking has its own rows)."""

    def expanded(names: tuple[str, ...], registered: list[str]) -> list[str]:
        named = [n for n in names if n != ALL]
        base = {n.partition("@")[0] for n in named}
        return named + [n for n in registered if n not in base] if ALL in names else named

    a, mx = config.attack, config.matrix
    if ALL not in a.mia + a.shakers + mx.defenses:
        return config
    trains = [n for n in SHAKERS.names() if SHAKERS.get(n).needs_data]
    return config.replace(attack={"mia": expanded(a.mia, MIA.names()), "shakers": expanded(a.shakers, trains)},
                          matrix={"defenses": expanded(mx.defenses, DEFENSES.names())})  # fmt: skip


def registered(table: str, name: str | None = None) -> list[str]:
    """Every registered name of a plugin table ("shakers", "mia", "defenses"); with ``name``, check
    that it is one (a ConfigError with the closest name otherwise)."""
    registry = REGISTRIES[table]
    if name is not None:
        registry.get(name)
    return registry.names()


def shaker_settings(config: Config, name: str):
    """The ``Settings`` of a registered shaker, with the config's ``[shakers.<name>]`` overrides."""
    return settings_from_table(SHAKERS.get(name).Settings, config.shakers.get(name, {}))


def mia_settings(config: Config, name: str):
    return settings_from_table(MIA.get(name).Settings, config.mia.get(name, {}))


def defense_settings(config: Config, name: str):
    return settings_from_table(DEFENSES.get(name).Settings, config.defenses.get(name, {}))


def method_settings(config: Config) -> dict[str, dict[str, dict[str, Any]]]:
    """Every setting of every method the attack runs, defaults included: the method tables in
    a profile only state what differs, and defaults can change between versions."""
    a = config.attack
    control = (a.control_shaker,) if a.control_steps else ()
    shakers = dict.fromkeys(a.shakers + a.ood_shakers + a.ood_generated_shakers + a.member_shakers + control + (("gaussian",) if a.gaussian_sigmas else ()))  # fmt: skip
    resolve = lambda settings: json.loads(json.dumps(dataclasses.asdict(settings), default=list))  # noqa: E731
    return {"shakers": {name: resolve(shaker_settings(config, name)) for name in shakers},
            "mia": {name: resolve(mia_settings(config, name)) for name in a.mia}}  # fmt: skip
