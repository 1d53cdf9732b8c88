"""Hypernetwork (the AUTOMATIC1111 / NovelAI design): residual MLPs on the cross-attention context.

No paper; the design is NovelAI's ("NovelAI Improvements on Stable Diffusion",
https://blog.novelai.net/novelai-improvements-on-stable-diffusion-e10d38db82ac)
as AUTOMATIC1111's web UI implements it
(https://github.com/AUTOMATIC1111/stable-diffusion-webui/blob/master/modules/hypernetworks/hypernetwork.py).
Each cross-attention layer computes
``k = to_k(c + mlp_k(c))`` and ``v = to_v(c + mlp_v(c))`` instead of
``to_k(c)``, ``to_v(c)``; one (k, v) pair of MLPs per context width is shared by
every hooked layer, and only those MLPs train. Differences from the web UI: the
last layer starts at exactly zero (the web UI draws N(0, 0.01)), so the shaken
model starts *equal* to the original; and only cross-attention (``attn2``) is
hooked (the web UI's default widths 320/640/1280 also hook self-attention).

A hypernetwork cannot be folded into the UNet's weights, and diffusers' UNet
format has no place for it, so a shaken bundle refuses ``Bundle.save``. Save
it with :func:`save_hypernetwork_bundle` (the base bundle in ``base/`` plus
``hypernetwork.safetensors``) and read it back with
:func:`load_hypernetwork_bundle`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from attacks.base import SHAKERS, FinetuneData
from s2l_guard.errors import BundleError, S2LError, SettingsError
from s2l_guard.model import Bundle, load_bundle

from .base import Adaptation, FinetuneMethod, FinetuneSettings, setting

HYPERNETWORK_FILE = "hypernetwork.safetensors"
MODULE_NAME = "s2l_hypernetwork"  # where the MLPs live inside the UNet, so the bundle names their parameters
ACTIVATIONS = {  # the web UI's choices; its "swish" is Hardswish
    "linear": torch.nn.Identity,
    "relu": torch.nn.ReLU,
    "leakyrelu": torch.nn.LeakyReLU,
    "elu": torch.nn.ELU,
    "swish": torch.nn.Hardswish,
    "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
}


class HypernetworkModule(torch.nn.Module):
    """``x + mlp(x)``, the MLP widths being ``dim * layer_structure`` (e.g. dim -> 2 dim -> dim)."""

    def __init__(self, dim: int, layer_structure: Sequence[float], activation: str):
        super().__init__()
        widths = [int(dim * w) for w in layer_structure]
        layers: list[torch.nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
            layers.append(torch.nn.Linear(n_in, n_out))
            if i < len(widths) - 2:  # the web UI activates every layer but the output
                layers.append(ACTIVATIONS[activation]())
        self.linear = torch.nn.Sequential(*layers)
        linears = [m for m in self.linear if isinstance(m, torch.nn.Linear)]
        for layer in linears:
            torch.nn.init.normal_(layer.weight, std=0.01)  # the web UI's "Normal" initialisation
            torch.nn.init.zeros_(layer.bias)
        torch.nn.init.zeros_(linears[-1].weight)  # exact identity at the start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


class Hypernetwork(torch.nn.Module):
    """One (k, v) pair of :class:`HypernetworkModule` per context width."""

    def __init__(self, dims: Sequence[int], layer_structure: Sequence[float], activation: str):
        super().__init__()
        self.layer_structure = tuple(layer_structure)
        self.activation = activation
        self.k = torch.nn.ModuleDict({str(d): HypernetworkModule(d, layer_structure, activation) for d in dims})
        self.v = torch.nn.ModuleDict({str(d): HypernetworkModule(d, layer_structure, activation) for d in dims})

    def save(self, path: Path) -> None:
        """Write the weights as safetensors, the structure as metadata."""
        meta = {"layer_structure": json.dumps(self.layer_structure), "activation": self.activation}
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "Hypernetwork":
        """Read a file :meth:`save` wrote."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
        if "layer_structure" not in meta:
            raise BundleError(f"{path} has no hypernetwork metadata; write it with Hypernetwork.save")
        dims = sorted({int(key.split(".")[1]) for key in state})
        network = cls(dims, json.loads(meta["layer_structure"]), meta["activation"])
        network.load_state_dict(state)
        return network


