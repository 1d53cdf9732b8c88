"""Fingerprints of tiny training runs: one sha256 per case over weights, losses, EMA, checkpoints and DP accounting.

    OMP_NUM_THREADS=1 PYTHONPATH=<checkout> .venv/bin/python benchmarks/train_identity.py

Run it on two checkouts (e.g. before and after a refactor of the training loop) and
compare the lines: equal hashes mean bit-identical training. Each case prints one hash
per part (params, losses, ema, checkpoint, privacy) so a difference says where it is.
Only public entry points are used (``training.train``, ``privacy.train_private``).
"""

from __future__ import annotations

import hashlib
import struct
import sys
import tempfile
from pathlib import Path

import torch

import s2l_guard
from s2l_guard.privacy import PrivacySettings, train_private
from s2l_guard.testing import tiny_bundle, tiny_latent_bundle
from s2l_guard.training import CHECKPOINT, PriorPreservation, TrainSettings, train


def toy_data(n=16, size=8, channels=1):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, channels, size, size, generator=g) > 0.5).float()
    captions = ["a digit seven" if i % 2 else "a digit eight" for i in range(n)]
    return images, captions


def digest(*chunks) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:16]


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return str((tuple(t.shape), t.dtype)).encode() + t.numpy().tobytes()


def floats(values) -> bytes:
    return b"".join(struct.pack("<d", float(v)) for v in values)


def params_hash(bundle) -> str:
    return digest(*(name.encode() + tensor_bytes(p) for name, p in bundle.named_parameters()))


def ema_hash(ema) -> str:
    if ema is None:
        return "-"
    return digest(*(tensor_bytes(p) for p in ema.shadow_params), str(ema.optimization_step).encode())


def state_hash(obj) -> bytes:
    """A checkpoint's content, key by key (tensors by value), independent of pickling details."""
    if isinstance(obj, torch.Tensor):
        return tensor_bytes(obj)
    if isinstance(obj, dict):
        return b"{" + b"".join(str(k).encode() + b":" + state_hash(obj[k]) for k in sorted(obj, key=str)) + b"}"
    if isinstance(obj, (list, tuple)):
        return b"[" + b"".join(state_hash(v) for v in obj) + b"]"
    return repr(obj).encode()


def plain(bundle, names, *, settings, prior=None, checkpoint_dir=None, on_step=None, images=None, captions=None):
    if images is None:
        images, captions = toy_data()
    trainable = {n: p for n, p in bundle.named_parameters() if n.startswith(names)}
    optimizer = torch.optim.AdamW(trainable.values(), lr=3e-3, weight_decay=1e-2)
    return train(bundle, images, captions, trainable=trainable, optimizer=optimizer, settings=settings, prior=prior,
                 checkpoint_dir=checkpoint_dir, on_step=on_step)  # fmt: skip


def private(bundle, names, *, steps=4, batch_size=8, physical=64, accountant="rdp", epsilon=1e4, ema_decay=0.9, schedule="cosine"):
    images, captions = toy_data()
    trainable = {n: p for n, p in bundle.named_parameters() if n.startswith(names)}
    optimizer = torch.optim.AdamW(trainable.values(), lr=3e-3)
    settings = TrainSettings(
        steps=steps, batch_size=batch_size, seed=5, caption_dropout=0.3, lr_schedule=schedule, warmup_steps=2, ema_decay=ema_decay
    )
    privacy = PrivacySettings(target_epsilon=epsilon, accountant=accountant, physical_batch_size=physical)
    return train_private(bundle, images, captions, trainable=trainable, optimizer=optimizer, settings=settings, privacy=privacy)


def plain_case(name, bundle, names, **kwargs):
    result = plain(bundle, names, **kwargs)
    return name, {"params": params_hash(bundle), "losses": digest(floats(result.losses)), "ema": ema_hash(result.ema)}


