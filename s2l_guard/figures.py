"""Figures written next to the numbers (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def plot_nearest_members(examples: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], path: Path, *, delta: float) -> Path:
    """Per domain, the generations closest to a member (top) above that member (bottom).

    A title in red marks a pair within ``delta``: a reproduced training image.
    """
    domains = list(examples)
    columns = max((len(g) for g, _, _ in examples.values()), default=1)
    fig, axes = plt.subplots(2 * len(domains), columns, figsize=(columns * 0.9, len(domains) * 2.1), squeeze=False)
    for row, domain in enumerate(domains):
        generated, members, distance = examples[domain]
        for col in range(columns):
            top, bottom = axes[2 * row, col], axes[2 * row + 1, col]
            for ax in (top, bottom):
                ax.axis("off")
            if col >= len(generated):
                continue
            top.imshow(_as_image(generated[col]), cmap="gray", vmin=0, vmax=1)
            bottom.imshow(_as_image(members[col]), cmap="gray", vmin=0, vmax=1)
            d = float(distance[col])
            top.set_title(f"{d:.2f}", fontsize=7, color="red" if d <= delta else "black")
        axes[2 * row, 0].text(-0.6, 0.5, f"{domain}\ngenerated", transform=axes[2 * row, 0].transAxes, ha="right", va="center", fontsize=7)
        axes[2 * row + 1, 0].text(-0.6, 0.5, "nearest\nmember", transform=axes[2 * row + 1, 0].transAxes, ha="right", va="center", fontsize=7)
    fig.suptitle(f"closest generations to training members (normalized L2; red <= {delta})", fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _as_image(x: torch.Tensor):
    x = x.detach().cpu().float()
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
