import json

import torch

from attacks.sp_set import generate_sp_set, sp_prompts
from s2l_guard.config import SPSetConfig
from s2l_guard.provider import Provider
from s2l_guard.sampling import sample
from s2l_guard.testing import tiny_bundle


def test_prompts_cycle_through_templates():
    settings = SPSetConfig(images=5, prompt_templates=("{prompt}", "a photo of {prompt}"))
    assert sp_prompts("x", settings) == ["x", "a photo of x", "x", "a photo of x", "x"]


def test_sp_set_is_an_imagefolder_of_the_models_own_generations(tmp_path):
    bundle = tiny_bundle()
    settings = SPSetConfig(images=6, sampler_steps=3)
    data = generate_sp_set(tmp_path / "sp", Provider(bundle, "open-weights"), "a digit seven", "digit7", settings, seed=4)
    rows = [json.loads(line) for line in (tmp_path / "sp" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["domain"] for r in rows} == {"digit7"} and {r["text"] for r in rows} == {"a digit seven"}
    direct = sample(bundle, ["a digit seven"] * 6, steps=3, guidance_scale=settings.guidance_scale, seed=4)
    # The folder holds the generations, quantised to 8 bits.
    assert torch.allclose(data.images, direct, atol=1 / 255 + 1e-6)
    again = generate_sp_set(tmp_path / "sp2", Provider(bundle, "generate-api"), "a digit seven", "digit7", settings, seed=4)
    assert torch.equal(again.images, data.images)
