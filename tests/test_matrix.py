"""The matrix plan and the gate verdicts, on configs and hand-made cells (no model runs here)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from s2l_guard.config import GatesConfig, load_config
from s2l_guard.errors import ConfigError
from s2l_guard.gates import control_problem, count_text, flip_kinds, flip_table, gate_plan, judge, verdict
from s2l_guard.results import Amplification, GateCell, Status, TableCell, cells_by_key
from s2l_guard.runner.matrix import failed_cells, utility_cell
from s2l_guard.runner.plan import POOLED, PlannedCell, plan
from s2l_guard.runner.settings import check_plugins

SMOKE = "configs/smoke.toml"


def test_plan_spans_defenses_attacks_measures_domains_with_readable_ids():
    config = load_config(SMOKE).replace(matrix={"defenses": ["none", "dp_sgd"], "shakers": ["lora"], "member_shakers": [], "gaussian_sigmas": [8e-4]})
    cells = plan(config)
    ids = {c.id for c in cells}
    assert "dp_sgd-lora-secmi-digit7" in ids and "none-lora-extraction-all" in ids and "dp_sgd-utility" in ids
    assert "none-gaussian-0.0008-draw1-loss-digit8" in ids  # smoke: 2 draws
    rows = {"pretrained", "lora", "gaussian-0.0008-draw0", "gaussian-0.0008-draw1"}
    measures = set(config.attack.mia) | {"extraction"}
    assert len(cells) == 2 * (len(rows) * len(measures) * (2 + 1) + 1)  # 2 domains + pooled, and one utility cell each
    assert len(ids) == len(cells)
    two_seeds = plan(config.replace(matrix={"seeds": [0, 1]}))
    assert len(two_seeds) == 2 * len(cells) and "none-lora-pia-all-seed1" in {c.id for c in two_seeds}


def test_threat_model_suffix_runs_an_api_defense_against_the_weights():
    config = load_config(SMOKE).replace(matrix={"defenses": ["none", "finetune_filter", "finetune_filter@open-weights"]})
    attacks = lambda name: {c.attack for c in plan(config) if c.defense == name}  # noqa: E731
    assert "end2end-perturb" in attacks("finetune_filter")  # behind its API: the adaptive requests join
    assert attacks("finetune_filter@open-weights") == attacks("none")  # with the weights there is nothing to adapt to
    adaptive = next(c for c in plan(config) if c.attack == "lora-subset")
    assert adaptive.base_attack == "lora"  # its positive control is the plain SP attack
    with pytest.raises(ConfigError, match="after '@'"):
        load_config(SMOKE).replace(matrix={"defenses": ["none", "finetune_filter@nowhere"]})
    with pytest.raises(ConfigError, match="unknown defense"):
        plan(load_config(SMOKE).replace(matrix={"defenses": ["none", "dp_sdg"]}))


def test_gates_judge_shaken_rows_on_the_chosen_domains():
    config = load_config(SMOKE).replace(matrix={"defenses": ["none"], "shakers": ["lora"], "member_shakers": [], "gaussian_sigmas": []})
    planned = plan(config)
    each = gate_plan(planned, GatesConfig(domains="each"), "auc_amplification")
    mias = check_plugins(config).attack.mia  # "all" expanded to the registered attacks
    assert each and all(c.domain != POOLED and c.attack == "lora" and c.measure in mias for c in each)
    assert {c.domain for c in gate_plan(planned, GatesConfig(domains="pooled"), "extracted")} == {POOLED}
    assert [c.id for c in gate_plan(planned, GatesConfig(), "utility")] == ["none-utility"]
    assert gate_plan(planned, GatesConfig(checks=("utility",)), "auc_amplification") == []


def mia_cell(delta: float, ci: tuple[float, float], status: str = "ok", resolvable: bool = True, **extra) -> GateCell:
    cell = {"id": "x-lora-secmi-all", "defense": "x", "threat_model": "open-weights", "attack": "lora", "measure": "secmi", "domain": POOLED,
            "seed": 0, "status": status}  # fmt: skip
    if status == "ok":
        cell["metrics"] = {"auc": {"value": 0.6, "ci95": [0.5, 0.7]},
                           "tpr_at_1pct_fpr": {"value": 0.1, "ci95": [0.0, 0.3], "resolvable": resolvable},
                           "auc_amplification": {"before": 0.6, "after": 0.6 + delta, "delta": delta, "ci95": list(ci), "p_value": 0.5, "method": "m"}}  # fmt: skip
        cell["samples"] = {"members": 120, "nonmembers": 120 if resolvable else 24, "bootstrap": 1000}
    return GateCell.from_dict(cell | extra)


def test_verdict_compares_the_interval_end_or_the_estimate():
    cell = mia_cell(0.01, (-0.02, 0.07))
    strict = verdict("auc_amplification", cell, GatesConfig(max_auc_amplification=0.05))
    assert strict.outcome == "fail" and strict.bound == pytest.approx(0.07)
    assert "+0.010 [95% CI -0.020, +0.070]" in strict.message and "maximum 0.05" in strict.message and "120 members" in strict.message
    assert verdict("auc_amplification", cell, GatesConfig(max_auc_amplification=0.05, compare="point")).outcome == "pass"
    assert verdict("tpr_at_1pct_fpr", mia_cell(0, (0, 0), resolvable=False), GatesConfig()).outcome == "skip"
    assert verdict("tpr_at_1pct_fpr", cell, GatesConfig(max_tpr_at_1pct_fpr=0.25)).outcome == "fail"  # upper end 0.3


def test_cells_that_did_not_run_skip_crashed_cells_fail_refused_requests_pass():
    gates = GatesConfig()
    assert verdict("auc_amplification", mia_cell(0, (0, 0), "not-run", reason="needs weights"), gates).outcome == "skip"
    crashed = verdict("auc_amplification", mia_cell(0, (0, 0), "failed", reason="RuntimeError: boom"), gates)
    assert crashed.outcome == "fail" and "RuntimeError: boom" in crashed.message
    assert verdict("auc_amplification", mia_cell(0, (0, 0), "refused", reason="flagged"), gates).outcome == "pass"
    assert verdict("auc_amplification", None, gates).outcome == "fail"  # missing from results.json


def test_positive_control_must_leak_on_the_undefended_model():
    gates = GatesConfig()
    gated = PlannedCell("dp_sgd", "lora", "secmi", "digit7", 0)
    defended = mia_cell(0.0, (-0.01, 0.01), id="dp_sgd-lora-secmi-digit7", defense="dp_sgd", domain="digit7")
    leaking = mia_cell(0.08, (0.03, 0.13), id="none-lora-secmi-all", defense="none")
    flat = mia_cell(0.008, (-0.020, 0.031), id="none-lora-secmi-all", defense="none")
    key = lambda c: c.key  # noqa: E731
    assert control_problem("auc_amplification", gated, {key(leaking): leaking}, gates) is None
    problem = control_problem("auc_amplification", gated, {key(flat): flat}, gates)
    assert "cannot tell a safe model from an insensitive test" in problem and "+0.008 [95% CI -0.020, +0.031]" in problem
    assert control_problem("auc_amplification", gated, {key(flat): flat}, GatesConfig(compare="point")) is None  # 0.008 > 0
    assert "add 'none'" in control_problem("auc_amplification", gated, {}, gates)
    assert control_problem("utility", gated, {}, gates) is None  # utility needs no control
    cells = {key(defended): defended, key(flat): flat}
    assert judge("auc_amplification", gated, cells, gates).outcome == "error"
    cells[key(flat)] = leaking
    assert judge("auc_amplification", gated, cells, gates).outcome == "pass"


def two_seed_cells(deltas: dict[int, float]) -> dict:
    """The dp_sgd lora/secmi pooled cell under each seed (amplification ``delta`` +-0.02) and a
    leaking undefended control under each."""
    cells = {}
    for seed, delta in deltas.items():
        gated = mia_cell(delta, (delta - 0.02, delta + 0.02), id=f"dp_sgd-lora-secmi-all-seed{seed}", defense="dp_sgd", seed=seed)
        control = mia_cell(0.08, (0.03, 0.13), id=f"none-lora-secmi-all-seed{seed}", defense="none", seed=seed)
        cells |= {gated.key: gated, control.key: control}
    return cells


def test_a_pass_another_seed_overturns_is_unstable_and_counted_as_a_flip():
    gates = GatesConfig(max_auc_amplification=0.05, checks=("auc_amplification",))
    planned = [PlannedCell("dp_sgd", "lora", "secmi", POOLED, seed, many_seeds=True) for seed in (0, 1, 2)]
    steady = two_seed_cells({0: 0.0, 1: 0.01, 2: -0.01})
    assert [judge("auc_amplification", p, steady, gates).outcome for p in planned] == ["pass"] * 3
    flipping = two_seed_cells({0: 0.0, 1: 0.06, 2: -0.01})  # seed 1's upper end 0.08 > 0.05
    outcomes = [judge("auc_amplification", p, flipping, gates) for p in planned]
    assert [v.outcome for v in outcomes] == ["unstable", "fail", "unstable"]
    assert outcomes[0].message.startswith("UNSTABLE across seeds (fail under seed 1)")
    assert judge("auc_amplification", replace(planned[0], many_seeds=False), flipping, gates).outcome == "pass"  # one seed: nothing to compare
    assert flip_table(planned, steady, gates) == [
        ["auc_amplification", "1", "0", "0.0% (0.0%-79.3%)", "1", "0"],
        ["all", "1", "0", "0.0% (0.0%-79.3%)", "1", "0"],
    ]
    assert flip_table(planned, flipping, gates)[-1] == ["all", "1", "1", "100.0% (20.7%-100.0%)", "1", "1"]
    assert flip_kinds(planned, flipping, gates) == {"fail/pass": 1} and flip_kinds(planned, steady, gates) == {}
    assert "2 unstable" in count_text(outcomes) and "unstable" not in count_text(outcomes[1:2])


@given(st.floats(-0.5, 0.5), st.floats(0, 0.3), st.floats(0, 0.3), st.floats(-0.2, 0.3))
def test_an_interval_pass_is_always_a_point_pass(delta, below, above, threshold):
    cell = mia_cell(delta, (delta - below, delta + above))
    interval = verdict("auc_amplification", cell, GatesConfig(max_auc_amplification=threshold)).outcome
    point = verdict("auc_amplification", cell, GatesConfig(max_auc_amplification=threshold, compare="point")).outcome
    assert interval != "pass" or point == "pass"


def test_release_profile_plans_a_given_model_and_refuses_pretraining_defenses(tmp_path):
    from s2l_guard.cli import apply_model_options

    release = apply_model_options(load_config("configs/release.toml"), str(tmp_path), None)
    assert {c.defense for c in plan(release)} == {"none", "finetune_filter", "output_filter"}
    assert release.run.model == str(tmp_path.resolve()) and release.run.data == ""
    standard = apply_model_options(load_config("configs/standard.toml"), str(tmp_path), None)
    with pytest.raises(ConfigError, match="dedup, a pre-training recipe"):
        plan(standard)


def extraction_cell(members: int, nonmembers: int, excess_ci=(-1.0, 2.0), legacy: bool = False) -> GateCell:
    metrics = {"extracted": members, "withheld": 0}
    if not legacy:
        metrics |= {"nonmembers_matched": nonmembers, "extracted_above_null": {"value": members - nonmembers, "ci95": list(excess_ci)}}
    return GateCell.from_dict({"id": "x-lora-extraction-all", "defense": "x", "threat_model": "open-weights", "attack": "lora",
                               "measure": "extraction", "domain": POOLED, "seed": 0, "status": "ok", "metrics": metrics,
                               "samples": {"candidates": 500, "domains": 5}})  # fmt: skip


def test_the_extraction_gate_judges_members_above_the_held_out_null():
    gates = GatesConfig(max_extracted=0)
    chance = verdict("extracted", extraction_cell(2, 2), gates)  # as many held-out digits matched: nothing above chance
    assert chance.outcome == "pass" and "2 members and 2 held-out non-members matched" in chance.message
    assert verdict("extracted", extraction_cell(3, 1, (0.5, 4.0)), gates).outcome == "fail"
    assert verdict("extracted", extraction_cell(2, 2, legacy=True), gates).outcome == "fail"  # an old matrix: the raw count


def test_a_given_data_set_names_the_attacked_domains_from_its_metadata(tmp_path):
    from s2l_guard.testbed import build_testbed

    config = load_config(SMOKE)
    build_testbed(tmp_path / "data", config.testbed, config.run.seed)
    planned = plan(config.replace(run={"data": str(tmp_path / "data")}, matrix={"defenses": ["none"]}))
    assert {c.domain for c in planned} == {"digit7", "digit8", POOLED}


def test_typed_cells_write_results_json_back_key_for_key():
    planned = PlannedCell("none", "lora", "secmi", "digit7", 0)
    [crashed] = failed_cells([planned], "RuntimeError: boom")
    assert crashed.to_dict() == {"id": "none-lora-secmi-digit7", "defense": "none", "threat_model": None, "attack": "lora", "measure": "secmi",
                                 "domain": "digit7", "seed": 0, "status": "failed", "reason": "RuntimeError: boom"}  # fmt: skip
    unmeasured = utility_cell(PlannedCell("none", "-", "utility", POOLED, 0), {"status": "failed", "reason": "no model"}, "open-weights")
    assert unmeasured.status == Status.NOT_RUN and unmeasured.to_dict()["reason"] == "no model"
    shapes = [
        crashed.to_dict(),
        mia_cell(0.01, (-0.02, 0.04)).to_dict() | {"shaker": None, "data": "-", "variant": "", "seconds": None, "cached": True},
        mia_cell(0.0, (0, 0), "not-run", reason="needs weights").to_dict(),
        extraction_cell(3, 1).to_dict() | {"refused_domains": ["digit8"]},
    ]
    for shape in shapes:
        again = GateCell.from_dict(json.loads(json.dumps(shape))).to_dict()
        assert json.dumps(again) == json.dumps(GateCell.from_dict(shape).to_dict()) and again == shape
    with pytest.raises(ValueError, match="fine"):
        GateCell.from_dict(shapes[0] | {"status": "fine"})


def test_an_amplification_reads_a_delta_test_and_keeps_what_gates_need():
    from s2l_guard.stats import paired_bootstrap_delta

    test = paired_bootstrap_delta([0.1, 0.5, 0.2], [0.3, 0.0, 0.4], [0.9, 0.7, 0.6], [0.2, 0.1, 0.3], statistic="auc", resamples=200, seed=0)
    amp = Amplification.from_dict(test.to_dict())
    assert (amp.before, amp.after, amp.delta) == (test.before, test.after, test.delta) and amp.ci95 == (test.low, test.high)
    assert set(amp.to_dict()) == {"before", "after", "delta", "ci95", "p_value", "method"}
    cell = mia_cell(0.05, (0.01, 0.09))
    assert cell.amplification.delta == 0.05 and cell.amplification.ci95 == (0.01, 0.09)


def test_plan_names_each_rows_oracle_and_whose_weights_the_model_has():
    config = load_config(SMOKE).replace(matrix={"defenses": ["none", "dp_sgd", "finetune_filter"], "shakers": ["lora", "end2end"],
                                                "member_shakers": ["end2end"], "gaussian_sigmas": [8e-4]})  # fmt: skip
    cells = {(c.defense, c.attack): c for c in plan(config)}
    assert cells["none", "end2end"].oracle == "end2end-members" and cells["none", "end2end-members"].oracle == "end2end-members"
    assert cells["none", "lora"].oracle == cells["none", "pretrained"].oracle == "end2end-members"  # no lora oracle: the first one
    assert cells["dp_sgd", "lora"].weights_of == "dp_sgd"  # a training recipe: its own weights
    assert cells["finetune_filter", "lora"].weights_of == "none"  # an API defense serves the undefended weights
    no_oracle = plan(config.replace(matrix={"member_shakers": []}))
    assert {c.oracle for c in no_oracle} == {""}


def test_release_mode_gates_on_the_audited_models_oracle_and_leaves_oracle_rows_ungated():
    release, compare = GatesConfig(mode="release"), GatesConfig()
    config = load_config(SMOKE).replace(matrix={"defenses": ["none"], "shakers": ["lora"], "member_shakers": ["lora"], "gaussian_sigmas": []})
    planned = plan(config)
    gated = {c.attack for c in gate_plan(planned, release, "auc_amplification")}
    assert gated == {"lora"} and {c.attack for c in gate_plan(planned, compare, "auc_amplification")} == {"lora", "lora-members"}
    cell = PlannedCell("none", "lora", "secmi", POOLED, 0, oracle="lora-members")
    quiet = mia_cell(0.0, (-0.02, 0.02), id="none-lora-secmi-all", defense="none")
    oracle_leaks = mia_cell(0.09, (0.04, 0.14), id="none-lora-members-secmi-all", defense="none", attack="lora-members")
    oracle_quiet = mia_cell(0.01, (-0.01, 0.03), id="none-lora-members-secmi-all", defense="none", attack="lora-members")
    cells = cells_by_key({"cells": [quiet.to_dict(), oracle_leaks.to_dict()]})
    assert judge("auc_amplification", cell, cells, release).outcome == "pass"  # S2L shows nothing, the oracle shows it could
    assert judge("auc_amplification", cell, cells, compare).outcome == "error"  # compare asks S2L itself to leak
    cells[oracle_quiet.key] = oracle_quiet
    blind = judge("auc_amplification", cell, cells, release)
    assert blind.outcome == "error" and "cannot see leakage on this model" in blind.message and "lora-members" in blind.message
    orphan = judge("auc_amplification", PlannedCell("none", "lora", "secmi", POOLED, 0), cells, release)
    assert orphan.outcome == "error" and "member_shakers" in orphan.message


def test_baseline_gates_judge_the_model_as_released():
    config = load_config(SMOKE).replace(matrix={"defenses": ["none"], "shakers": ["lora"], "member_shakers": ["end2end"], "gaussian_sigmas": []})
    planned = plan(config)
    for check in ("baseline_tpr_at_1pct_fpr", "baseline_extracted"):
        assert {c.attack for c in gate_plan(planned, GatesConfig(), check)} == {"pretrained"}
    assert "pretrained" not in {c.attack for c in gate_plan(planned, GatesConfig(), "tpr_at_1pct_fpr")}
    released = GateCell.from_dict(mia_cell(0, (0, 0)).to_dict() | {"id": "none-pretrained-secmi-all", "attack": "pretrained"})
    assert verdict("baseline_tpr_at_1pct_fpr", released, GatesConfig(max_baseline_tpr_at_1pct_fpr=0.3)).outcome == "pass"  # upper end 0.3
    failing = verdict("baseline_tpr_at_1pct_fpr", released, GatesConfig(max_baseline_tpr_at_1pct_fpr=0.29))
    assert failing.outcome == "fail" and "max_baseline_tpr_at_1pct_fpr = 0.29" in failing.message
    extracted = extraction_cell(3, 1, (0.5, 4.0))
    assert verdict("baseline_extracted", extracted, GatesConfig(max_baseline_extracted=2)).outcome == "pass"  # the point, 2, is gated
    assert verdict("baseline_extracted", extracted, GatesConfig(max_baseline_extracted=1)).outcome == "fail"


def test_a_value_on_the_threshold_passes_under_both_compare_modes():
    cell = mia_cell(0.05, (0.01, 0.05))
    assert verdict("auc_amplification", cell, GatesConfig(max_auc_amplification=0.05)).outcome == "pass"
    assert verdict("auc_amplification", mia_cell(0.05, (0.05, 0.09)), GatesConfig(max_auc_amplification=0.05, compare="point")).outcome == "pass"
    assert verdict("extracted", extraction_cell(1, 1), GatesConfig(max_extracted=0)).outcome == "pass"  # 0 above the null


def test_a_crashed_domain_fails_the_pooled_row_and_its_gate():
    from s2l_guard.config import Config
    from s2l_guard.runner.summaries import pooled

    base, ok = TableCell("pretrained", None, "-"), TableCell("lora", "lora", "SP")
    crashed = TableCell("lora", "lora", "SP", Status.FAILED, "RuntimeError: boom")
    row = pooled({"digit7": {"pretrained": base, "lora": ok}, "digit8": {"pretrained": base, "lora": crashed}}, "lora", "pretrained", Config(), 0)
    assert row["status"] == "failed" and row["reasons"] == ["digit8 failed (RuntimeError: boom)"]
    from s2l_guard.runner.matrix import _cell

    cell = _cell(PlannedCell("none", "lora", "secmi", POOLED, 0), row | {"shaker": "lora", "data": "SP"}, [], "open-weights")
    v = verdict("auc_amplification", cell, GatesConfig(domains="pooled"))
    assert v.outcome == "fail" and "digit8 failed (RuntimeError: boom)" in v.message


def test_the_summary_table_shows_the_worst_verdict_per_defense_and_attack():
    from s2l_guard.gates import Verdict, summary_lines

    cells = [PlannedCell("none", "lora", "secmi", "digit7", 0), PlannedCell("none", "lora", "pia", POOLED, 0),
             PlannedCell("none", "-", "utility", POOLED, 0), PlannedCell("dp_sgd", "lora", "secmi", POOLED, 0)]  # fmt: skip
    judged = [(c, Verdict("check", c.id, outcome, "")) for c, outcome in zip(cells, ("pass", "fail", "pass", "error"))]
    lines = summary_lines(judged, "release")
    assert [line.split() for line in lines[:3]] == [["defense", "lora", "utility"], ["none", "FAIL", "PASS"], ["dp_sgd", "ERR", "-"]]
    assert lines[-1].startswith("mode release: 2 pass, 1 fail, 1 error, 0 skip (4 gates")


def test_the_matrix_folder_does_not_depend_on_whether_all_was_expanded_first():
    from s2l_guard.runner.matrix import matrix_folder

    config = load_config("configs/standard.toml")
    assert "all" in config.attack.mia
    assert matrix_folder(config) == matrix_folder(check_plugins(config))
    assert matrix_folder(config) == matrix_folder(config.replace(gates={"mode": "release"}))  # verdicts, not measurements
    assert matrix_folder(config) != matrix_folder(config.replace(attack={"mia": ["secmi"]}))


def measured_part(config, seeds: list[int], defenses: list[str]) -> dict:
    """A part's results.json as `s2l-guard matrix` writes it, each cell marked with its part
    (failed cells: nothing runs here)."""
    from s2l_guard.runner.matrix import matrix_results

    part = config.replace(matrix={"seeds": seeds, "defenses": defenses})
    mark = f"part {seeds} {defenses}"
    tables = {f"{d}/{s}": {"status": "failed", "reason": mark} for s in seeds for d in defenses}
    return matrix_results(part, defenses, tables, [c.to_dict() for c in failed_cells(plan(part), mark)], 10.0)


def test_a_matrix_merges_from_parts_of_its_defenses_and_seeds():
    from s2l_guard.runner.merge import merge_matrices, part_paths

    base = load_config(SMOKE).replace(matrix={"shakers": ["lora"], "member_shakers": [], "gaussian_sigmas": []})
    whole = base.replace(matrix={"seeds": [0, 1], "defenses": ["none", "output_filter"]})
    parts = {"a": measured_part(base, [0], ["none", "output_filter"]), "b": measured_part(base, [1], ["none"]),
             "c": measured_part(base.replace(run={"store": "elsewhere"}, gates={"max_extracted": 3}), [1], ["output_filter"])}  # fmt: skip
    merged = merge_matrices(whole, parts)
    assert [c["id"] for c in merged["cells"]] == [p.id for p in plan(whole)]  # the whole run's ids and order: seed-suffixed
    source = {"none/0": "a", "output_filter/0": "a", "none/1": "b", "output_filter/1": "c"}
    for cell in merged["cells"]:
        assert cell["reason"] == parts[source[f"{cell['defense']}/{cell['seed']}"]]["tables"][f"{cell['defense']}/{cell['seed']}"]["reason"]
    assert merged["seeds"] == [0, 1] and merged["defenses"] == ["none", "output_filter"] and merged["wall_seconds"] == 30.0
    assert [p["results"] for p in merged["parts"]] == ["a", "b", "c"]
    # a glob over the run folders may match the merge's own output: the whole, not a part
    found = part_paths(["a/results.json", "b", "out/results.json", "a", "out", "records/seed3.json"], Path("out"))
    assert found == [Path("a/results.json"), Path("b/results.json"), Path("records/seed3.json")]
    with pytest.raises(ConfigError, match="no part holds output_filter under seed 1"):
        merge_matrices(whole, {"a": parts["a"], "b": parts["b"]})
    with pytest.raises(ConfigError, match="b and c both hold defense none under seed 1"):
        merge_matrices(whole, parts | {"c": measured_part(base, [1], ["none", "output_filter"])})
    with pytest.raises(ConfigError, match=r"plans no dp_sgd under seed 1 \(d\)"):
        merge_matrices(whole, parts | {"d": measured_part(base, [1], ["dp_sgd"])})
    with pytest.raises(ConfigError, match=r"c measured another config .*pretrain\.steps = 13, not 12"):
        merge_matrices(whole, parts | {"c": measured_part(base.replace(pretrain={"steps": 13}), [1], ["output_filter"])})


def test_a_merge_computes_nothing_so_it_does_not_wait_for_the_cores(tmp_path):
    """`matrix --merge` while another command holds every core: it runs at once."""
    import os
    import subprocess
    import sys

    from s2l_guard.cores import try_take

    whole = tmp_path / "whole.toml"
    whole.write_text(f'extends = "{Path(SMOKE).resolve()}"\n[matrix]\ndefenses = ["none"]\nseeds = [0, 1]\nshakers = ["lora"]\nmember_shakers = []\n')
    for seed in (0, 1):
        (tmp_path / f"part{seed}.json").write_text(json.dumps(measured_part(load_config(str(whole)), [seed], ["none"])))
    cores = os.cpu_count() or 1
    held = try_take(cores, cores, tmp_path / "lease")
    assert held is not None
    env = dict(os.environ, S2L_GUARD_CORE_LEASE="1", S2L_GUARD_CORE_LEASE_DIR=str(tmp_path / "lease"), OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "s2l_guard.cli", "matrix", "--config", str(whole), "--merge", "part0.json", "part1.json", "--out", "m"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "waiting for" not in done.stderr + done.stdout and "verdicts flipping across 2 seeds" in done.stdout
    assert [c["id"] for c in json.loads((tmp_path / "m" / "results.json").read_text())["cells"]][-1] == "none-utility-seed1"


def test_a_part_without_the_undefended_model_says_to_merge_it_with_the_one_that_holds_it(tmp_path, capsys):
    """A split study's part (`--defense dedup`) gated alone: its compare gates lack their control,
    and the summary says which merge judges them; a part that holds 'none' gets no such note."""
    from s2l_guard.cli import main

    whole = tmp_path / "whole.toml"
    matrix = '[matrix]\ndefenses = ["none", "dedup"]\nseeds = [0]\nshakers = ["lora"]\nmember_shakers = []\n'
    whole.write_text(f'extends = "{Path(SMOKE).resolve()}"\n{matrix}')
    for defense in ("dedup", "none"):
        part = tmp_path / f"{defense}.json"
        part.write_text(json.dumps(measured_part(load_config(str(whole)), [0], [defense])))
        argv = ["matrix", "--config", str(whole), "--defense", defense, "--merge", str(part), "--out", str(tmp_path / defense)]
        assert main(argv) == 0
        hinted = "note: the undefended model ('none') is not in this matrix" in capsys.readouterr().out
        assert hinted == (defense == "dedup")
