"""`s2l-guard attack --defense ...` end to end on a cut-down smoke profile (one fine-tune method)."""

import json
from pathlib import Path

import pytest
from test_s2l import inside

from attacks.base import MIA
from defenses.base import DEFENSES
from s2l_guard.cache import content_key
from s2l_guard.cli import main
from s2l_guard.config import load_config
from s2l_guard.runner.cells import S2LRun
from s2l_guard.runner.plan import resolve_threat_model

pytestmark = pytest.mark.slow  # the S2L table against every defense through the CLI (about 80 s)

ROOT = Path(__file__).resolve().parents[1]
PROFILE = f"""extends = "{ROOT / "configs" / "smoke.toml"}"

[attack]
shakers = ["lora"]
ood_shakers = ["lora"]
ood_generated_shakers = []
gaussian_sigmas = []

[adaptive]
shakers = ["lora"]
"""


def _results(folder: Path) -> dict[str, dict]:
    out = {}
    for path in (folder / "runs").glob("*/results.json"):
        results = json.loads(path.read_text())
        out[(results["defense"]["name"], results["defense"]["threat_model"])] = results
    return out


@pytest.fixture(scope="module")
def defended(tmp_path_factory):
    folder = tmp_path_factory.mktemp("defended")
    (folder / "mini.toml").write_text(PROFILE)
    with inside(folder):
        assert main(["attack", "--config", "mini.toml", "--defense", "all"]) == 0
        # An API defense attacked with the weights: the attacker never meets the API.
        assert main(["attack", "--config", "mini.toml", "--defense", "finetune_filter", "--threat-model", "open-weights"]) == 0
    return folder, _results(folder)


def test_every_defense_ran_under_its_threat_model(defended):
    _, results = defended
    expected = {(name, resolve_threat_model("auto", DEFENSES.get(name)())) for name in DEFENSES.names()}  # `--defense all`
    assert set(results) == expected | {("finetune_filter", "open-weights")}
    for (name, threat_model), r in results.items():
        u = r["utility"]
        assert u["status"] == "ok" and 0 <= u["conditional_accuracy_mean"] <= 1 and u["frechet_distance"] >= 0, name
        assert set(u["domains"]) == {"digit0", "digit1", "digit7", "digit8"}
        assert u["heldout_denoising_loss"] > 0
        pre = next(row for row in r["table"] if row["row"] == "pretrained")
        assert pre["status"] == "ok"
        if threat_model == "open-weights":
            assert set(pre["mia"]) == set(MIA.names()) and not r["defense"]["unavailable_mia"]
        else:  # behind an API no attack gets the weights
            assert pre["mia"] == {} and set(r["defense"]["unavailable_mia"]) == set(MIA.names())


def test_dp_defenses_report_the_accountants_epsilon(defended):
    _, results = defended
    for name in ("dp_sgd", "private_finetune"):
        privacy = results[(name, "open-weights")]["defense"]["pretraining"]["privacy"]
        assert 0 < privacy["epsilon"] <= 10.0 + 1e-6 and privacy["noise_multiplier"] > 0 and 0 < privacy["sample_rate"] < 1
    private = results[("private_finetune", "open-weights")]["defense"]["pretraining"]
    assert private["private_trainable_parameters"] < sum(private["parameters"].values())


def test_dp_defenses_report_an_empirical_epsilon_beside_the_claimed_one(defended):
    folder, results = defended
    for name in ("dp_sgd", "private_finetune"):
        r = results[(name, "open-weights")]
        bounds = r["defense"]["empirical_epsilon"]
        assert set(bounds) == set(MIA.names())
        for b in bounds.values():  # 6 + 6 members and non-members per domain, two domains, half of each for the test
            assert b["epsilon"] >= 0 and b["delta"] == r["defense"]["pretraining"]["privacy"]["delta"]
            assert (b["test_members"], b["test_nonmembers"]) == (6, 6)
    assert "empirical_epsilon" not in results[("none", "open-weights")]["defense"]  # no claim to audit
    table = next(p for p in (folder / "runs").glob("*/table.txt") if "dp_sgd" in p.read_text().split("defense: ")[-1][:20])
    assert "empirical epsilon, lower bound" in table.read_text()


def test_finetune_filter_reports_detection_and_false_rejection(defended):
    _, results = defended
    r = results[("finetune_filter", "finetune-api")]
    f = r["defense"]["filter"]
    assert set(f["detection"]) == {"sp", "perturb", "mix", "subset"}
    assert f["detection"]["subset"]["size"] == 4 and f["detection"]["sp"]["size"] == 8
    for entry in list(f["detection"].values()) + list(f["false_rejection_heldout"].values()):
        assert 0 <= entry["rate"] <= 1 and entry["ci95"][0] <= entry["rate"] <= entry["ci95"][1] and entry["n"] >= 200
    for entry in f["false_rejection_heldout"].values():
        spread = entry["across_splits"]
        assert spread["splits"] == 20 and spread["range95"][0] <= spread["mean"] <= spread["range95"][1]
    labels = {row["row"]: row for row in r["table"]}
    assert {"lora-perturb", "lora-mix", "lora-subset"} <= set(labels)
    for row in r["table"]:
        if row["status"] == "refused":
            assert row["reasons"] and row["refused_domains"]


def test_an_api_defense_protects_nothing_under_open_weights(defended):
    _, results = defended
    none, filtered = results[("none", "open-weights")], results[("finetune_filter", "open-weights")]
    assert [row["row"] for row in none["table"]] == [row["row"] for row in filtered["table"]]  # no adaptive rows either
    for a, b in zip(none["table"], filtered["table"]):
        assert a["mia"] == b["mia"] and a["extraction"] == b["extraction"], a["row"]
    cached = [row["cached"] for domain in filtered["domains"].values() for row in domain["rows"].values()]
    assert all(cached), "open-weights cells must be the undefended run's cached cells"


def test_a_finetune_filter_shares_the_undefended_generations(defended):
    """The filter does not touch generation, so behind its API the SP sets and the utility are
    the undefended model's own artifacts, not recomputed copies; an output filter's are its own."""
    folder, results = defended
    assert results[("finetune_filter", "finetune-api")]["utility"] == results[("none", "open-weights")]["utility"]  # seconds included
    with inside(folder):
        runs = {name: S2LRun(load_config(Path("mini.toml")).replace(defense={"name": name})) for name in ("none", "finetune_filter", "output_filter")}
        # Compared by key, not by value: an output filter that withholds nothing measures the same
        # numbers, and its own measurement may even take the same hundredths of a second.
        utility = {name: content_key("utility", run._utility_spec()) for name, run in runs.items()}
    sp = {name: content_key("sp_set", run._sp_spec("digit7", "a handwritten digit seven")) for name, run in runs.items()}
    assert sp["finetune_filter"] == sp["none"] != sp["output_filter"]
    assert utility["finetune_filter"] == utility["none"] != utility["output_filter"]


def test_defense_summary_is_printed(defended, capsys):
    folder, _ = defended
    with inside(folder):
        assert main(["attack", "--config", "mini.toml", "--defense", "all"]) == 0
    out = capsys.readouterr().out
    assert "largest S2L dAUC" in out and all(name in out for name in ("dedup", "dp_sgd", "output_filter"))
