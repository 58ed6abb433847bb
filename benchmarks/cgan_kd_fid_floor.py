"""The real-data floor of a GAN run's FID-like proxy: the same Fréchet distance between a feature
model's penultimate features on the real test images the GAN run scores against (its seeded pick)
and on other real images -- other test images, and the training images the GAN saw.

    python benchmarks/cgan_kd_fid_floor.py --data cifar10 --root data --train-subset 1000 \\
        --feature-model benchmarks/teachers/cifar10_resnet20.pt --samples 1000

A GAN whose FID-like value sits near these numbers makes images the feature model cannot tell from
real ones; the GAN runs' values are comparable only with floors computed in the same feature space.
"""

from __future__ import annotations

import argparse
import json

import torch

from kdforge.config import DataConfig, ModelConfig
from kdforge.engine.build import build_data, build_model
from kdforge.engine.gan import normalized_inputs
from kdforge.generative import frechet_distance
from kdforge.generative.processing import batched, penultimate_features


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--root", default=None)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--feature-model", required=True)
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args(argv)
    splits = build_data(DataConfig(name=args.data, root=args.root, train_subset=args.train_subset, augment=False))
    info = splits.info
    model, _ = build_model(ModelConfig(checkpoint=args.feature_model), info, "feature model")
    model.eval()
    count = args.samples
    picks = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(0))  # the GAN run's pick
    scored, others = picks[:count], picks[count : 2 * count]

    def features(images: torch.Tensor) -> torch.Tensor:
        return penultimate_features(model, normalized_inputs(images, info))

    reference = features(splits.test.images[scored])
    train_images = splits.train.images[: min(count, len(splits.train))]
    result = {
        "feature_model": args.feature_model,
        "samples": count,
        "test_vs_other_test": frechet_distance(reference, features(splits.test.images[others])),
        "test_vs_train": frechet_distance(reference, features(train_images)),
        "train_images": len(train_images),
    }
    outputs = batched(model, normalized_inputs(splits.test.images[scored], info))
    if info.task == "classification":
        result["label_top1_real_test"] = 100.0 * float((outputs.argmax(1) == splits.test.labels[scored]).float().mean())
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
