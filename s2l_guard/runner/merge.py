"""One matrix assembled from runs that each measured part of it (some defenses, replicates, draws).

The standard matrix under five replicates costs about 7 hours on two cores. Runs of a few
(defense, replicate, draw) tables each - on other days, or on other machines - add up to it:
a table depends only on its defense, its replicate, its draw and the measured config, so the
merged cells are the cells the whole run would report, and the gates and the report read
the merged results.json as they read a whole run's. ``s2l-guard matrix --merge`` is the
command; docs/gates.md shows it on the 5-seed standard matrix.
"""

from __future__ import annotations

import json
from pathlib import Path

from s2l_guard.config import Config
from s2l_guard.errors import ConfigError

from .matrix import config_of, matrix_results, table_key
from .plan import plan
from .settings import check_plugins

# What the parts may differ in: which of the matrix's tables they ran, where they kept their
# files, and the thresholds (which change verdicts, not measurements).
FREE = {
    ("matrix", "replicates"),
    ("matrix", "draws"),
    ("matrix", "defenses"),
    ("run", "seed"),
    ("run", "draw"),
    ("run", "store"),
    ("run", "out_dir"),
    ("gates", None),
}


def _measured(config: Config) -> dict:
    data = check_plugins(config).measured_dict()
    for section, key in FREE:
        if key is None:
            data.pop(section, None)
        else:
            data.get(section, {}).pop(key, None)
    return data


def _first_difference(a: dict, b: dict, where: str = "") -> str:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                return _first_difference(a[key], b[key], f"{where}{key}.")
            return f"{where}{key} = {json.dumps(b.get(key))}, not {json.dumps(a.get(key))}"
    return ""


def part_paths(paths: list[str], out: Path) -> list[Path]:
    """The parts' results files (each given as the file or its run folder), less ``out``'s:
    what an earlier merge wrote there is the whole, not a part (so a glob may match it)."""
    files = [Path(p) if Path(p).suffix == ".json" else Path(p) / "results.json" for p in paths]
    return list(dict.fromkeys(f for f in files if f.resolve() != (out / "results.json").resolve()))


def merge_matrices(config: Config, parts: dict[str, dict]) -> dict:
    """results.json of ``config``'s matrix, its tables taken from ``parts`` (name -> a part's
    results.json content). Every (defense, replicate, draw) the matrix plans must come from exactly one
    part, and every part must have measured ``config`` (apart from :data:`FREE`)."""
    config = check_plugins(config)
    want = _measured(config)
    source: dict[tuple[str, int, int], str] = {}
    tables, cells = {}, {}
    for name, part in parts.items():
        got = _measured(config_of(part))
        if got != want:
            raise ConfigError(f"{name} measured another config than {config.source} ({_first_difference(want, got)}); "
                              f"only [matrix] replicates, draws and defenses, [run] seed, draw, store and out_dir and [gates] may differ")  # fmt: skip
        for seed in part["seeds"]:
            for draw in part.get("draws", [0]):
                for defense in part["defenses"]:
                    if (defense, seed, draw) in source:
                        raise ConfigError(f"{source[defense, seed, draw]} and {name} both hold defense {defense} under {_unit(seed, draw)}; "
                                          f"give each table once")  # fmt: skip
                    source[defense, seed, draw] = name
                    tables[table_key(defense, seed, draw)] = part["tables"][table_key(defense, seed, draw)]
        for cell in part["cells"]:
            cells[cell["defense"], cell["attack"], cell["measure"], cell["domain"], cell["seed"], cell.get("draw", 0)] = cell
    planned = plan(config)
    wanted = list(dict.fromkeys((p.defense, p.seed, p.draw) for p in planned))
    missing = [f"{d} under {_unit(s, k)}" for d, s, k in wanted if (d, s, k) not in source]
    if missing:
        raise ConfigError(f"no part holds {', '.join(missing)}; run them (`s2l-guard matrix --config {config.source} "
                          f"--defense NAME --replicates SEED --draws DRAW`) and add their results.json")  # fmt: skip
    extra = [f"{d} under {_unit(s, k)} ({source[d, s, k]})" for d, s, k in source if (d, s, k) not in wanted]
    if extra:
        raise ConfigError(f"{config.source} plans no {', '.join(extra)}; add it to [matrix] defenses, replicates and draws, or leave that part out")
    key = lambda p: (p.defense, p.attack, p.measure, p.domain, p.seed, p.draw)  # noqa: E731
    lacking = [p for p in planned if key(p) not in cells]
    if lacking:
        first = lacking[0]
        raise ConfigError(f"{source[first.defense, first.seed, first.draw]} lacks cell {first.id} (and {len(lacking) - 1} more); rerun that part")
    merged = [dict(cells[key(p)], id=p.id) for p in planned]
    results = matrix_results(config, list(config.matrix.defenses), tables, merged, sum(p["wall_seconds"] for p in parts.values()))
    versions = sorted({p["code_version"] for p in parts.values()})
    results["code_version"] = ", ".join(versions)
    results["blind"] = {seed: entry for p in parts.values() for seed, entry in p.get("blind", {}).items()}
    results["parts"] = [{"results": name, "code_version": p["code_version"], "seeds": p["seeds"], "draws": p.get("draws", [0]),
                         "defenses": p["defenses"], "wall_seconds": p["wall_seconds"]} for name, p in parts.items()]  # fmt: skip
    return results


def _unit(seed: int, draw: int) -> str:
    return f"replicate {seed}" + (f" draw {draw}" if draw else "")
