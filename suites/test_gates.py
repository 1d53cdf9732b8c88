from s2l_guard.decision import Outcome

"""The release gates: one test per (gate, cell), ids like ``test_amplification[dp_sgd-lora-secmi-digit7]``.

Each asserts that the gate's measurement, pooled over every replicate and draw, stays within its
[gates] threshold; the ``judged`` fixture (conftest.py) skips cells that did not run and errors
when the gate is UNDECIDED. Thresholds, compare mode and domains: docs/gates.md.
"""


def test_amplification(judged):
    """S2L must not raise membership inference AUC by more than max_auc_amplification."""
    assert judged.outcome == Outcome.PASS, judged.message


def test_tpr_at_1pct_fpr(judged):
    """The shaken model's TPR at 1% FPR must stay at or below max_tpr_at_1pct_fpr."""
    assert judged.outcome == Outcome.PASS, judged.message


def test_extraction(judged):
    """The shaken model must not reproduce more than max_extracted_share of the members above the held-out null."""
    assert judged.outcome == Outcome.PASS, judged.message


def test_utility(judged):
    """The deployed model must keep min_utility conditional accuracy (a defense may not win by ruining it)."""
    assert judged.outcome == Outcome.PASS, judged.message


def test_baseline_tpr_at_1pct_fpr(judged):
    """The model as released (before any shaking) must keep TPR at 1% FPR at or below max_baseline_tpr_at_1pct_fpr."""
    assert judged.outcome == Outcome.PASS, judged.message


def test_baseline_extraction(judged):
    """The model as released must not reproduce more than max_baseline_extracted_share of its members above the held-out null."""
    assert judged.outcome == Outcome.PASS, judged.message
