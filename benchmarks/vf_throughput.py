"""Volume Fusion throughput against nnU-Net 2.8's own per-sample training augmentation, measured in one run.

Baseline: ``nnUNetTrainer.get_training_transforms(...)`` built exactly as nnU-Net builds it for a 3D patch (rotation
+-30 deg, scaling, noise, blur, brightness/contrast, low resolution, gamma, mirroring, deep-supervision
downsampling), applied per sample to crops of nnU-Net's enlarged initial patch size, the way ``nnUNetDataLoader``
does, then stacked into a batch. Volume Fusion: ``VolumeFusionTransform`` (paper / grid) on the augmented batch,
including the deep-supervision label pyramid. Both run single-threaded by default, like one nnU-Net augmentation
worker (``threadpool_limits(1)``, ``torch.set_num_threads(1)``).

    python benchmarks/vf_throughput.py                      # CPU-sized: patch 64x128x128, batch 2
    python benchmarks/vf_throughput.py --preset gpu         # GPU-sized: patch 96x160x160, batch 4
    python benchmarks/vf_throughput.py --patch 64 128 128 --batch 2 --repeats 5
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

PRESETS = {
    "cpu": dict(patch=(64, 128, 128), batch=2, repeats=30),
    "gpu": dict(patch=(96, 160, 160), batch=4, repeats=10),
}


def deep_supervision_scales(patch, levels: int = 4):
    return [[1.0 / 2 ** i] * len(patch) for i in range(levels)]


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--patch", type=int, nargs=3, default=None, metavar=("D", "H", "W"))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed batches per method (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (nnU-Net workers use 1)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    patch = tuple(args.patch or preset["patch"])
    batch_size = args.batch or preset["batch"]
    repeats = args.repeats or preset["repeats"]
    if batch_size < 2:
        parser.error("--batch must be >= 2 (the paper variant fuses two samples of a batch)")

    from nnunetv2_vf.pretrain.dataset import nnunet_augmentation
    from nnunetv2_vf.pretrain.volume_fusion import VolumeFusionTransform

    torch.set_num_threads(args.threads)
    # nnU-Net's transforms draw from the global RNGs; fixed seeds make the baseline's random choices repeatable
    torch.manual_seed(0)
    np.random.seed(0)
    rng = np.random.default_rng(0)
    # the baseline: nnU-Net's transforms including its deep-supervision label pyramid, as nnUNetTrainer builds them
    transforms, initial = nnunet_augmentation(patch, deep_supervision_scales(patch))
    # smooth random volumes with a labelled blob, on nnU-Net's enlarged crop size (z-scored intensities)
    images = [torch.from_numpy(rng.normal(size=(1, *initial)).astype(np.float32)) for _ in range(batch_size)]
    seg = torch.zeros((1, *initial), dtype=torch.int16)
    seg[(slice(None),) + tuple(slice(s // 3, 2 * s // 3) for s in initial)] = 1

    def nnunet_batch():
        samples = [transforms(image=img.clone(), segmentation=seg.clone()) for img in images]
        return torch.stack([s["image"] for s in samples])

    with threadpool_limits(limits=args.threads, user_api=None):
        augmented = nnunet_batch()
        t_nnunet = time_it(nnunet_batch, repeats)
        results = [("nnU-Net per-sample augmentation (baseline)", t_nnunet)]
        for variant in ("paper", "grid"):
            fusion = VolumeFusionTransform(variant, seed=0, deep_supervision_scales=deep_supervision_scales(patch))
            t = time_it(lambda: fusion(data=augmented.clone()), repeats)
            results.append((f"Volume Fusion '{variant}' (+ DS label pyramid)", t))

    print(f"patch {'x'.join(map(str, patch))}, batch {batch_size}, nnU-Net initial crop "
          f"{'x'.join(map(str, initial))}, {repeats} timed batches, {args.threads} thread(s), torch "
          f"{torch.__version__}")
    print(f"| {'method':<44} | {'ms / batch':>10} | {'batches / s':>11} | {'ratio to nnU-Net aug':>20} |")
    print(f"|{'-' * 46}|{'-' * 12}:|{'-' * 12}:|{'-' * 21}:|")
    for name, seconds in results:
        print(f"| {name:<44} | {seconds * 1e3:>10.1f} | {1 / seconds:>11.2f} | {seconds / t_nnunet:>20.3f} |")


if __name__ == "__main__":
    main()
