import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from s2l_guard.errors import BundleError, UnsafeWeightsError
from s2l_guard.model import build_tokenizer, load_bundle
from s2l_guard.sampling import sample
from s2l_guard.testing import save_sd_v1_folder, tiny_bundle, tiny_latent_bundle


def unet_output(bundle, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2,) + bundle.latent_shape, generator=g)
    with torch.no_grad():
        return bundle.unet(x, torch.tensor([3, 50]), bundle.encode_prompts(["a digit seven", ""])).sample


def test_tokenizer_is_built_offline_and_knows_the_testbed_words():
    tokenizer = build_tokenizer(max_tokens=8)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a handwritten digit seven").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "handwritten</w>", "digit</w>", "seven</w>", "<|endoftext|>"]
    assert len(tokenizer("a zebra").input_ids) > 3  # unknown words fall back to bytes


@pytest.mark.parametrize("make", [tiny_bundle, tiny_latent_bundle])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, make):
    bundle = make(seed=1)
    bundle.save(tmp_path / "b")
    again = load_bundle(tmp_path / "b")
    assert torch.equal(unet_output(bundle), unet_output(again))
    assert type(again.scheduler) is type(bundle.scheduler)
    assert again.tokenizer("a digit seven").input_ids == bundle.tokenizer("a digit seven").input_ids
    assert torch.equal(sample(bundle, ["a digit seven"] * 2, steps=3), sample(again, ["a digit seven"] * 2, steps=3))
    assert not any(p.suffix == ".bin" for p in (tmp_path / "b").rglob("*"))  # safetensors only


def test_sd_v1_folder_loads_unchanged(tmp_path):
    folder = save_sd_v1_folder(tmp_path / "sd")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"] and index["vae"][1] == "AutoencoderKL"
    bundle = load_bundle(folder)
    assert bundle.vae is not None and bundle.image_size == 16 and bundle.image_channels == 3
    images = sample(bundle, ["a photo of a cat"] * 2, steps=2)
    assert images.shape == (2, 3, 16, 16)
    latents = bundle.to_model_space(torch.rand(2, 1, 16, 16))  # grey images are widened to RGB
    assert latents.shape == (2, 4, 8, 8)


def test_latent_bundle_runs_in_stable_diffusion_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    tiny_latent_bundle().save(tmp_path / "b")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "b", safety_checker=None)
    out = pipe("a handwritten digit seven", num_inference_steps=2, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()


def to_pickle(folder, component):
    sub = folder / component
    for path in sub.glob("*.safetensors"):
        torch.save(load_file(path), sub / "diffusion_pytorch_model.bin")
        path.unlink()


def test_pickle_weights_refused_unless_trusted(tmp_path):
    tiny_bundle().save(tmp_path / "b")
    to_pickle(tmp_path / "b", "unet")
    with pytest.raises(UnsafeWeightsError, match="--trust-pickle"):
        load_bundle(tmp_path / "b")
    assert load_bundle(tmp_path / "b", trust_pickle=True).unet is not None


def test_nan_weights_are_refused(tmp_path):
    tiny_bundle().save(tmp_path / "b")
    path = next((tmp_path / "b" / "unet").glob("*.safetensors"))
    weights = load_file(path)
    name = sorted(weights)[0]
    weights[name][...] = float("nan")
    save_file(weights, path)
    with pytest.raises(BundleError, match=f"unet.{name} holds NaN"):
        load_bundle(tmp_path / "b")


def test_wrong_folder_shapes_are_named(tmp_path):
    with pytest.raises(BundleError, match="no model_index.json"):
        load_bundle(tmp_path)
    tiny_bundle().save(tmp_path / "b")
    index = json.loads((tmp_path / "b" / "model_index.json").read_text())
    index.pop("unet")
    (tmp_path / "b" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(BundleError, match="lists no unet"):
        load_bundle(tmp_path / "b")


def test_components_from_different_models_are_refused(tmp_path):
    tiny_bundle().save(tmp_path / "a")
    tiny_latent_bundle().save(tmp_path / "b")
    # A pixel UNet (1 channel) next to a VAE with 4 latent channels.
    import shutil

    shutil.rmtree(tmp_path / "b" / "unet")
    shutil.copytree(tmp_path / "a" / "unet", tmp_path / "b" / "unet")
    with pytest.raises(BundleError, match="latent_channels = 4 but unet.in_channels = 1"):
        load_bundle(tmp_path / "b")
