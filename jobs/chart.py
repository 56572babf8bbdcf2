"""Loss chart PNG for progress updates (matplotlib, headless Agg backend)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402


def loss_chart_png(
    train_loss: list[tuple[int, float]],
    eval_loss: list[tuple[int, float]],
    best_step: int | None,
) -> bytes:
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if train_loss:
        ax.plot([s for s, _ in train_loss], [v for _, v in train_loss], label="train loss", color="#4c78a8")
    if eval_loss:
        ax.plot([s for s, _ in eval_loss], [v for _, v in eval_loss], label="eval loss",
                color="#f58518", marker="o", markersize=3)
        best = dict(eval_loss).get(best_step) if best_step is not None else None
        if best is not None:
            ax.scatter([best_step], [best], s=120, marker="*", color="#e45756", zorder=5,
                       label=f"best checkpoint (step {best_step}, {best:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training progress")
    ax.grid(alpha=0.3)
    if train_loss or eval_loss:
        ax.legend(loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
