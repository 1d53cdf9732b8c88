"""The matrix plan and the gate verdicts, on configs and hand-made cells (no model runs here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from s2l_guard.config import GatesConfig, load_config
from s2l_guard.decision import Outcome
from s2l_guard.errors import ConfigError
from s2l_guard.gates import agreement, count_text, gate_plan, judge, sensitivity_problem, verdict
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
    two_seeds = plan(config.replace(matrix={"replicates": [0, 1]}))
    assert len(two_seeds) == 2 * len(cells) and "none-lora-pia-all-seed1" in {c.id for c in two_seeds}
    drawn = plan(config.replace(matrix={"replicates": [0, 1], "draws": [0, 3]}))
    assert len(drawn) == 4 * len(cells) and "none-lora-pia-all-seed1-draw3" in {c.id for c in drawn}
    assert len({c.gate_id for c in drawn}) == len({c.gate_id for c in cells})  # one gate pools every replicate and draw


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


def test_verdict_passes_fails_or_leaves_undecided_by_the_interval():
    gates = GatesConfig(max_auc_amplification=0.05)
    passed = verdict("auc_amplification", mia_cell(0.01, (-0.02, 0.04)), gates)
    assert passed.outcome == Outcome.PASS and passed.bound == pytest.approx(0.04)
    assert "+0.010 [95% CI -0.020, +0.040]" in passed.message and "maximum 0.05" in passed.message and "120 members" in passed.message
    failed = verdict("auc_amplification", mia_cell(0.08, (0.06, 0.10)), gates)
    assert failed.outcome == Outcome.FAIL and failed.bound == pytest.approx(0.06)  # the favourable end is beyond the threshold
    straddling = verdict("auc_amplification", mia_cell(0.01, (-0.02, 0.07)), gates)
    assert straddling.outcome == Outcome.UNDECIDED and "would be decided by" in straddling.message and "at least 2 draws" in straddling.message
    assert verdict("auc_amplification", mia_cell(0.01, (-0.02, 0.07)), GatesConfig(max_auc_amplification=0.05, compare="point")).outcome == "pass"
    assert verdict("tpr_at_1pct_fpr", mia_cell(0, (0, 0), resolvable=False), GatesConfig()).outcome == "skip"
    assert verdict("tpr_at_1pct_fpr", mia_cell(0, (0, 0)), GatesConfig(max_tpr_at_1pct_fpr=0.25)).outcome == "undecided"  # 0.0-0.3


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
    assert sensitivity_problem("auc_amplification", gated, {key(leaking): leaking}, gates) is None
    problem = sensitivity_problem("auc_amplification", gated, {key(flat): flat}, gates)
    assert "cannot tell a safe model from an insensitive test" in problem and "+0.008 [95% CI -0.020, +0.031]" in problem
    assert sensitivity_problem("auc_amplification", gated, {key(flat): flat}, GatesConfig(compare="point")) is None  # 0.008 > 0
    assert "add 'none'" in sensitivity_problem("auc_amplification", gated, {}, gates)
    assert sensitivity_problem("utility", gated, {}, gates) is None  # utility needs no control
    cells = {key(defended): defended, key(flat): flat}
    assert judge("auc_amplification", gated, cells, gates).outcome == "undecided"
    cells[key(flat)] = leaking
    assert judge("auc_amplification", gated, cells, gates).outcome == "pass"


def drawn_cells(deltas: dict[int, float], width: float = 0.02) -> dict:
    """The dp_sgd lora/secmi pooled cell under each draw (amplification ``delta`` +-``width``) and a
    leaking undefended control under each."""
    cells = {}
    for draw, delta in deltas.items():
        gated = mia_cell(delta, (delta - width, delta + width), id=f"dp_sgd-lora-secmi-all-draw{draw}", defense="dp_sgd", draw=draw)
        control = mia_cell(0.08, (0.03, 0.13), id=f"none-lora-secmi-all-draw{draw}", defense="none", draw=draw)
        cells |= {gated.key: gated, control.key: control}
    return cells


def test_one_gate_pools_every_draw_into_one_interval():
    gates = GatesConfig(max_auc_amplification=0.05, checks=("auc_amplification",))
    planned = PlannedCell("dp_sgd", "lora", "secmi", POOLED, 0, draw=0, many_draws=True)
    steady = judge("auc_amplification", planned, drawn_cells({0: 0.0, 1: 0.01, 2: -0.01}), gates)
    assert steady.outcome == Outcome.PASS and steady.cell_id == "dp_sgd-lora-secmi-all" and steady.measurement.draws == 3
    assert steady.measurement.value == pytest.approx(0.0) and "mean of 3 draws" in steady.message
    # one draw far off: the between-draw spread widens the interval until it straddles the threshold
    scattered = judge("auc_amplification", planned, drawn_cells({0: 0.0, 1: 0.06, 2: -0.01}), gates)
    assert scattered.outcome == Outcome.UNDECIDED and "draws (now 3)" in scattered.message
    assert scattered.measurement.ci95[1] - scattered.measurement.ci95[0] > steady.measurement.ci95[1] - steady.measurement.ci95[0]
    assert judge("auc_amplification", planned, drawn_cells({0: 0.09, 1: 0.1, 2: 0.11}), gates).outcome == Outcome.FAIL


def test_two_runs_agree_when_neither_passes_what_the_other_fails():
    from s2l_guard.gates import Verdict

    a = [Verdict("c", "g1", Outcome.PASS, ""), Verdict("c", "g2", Outcome.UNDECIDED, ""), Verdict("c", "g3", Outcome.FAIL, ""),
         Verdict("c", "g4", Outcome.SKIP, "")]  # fmt: skip
    b = [Verdict("c", "g1", Outcome.PASS, ""), Verdict("c", "g2", Outcome.PASS, ""), Verdict("c", "g3", Outcome.PASS, ""),
         Verdict("c", "g4", Outcome.SKIP, "")]  # fmt: skip
    assert agreement(a, b) == {"gates": 3, "same": 1, "contradict": 1, "decided_once": 1}
    assert count_text(a) == "1 pass, 1 fail, 1 undecided, 1 skip"


@given(st.floats(-0.5, 0.5), st.floats(0, 0.3), st.floats(0, 0.3), st.floats(-0.2, 0.3))
def test_an_interval_pass_is_always_a_point_pass(delta, below, above, threshold):
    cell = mia_cell(delta, (delta - below, delta + above))
    interval = verdict("auc_amplification", cell, GatesConfig(max_auc_amplification=threshold)).outcome
    point = verdict("auc_amplification", cell, GatesConfig(max_auc_amplification=threshold, compare="point")).outcome
    assert interval != "pass" or point == "pass"
    assert interval != "fail" or point == "fail"


def test_release_profile_plans_a_given_model_and_refuses_pretraining_defenses(tmp_path):
    from s2l_guard.cli import apply_model_options

    release = apply_model_options(load_config("configs/release.toml"), str(tmp_path), None)
    assert {c.defense for c in plan(release)} == {"none", "finetune_filter", "output_filter"}
    assert release.run.model == str(tmp_path.resolve()) and release.run.data == ""
    standard = apply_model_options(load_config("configs/standard.toml"), str(tmp_path), None)
    with pytest.raises(ConfigError, match="dedup, a pre-training recipe"):
        plan(standard)
    assert release.matrix.draws == (0, 1, 2) and len({c.draw for c in plan(release)}) == 3  # a given model: draws of the attack
    with pytest.raises(ConfigError, match="vary the attack with \\[matrix\\] draws instead"):
        release.replace(matrix={"replicates": [0, 1]})  # it cannot be re-drawn and pre-trained


def extraction_cell(members: int, nonmembers: int, excess_ci=(-1.0, 2.0), legacy: bool = False, size: int = 200) -> GateCell:
    metrics = {"extracted": members, "withheld": 0, "nonmembers_matched": nonmembers,
               "extracted_above_null": {"value": members - nonmembers, "ci95": list(excess_ci)}}  # fmt: skip
    samples = {"candidates": 500, "domains": 5} | ({} if legacy else {"members": size, "nonmembers": size})
    return GateCell.from_dict({"id": "x-lora-extraction-all", "defense": "x", "threat_model": "open-weights", "attack": "lora",
                               "measure": "extraction", "domain": POOLED, "seed": 0, "status": "ok", "metrics": metrics,
                               "samples": samples})  # fmt: skip


def test_the_extraction_gate_judges_the_share_of_members_above_the_held_out_null():
    gates = GatesConfig(max_extracted_share=0.1)
    chance = verdict("extracted", extraction_cell(2, 2), gates)  # as many held-out digits matched: nothing above chance
    assert chance.outcome == "pass" and chance.measurement.value == 0 and "Clopper-Pearson" in chance.message
    assert chance.measurement.counts["members_matched"] == 2 and "matched against 200 members" in chance.message
    assert verdict("extracted", extraction_cell(60, 2), gates).outcome == "fail"  # 0.29 of the members above chance
    assert verdict("extracted", extraction_cell(22, 2), gates).outcome == "undecided"  # 0.10 [0.05, 0.15]
    nothing = verdict("extracted", extraction_cell(0, 0, size=20), gates)  # 0 of 20 members: upper end 0.168 > 0.1
    assert nothing.outcome == "undecided" and nothing.measurement.ci95[1] == pytest.approx(1 - 0.025 ** (1 / 20))
    legacy = verdict("extracted", extraction_cell(2, 2, legacy=True), gates)
    assert legacy.outcome == "undecided" and "rerun the matrix" in legacy.message  # an old matrix: no member counts to form a share


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
    oracle_leaks = mia_cell(0.12, (0.07, 0.17), id="none-lora-members-secmi-all", defense="none", attack="lora-members")
    oracle_quiet = mia_cell(0.01, (-0.01, 0.03), id="none-lora-members-secmi-all", defense="none", attack="lora-members")
    cells = cells_by_key({"cells": [quiet.to_dict(), oracle_leaks.to_dict()]})
    assert judge("auc_amplification", cell, cells, release).outcome == "pass"  # S2L shows nothing, the oracle shows it could
    assert judge("auc_amplification", cell, cells, compare).outcome == "undecided"  # compare asks S2L itself to leak
    cells[oracle_quiet.key] = oracle_quiet
    blind = judge("auc_amplification", cell, cells, release)
    assert blind.outcome == "undecided" and "cannot see membership on this model" in blind.message and "lora-members" in blind.message
    orphan = judge("auc_amplification", PlannedCell("none", "lora", "secmi", POOLED, 0), cells, release)
    assert orphan.outcome == "undecided" and "member_shakers" in orphan.message
    # the oracle leaks, but by less than the gate's own threshold: a calibrated control must exceed it
    cells[oracle_quiet.key] = mia_cell(0.04, (0.02, 0.06), id="none-lora-members-secmi-all", defense="none", attack="lora-members")
    assert judge("auc_amplification", cell, cells, release).outcome == "undecided"
    # the released model's own AUC excludes 0.5: the measure sees membership without any control
    released = mia_cell(0.0, (0.0, 0.0), id="none-pretrained-secmi-all", defense="none", attack="pretrained")
    released = GateCell.from_dict(released.to_dict() | {"metrics": dict(released.metrics, auc={"value": 0.67, "ci95": [0.62, 0.72]})})
    cells[released.key] = released
    assert judge("auc_amplification", cell, cells, release).outcome == "pass"
    # ... unless a blind baseline tells the members from the non-members without the model
    fired = {"0": {POOLED: {"fires": True, "message": "members and non-members differ without the model (blind AUC 0.9)"}}}
    shifted = judge("auc_amplification", cell, cells, release, fired)
    assert shifted.outcome == "undecided" and "differ without the model" in shifted.message


def test_a_calibrated_control_row_trains_on_the_members_at_its_own_budget_and_is_every_rows_release_control():
    from s2l_guard.runner.plan import plan_rows

    config = load_config(SMOKE).replace(attack={"control_steps": 500, "control_learning_rate": 2e-4},
                                        matrix={"defenses": ["none"], "shakers": ["lora"], "member_shakers": ["lora"], "gaussian_sigmas": []})  # fmt: skip
    control = [r for r in plan_rows(config) if r.label == "end2end-control"]
    assert len(control) == 1 and control[0].shaker == "end2end" and control[0].data == "members"
    assert dict(control[0].overrides) == {"steps": 500, "learning_rate": 2e-4}
    planned = plan(config)
    assert {c.oracle for c in planned if c.measure != "utility"} == {"end2end-control"}  # the lora oracle row is a report row now
    release = {c.attack for c in gate_plan(planned, GatesConfig(mode="release"), "auc_amplification")}
    assert release == {"lora"}  # neither the control nor the oracle row at lora's budget is gated in a release
    assert {"end2end-control", "lora-members"} <= {c.attack for c in gate_plan(planned, GatesConfig(), "auc_amplification")}
    cell = PlannedCell("none", "lora", "loss", POOLED, 0, oracle="end2end-control")
    quiet = mia_cell(0.0, (-0.02, 0.02), id="none-lora-loss-all", defense="none", measure="loss")
    weak = mia_cell(0.04, (0.02, 0.06), id="none-end2end-control-loss-all", defense="none", attack="end2end-control", measure="loss")
    cells = cells_by_key({"cells": [quiet.to_dict(), weak.to_dict()]})
    undecided = judge("auc_amplification", cell, cells, GatesConfig(mode="release"))
    assert undecided.outcome == "undecided" and "calibrated control end2end-control" in undecided.message
    assert "control_steps" not in undecided.message  # the fix it gives is not the control it already has
    # a released AUC above 0.5 shows the measure sees membership, not that it rises with leakage: with a calibrated
    # control planned, amplification gates need the control (baseline gates, on the released model, do not)
    released = mia_cell(0.0, (0.0, 0.0), id="none-pretrained-loss-all", defense="none", attack="pretrained", measure="loss")
    released = GateCell.from_dict(released.to_dict() | {"metrics": dict(released.metrics, auc={"value": 0.67, "ci95": [0.62, 0.72]})})
    cells[released.key] = released
    still = judge("auc_amplification", cell, cells, GatesConfig(mode="release"))
    assert still.outcome == "undecided" and "loss does not rise with leakage on this model" in still.message
    assert sensitivity_problem("baseline_tpr_at_1pct_fpr", PlannedCell("none", "pretrained", "loss", POOLED, 0, oracle="end2end-control"),
                               cells, GatesConfig(mode="release")) is None  # fmt: skip
    cells[weak.key] = mia_cell(0.15, (0.11, 0.19), id="none-end2end-control-loss-all", defense="none", attack="end2end-control", measure="loss")
    assert judge("auc_amplification", cell, cells, GatesConfig(mode="release")).outcome == "pass"
    with pytest.raises(ConfigError, match="control_shaker = 'gaussian' has no steps"):
        check_plugins(config.replace(attack={"control_shaker": "gaussian"}))
    with pytest.raises(ConfigError, match="no_such_method"):
        check_plugins(config.replace(attack={"control_shaker": "no_such_method"}))


def test_baseline_gates_judge_the_model_as_released():
    config = load_config(SMOKE).replace(matrix={"defenses": ["none"], "shakers": ["lora"], "member_shakers": ["end2end"], "gaussian_sigmas": []})
    planned = plan(config)
    for check in ("baseline_tpr_at_1pct_fpr", "baseline_extracted"):
        assert {c.attack for c in gate_plan(planned, GatesConfig(), check)} == {"pretrained"}
    assert "pretrained" not in {c.attack for c in gate_plan(planned, GatesConfig(), "tpr_at_1pct_fpr")}
    released = GateCell.from_dict(mia_cell(0, (0, 0)).to_dict() | {"id": "none-pretrained-secmi-all", "attack": "pretrained"})
    assert verdict("baseline_tpr_at_1pct_fpr", released, GatesConfig(max_baseline_tpr_at_1pct_fpr=0.3)).outcome == "pass"  # upper end 0.3
    straddled = verdict("baseline_tpr_at_1pct_fpr", released, GatesConfig(max_baseline_tpr_at_1pct_fpr=0.29))
    assert straddled.outcome == "undecided" and "max_baseline_tpr_at_1pct_fpr = 0.29" in straddled.message  # 0.1 [0.0, 0.3]
    failing = verdict("baseline_tpr_at_1pct_fpr", released, GatesConfig(max_baseline_tpr_at_1pct_fpr=0.0))
    assert failing.outcome == "undecided"  # the lower end 0.0 is not beyond 0.0: a fail needs the favourable end beyond
    extracted = extraction_cell(3, 1)  # 0.01 [-0.015, 0.036] of 200 members above the null
    assert verdict("baseline_extracted", extracted, GatesConfig(max_baseline_extracted_share=0.05)).outcome == "pass"
    assert verdict("baseline_extracted", extracted, GatesConfig(max_baseline_extracted_share=0.0)).outcome == "undecided"


def test_a_value_on_the_threshold_passes_under_both_compare_modes():
    cell = mia_cell(0.05, (0.01, 0.05))
    assert verdict("auc_amplification", cell, GatesConfig(max_auc_amplification=0.05)).outcome == "pass"
    assert verdict("auc_amplification", mia_cell(0.05, (0.05, 0.09)), GatesConfig(max_auc_amplification=0.05, compare="point")).outcome == "pass"
    assert verdict("extracted", extraction_cell(1, 1), GatesConfig(max_extracted_share=0.03)).outcome == "pass"  # 0 above the null


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
    outcomes = (Outcome.PASS, Outcome.FAIL, Outcome.PASS, Outcome.UNDECIDED)
    judged = [(c, Verdict("check", c.gate_id, outcome, "")) for c, outcome in zip(cells, outcomes)]
    lines = summary_lines(judged, "release")
    assert [line.split() for line in lines[:3]] == [["defense", "lora", "utility"], ["none", "FAIL", "PASS"], ["dp_sgd", "UNDEC", "-"]]
    assert lines[-1].startswith("mode release: 2 pass, 1 fail, 1 undecided, 0 skip (4 gates")


def test_the_matrix_folder_does_not_depend_on_whether_all_was_expanded_first():
    from s2l_guard.runner.matrix import matrix_folder

    config = load_config("configs/standard.toml")
    assert "all" in config.attack.mia
    assert matrix_folder(config) == matrix_folder(check_plugins(config))
    assert matrix_folder(config) == matrix_folder(config.replace(gates={"mode": "release"}))  # verdicts, not measurements
    assert matrix_folder(config) != matrix_folder(config.replace(attack={"mia": ["secmi"]}))


def measured_part(config, seeds: list[int], defenses: list[str], draws: list[int] = ()) -> dict:
    """A part's results.json as `s2l-guard matrix` writes it, each cell marked with its part
    (failed cells: nothing runs here)."""
    from s2l_guard.runner.matrix import matrix_results, table_key

    part = config.replace(matrix={"replicates": seeds, "defenses": defenses, "draws": list(draws)})
    mark = f"part {seeds} {list(draws)} {defenses}"
    tables = {table_key(d, s, k): {"status": "failed", "reason": mark} for s in seeds for k in draws or [0] for d in defenses}
    return matrix_results(part, defenses, tables, [c.to_dict() for c in failed_cells(plan(part), mark)], 10.0)


def test_a_matrix_merges_from_parts_of_its_defenses_and_seeds():
    from s2l_guard.runner.merge import merge_matrices, part_paths

    base = load_config(SMOKE).replace(matrix={"shakers": ["lora"], "member_shakers": [], "gaussian_sigmas": []})
    whole = base.replace(matrix={"replicates": [0, 1], "defenses": ["none", "output_filter"]})
    parts = {"a": measured_part(base, [0], ["none", "output_filter"]), "b": measured_part(base, [1], ["none"]),
             "c": measured_part(base.replace(run={"store": "elsewhere"}, gates={"max_extracted_share": 0.3}), [1], ["output_filter"])}  # fmt: skip
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
    with pytest.raises(ConfigError, match="no part holds output_filter under replicate 1"):
        merge_matrices(whole, {"a": parts["a"], "b": parts["b"]})
    with pytest.raises(ConfigError, match="b and c both hold defense none under replicate 1"):
        merge_matrices(whole, parts | {"c": measured_part(base, [1], ["none", "output_filter"])})
    with pytest.raises(ConfigError, match=r"plans no dp_sgd under replicate 1 \(d\)"):
        merge_matrices(whole, parts | {"d": measured_part(base, [1], ["dp_sgd"])})
    with pytest.raises(ConfigError, match=r"c measured another config .*pretrain\.steps = 13, not 12"):
        merge_matrices(whole, parts | {"c": measured_part(base.replace(pretrain={"steps": 13}), [1], ["output_filter"])})


def test_draws_merge_like_replicates_and_a_part_from_before_draws_still_reads():
    from s2l_guard.runner.merge import merge_matrices

    base = load_config(SMOKE).replace(matrix={"shakers": ["lora"], "member_shakers": [], "gaussian_sigmas": [], "defenses": ["none"]})
    whole = base.replace(matrix={"draws": [0, 1, 2]})
    merged = merge_matrices(whole, {"a": measured_part(base, [0], ["none"], [0, 1]), "b": measured_part(base, [0], ["none"], [2])})
    assert merged["draws"] == [0, 1, 2] and {c.get("draw", 0) for c in merged["cells"]} == {0, 1, 2}
    assert set(merged["tables"]) == {"none/0", "none/0/draw1", "none/0/draw2"}
    with pytest.raises(ConfigError, match="no part holds none under replicate 0 draw 2"):
        merge_matrices(whole, {"a": measured_part(base, [0], ["none"], [0, 1])})
    # results.json written before draws: [matrix] seeds, count thresholds, no "draw" on its cells
    old = measured_part(base, [0], ["none"])
    old["config"]["matrix"]["seeds"] = old["config"]["matrix"].pop("replicates")
    old["config"]["matrix"].pop("draws")
    old["config"]["gates"]["max_extracted"] = 0
    assert merge_matrices(base, {"old": old})["cells"][0]["id"] == old["cells"][0]["id"]


def test_a_merge_computes_nothing_so_it_does_not_wait_for_the_cores(tmp_path):
    """`matrix --merge` while another command holds every core: it runs at once."""
    import os
    import subprocess
    import sys

    from s2l_guard.cores import try_take

    whole = tmp_path / "whole.toml"
    whole.write_text(
        f'extends = "{Path(SMOKE).resolve()}"\n[matrix]\ndefenses = ["none"]\nreplicates = [0, 1]\nshakers = ["lora"]\nmember_shakers = []\n'
    )
    for seed in (0, 1):
        (tmp_path / f"part{seed}.json").write_text(json.dumps(measured_part(load_config(str(whole)), [seed], ["none"])))
    cores = os.cpu_count() or 1
    held = try_take(cores, cores, tmp_path / "lease")
    assert held is not None
    env = dict(os.environ, S2L_GUARD_CORE_LEASE="1", S2L_GUARD_CORE_LEASE_DIR=str(tmp_path / "lease"), OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "s2l_guard.cli", "matrix", "--config", str(whole), "--merge", "part0.json", "part1.json", "--out", "m"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "waiting for" not in done.stderr + done.stdout and "2 replicate(s) x 1 draw(s) pooled per gate" in done.stdout
    assert [c["id"] for c in json.loads((tmp_path / "m" / "results.json").read_text())["cells"]][-1] == "none-utility-seed1"


def test_a_part_without_the_undefended_model_says_to_merge_it_with_the_one_that_holds_it(tmp_path, capsys):
    """A split study's part (`--defense dedup`) gated alone: its compare gates lack their control,
    and the summary says which merge judges them; a part that holds 'none' gets no such note."""
    from s2l_guard.cli import main

    whole = tmp_path / "whole.toml"
    matrix = '[matrix]\ndefenses = ["none", "dedup"]\nreplicates = [0]\nshakers = ["lora"]\nmember_shakers = []\n'
    whole.write_text(f'extends = "{Path(SMOKE).resolve()}"\n{matrix}')
    for defense in ("dedup", "none"):
        part = tmp_path / f"{defense}.json"
        part.write_text(json.dumps(measured_part(load_config(str(whole)), [0], [defense])))
        argv = ["matrix", "--config", str(whole), "--defense", defense, "--merge", str(part), "--out", str(tmp_path / defense)]
        assert main(argv) == 0
        hinted = "note: the undefended model ('none') is not in this matrix" in capsys.readouterr().out
        assert hinted == (defense == "dedup")


def test_agreement_of_two_runs_exits_1_when_one_passes_what_the_other_fails(tmp_path, capsys):
    from s2l_guard.cli import main

    fixture = json.loads((Path(__file__).parent / "data" / "matrix-smoke-results.json").read_text())
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(fixture))
    assert main(["agreement", str(tmp_path / "a"), str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "0 PASS in one and FAIL in the other, 0 (0.0%) decided in one and UNDECIDED in the other" in out
    flipped = json.loads(json.dumps(fixture))  # none's utility, 0.06 in the fixture (FAIL), now 0.99 [0.98, 1.0] (PASS)
    cell = next(c for c in flipped["cells"] if c["id"] == "none-utility")
    cell["metrics"]["conditional_accuracy"].update(value=0.99, ci95=[0.98, 1.0])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps(flipped))
    assert main(["agreement", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "1 PASS in one and FAIL in the other" in capsys.readouterr().out
    # judged by another profile's thresholds, the same runs agree again: utility's floor 0 passes both
    loose = tmp_path / "loose.toml"
    loose.write_text(f'extends = "{Path(SMOKE).resolve()}"\n[gates]\nmin_utility = 0.0\n')
    assert main(["agreement", str(tmp_path / "a"), str(tmp_path / "b"), "--config", str(loose)]) == 0
