"""Renders bench_audit.py's results (audit_results.json) as the Markdown tables and the
Figure 7 plot of docs/benchmarks/audit.md.

    .venv/bin/python bench/audit_tables.py --out docs/benchmarks
"""

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from worker.audit.stats import clopper_pearson

EPOCHS = ["0", "0'", "1", "2", "3", "4", "5"]
# Graves et al., Table 1 (CIFAR-100) and Figure 7 (MNIST accuracy loss, read off the plot).
PAPER_TABLE1 = {
    "naive": [0.9748, 0.9748, 0.0924, 0.0588, 0.0, 0.0, 0.0],
    "relabel": [0.9748, 0.9748, 0.0, 0.0, 0.0, 0.0, 0.0],
    "amnesiac": [0.9748, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
}
PAPER_FIGURE7_MNIST_LOSS = [0.04, 0.09, 0.22, 0.42, 0.68, 0.81, 0.88]


def pooled(draws: list[dict[str, Any]], pick: Any) -> str:
    """k/n summed over the draws, as 'rate [low, high]'."""
    k = sum(pick(d)["k"] for d in draws)
    n = sum(pick(d)["n"] for d in draws)
    p = clopper_pearson(k, n)
    return "n/a" if p.value is None else f"{p.value:.2f} [{p.low:.2f}, {p.high:.2f}]"


def mean(draws: list[dict[str, Any]], pick: Any) -> str:
    values = [pick(d) for d in draws if pick(d) is not None]
    return f"{np.mean(values):.2f}" if values else "n/a"


def table1(results: dict[str, Any]) -> str:
    draws = results["draws"]
    lines = []
    for method in ("naive", "relabel", "amnesiac"):
        paper = ", ".join(f"{v:g}" for v in PAPER_TABLE1[method])
        lines += [
            f"\n**{method}** (paper's recall at 0, 0', 1-5: {paper})\n",
            "| epoch | acc F | acc T | shadow recall F (paper's metric: correct only) | "
            "shadow recall F (all) | shadow FPR H | calibrated TPR@1%FPR | calibrated AUC | "
            "LiRA TPR@0.1%FPR | LiRA TPR@1%FPR | LiRA AUC | MIA-efficacy |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, epoch in enumerate(EPOCHS):
            lines.append(row(epoch, [d["methods"][method][i] for d in draws]))
    lines += [
        "\n**exact retrain without F** (reference)\n",
        "| | acc F | acc T | shadow recall F (correct only) | shadow recall F (all) | "
        "shadow FPR H | calibrated TPR@1%FPR | calibrated AUC | LiRA TPR@0.1%FPR | "
        "LiRA TPR@1%FPR | LiRA AUC | MIA-efficacy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        row("retrain", [d["exact_retrain"] for d in draws]),
    ]
    return "\n".join(lines)


def row(label: str, figures: list[dict[str, Any]]) -> str:
    cells = [
        mean(figures, lambda f: f["forget_accuracy"]),
        mean(figures, lambda f: f["test_accuracy"]),
        pooled(figures, lambda f: f["shadow_recall_correct"]),
        pooled(figures, lambda f: f["shadow_recall"]),
        mean(figures, lambda f: f["shadow_fpr_heldout"]),
        pooled(figures, lambda f: f["calibrated_tpr_1pct"]),
        mean(figures, lambda f: f["calibrated_auc"]),
        pooled(figures, lambda f: f["lira_tpr_0.1pct"]),
        pooled(figures, lambda f: f["lira_tpr_1pct"]),
        mean(figures, lambda f: f["lira_auc"]),
        mean(figures, lambda f: f["mia_efficacy"]),
    ]
    return f"| {label} | " + " | ".join(cells) + " |"


def figure7(results: dict[str, Any], out: Path) -> str:
    shares = np.array(results["shares"])
    runs = results["runs"]
    loss = np.array([[r["baseline"] - a for a in r["accuracy"]] for r in runs])
    accuracy = np.array([r["accuracy"] for r in runs])
    figure = Figure(figsize=(5, 3.4))
    axis = figure.subplots()
    axis.errorbar(
        100 * shares,
        accuracy.mean(0),
        yerr=accuracy.std(0),
        marker="o",
        label=f"digits, small CNN (mean ± sd of {len(runs)} seeds)",
    )
    baseline = np.mean([r["baseline"] for r in runs])
    axis.plot(
        100 * shares,
        baseline - np.array(PAPER_FIGURE7_MNIST_LOSS),
        "k--",
        label="paper, MNIST ResNet18 (loss read off Fig. 7)",
    )
    axis.set_xlabel("% of training steps rolled back")
    axis.set_ylabel("test accuracy")
    axis.legend(fontsize=7)
    figure.subplots_adjust(left=0.14, bottom=0.14, right=0.97, top=0.95)
    figure.savefig(out / "img" / "audit_figure7.png", dpi=100)
    header = "| steps rolled back | " + " | ".join(f"{100 * s:g}%" for s in shares) + " |"
    lines = [header, "|---" * (len(shares) + 1) + "|"]
    lines.append(
        "| test accuracy (mean ± sd) | "
        + " | ".join(
            f"{m:.3f} ± {s:.3f}" for m, s in zip(accuracy.mean(0), accuracy.std(0), strict=True)
        )
        + " |"
    )
    lines.append("| accuracy loss (mean) | " + " | ".join(f"{v:.3f}" for v in loss.mean(0)) + " |")
    lines.append(
        "| paper, MNIST loss | " + " | ".join(f"{v:.2f}" for v in PAPER_FIGURE7_MNIST_LOSS) + " |"
    )
    return f"baseline test accuracy {baseline:.3f}\n\n" + "\n".join(lines)


def cost(results: dict[str, Any]) -> str:
    train, first, cached = results["training"], results["first_audit"], results["cached_audit"]
    lines = [
        "| | wall s | CPU s |",
        "|---|---|---|",
        f"| one training run ({describe(results['config'])}) | {train['wall']:.1f} | "
        f"{train['cpu']:.1f} |",
        f"| first audit (builds the caches) | {first['wall']:.1f} | {first['cpu']:.1f} |",
        f"| audit with cached models | {cached['wall']:.1f} | {cached['cpu']:.1f} |",
        f"| ratio cached audit / training | {results['ratio_wall']:.0%} | "
        f"{results['ratio_cpu']:.0%} |",
        "",
        f"audit settings: {results['audit_config']['inversion_iterations']} unlearning-inversion "
        f"and {results['audit_config']['class_inversion_iterations']} class-inversion iterations",
        "",
        "| stage (cached audit) | wall s |",
        "|---|---|",
        *(f"| {k} | {v:.2f} |" for k, v in cached["stages"].items()),
        "",
        "| one-off cache object | s |",
        "|---|---|",
        *(f"| {k} | {v:.1f} |" for k, v in first["one_off"].items()),
    ]
    return "\n".join(lines)


def describe(config: dict[str, Any]) -> str:
    return (
        f"{config['epochs']} epochs, batch {config['batch_size']}, {config['optimizer']} "
        f"lr {config['lr']:g}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()
    results = json.loads((args.out / "audit_results.json").read_text())
    for name, render in (("cost", cost), ("cost_lean", cost), ("table1", table1)):
        if name in results:
            print(f"\n## {name}\n\n{render(results[name])}")
    if "figure7" in results:
        print(f"\n## figure7\n\n{figure7(results['figure7'], args.out)}")


if __name__ == "__main__":
    main()