class HypernetworkProcessor:
    """Wraps an attention processor so its key and value see the hypernetwork's context.

    It hands the wrapped processor a view of the attention layer whose ``to_k`` and
    ``to_v`` apply the MLPs first, so masks, norms and the attention kernel stay the
    wrapped processor's own (diffusers' ``AttnProcessor2_0`` by default).
    """

    def __init__(self, inner, network: Hypernetwork):
        self.inner = inner
        self.network = network

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return self.inner(_HookedAttention(attn, self.network), hidden_states, encoder_hidden_states, attention_mask, **kwargs)


class _HookedAttention:
    """The attention layer as the wrapped processor sees it: everything but ``to_k``/``to_v`` forwarded."""

    def __init__(self, attn, network: Hypernetwork):
        self._attn = attn
        self._network = network

    def __getattr__(self, name):
        return getattr(self._attn, name)

    def to_k(self, context: torch.Tensor) -> torch.Tensor:
        return self._attn.to_k(self._network.k[str(context.shape[-1])](context))

    def to_v(self, context: torch.Tensor) -> torch.Tensor:
        return self._attn.to_v(self._network.v[str(context.shape[-1])](context))


@SHAKERS.register
class HypernetworkShaker(FinetuneMethod):
    """Residual MLPs on the cross-attention context; the model's own weights stay frozen."""

    name = "hypernetwork"
    paper = "https://blog.novelai.net/novelai-improvements-on-stable-diffusion-e10d38db82ac"
    summary = "Trains residual MLPs on the cross-attention keys' and values' context (AUTOMATIC1111's hypernetwork)."

    @dataclass(frozen=True)
    class Settings(FinetuneSettings):
        """Hypernetwork settings (the web UI's defaults: structure 1, 2, 1, linear activation)."""

        learning_rate: float = setting(1e-4, gt=0.0)
        layer_structure: tuple[float, ...] = setting((1.0, 2.0, 1.0), each_gt=0.0)  # widths in units of the context width
        activation: str = setting("linear", choices=tuple(ACTIVATIONS))

        def __post_init__(self):
            super().__post_init__()
            if len(self.layer_structure) < 2 or self.layer_structure[0] != 1 or self.layer_structure[-1] != 1:
                raise SettingsError(f"layer_structure {self.layer_structure} must start and end with 1 (e.g. 1, 2, 1)")

    def adapt(self, bundle: Bundle, data: FinetuneData) -> Adaptation:
        """Install a fresh hypernetwork on the UNet's cross-attention and train only it.

        Args:
            bundle: the clone being shaken; its UNet gains the hypernetwork.
            data: unused.
        Returns:
            the hypernetwork's parameters and its export.
        """
        s = self.settings
        network = install_hypernetwork(bundle, Hypernetwork(_context_dims(bundle), s.layer_structure, s.activation))

        def export(folder: Path) -> dict[str, str]:
            network.save(folder / HYPERNETWORK_FILE)
            return {"hypernetwork": str(folder / HYPERNETWORK_FILE)}

        trainable = {n: p for n, p in bundle.named_parameters() if n.startswith(f"unet.{MODULE_NAME}.")}
        return Adaptation.of(trainable, exports=[export])


def _cross_attention(bundle: Bundle) -> dict[str, object]:
    """The UNet's cross-attention (``attn2``) layers, by processor name."""
    return {name: proc for name, proc in bundle.unet.attn_processors.items() if name.endswith("attn2.processor")}


