"""The S2L pipeline end to end on the smoke profile (tiny model, a few steps per method)."""

import contextlib
import json
import os
from pathlib import Path

import pytest

from attacks.base import MIA, SHAKERS
from s2l_guard.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"


@contextlib.contextmanager
def inside(folder: Path):
    """Run in ``folder`` (module fixtures cannot use monkeypatch.chdir)."""
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("attack")
    with inside(folder):
        assert main(["attack", "--config", str(SMOKE)]) == 0
    [run] = (folder / "runs").iterdir()
    return folder, json.loads((run / "results.json").read_text()), (run / "table.txt").read_text()


def test_every_method_and_attack_ran(smoke_run):
    _, results, table = smoke_run
    assert results["schema"] == "s2l-guard/attack-results/1"
    labels = [row["row"] for row in results["table"]]
    assert labels[:5] == ["pretrained", "end2end-ood", "lora-ood", "end2end-ood-gen", "lora-ood-gen"]
    assert set(SHAKERS.names()) - {"gaussian"} <= set(labels)
    assert all(row["status"] == "ok" for row in results["table"]), [r for r in results["table"] if r["status"] != "ok"]
    for domain in results["domains"].values():
        for label, row in domain["rows"].items():
            assert set(row["mia"]) == set(MIA.names())  # the profile says "all"
            roc = row["mia"]["secmi"]["roc"]
            assert 0 <= roc["auc"]["value"] <= 1 and roc["auc"]["n"] == domain["members"] + domain["nonmembers"]
            assert "optimistic_fit_on_test" in row["mia"]["secmi"]["thresholds"]
            assert row["extraction"]["candidates"] == 8
            if label != "pretrained":
                # a domain's row holds its changes under the keys a pooled row uses
                assert {"auc_delta", "auc_delta_delong", "tpr_delta", "tpr_delta_in_sample"} <= set(row["mia"]["secmi"])
                assert {"delta_total_vs_pretrained", "above_null_delta_vs_pretrained"} <= set(row["extraction"])
    assert "textual_inversion" in table and "dAUC vs pre-trained" in table
    lora = results["method_settings"]["shakers"]["lora"]  # every setting, defaults included
    assert (lora["rank"], lora["steps"], lora["learning_rate"]) == (2, 3, 1e-4)
    sp_row = next(r for r in results["table"] if r["row"] == "lora")
    assert sp_row["controls"] == {"vs_ood_control": "lora-ood", "vs_generated_ood_control": "lora-ood-gen"}
    dreambooth = next(r for r in results["table"] if r["row"] == "dreambooth")  # no DreamBooth control: End-to-End's
    assert dreambooth["controls"] == {"vs_ood_control": "end2end-ood", "vs_generated_ood_control": "end2end-ood-gen"}
    assert {"auc_delta", "auc_delta_vs_ood_control", "auc_delta_vs_generated_ood_control"} <= set(sp_row["mia"]["secmi"])
    assert "vs_generated_ood_control" in results["domains"]["digit7"]["rows"]["lora"]["extraction"]


def test_textual_inversion_is_attacked_through_its_token(smoke_run):
    _, results, _ = smoke_run
    row = results["domains"]["digit7"]["rows"]["textual_inversion"]
    assert "<s2l>" in row["prompt"] and row["trainable_parameters"] == 32  # one vector of the 32-wide text encoder


def test_trajectories_are_recorded(smoke_run):
    _, results, _ = smoke_run
    trajectory = results["domains"]["digit8"]["rows"]["lora"]["trajectory"]
    assert [point["step"] for point in trajectory] == [2]  # every 2 of 3 steps
    best = next(r for r in results["table"] if r["row"] == "lora")["best_checkpoint"]
    assert best["step"] in (2, 3) and best["uses_membership_labels"]
    assert [p["step"] for p in best["curve"]] == [2, 3]  # the trajectory point and the final model


