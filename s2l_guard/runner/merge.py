"""One matrix assembled from runs that each measured part of it (some defenses, some seeds).

The standard matrix under five seeds costs about 7 hours on two cores. Runs of a few
(defense, seed) tables each - on other days, or on other machines - add up to it: a table
depends only on its defense, its seed and the measured config, so the merged cells are
the cells the whole run would report, and the gates, the flip table and the report read
the merged results.json as they read a whole run's. ``s2l-guard matrix --merge`` is the
command; docs/gates.md shows it on the 5-seed standard matrix.
"""

from __future__ import annotations

import json
from pathlib import Path

from s2l_guard.config import Config
from s2l_guard.errors import ConfigError

from .matrix import config_of, matrix_results
from .plan import plan
from .settings import check_plugins

# What the parts may differ in: which of the matrix's tables they ran, where they kept their
# files, and the thresholds (which change verdicts, not measurements).
FREE = {("matrix", "seeds"), ("matrix", "defenses"), ("run", "seed"), ("run", "store"), ("run", "out_dir"), ("gates", None)}


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
    results.json content). Every (defense, seed) the matrix plans must come from exactly one
    part, and every part must have measured ``config`` (apart from :data:`FREE`)."""
    config = check_plugins(config)
    want = _measured(config)
    source: dict[tuple[str, int], str] = {}
    tables, cells = {}, {}
    for name, part in parts.items():
        got = _measured(config_of(part))
        if got != want:
            raise ConfigError(f"{name} measured another config than {config.source} ({_first_difference(want, got)}); "
                              f"only [matrix] seeds and defenses, [run] seed, store and out_dir and [gates] may differ")  # fmt: skip
        for seed in part["seeds"]:
            for defense in part["defenses"]:
                if (defense, seed) in source:
                    raise ConfigError(f"{source[defense, seed]} and {name} both hold defense {defense} under seed {seed}; give each table once")
                source[defense, seed] = name
                tables[f"{defense}/{seed}"] = part["tables"][f"{defense}/{seed}"]
        for cell in part["cells"]:
            cells[cell["defense"], cell["attack"], cell["measure"], cell["domain"], cell["seed"]] = cell
    planned = plan(config)
    wanted = list(dict.fromkeys((p.defense, p.seed) for p in planned))
    missing = [f"{d} under seed {s}" for d, s in wanted if (d, s) not in source]
    if missing:
        raise ConfigError(f"no part holds {', '.join(missing)}; run them (`s2l-guard matrix --config {config.source} "
                          f"--defense NAME --seeds SEED`) and add their results.json")  # fmt: skip
    extra = [f"{d} under seed {s} ({source[d, s]})" for d, s in source if (d, s) not in wanted]
    if extra:
        raise ConfigError(f"{config.source} plans no {', '.join(extra)}; add it to [matrix] defenses and seeds, or leave that part out")
    lacking = [p for p in planned if (p.defense, p.attack, p.measure, p.domain, p.seed) not in cells]
    if lacking:
        raise ConfigError(f"{source[lacking[0].defense, lacking[0].seed]} lacks cell {lacking[0].id} (and {len(lacking) - 1} more); rerun that part")
    merged = [dict(cells[p.defense, p.attack, p.measure, p.domain, p.seed], id=p.id) for p in planned]
    results = matrix_results(config, list(config.matrix.defenses), tables, merged, sum(p["wall_seconds"] for p in parts.values()))
    versions = sorted({p["code_version"] for p in parts.values()})
    results["code_version"] = ", ".join(versions)
    results["parts"] = [{"results": name, "code_version": p["code_version"], "seeds": p["seeds"], "defenses": p["defenses"],
                         "wall_seconds": p["wall_seconds"]} for name, p in parts.items()]  # fmt: skip
    return results
