"""A synthetic nnU-Net plans configuration for unit tests that need plans but no preprocessed dataset."""
from __future__ import annotations

PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"


def nnunet_configuration(patch, strides, kernels, *, spacing=None, data_identifier="x", batch_size=2,
                         **arch_kwargs) -> dict:
    """One ``plans['configurations'][name]`` entry as nnU-Net 2.8's planner writes it, building a PlainConvUNet."""
    return {"data_identifier": data_identifier, "preprocessor_name": "DefaultPreprocessor", "batch_size": batch_size,
            "patch_size": patch, "median_image_size_in_voxels": patch,
            "spacing": spacing if spacing is not None else [1.0] * len(patch),
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {}, "batch_dice": False,
            "architecture": {"network_class_name": PLAIN_CONV_UNET,
                             "arch_kwargs": {"strides": strides, "kernel_sizes": kernels, **arch_kwargs},
                             "_kw_requires_import": []}}