def test_best_checkpoint_is_the_step_with_the_highest_mean_domain_auc():
    from s2l_guard.results import TableCell
    from s2l_guard.runner.summaries import best_checkpoint

    def cell(members, nonmembers, trajectory):
        return TableCell("lora", "lora", "SP", mia={"secmi": {"members": members, "nonmembers": nonmembers}},
                         trajectory=tuple({"step": s, "auc": a} for s, a in trajectory))  # fmt: skip

    perfect, chance = ([1.0, 2.0], [0.0, 0.5]), ([0.0, 1.0], [0.0, 1.0])
    cells = [cell(*chance, [(10, 0.9), (20, 0.6)]), cell(*chance, [(10, 0.7), (20, 0.8)])]
    bases = [cell(*perfect, []), cell(*chance, [])]
    best = best_checkpoint(cells, bases, "secmi", final_step=30)
    assert best["step"] == 10 and best["mean_domain_auc"] == pytest.approx(0.8)
    assert best["pretrained_mean_domain_auc"] == pytest.approx(0.75) and best["delta"] == pytest.approx(0.05)
    assert [p["step"] for p in best["curve"]] == [10, 20, 30] and best["curve"][-1]["mean_domain_auc"] == pytest.approx(0.5)


def test_rerun_reuses_every_cell(smoke_run, capsys):
    folder, _, _ = smoke_run
    with inside(folder):
        assert main(["attack", "--config", str(SMOKE)]) == 0
    out = capsys.readouterr().out
    assert out.count("(cached)") == 30


def test_a_crashing_cell_is_reported_failed_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    config = tmp_path / "one.toml"
    config.write_text(
        f'extends = "{SMOKE}"\n[attack]\ndomains = ["digit7"]\nshakers = ["lora", "end2end"]\n'
        "ood_shakers = []\nood_generated_shakers = []\ngaussian_sigmas = []\nmia = ['loss']\n"
    )

    def broken(self, *args, **kwargs):
        raise RuntimeError("GPU on fire")

    monkeypatch.setattr(SHAKERS.get("lora"), "shake", broken)
    monkeypatch.chdir(tmp_path)
    assert main(["attack", "--config", str(config), "--workers", "1"]) == 0  # the patch lives in this process only
    [run] = (tmp_path / "runs").iterdir()
    results = json.loads((run / "results.json").read_text())
    rows = {row["row"]: row for row in results["table"]}
    assert rows["lora"]["status"] == "failed" and rows["end2end"]["status"] == "ok"
    cell = results["domains"]["digit7"]["rows"]["lora"]
    assert cell["status"] == "failed" and "RuntimeError: GPU on fire" in cell["reason"]


@pytest.mark.slow  # a second whole smoke table from scratch
def test_results_are_reproducible_from_config_and_seed(tmp_path, monkeypatch):
    """Two fresh runs (separate stores, different global RNG states) give identical numbers."""
    import torch

    config = tmp_path / "repro.toml"
    config.write_text(
        f'extends = "{SMOKE}"\n[attack]\ndomains = ["digit7"]\nshakers = ["lora", "hypernetwork", "textual_inversion"]\n'
        "ood_shakers = []\nood_generated_shakers = []\ngaussian_sigmas = [1e-3]\ngaussian_draws = 1\nmia = ['secmi', 'pia']\n"
    )
    tables = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        monkeypatch.chdir(folder)
        torch.manual_seed(len(tables) + 11)
        assert main(["attack", "--config", str(config)]) == 0
        [out] = (folder / "runs").iterdir()
        results = json.loads((out / "results.json").read_text())
        tables.append(without_timings(results["domains"]))
    assert tables[0] == tables[1]


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in ("seconds", "cached")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def test_the_out_of_domain_cell_key_follows_the_number_of_its_images(tmp_path, monkeypatch):
    """The real-image control trains on min(public images, [sp_set] images): a new count is a new cell."""
    from s2l_guard.config import load_config
    from s2l_guard.runner.cells import S2LRun
    from s2l_guard.runner.plan import DataKind, Row

    monkeypatch.chdir(tmp_path)
    config = load_config(SMOKE)
    row = Row("end2end-ood", "end2end", DataKind.OOD)
    specs = []
    for images in (4, 8, 8):
        run = S2LRun(config.replace(sp_set={"images": images}))
        specs.append(run.cell_spec(run.domains[0], row, None))
    assert specs[0]["ood_data"] == {"domain": "digit0", "images": 4}
    assert specs[0] != specs[1] and specs[1] == specs[2]