def checkpoint_case():
    """Killed after step 5 with checkpoints every 2 steps, then resumed: the checkpoint and the final weights."""
    settings = TrainSettings(steps=8, batch_size=4, seed=3, caption_dropout=0.3, lr_schedule="cosine", warmup_steps=2, ema_decay=0.9,
                             checkpoint_every=2)  # fmt: skip

    class Killed(Exception):
        pass

    def die(step, loss):
        if step == 5:
            raise Killed

    with tempfile.TemporaryDirectory() as folder:
        try:
            plain(tiny_bundle(), ("unet.",), settings=settings, checkpoint_dir=folder, on_step=die)
        except Killed:
            pass
        state = torch.load(Path(folder) / CHECKPOINT, map_location="cpu", weights_only=True)
        checkpoint = digest(state_hash(state))
        bundle = tiny_bundle()
        result = plain(bundle, ("unet.",), settings=settings, checkpoint_dir=folder)
    parts = {"params": params_hash(bundle), "losses": digest(floats(result.losses)), "ema": ema_hash(result.ema), "checkpoint": checkpoint,
             "resumed_from": str(result.resumed_from)}  # fmt: skip
    return "plain_checkpoint_resume", parts


def private_case(name, bundle, names, **kwargs):
    r = private(bundle, names, **kwargs)
    privacy = (r.epsilon, r.delta, r.noise_multiplier, r.sample_rate, r.steps, r.expected_batch_size, r.accountant, r.accountant_history)
    return name, {"params": params_hash(bundle), "losses": digest(floats(r.losses)), "ema": ema_hash(r.ema), "privacy": digest(repr(privacy).encode()),
                  "epsilon": repr(r.epsilon), "nan_losses": str(sum(x != x for x in r.losses))}  # fmt: skip


def cases():
    prior = PriorPreservation(images=torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(9)), caption="a digit", weight=0.7)
    ema_warmup = TrainSettings(steps=6, batch_size=4, seed=5, caption_dropout=0.3, lr_schedule="cosine", warmup_steps=2, ema_decay=0.9)
    yield plain_case("plain_unet_prior_ema_warmup", tiny_bundle(), ("unet.",), settings=ema_warmup, prior=prior)
    text = TrainSettings(steps=5, batch_size=4, seed=1, lr_schedule="constant_with_warmup", warmup_steps=2, ema_decay=0.8, grad_clip=None)
    yield plain_case("plain_unet_text_encoder", tiny_bundle(), ("unet.", "text_encoder."), settings=text, prior=prior)
    latent_images, latent_captions = toy_data(8, size=16, channels=3)
    yield plain_case("plain_vae_trained", tiny_latent_bundle(), ("unet.", "vae.encoder."), settings=TrainSettings(steps=3, batch_size=2),
                     images=latent_images, captions=latent_captions)  # fmt: skip
    yield checkpoint_case()
    yield private_case("dp_unet", tiny_bundle(), ("unet.",))
    yield private_case("dp_unet_text_encoder", tiny_bundle(), ("unet.", "text_encoder."))
    yield private_case("dp_physical_2_of_6", tiny_bundle(), ("unet.", "text_encoder."), batch_size=6, physical=2)
    yield private_case("dp_empty_batches", tiny_bundle(), ("unet.conv_out.",), steps=8, batch_size=1, ema_decay=0.0, schedule="constant")
    yield private_case("dp_prv_epsilon_4", tiny_bundle(), ("unet.up_blocks.",), steps=3, accountant="prv", epsilon=4.0)
    yield private_case("dp_many_epochs", tiny_bundle(), ("unet.conv_out.",), steps=7, batch_size=8, physical=3)


def main() -> None:
    torch.manual_seed(0)
    print(f"# s2l_guard from {Path(s2l_guard.__file__).parent}, torch {torch.__version__}, threads {torch.get_num_threads()}", file=sys.stderr)
    for name, parts in cases():
        print(name, " ".join(f"{k}={v}" for k, v in parts.items()), flush=True)


if __name__ == "__main__":
    main()
