"""Writing evaluation results: JSON, a Markdown table, a same-seed image grid and a bar plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import EvaluationError
from ..io import atomic_write

_COLS = [  # (key, header, format)
    ("fid", "FID*", "{:.2f}"), ("kid", "KID*×10³", None), ("precision", "prec.", "{:.3f}"),
    ("recall", "recall", "{:.3f}"), ("inception_score", "IS*", "{:.2f}"), ("fid_to_fp", "FID*-to-FP", "{:.2f}"),
    ("psnr", "PSNR dB", "{:.1f}"), ("ssim", "SSIM", "{:.3f}"),
]


def _cell(m: dict, key: str, fmt: str | None, seeds: int) -> str:
    if key not in m:
        return "–"
    v, sd = m[key], m.get(key + "_std", 0.0)
    if key == "kid":
        return f"{1e3 * v:.2f}" + (f" ± {1e3 * sd:.2f}" if seeds > 1 else "")
    return fmt.format(v) + (f" ± {fmt.format(sd)}" if seeds > 1 else "")


def markdown_table(results: dict) -> str:
    """The results as a Markdown table with the protocol and noise floors underneath."""
    p = results["protocol"]
    seeds = len(p["seeds"])
    cols = _COLS if results.get("feature_space") is not None else [c for c in _COLS if c[0] in ("psnr", "ssim")]
    head = ["model"] + [h for _, h, _ in cols] + ["checkpoint B", "sampling s", "speed × FP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fp_secs = results["models"][results["fp_model"]]["sample_seconds"]
    for name, m in results["models"].items():
        row = [name] + [_cell(m, k, f, seeds) for k, _, f in cols]
        row += [f"{m['bytes']:,}" if "bytes" in m else "–", f"{m['sample_seconds']:.0f}",
                f"{fp_secs / m['sample_seconds']:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    proto = (f"Protocol `{p['name']}`: {p['sampler'].upper()} {p['steps']} steps, {p['num_samples']:,} samples × "
             f"{seeds} seed(s) {list(p['seeds'])}.")
    if all("warmup_seconds" in m for m in results["models"].values()):
        proto += (" Sampling s excludes a one-off warm-up step per model (where a compiled model compiles): "
                  + ", ".join(f"{n} {m['warmup_seconds']:.1f} s" for n, m in results["models"].items()) + ".")
    if any("run" in m for m in results["models"].values()):
        proto += " " + " ".join(f"{n}: {m['run']}." for n, m in results["models"].items() if "run" in m)
    if results.get("feature_space") is None:  # a model of other data: no feature extractor for it
        lines += ["", f"{proto} PSNR and SSIM compare with the FP model's same-seed images. FID*, KID*, precision,"
                      " recall and IS* need a feature extractor for the model's data; lowbit ships one for"
                      " Fashion-MNIST only, so they are not computed."]
        return "\n".join(lines)
    fl = results["noise_floor"]
    floor = f"test-set split-half FID* {fl['test_split_half_fid']:.2f}"
    if "fp_seed_to_seed_fid" in fl:
        floor += f"; FP seed-to-seed FID* {fl['fp_seed_to_seed_fid']:.2f}; FP FID* seed std {fl['fp_fid_seed_std']:.2f}"
    lines += ["", f"{proto} *FID/KID/IS in {results['feature_space']}. "
                  f"FID*-to-FP, PSNR and SSIM compare with the FP model's same-seed images. Noise floor: {floor}."]
    return "\n".join(lines)


def save_grid(grid: dict[str, torch.Tensor], path: "str | Path") -> Path:
    """One row per model, the same seeds in each column, labelled — FP vs quantized at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(grid)
    n = min(len(v) for v in grid.values())
    channels = next(iter(grid.values())).shape[1]
    if channels not in (1, 3):  # e.g. 4-channel latents: a picture of them would mislead
        raise EvaluationError(f"images with {channels} channels cannot be drawn as a grid (1: grayscale, 3: RGB);"
                              " latents need their VAE's decoder first")
    fig, axes = plt.subplots(len(names), 1, figsize=(n * 0.55 + 1.2, len(names) * 0.75 + 0.3), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        row = torch.cat(list(grid[name][:n].float().clamp(-1, 1)), dim=2)  # [C, H, n*W]
        if channels == 1:
            ax.imshow(row[0].numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        else:
            ax.imshow(((row.permute(1, 2, 0) + 1) / 2).numpy(), interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_bars(results: dict, path: "str | Path") -> Path:
    """Bar plot of FID* (vs test set) and FID*-to-FP per model, with the split-half noise floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fid = [results["models"][n]["fid"] for n in names]
    fid_err = [results["models"][n].get("fid_std", 0) for n in names]
    to_fp = [results["models"][n].get("fid_to_fp", 0) for n in names]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.2))
    ax.bar([i - 0.2 for i in x], fid, 0.4, yerr=fid_err, label="FID* vs test set")
    ax.bar([i + 0.2 for i in x], to_fp, 0.4, label="FID* vs FP same seeds")
    ax.axhline(results["noise_floor"]["test_split_half_fid"], color="k", ls="--", lw=1, label="split-half floor")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("FID* (classifier features)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(results: dict, out_dir: "str | Path") -> dict[str, Path]:
    """Write results.json, results.md, grid.png and (with FID*s) bars.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in results.items() if not k.startswith("_")}
    atomic_write(out / "results.json", (json.dumps(clean, indent=2) + "\n").encode())
    atomic_write(out / "results.md", (markdown_table(results) + "\n").encode())
    files = {"json": out / "results.json", "markdown": out / "results.md"}
    if results.get("feature_space") is not None:  # the bars are FID*s
        files["bars"] = save_bars(results, out / "bars.png")
    if results.get("_grid"):
        files["grid"] = save_grid(results["_grid"], out / "grid.png")
    return files
