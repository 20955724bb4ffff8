"""The frontier, put together: fidelity on each trained model against the measured speed-up on SDXL-base.

    python -m benchmarks.frontier.report

Reads the last row of every setting from the speed CSV (``benchmarks.frontier.speed``) and from each
model's fidelity CSV (``benchmarks.fidelity.frontier``), and writes into ``--out``:

* ``frontier_<model>.png``: PSNR to the unpruned samples (left) and the classifier feature distance
  (right) against the speed-up, one marker per setting;
* ``frontier.md``: for each target speed-up (1.3x, 1.6x, 2x) and model, the setting with the best PSNR
  among those at least that fast, by how much it leads the best setting of any other method and the
  best AT-EDM preset as published; G-WPR against random ranking, setting by setting; and every row.

A setting's speed-up is its per-step one, or its whole generation's where it works across steps
(DeepCache).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import RESULTS_DIR  # noqa: E402
from benchmarks.fidelity.bench_fidelity import OUT_DIRS  # noqa: E402

from .settings import PUBLISHED, SETTINGS  # noqa: E402

TARGETS = (1.3, 1.6, 2.0)
FAMILY_COLOURS = {"atedm": "tab:blue", "tomesd": "tab:orange", "deepcache": "tab:green",
                  "atedm+deepcache": "tab:purple", "todo": "tab:red", "full": "black"}
RECOVERY_MARKERS = {("copy", "attention"): "o", ("copy", "key_cosine"): "s", ("delta", "attention"): "^",
                    ("delta", "key_cosine"): "D"}


def last_rows(path: Path, key=lambda row: row["setting"]) -> dict:
    """The last row of each key in a CSV that runs append to."""
    if not path.exists():
        raise SystemExit(f"no results at {path}: run the frontier's speed and fidelity scripts first")
    rows = {}
    for row in csv.DictReader(path.open()):
        rows[key(row)] = row
    return rows


def speedups(speed_csv: Path) -> tuple[dict[str, float], dict]:
    """Each setting's speed-up (whole generation where it works across steps) and the run's context."""
    rows = last_rows(speed_csv, key=lambda row: (row["setting"], row["measure"]))
    result = {}
    for (name, measure), row in rows.items():
        setting = SETTINGS.get(name)
        if setting is not None and (measure == "generation") == setting.across_steps:
            result[name] = float(row["speedup"])
    return result, next(iter(rows.values()))


def fidelity(path: Path) -> dict[str, dict]:
    rows = last_rows(path)
    return {name: {key: (float(value) if key not in ("setting", "family", "model", "machine", "torch", "diffusers",
                                                          "git_sha") else value) for key, value in row.items()}
            for name, row in rows.items() if name in SETTINGS}


def best(names, scores: dict) -> str | None:
    names = [name for name in names if name in scores]
    return max(names, key=lambda name: scores[name]["psnr_db"]) if names else None


def pick_table(speed: dict[str, float], models: dict[str, dict]) -> list[str]:
    lines = ["| target | model | best setting (speed-up) | PSNR dB | feature dist. | lead over the best other method "
             "| lead over the best published AT-EDM preset |", "|---|---|---|---|---|---|---|"]
    for target in TARGETS:
        fast = [name for name, value in speed.items() if value >= target]
        for model, scores in models.items():
            winner = best(fast, scores)
            if winner is None:
                lines.append(f"| {target}x | {model} | nothing measured is this fast | | | | |")
                continue
            family = SETTINGS[winner].family
            other = best([name for name in fast if SETTINGS[name].family != family], scores)
            published = best([name for name in fast if SETTINGS[name].published and SETTINGS[name].family == "atedm"],
                             scores)

            def lead(name):
                if name is None:
                    return "none this fast"
                return f"+{scores[winner]['psnr_db'] - scores[name]['psnr_db']:.1f} dB over {name} ({speed[name]:.2f}x)"

            lines.append(f"| {target}x | {model} | {winner} ({speed[winner]:.2f}x) | {scores[winner]['psnr_db']:.1f} "
                         f"| {scores[winner]['feature_distance']:.2f} | {lead(other)} | "
                         f"{'it is one' if winner == published else lead(published)} |")
    return lines


def ranking_table(models: dict[str, dict]) -> list[str]:
    """G-WPR minus random ranking, PSNR, for every AT-EDM setting pair, per model."""
    lines = ["| setting (G-WPR vs random) | " + " | ".join(f"{model}: PSNR gain dB" for model in models) + " |",
             "|---|" + "---|" * len(models)]
    wins = {model: [0, 0] for model in models}
    for name, setting in SETTINGS.items():
        if setting.family != "atedm" or setting.ranking != "gwpr":
            continue
        random_name = name.removesuffix("-gwpr") + "-random"
        cells = []
        for model, scores in models.items():
            if name in scores and random_name in scores:
                gain = scores[name]["psnr_db"] - scores[random_name]["psnr_db"]
                sem = (scores[name]["psnr_sem"] ** 2 + scores[random_name]["psnr_sem"] ** 2) ** 0.5
                wins[model][0] += gain > 0
                wins[model][1] += 1
                cells.append(f"{gain:+.2f} (+-{sem:.2f})")
            else:
                cells.append("-")
        lines.append(f"| {name.removesuffix('-gwpr')} | " + " | ".join(cells) + " |")
    lines.append("| G-WPR ahead in | " + " | ".join(f"{won} of {total}" for won, total in wins.values()) + " |")
    return lines


def all_rows_table(speed: dict[str, float], models: dict[str, dict]) -> list[str]:
    header = "| setting | speed-up (SDXL-base) | " + " | ".join(
        f"{model} PSNR dB | {model} feature dist. | {model} accuracy" for model in models) + " |"
    lines = [header, "|---|---|" + "---|---|---|" * len(models)]
    for name in sorted(SETTINGS, key=lambda name: -speed.get(name, 0.0)):
        cells = []
        for scores in models.values():
            row = scores.get(name)
            cells += ["-"] * 3 if row is None else [f"{row['psnr_db']:.1f} +- {row['psnr_sem']:.1f}",
                                                    f"{row['feature_distance']:.2f}", f"{row['accuracy']:.2f}"]
        lines.append(f"| {name} | {speed[name]:.2f}x | " + " | ".join(cells) + " |" if name in speed
                     else f"| {name} | - | " + " | ".join(cells) + " |")
    return lines


def plot(model: str, speed: dict[str, float], scores: dict[str, dict], out: Path, machine: str,
         speed_model: str) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, metric, label in ((axes[0], "psnr_db", "PSNR to the unpruned samples, dB (higher is closer)"),
                                (axes[1], "feature_distance", "classifier feature distance (lower is closer)")):
        seen = set()
        for name, row in scores.items():
            if name not in speed:
                continue
            setting = SETTINGS[name]
            colour = FAMILY_COLOURS[setting.family]
            marker = RECOVERY_MARKERS[(setting.recovery, setting.similarity)] if setting.family == "atedm" else "*"
            legend = setting.family if setting.family != "atedm" else (
                f"AT-EDM {setting.recovery}/{setting.similarity}" + (" (published)" if (
                    setting.recovery, setting.similarity) == PUBLISHED[:2] else ""))
            if setting.family == "atedm" and setting.ranking == "random":
                legend += ", random ranking"
            axis.scatter(speed[name], row[metric], marker=marker, s=70 if marker == "*" else 36,
                         facecolors="none" if setting.ranking == "random" else colour, edgecolors=colour,
                         label=None if legend in seen else legend)
            seen.add(legend)
            if setting.family == "atedm" and setting.published:
                axis.annotate(setting.atedm_preset, (speed[name], row[metric]), textcoords="offset points",
                              xytext=(4, 4), fontsize=8)
            elif setting.family in ("tomesd", "deepcache", "todo", "atedm+deepcache"):
                axis.annotate(name.split("-", 1)[1] if "-" in name else name, (speed[name], row[metric]),
                              textcoords="offset points", xytext=(4, -10), fontsize=7, color=colour)
        if metric == "psnr_db":
            floor = next(iter(scores.values()))["psnr_unrelated_db"]
        else:
            floor = next(iter(scores.values()))["feature_distance_unrelated"]
        axis.axhline(floor, color="grey", linestyle=":", label="unrelated samples (other seeds, same labels)")
        for target in TARGETS:
            axis.axvline(target, color="lightgrey", linewidth=0.8)
        axis.set_xlabel(f"measured speed-up on {speed_model} ({machine})")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Fidelity on the {model} model vs speed on {speed_model} (filled: G-WPR, hollow: random ranking)")
    fig.tight_layout()
    path = out / f"frontier_{model}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", default=str(RESULTS_DIR / "cpu" / "frontier_speed_512px.csv"))
    parser.add_argument("--models", default="digits,scenes")
    parser.add_argument("--fidelity", default=None,
                        help="model=csv,... (default: each model's results/<dir>/frontier.csv)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "frontier"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    speed, context = speedups(Path(args.speed))
    paths = {model: OUT_DIRS[model] / "frontier.csv" for model in args.models.split(",")}
    if args.fidelity:
        paths.update((model, Path(path)) for model, path in (part.split("=", 1) for part in args.fidelity.split(",")))
    models = {model: fidelity(path) for model, path in paths.items()}
    machine = f"CPU, {context['height']} px {context['dtype']}, CFG batch 2"
    speed_model = {"sdxl-base": "SDXL-base", "tiny": "the tiny test UNet"}[context["model"]]
    for model, scores in models.items():
        print(f"wrote {plot(model, speed, scores, out, machine, speed_model)}")
    text = ["# The quality-speed frontier", "",
            f"Speed: {speed_model} on the CPU ({context['device']}, {context['threads']} torch threads), "
            f"{context['height']}x{context['width']}, {context['dtype']}, CFG batch 2, {context['steps']} steps, "
            f"git {context['git_sha']}. Fidelity: "
            + "; ".join(f"{model} model, {int(next(iter(scores.values()))['images'])} images, DDIM "
                        f"{int(next(iter(scores.values()))['ddim_steps'])}, git {next(iter(scores.values()))['git_sha']}"
                        for model, scores in models.items()) + ".", "",
            "## Best pick per target speed-up", "", *pick_table(speed, models), "",
            "## G-WPR against random ranking (PSNR, G-WPR minus random; +- one standard error)", "",
            *ranking_table(models), "", "## Every setting", "", *all_rows_table(speed, models), ""]
    (out / "frontier.md").write_text("\n".join(text))
    print(f"wrote {out / 'frontier.md'}")


if __name__ == "__main__":
    main()