def test_an_unchanged_model_measures_exactly_as_the_pretrained_one(tmp_path, monkeypatch):
    """Gaussian shaking with sigma 0 leaves the model as it was; with common random numbers
    for the attacks (the loss attack's noise, the extraction candidates' starting noise) every
    paired change is then exactly 0, not the difference of two noise draws."""
    config = tmp_path / "zero.toml"
    config.write_text(
        f'extends = "{SMOKE}"\n[attack]\ndomains = ["digit7"]\nshakers = []\nood_shakers = []\n'
        "ood_generated_shakers = []\ngaussian_sigmas = [0.0]\ngaussian_draws = 1\nmia = ['loss', 'secmi']\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["attack", "--config", str(config)]) == 0
    [run] = (tmp_path / "runs").iterdir()
    rows = json.loads((run / "results.json").read_text())["domains"]["digit7"]["rows"]
    base, same = rows["pretrained"], rows["gaussian-0-draw0"]
    assert same["extraction"]["nearest_distance_median"] == base["extraction"]["nearest_distance_median"]
    for mia in ("loss", "secmi"):
        assert same["mia"][mia]["roc"]["auc"] == base["mia"][mia]["roc"]["auc"]
        assert same["mia"][mia]["auc_delta"]["delta"] == pytest.approx(0.0, abs=1e-12)


def test_a_new_extraction_radius_recounts_cached_cells(smoke_run, tmp_path):
    """Cells keep each candidate's distances, so delta is applied when they are read: a wider
    radius reuses every cell and can only match more members and non-members."""
    folder, results, _ = smoke_run
    wide = tmp_path / "wide.toml"
    wide.write_text(f'extends = "{SMOKE}"\n[extraction]\ndelta = 1.0\n')  # the largest normalized L2: all match
    with inside(folder):
        assert main(["attack", "--config", str(wide)]) == 0
    [run] = [r for r in (folder / "runs").iterdir() if r.name.startswith("wide-")]
    again = json.loads((run / "results.json").read_text())
    for name, domain in again["domains"].items():
        for label, row in domain["rows"].items():
            assert row["cached"], (name, label)
            narrow = results["domains"][name]["rows"][label]["extraction"]
            assert row["extraction"]["delta"] == 1.0 and narrow["delta"] == 0.09
            assert row["extraction"]["extracted_images"] == domain["members"] >= narrow["extracted_images"]
            assert row["extraction"]["nonmembers_matched"] == domain["nonmembers"] >= narrow["nonmembers_matched"]
            assert row["extraction"]["above_null"]["excess"] == pytest.approx(0)  # as many of each: nothing above chance


@pytest.mark.slow  # two smoke pre-trainings and a process pool
def test_worker_processes_compute_the_cells_one_process_does(tmp_path, monkeypatch, capsys):
    """[run] workers only spreads the missing cells over processes: the cells are the ones a
    single process computes, bit for bit at the same thread count, and a rerun starts no workers."""
    import torch

    config = tmp_path / "two.toml"
    config.write_text(
        f'extends = "{SMOKE}"\n[attack]\ndomains = ["digit7"]\nshakers = ["lora"]\nood_shakers = []\n'
        "ood_generated_shakers = []\ngaussian_sigmas = [1e-3]\ngaussian_draws = 1\nmia = ['loss', 'secmi']\n"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers get 1 thread each; roundoff differs between thread counts
    try:
        cells = []
        for workers in ("1", "2"):
            folder = tmp_path / workers
            folder.mkdir()
            monkeypatch.chdir(folder)
            assert main(["attack", "--config", str(config), "--workers", workers]) == 0
            [out] = (folder / "runs").iterdir()
            cells.append(without_timings(json.loads((out / "results.json").read_text())["domains"]))
        assert "3 cells and utility to compute in 2 worker processes" in capsys.readouterr().out
        assert cells[0] == cells[1]
        assert main(["attack", "--config", str(config), "--workers", "2"]) == 0
        out = capsys.readouterr().out
        assert "worker processes" not in out and out.count("(cached)") == 3
    finally:
        torch.set_num_threads(threads)


def test_every_stored_cell_reads_back_as_a_typed_table_cell(smoke_run):
    """The store's cell.json files are the table's raw data: a TableCell holds each of them whole."""
    from s2l_guard.results import Status, TableCell

    folder, _, _ = smoke_run
    stored = [json.loads(p.read_text()) for p in (folder / ".s2l-cache" / "cell").glob("*/cell.json")]
    assert len(stored) == 30
    for raw in stored:
        cell = TableCell.from_dict(raw)
        back = cell.to_dict()
        assert {k: back[k] for k in raw} == raw  # every stored part, unchanged
        assert all(back[k] is None for k in set(back) - set(raw) - {"status", "cached", "mia"})
        assert cell.status == Status(raw.get("status", "ok"))
        for name, scores in raw.get("mia", {}).items():
            members, nonmembers = cell.scores(name)
            assert members.tolist() == scores["members"] and nonmembers.tolist() == scores["nonmembers"]
