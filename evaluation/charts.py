"""The retrieval-quality report: the table (quality.md) and the chart (quality.png) of every run."""

from __future__ import annotations

from pathlib import Path

__all__ = ["METRICS", "chart", "quality_table"]

METRICS = ("mMP@5", "mR@1", "MAP@5", "MRR", "nDCG@5")


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / (2 * len(results))
    for n, (model, variants) in enumerate(results.items()):
        for m, variant in enumerate(("pretrained", "top_tuned")):
            offset = (2 * n + m) * width
            values = [variants[variant][metric] for metric in METRICS]
            ax.bar([i + offset for i in range(len(METRICS))], values, width, label=f"{model} {variant}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(METRICS))], METRICS)
    ax.set_ylim(0, 1)
    ax.set_title("Fashion-MNIST image-to-image retrieval (test split, exact search)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quality_table(results: dict) -> str:
    lines = ["| model | task | embedding | " + " | ".join(METRICS) + " |", "|---|---|---|" + "---|" * len(METRICS)]
    for model, result in results.items():
        for task, variants in (("image → image", result), ("text → image", result.get("text_to_image"))):
            for variant in ("pretrained", "top_tuned") if variants else ():
                values = " | ".join(f"{variants[variant][m]:.4f}" for m in METRICS)
                lines.append(f"| {model} | {task} | {variant} | {values} |")
    return "\n".join(lines)
