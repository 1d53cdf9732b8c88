import numpy as np
import pytest
import torch

from attacks.extraction import auto_grid, flag_near_duplicates, match_candidates
from s2l_guard.config import ExtractionConfig


def images(n, seed):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_auto_grid_keeps_carlini_tile_size():
    assert auto_grid(8) == 1 and auto_grid(64) == 1 and auto_grid(256) == 2 and auto_grid(512) == 4 and auto_grid(1024) == 4


def test_copies_near_training_images_are_extracted_and_counted_once():
    training = images(10, 0)
    copies = [1] * 10
    members = [2, 3, 4]  # the domain's members
    # candidates: two near-copies of member 2, one of member 4, one of a public image (7), and noise
    candidates = torch.stack([training[2] + 0.01, training[2] - 0.01, training[4], training[7], images(1, 9)[0]]).clamp(0, 1)
    result = match_candidates(candidates, training, copies, members, ExtractionConfig(candidates=5))
    assert result.any_hits.tolist() == [2, 2, 4, 7, -1]
    assert result.matches == [[2], [2], [4], [], []]  # the public image is not a member of the domain
    assert result.extracted == [2, 4]
    assert result.matched_candidates == 3 and result.to_dict()["matched_any_training_image"] == 4
    assert result.to_dict()["extracted_images"] == 2


def test_eidetic_k_excludes_images_seen_too_often():
    training = images(3, 1)
    result = match_candidates(training.clone(), training, [1, 11, 10], [0, 1, 2], ExtractionConfig(max_copies=10))
    assert result.any_hits.tolist() == [0, -1, 2] and result.extracted == [0, 2]


def test_flagging_and_precision():
    training = images(4, 2)
    duplicated = training[0:1].repeat(4, 1, 1, 1)  # the model keeps generating member 0
    unrelated = images(3, 3).repeat_interleave(4, 0) * 0.5 + 0.5  # near-duplicate clusters that match nothing
    candidates = torch.cat([duplicated, unrelated, images(5, 4)])
    settings = ExtractionConfig(flag_neighbours=3, flag_delta=0.05)
    result = match_candidates(candidates, training, [1] * 4, [0, 1, 2, 3], settings)
    assert result.flagged[:4].all() and result.flagged[4:16].all() and not result.flagged[16:].any()
    assert result.precision == pytest.approx(4 / 16)


def test_matching_is_chunk_independent():
    training, candidates = images(40, 5), images(30, 6)
    a = match_candidates(candidates, training, [1] * 40, list(range(10)), ExtractionConfig(delta=0.35, chunk=7))
    b = match_candidates(candidates, training, [1] * 40, list(range(10)), ExtractionConfig(delta=0.35, chunk=1000))
    assert a.matches == b.matches and np.array_equal(a.flagged, b.flagged) and a.extracted == b.extracted


def test_no_candidates_extract_nothing():  # an output filter may serve none
    result = match_candidates(images(0, 1), images(12, 0), [1] * 12, [0, 1, 2], ExtractionConfig(), images(3, 2))
    assert result.candidates == 0 and result.extracted == [] and result.nonmembers_matched == 0 and result.precision is None


def test_no_flag_means_no_precision():
    training = images(3, 7)
    result = match_candidates(images(2, 8), training, [1] * 3, [0], ExtractionConfig())
    assert result.precision is None and not flag_near_duplicates(images(2, 8), ExtractionConfig(), 1).any()


def test_every_member_within_delta_counts_not_only_the_nearest():
    """Carlini et al. count every training image within delta of a generation: two members close
    to each other and to one candidate are both extracted, though only one is its nearest."""
    base = images(1, 10)[0]
    training = torch.cat([base[None], (base + 0.04).clamp(0, 1)[None], images(3, 11)])
    result = match_candidates(base[None].clone(), training, [1] * 5, [0, 1], ExtractionConfig(delta=0.1))
    assert result.any_hits.tolist() == [0]  # its nearest
    assert result.matches == [[0, 1]] and result.extracted == [0, 1]
    # a member whose nearest neighbour is seen too often (k) is still extracted when it is eligible itself
    result = match_candidates(base[None].clone(), training, [11, 1, 1, 1, 1], [0, 1], ExtractionConfig(delta=0.1, max_copies=10))
    assert result.any_hits.tolist() == [-1] and result.extracted == [1]


def test_the_null_counts_held_out_nonmembers_matched_by_the_same_candidates():
    training, held_out = images(6, 12), images(4, 13)
    candidates = torch.stack([training[0], held_out[1], held_out[1] + 0.01, images(1, 14)[0]]).clamp(0, 1)
    result = match_candidates(candidates, training, [1] * 6, [0, 1, 2], ExtractionConfig(delta=0.1), held_out)
    assert result.matches == [[0], [], [], []] and result.null_matches == [[], [1], [1], []]
    assert result.nonmembers_matched == 1 and result.to_dict()["nonmembers_matched"] == 1
