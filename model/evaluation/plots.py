"""Learning-curve plots (matplotlib, Agg backend; no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["plot_learning_curves"]


def plot_learning_curves(history: Sequence[Mapping[str, float]], path: Path, title: str) -> Path:
    """Plot per-epoch training losses, task weights and validation metrics into one PNG.

    ``history`` rows hold ``epoch`` and any of ``train_loss_{ctc,intent,parse}``,
    ``weight_{ctc,intent,parse}``, ``valid_{semer,wer,intent_accuracy,slot_f1}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        ("training loss", ["train_loss_ctc", "train_loss_intent", "train_loss_parse"], True),
        ("task weight", ["weight_ctc", "weight_intent", "weight_parse"], False),
        ("validation", ["valid_semer", "valid_wer", "valid_intent_accuracy", "valid_slot_f1"], False),
    ]
    for ax, (name, keys, log_scale) in zip(axes, panels, strict=True):
        for key in keys:
            values = [row.get(key) for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=key.split("_", 1)[1])
        ax.set_title(name)
        ax.set_xlabel("epoch")
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
