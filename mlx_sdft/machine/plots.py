"""PNG plots of a continual run (needs the optional `plot` extra: matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_continual(out: Path, results: dict, methods: list[str], names: list[str]) -> list[Path]:
    """learning_curves.png (training loss per stage, per method) and retention_matrix.png."""
    written = []
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.5), squeeze=False)
    for ax, method in zip(axes[0], methods):
        offset = 0
        for k, name in enumerate(names):
            metrics = out / method / f"{k + 1:02d}-{name}" / "metrics.jsonl"
            rows = (
                [json.loads(line) for line in metrics.read_text().splitlines()]
                if metrics.exists()
                else []
            )
            train = [r for r in rows if r["type"] == "train"]
            ax.plot(
                [offset + r["step"] for r in train],
                [r["loss"] for r in train],
                "o-",
                ms=3,
                label=name,
            )
            offset += train[-1]["step"] if train else 0
        ax.set(title=f"{method}: training loss", xlabel="step", ylabel="loss")
        ax.legend()
    fig.tight_layout()
    written.append(out / "learning_curves.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    width = 1.3 * (len(names) + 1) + 1.5  # per method: one column per stage, room for task names
    fig, axes = plt.subplots(
        1,
        len(methods),
        figsize=(width * len(methods) + 1, 0.6 * len(names) + 2.4),
        squeeze=False,
        layout="constrained",
    )
    for ax, method in zip(axes[0], methods):
        result = results[method]
        grid = [[float("nan") if v is None else v for v in row] for row in result["scores"]]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(
            range(len(result["stages"])),
            [f"after {s}" if s != "base" else s for s in result["stages"]],
            rotation=30,
            ha="right",
        )
        ax.set_yticks(range(len(names)), names)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:  # not NaN
                    ax.text(
                        j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k"
                    )
        ax.set_title(f"{method}: task score")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    written.append(out / "retention_matrix.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written