def _context_dims(bundle: Bundle) -> list[int]:
    names = [key.removesuffix(".processor") for key in _cross_attention(bundle)]
    return sorted({bundle.unet.get_submodule(name).to_k.in_features for name in names})


def hypernetwork_of(bundle: Bundle) -> Hypernetwork | None:
    """The hypernetwork a bundle carries, or None."""
    return getattr(bundle.unet, MODULE_NAME, None)


def install_hypernetwork(bundle: Bundle, network: Hypernetwork) -> Hypernetwork:
    """Hook ``network`` into every cross-attention layer of ``bundle`` (in place).

    Args:
        bundle: a bundle without a hypernetwork.
        network: has one (k, v) pair for each cross-attention context width.
    Returns:
        the installed network, now on the UNet's device and dtype.
    Raises:
        S2LError: the bundle already carries one, or a width has no MLP pair.
    """
    unet = bundle.unet
    if hypernetwork_of(bundle) is not None:
        raise S2LError("this bundle already carries a hypernetwork; shake the original bundle instead")
    missing = sorted(set(_context_dims(bundle)) - {int(d) for d in network.k})
    if missing:
        raise S2LError(f"the hypernetwork has no MLPs for context width(s) {missing}; it was trained for another model")
    network.to(device=unet.device, dtype=unet.dtype)
    unet.add_module(MODULE_NAME, network)  # a UNet submodule: trained, cloned and moved with the UNet
    processors = dict(unet.attn_processors)
    processors.update({name: HypernetworkProcessor(proc, network) for name, proc in _cross_attention(bundle).items()})
    unet.set_attn_processor(processors)
    # diffusers' UNet format has no place for the MLPs: its loader would drop them without a word.
    unet.save_pretrained = _refuse_save
    return network


def remove_hypernetwork(bundle: Bundle) -> Bundle:
    """A copy of ``bundle`` with its hypernetwork taken out: the plain base model."""
    plain = bundle.clone()
    unet = plain.unet
    delattr(unet, MODULE_NAME)
    processors = dict(unet.attn_processors)
    processors.update({name: proc.inner for name, proc in _cross_attention(plain).items()})
    unet.set_attn_processor(processors)
    del unet.save_pretrained  # the class's own method again
    return plain


def save_hypernetwork_bundle(bundle: Bundle, folder: str | Path) -> Path:
    """Save a hypernetwork-shaken bundle: ``base/`` (a plain bundle) and ``hypernetwork.safetensors``.

    The folder itself has no ``model_index.json``, so ``load_bundle`` refuses it rather
    than loading the base model alone.

    Args:
        bundle: a bundle carrying a hypernetwork.
        folder: created if needed.
    Returns:
        the folder.
    """
    network = hypernetwork_of(bundle)
    if network is None:
        raise S2LError("this bundle carries no hypernetwork; save it with Bundle.save")
    folder = Path(folder)
    remove_hypernetwork(bundle).save(folder / "base")
    network.save(folder / HYPERNETWORK_FILE)
    return folder


def load_hypernetwork_bundle(folder: str | Path, **load_kwargs) -> Bundle:
    """Read what :func:`save_hypernetwork_bundle` wrote (``load_kwargs`` go to ``load_bundle``)."""
    folder = Path(folder)
    if not (folder / HYPERNETWORK_FILE).is_file():
        raise BundleError(f"{folder} has no {HYPERNETWORK_FILE}; point at a folder save_hypernetwork_bundle wrote")
    bundle = load_bundle(folder / "base", **load_kwargs)
    install_hypernetwork(bundle, Hypernetwork.load(folder / HYPERNETWORK_FILE))
    return bundle.eval()


def _refuse_save(*args, **kwargs):
    raise S2LError(
        "this UNet carries a hypernetwork, which diffusers' UNet format cannot hold; save the bundle with "
        "attacks.finetune.hypernetwork.save_hypernetwork_bundle and load it with load_hypernetwork_bundle"
    )
