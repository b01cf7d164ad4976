"""Train lowbit's Fashion-MNIST feature classifier and compute the test-set reference statistics.

    python -m lowbit.evaluate.train_classifier [--epochs 5] [--out-dir DIR] [--threads 1]
    python -m lowbit.evaluate.train_classifier --reference-only   # keep the classifier, redo stats

Steps:

1. Train ``FashionClassifier(batchnorm=True)`` on the 60k training images (Debian package
   ``dataset-fashion-mnist``). AdamW with a one-cycle LR schedule, batch 128, a fixed seed. The
   only augmentation is a random shift of up to ±1 pixel (``--max-shift``), with background fill.
   There are no flips. The number of epochs is fixed, and no checkpoint is picked by test
   accuracy.
2. Fold BatchNorm into the convs, round the weights to fp16, and measure test accuracy
   (overall and per class) on exactly those weights. Stop if it is below 90 %.
3. Write ``fmnist_classifier.safetensors`` (fp16, atomic) with the accuracy, epochs, seed, wall
   time and parameter count in its metadata. Then reload it with :func:`load_classifier`.
4. Extract features of the 10k test images with the reloaded classifier and write
   ``fmnist_test_features.safetensors`` (:func:`save_reference`).

The default ``--out-dir`` is the package's ``lowbit/zoo`` directory, where the shipped files live.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lowbit._platform import cpu_name
from lowbit.data import FASHION_MNIST_CLASSES, load_fashion_mnist, to_model_range
from lowbit.errors import LowbitError
from lowbit.evaluate.features import (
    CLASSIFIER_PATH,
    REFERENCE_PATH,
    FashionClassifier,
    extract,
    load_classifier,
    save_classifier,
    save_reference,
)

MIN_TEST_ACCURACY = 0.90


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image of ``x`` [B, 1, H, W] by independent random (dy, dx) in
    [-max_shift, max_shift]. Pixels that enter from the border are background (-1)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # [B, H, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # [B, 1, W]
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, list[float]]:
    """Overall and per-class accuracy."""
    pred = logits.argmax(1)
    per_class = [float((pred[labels == c] == c).float().mean()) for c in range(len(FASHION_MNIST_CLASSES))]
    return float((pred == labels).float().mean()), per_class


def _hardware(threads: int) -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, torch threads {threads}"


def train(
    epochs: int, seed: int, batch_size: int, lr: float, max_shift: int, data_dir: str | None
) -> tuple[FashionClassifier, float]:
    """Train the BatchNorm variant; return (folded plain classifier, training wall time in s)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_fashion_mnist("train", root=data_dir)
    x_all = to_model_range(images)
    model = FashionClassifier(batchnorm=True).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = (x_all.shape[0] + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2
    )
    t0 = time.perf_counter()
    model.train()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(x_all.shape[0], generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{epochs}", unit="batch", file=sys.stderr)
        for step in bar:
            idx = perm[step * batch_size : (step + 1) * batch_size]
            x = random_shift(x_all[idx], max_shift, gen).contiguous(memory_format=torch.channels_last)
            y = labels[idx]
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
            if step % 20 == 0 or step == steps_per_epoch - 1:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        bar.close()
        print(
            f"epoch {epoch}: train loss {loss_sum / seen:.4f}, train acc (augmented) {correct / seen:.4f}, "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    wall = time.perf_counter() - t0
    model.eval()
    return model.fold_batchnorm().to(memory_format=torch.contiguous_format), wall


def make_reference(classifier_path: Path, reference_path: Path, data_dir: str | None) -> dict:
    """Compute and write the reference statistics of the 10k test images with the classifier
    exactly as :func:`load_classifier` returns it."""
    classifier = load_classifier(classifier_path)
    images, labels = load_fashion_mnist("test", root=data_dir)
    feats, logits = extract(to_model_range(images), classifier)
    acc, _ = accuracy(logits, labels)
    save_reference(
        reference_path,
        feats,
        labels,
        classifier_path=classifier_path,
        metadata={
            "split": "test",
            "test_accuracy": f"{acc:.4f}",  # of the classifier, on these images
            "torch_version": torch.__version__,
        },
    )
    return {"test_accuracy": acc, "n": feats.shape[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lowbit.evaluate.train_classifier",
        description="Train lowbit's Fashion-MNIST feature classifier and compute test-set reference statistics.",
    )
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--out-dir", type=Path, default=CLASSIFIER_PATH.parent,
                   help="where to write the two .safetensors files (default: the package's lowbit/zoo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--max-shift", type=int, default=1, help="random translation in pixels (augmentation)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST idx files")
    p.add_argument("--reference-only", action="store_true",
                   help="do not train: recompute the reference statistics for the classifier in --out-dir")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    classifier_path = args.out_dir / CLASSIFIER_PATH.name
    reference_path = args.out_dir / REFERENCE_PATH.name

    try:
        if not args.reference_only:
            t_start = time.perf_counter()
            plain, train_wall = train(args.epochs, args.seed, args.batch_size, args.lr, args.max_shift, args.data_dir)
            # Evaluate exactly the weights that will be shipped: fp16-rounded, used in fp32.
            plain.load_state_dict({k: v.half().float() for k, v in plain.state_dict().items()})
            images, labels = load_fashion_mnist("test", root=args.data_dir)
            _, logits = extract(to_model_range(images), plain)
            acc, per_class = accuracy(logits, labels)
            print(f"test accuracy {acc:.4f} (fp16 weights); training wall time {train_wall:.1f} s")
            for name, a in zip(FASHION_MNIST_CLASSES, per_class):
                print(f"  {name:<12} {a:.4f}")
            if acc < MIN_TEST_ACCURACY:
                print(f"error: test accuracy {acc:.4f} < {MIN_TEST_ACCURACY}; not writing files "
                      "(train longer with --epochs)", file=sys.stderr)
                return 1
            save_classifier(plain, classifier_path, metadata={
                "test_accuracy": f"{acc:.4f}",
                "per_class_accuracy": json.dumps(dict(zip(FASHION_MNIST_CLASSES, [round(a, 4) for a in per_class]))),
                "epochs": args.epochs,
                "seed": args.seed,
                "batch_size": args.batch_size,
                "peak_lr": args.lr,
                "optimizer": "AdamW(weight_decay=0.05), OneCycleLR(pct_start=0.2)",
                "augmentation": f"random shift +-{args.max_shift} px (fill -1); no flips",
                "train_wall_time_s": f"{train_wall:.1f}",
                "hardware": _hardware(threads),
                "param_count": sum(t.numel() for t in plain.parameters()),
                "train_data": "Fashion-MNIST train split, 60000 images",
                "torch_version": torch.__version__,
            })
            reloaded = load_classifier(classifier_path)
            _, logits2 = extract(to_model_range(images), reloaded)
            if not torch.equal(logits, logits2):
                raise LowbitError("the reloaded classifier does not reproduce the evaluated one; this is a bug")
            print(f"wrote {classifier_path} ({classifier_path.stat().st_size:,} B); "
                  f"total {time.perf_counter() - t_start:.1f} s")
        info = make_reference(classifier_path, reference_path, args.data_dir)
        print(f"wrote {reference_path} ({reference_path.stat().st_size:,} B): {info['n']} test images, "
              f"classifier test accuracy {info['test_accuracy']:.4f}")
    except LowbitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
