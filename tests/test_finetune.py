"""Fine-tune shakers on tiny seeded bundles: what trains, what files come out, what loads them."""

import dataclasses

import numpy as np
import pytest
import torch

from attacks.base import SHAKERS, FinetuneData
from attacks.finetune.combinations import DreamBoothHypernetwork, DreamBoothLora, TextualInversionLora
from attacks.finetune.dreambooth import DreamBooth
from attacks.finetune.end2end import EndToEnd
from attacks.finetune.hypernetwork import (
    Hypernetwork,
    HypernetworkShaker,
    install_hypernetwork,
    load_hypernetwork_bundle,
    save_hypernetwork_bundle,
)
from attacks.finetune.lora import Lora
from attacks.finetune.textual_inversion import TextualInversion
from s2l_guard.errors import BundleError, ConfigError, S2LError
from s2l_guard.model import load_bundle
from s2l_guard.testing import tiny_bundle, tiny_latent_bundle

METHODS = {cls.name: cls for cls in (EndToEnd, DreamBooth, TextualInversion, Lora, HypernetworkShaker,
                                     DreamBoothLora, DreamBoothHypernetwork, TextualInversionLora)}  # fmt: skip
PROMPT = "a handwritten digit seven"
EMBEDDING = "text_encoder.embeddings.token_embedding.weight"


