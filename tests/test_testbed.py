import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from s2l_guard.config import TestbedConfig
from s2l_guard.data import load_imagefolder
from s2l_guard.errors import DataError
from s2l_guard.testbed import build_testbed, split_digits

LABELS = np.repeat(np.arange(10), 40)  # 40 images per class, like a small digits set


@st.composite
def random_testbed_configs(draw):
    digits = draw(st.permutations(range(10)))
    n_private = draw(st.integers(1, 4))
    n_public = draw(st.integers(0, 3))
    return TestbedConfig(
        private_domains=tuple(digits[:n_private]),
        public_domains=tuple(digits[n_private : n_private + n_public]),
        members_per_domain=draw(st.integers(1, 20)),
        nonmembers_per_domain=draw(st.integers(1, 20)),
        public_per_domain=draw(st.integers(0, 40)),
        duplicated_share=draw(st.floats(0, 1)),
        copies=draw(st.integers(1, 6)),
    )


@settings(max_examples=60, deadline=None)
@given(config=random_testbed_configs(), seed=st.integers(0, 2**31))
def test_split_invariants(config, seed):
    plan = split_digits(LABELS, config, seed)
    indices = [a.index for a in plan]
    assert len(indices) == len(set(indices)), "an image was assigned twice (e.g. member and nonmember)"
    for a in plan:
        assert LABELS[a.index] == a.digit
    for digit in config.private_domains:
        members = [a for a in plan if a.digit == digit and a.membership == "member"]
        nonmembers = [a for a in plan if a.digit == digit and a.membership == "nonmember"]
        assert len(members) == config.members_per_domain
        assert len(nonmembers) == config.nonmembers_per_domain
        assert all(a.copies == 0 for a in nonmembers)
        duplicated = round(config.duplicated_share * config.members_per_domain)
        assert sum(a.copies for a in members) == duplicated * config.copies + (config.members_per_domain - duplicated)
    for digit in config.public_domains:
        public = [a for a in plan if a.digit == digit]
        assert {a.membership for a in public} == {"public"}
        assert len(public) == (config.public_per_domain or 40)
    assert split_digits(LABELS, config, seed) == plan  # same seed, same split


def test_different_seeds_give_different_members():
    config = TestbedConfig(private_domains=(7,), public_domains=(), members_per_domain=10, nonmembers_per_domain=10)
    a = {x.index for x in split_digits(LABELS, config, 0) if x.membership == "member"}
    b = {x.index for x in split_digits(LABELS, config, 1) if x.membership == "member"}
    assert a != b


def test_asking_for_too_many_images_is_an_error():
    config = TestbedConfig(private_domains=(7,), public_domains=(), members_per_domain=30, nonmembers_per_domain=30)
    with pytest.raises(DataError, match="digit 7 has 40 images"):
        split_digits(LABELS, config, 0)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    config = TestbedConfig(private_domains=(7, 8), public_domains=(0,), members_per_domain=5, nonmembers_per_domain=4, public_per_domain=6)
    return build_testbed(tmp_path_factory.mktemp("testbed"), config, seed=3), config


def test_build_writes_imagefolder_layout(testbed):
    folder, config = testbed
    data = load_imagefolder(folder)
    assert data.images.shape == (2 * 9 + 6, 1, 8, 8)
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    counts = Counter((r.domain, r.membership) for r in data.records)
    assert counts[("digit7", "member")] == 5 and counts[("digit8", "nonmember")] == 4 and counts[("digit0", "public")] == 6
    assert data.domain_caption("digit7") == "a handwritten digit seven"
    images, captions = data.training_set()
    assert len(images) == len(captions) == sum(r.copies for r in data.records)
    nonmember_images = data.select(membership="nonmember").images
    assert not any(torch_equal_any(img, images) for img in nonmember_images), "a non-member leaked into training"


def torch_equal_any(image, batch):
    return bool(((batch - image).abs().flatten(1).amax(1) == 0).any())


def test_build_is_deterministic(tmp_path, testbed):
    folder, config = testbed
    again = build_testbed(tmp_path / "again", config, seed=3)
    assert (again / "metadata.jsonl").read_text() == (folder / "metadata.jsonl").read_text()


def make_folder(tmp_path, rows, images):
    for name, array in images.items():
        Image.fromarray(np.asarray(array, dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


def row(name, membership="member", copies=1):
    return {"file_name": name, "text": "a cat", "domain": "cat", "membership": membership, "copies": copies}


def test_user_folder_loads(tmp_path):
    folder = make_folder(tmp_path, [row("a.png"), row("b.png", "nonmember", 0)], {"a.png": np.zeros((4, 4, 3)), "b.png": np.ones((4, 4, 3)) * 255})
    data = load_imagefolder(folder)
    assert data.images.shape == (2, 3, 4, 4) and float(data.images[1].min()) == 1.0
    assert load_imagefolder(folder, channels=1).images.shape == (2, 1, 4, 4)


@pytest.mark.parametrize(
    "rows, images, fragment",
    [
        ([row("a.png")], {}, "a.png is listed in metadata.jsonl but missing"),
        ([row("a.png", "members")], {"a.png": np.zeros((4, 4))}, "unknown membership 'members'"),
        ([row("a.png"), row("b.png")], {"a.png": np.zeros((4, 4)), "b.png": np.zeros((5, 4))}, "mixed sizes"),
        ([row("a.png", "nonmember", 2)], {"a.png": np.zeros((4, 4))}, "a nonmember has copies = 0"),
        ([row("a.png", "member", 0)], {"a.png": np.zeros((4, 4))}, "set copies >= 1"),
        ([row("a.png"), row("a.png")], {"a.png": np.zeros((4, 4))}, "listed twice"),
    ],
)
def test_bad_folders_name_the_problem(tmp_path, rows, images, fragment):
    with pytest.raises(DataError, match=fragment):
        load_imagefolder(make_folder(tmp_path, rows, images))


def test_unreadable_image_and_missing_metadata(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row("a.png")) + "\n")
    with pytest.raises(DataError, match="not a readable image"):
        load_imagefolder(tmp_path)
    with pytest.raises(DataError, match="has no metadata.jsonl"):
        load_imagefolder(tmp_path / "elsewhere")