def data_for(bundle, n=6, prompt=PROMPT, seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    shape = (n, bundle.image_channels, bundle.image_size, bundle.image_size)
    return FinetuneData(torch.rand(shape, generator=g), [prompt] * n, prompt, **extra)


def quick(cls, **settings):
    return cls(cls.Settings(**{"steps": 3, "batch_size": 2, **settings}))


def snapshot(bundle):
    return {name: p.detach().clone() for name, p in bundle.named_parameters()}


def trained(before, bundle):
    """{name: how many numbers changed or were added}, for tensors that changed or are new.

    peft moves an adapted layer's weight to ``<layer>.base_layer``; it is compared under
    its original name. A grown matrix (new token rows) must keep its old rows exactly.
    """
    out = {}
    for name, p in bundle.named_parameters():
        name = name.replace(".base_layer.", ".")
        old = before.get(name)
        if old is None:
            out[name] = p.numel()
        elif p.shape != old.shape:
            assert torch.equal(p[: len(old)], old), f"{name}: rows of existing tokens changed"
            out[name] = p[len(old) :].numel()
        elif not torch.equal(p, old):
            out[name] = p.numel()
    return out


def is_lora(name):
    return ".lora_" in name


def is_hypernetwork(name):
    return name.startswith("unet.s2l_hypernetwork.")


def is_lora_target(name):
    return name.endswith(("to_q.weight", "to_v.weight", "q_proj.weight", "v_proj.weight"))


# name -> (bundle, what trains, what differs in the result from the input; None: what trains)
VAE_ENCODER = ("vae.encoder.", "vae.quant_conv.")
CASES = {
    "end2end": (tiny_bundle, lambda n: n.startswith(("unet.", "text_encoder.")), None),
    "end2end-vae": (tiny_latent_bundle, lambda n: n.startswith(("unet.", "text_encoder.") + VAE_ENCODER), None),
    "dreambooth": (tiny_bundle, lambda n: n.startswith("unet."), None),
    "textual_inversion": (tiny_bundle, lambda n: n == EMBEDDING, None),
    "lora": (tiny_bundle, is_lora, is_lora_target),  # adapters train, then merge into their targets
    "hypernetwork": (tiny_bundle, is_hypernetwork, None),
    "dreambooth+lora": (tiny_bundle, is_lora, is_lora_target),
    "dreambooth+hypernetwork": (tiny_bundle, is_hypernetwork, None),
    "textual_inversion+lora": (
        tiny_bundle,
        lambda n: n == EMBEDDING or is_lora(n),
        lambda n: n == EMBEDDING or is_lora_target(n),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_method_trains_exactly_its_parameters(case):
    make, trains, changes = CASES[case]
    bundle = make()
    before, vocab = snapshot(bundle), len(bundle.tokenizer)
    seen = {}

    def callback(step, training_bundle):  # the model as it trains, before any merge
        seen[step] = trained(before, training_bundle)
        seen["names"] = {n.replace(".base_layer.", ".") for n, _ in training_bundle.named_parameters()}

    method = quick(METHODS[case.removesuffix("-vae")])
    # Class images too: the DreamBooth combinations then train with the prior term, the others ignore them.
    classes = data_for(bundle, seed=1).images
    data = data_for(bundle, class_images=classes, class_prompt="a handwritten digit")
    result = method.shake(bundle, data, seed=0, callback=callback, callback_every=1)

    assert sorted(k for k in seen if k != "names") == [1, 2, 3]
    during = seen[3]
    assert set(during) == {n for n in seen["names"] if trains(n)}
    assert sum(during.values()) == result.trainable_parameters > 0
    after = trained(before, result.bundle)
    assert set(after) == {n for n in seen["names"] if (changes or trains)(n)}
    assert not any(".lora_" in n or ".base_layer." in n for n, _ in result.bundle.named_parameters())
    assert trained(before, bundle) == {}  # the input bundle is never modified
    assert len(bundle.tokenizer) == vocab and "save_pretrained" not in vars(bundle.unet)
    assert {type(p).__name__ for p in bundle.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert len(result.losses) == 3 and result.prompt == method.target_prompt(data)


def test_registry_lists_every_finetune_method_with_its_metadata():
    assert set(METHODS) <= set(SHAKERS.names())
    for name, cls in METHODS.items():
        assert SHAKERS.get(name) is cls
        assert cls.paper.startswith("https://") and cls.summary and cls.threat_models
        assert dataclasses.is_dataclass(cls.Settings) and cls.Settings.__dataclass_params__.frozen
        cls.Settings()  # every default is valid
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        SHAKERS.get("lroa")


def test_trainable_parameter_counts_on_the_tiny_bundle():
    bundle, data = tiny_bundle(), data_for(tiny_bundle())
    counts = {name: quick(cls).shake(bundle, data, seed=0).trainable_parameters for name, cls in METHODS.items()}
    unet, text = bundle.num_parameters()["unet"], bundle.num_parameters()["text_encoder"]
    dim = bundle.text_encoder.config.hidden_size  # 16
    assert counts["end2end"] == unet + text and counts["dreambooth"] == unet
    assert counts["textual_inversion"] == dim
    # Hypernetwork: one (k, v) pair of dim -> 2 dim -> dim MLPs for the one context width.
    assert counts["hypernetwork"] == counts["dreambooth+hypernetwork"] == 2 * (dim * 2 * dim + 2 * dim + 2 * dim * dim + dim)
    assert counts["lora"] == counts["dreambooth+lora"] and counts["textual_inversion+lora"] == counts["lora"] + dim


def unet_output(bundle, prompt=PROMPT):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2,) + bundle.latent_shape, generator=g)
    with torch.no_grad():
        return bundle.unet(x, torch.tensor([3, 50]), bundle.encode_prompts([prompt, ""])).sample


def test_lora_loads_in_diffusers_pipeline_and_matches_the_merged_bundle(tmp_path):
    from diffusers import StableDiffusionPipeline

    bundle = tiny_latent_bundle()
    bundle.save(tmp_path / "base")
    result = quick(Lora, learning_rate=1e-2).shake(bundle, data_for(bundle), seed=0, export_dir=tmp_path / "lora")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base", safety_checker=None)

    def generate():
        return pipe(PROMPT, num_inference_steps=2, height=16, width=16, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    plain = generate()
    pipe.load_lora_weights(result.files["lora"])
    assert np.abs(generate() - plain).max() > 1e-4
    # diffusers' own loading (alpha / rank scale included) equals our merged weights.
    with torch.no_grad():
        context = pipe.text_encoder(result.bundle.tokenize([PROMPT]))[0]
        assert torch.allclose(context, result.bundle.encode_prompts([PROMPT]), atol=1e-5)
        x, t = torch.randn((1,) + bundle.latent_shape), torch.tensor([7])
        assert torch.allclose(pipe.unet(x, t, context).sample, result.bundle.unet(x, t, context).sample, atol=1e-5)
    result.bundle.save(tmp_path / "merged")  # a plain bundle again
    assert torch.equal(unet_output(load_bundle(tmp_path / "merged")), unet_output(result.bundle))


def test_textual_inversion_loads_in_diffusers_pipeline_with_the_learned_vectors(tmp_path):
    from diffusers import StableDiffusionPipeline

    bundle = tiny_latent_bundle()
    bundle.save(tmp_path / "base")
    method = quick(TextualInversion, num_vectors=2)
    result = method.shake(bundle, data_for(bundle), seed=0, export_dir=tmp_path / "ti")
    assert result.prompt == "a handwritten digit <s2l> <s2l>_1"
    learned = result.bundle.text_encoder.get_input_embeddings().weight[-2:]
    seven = bundle.text_encoder.get_input_embeddings().weight[bundle.tokenizer.convert_tokens_to_ids("seven</w>")]
    assert not torch.equal(learned[0], seven) and not torch.equal(learned[1], seven)  # trained from the initializer

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base", safety_checker=None)
    pipe.load_textual_inversion(result.files["textual_inversion"])
    ids = pipe.tokenizer.convert_tokens_to_ids(["<s2l>", "<s2l>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], learned)
    # The pipeline expands "<s2l>" into both vectors: the same context as the shaken bundle's prompt.
    context, _ = pipe.encode_prompt("a handwritten digit <s2l>", "cpu", 1, False)
    assert torch.allclose(context, result.bundle.encode_prompts([result.prompt]), atol=1e-6)
    result.bundle.save(tmp_path / "shaken")  # tokenizer and grown embedding round-trip
    again = load_bundle(tmp_path / "shaken")
    assert torch.equal(again.encode_prompts([result.prompt]), result.bundle.encode_prompts([result.prompt]))


def test_textual_inversion_runs_on_any_domain_and_refuses_what_it_cannot_use():
    bundle = tiny_bundle()
    cat = data_for(bundle, prompt="a photo of a cat")  # "cat" splits into byte tokens: mean start
    assert quick(TextualInversion).shake(bundle, cat, seed=0).prompt == "a photo of a <s2l>"
    with pytest.raises(S2LError, match="initializer word 'seven'"):
        quick(TextualInversion).shake(bundle, FinetuneData(cat.images, cat.captions, PROMPT), seed=0)
    with pytest.raises(S2LError, match="fewer num_vectors"):
        quick(TextualInversion, num_vectors=4).shake(bundle, data_for(bundle), seed=0)  # 8-token tokenizer


def test_dreambooth_prior_term_is_weighted_into_the_loss():
    bundle = tiny_bundle()
    g = torch.Generator().manual_seed(1)
    classes = torch.rand(4, 1, 8, 8, generator=g)

    def with_prior(weight, images=classes):
        data = data_for(bundle, class_images=images, class_prompt="a handwritten digit")
        return quick(DreamBooth, prior_loss_weight=weight).shake(bundle, data, seed=0)

    none = quick(DreamBooth).shake(bundle, data_for(bundle), seed=0)
    zero, one, two = with_prior(0.0), with_prior(1.0), with_prior(2.0)
    assert zero.losses == none.losses and trained(snapshot(none.bundle), zero.bundle) == {}
    # Step 0 draws the same instance batch in every run; the class term adds on top, times the weight.
    class_term = one.losses[0] - none.losses[0]
    assert class_term > 0 and two.losses[0] - none.losses[0] == pytest.approx(2 * class_term, rel=1e-4)
    other = with_prior(1.0, torch.rand(4, 1, 8, 8, generator=g))
    assert trained(snapshot(one.bundle), other.bundle)  # the class images shape the result


def test_dreambooth_generates_class_images_when_asked():
    bundle = tiny_bundle()
    method = quick(DreamBooth, prior_preservation=True, num_class_images=3, class_sampler_steps=2)
    prior = method.prior(bundle, data_for(bundle, class_prompt="a handwritten digit"), seed=0)
    assert prior.images.shape == (3, 1, 8, 8) and prior.caption == "a handwritten digit"
    assert quick(DreamBooth, prior_preservation=True, class_sampler_steps=2).shake(
        bundle, data_for(bundle, class_prompt="a handwritten digit"), seed=0).losses  # fmt: skip
    with pytest.raises(S2LError, match="needs a class prompt"):
        method.shake(bundle, data_for(bundle), seed=0)


def test_hypernetwork_starts_as_identity_and_then_changes_the_model():
    bundle = tiny_bundle()
    hooked = bundle.clone()
    install_hypernetwork(hooked, Hypernetwork([16], (1, 2, 1), "relu"))
    assert torch.equal(unet_output(hooked), unet_output(bundle))
    result = quick(HypernetworkShaker, learning_rate=1e-2).shake(bundle, data_for(bundle), seed=0)
    assert not torch.allclose(unet_output(result.bundle), unet_output(bundle))


def test_hypernetwork_bundle_refuses_plain_save_and_round_trips_through_its_own(tmp_path):
    bundle = tiny_bundle()
    result = quick(HypernetworkShaker, learning_rate=1e-2).shake(bundle, data_for(bundle), seed=0)
    with pytest.raises(S2LError, match="save_hypernetwork_bundle"):
        result.bundle.save(tmp_path / "plain")
    save_hypernetwork_bundle(result.bundle, tmp_path / "hn")
    assert torch.equal(unet_output(load_hypernetwork_bundle(tmp_path / "hn")), unet_output(result.bundle))
    assert torch.equal(unet_output(load_bundle(tmp_path / "hn" / "base")), unet_output(bundle))  # base untouched
    with pytest.raises(BundleError, match="no model_index.json"):
        load_bundle(tmp_path / "hn")  # never the base model alone by mistake
    assert torch.equal(unet_output(result.bundle.clone()), unet_output(result.bundle))


def test_bad_settings_and_missing_data_are_named():
    with pytest.raises(ValueError, match="rank"):
        Lora.Settings(rank=0)
    with pytest.raises(ValueError, match="start and end with 1"):
        HypernetworkShaker.Settings(layer_structure=(2.0, 1.0))
    with pytest.raises(ValueError, match="activation"):
        HypernetworkShaker.Settings(activation="gelu2")
    with pytest.raises(S2LError, match="pass FinetuneData"):
        quick(Lora).shake(tiny_bundle(), None, seed=0)
    with pytest.raises(S2LError, match="has no layer named"):
        quick(Lora, unet_targets=("to_nothing",)).shake(tiny_bundle(), data_for(tiny_bundle()), seed=0)


@pytest.mark.parametrize("name", ["lora", "hypernetwork", "textual_inversion+lora"])
def test_methods_that_add_layers_are_reproducible_from_the_seed(name):
    """New layers are initialised from the seed, not from whatever the global RNG holds."""
    cls = SHAKERS.get(name)
    settings = cls.Settings(steps=2, batch_size=2)
    bundle = tiny_bundle()
    data = data_for(bundle)
    runs = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # a different global RNG state before each run
        runs.append(cls(settings).shake(bundle, data, seed=3).bundle)
    for (n, a), (_, b) in zip(runs[0].named_parameters(), runs[1].named_parameters()):
        assert torch.equal(a, b), n
