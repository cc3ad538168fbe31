"""Data: ImageFolder datasets with a cached file list, the reference's views, device-side colour
augmentation, and a sampler + loader that resume exactly in the middle of an epoch.

Typical pretraining use:

    dataset = ImageFolderDataset(split_root(root, "train"), make_pretrain_transform("color", 224), cache_dir)
    sampler = ResumableDistributedSampler(len(dataset), world_size, rank, seed=seed)
    loader = build_loader(dataset, batch_size, sampler, num_workers, seed)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            student, teacher = to_views(batch["image"], device)
            ...  # step; a checkpoint stores loader.state_dict()
"""

from extrema.data.device_color import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    REFERENCE_COLOR,
    ColorAugmentParams,
    ColorAugmentSpec,
    color_augment,
    color_views,
    sample_color_params,
    sample_color_params_batch,
)
from extrema.data.filelist import IMG_EXTENSIONS, default_cache_dir
from extrema.data.folder import ImageFolderDataset, LoadedSample, decode_image, split_root
from extrema.data.loader import OneViewPerImage, ResumableLoader, SampleKey, build_loader, to_views
from extrema.data.sampler import ResumableDistributedSampler
from extrema.data.seeding import sample_generator, sample_seed, seeded_global_rng
from extrema.data.transforms import (
    PRETRAIN_MODES,
    CropWithColor,
    apply_color_params_pil,
    make_eval_transform,
    make_pretrain_transform,
    random_resized_crop_params,
)

__all__ = [
    "OneViewPerImage",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "PRETRAIN_MODES",
    "REFERENCE_COLOR",
    "ColorAugmentParams",
    "ColorAugmentSpec",
    "CropWithColor",
    "ImageFolderDataset",
    "LoadedSample",
    "ResumableDistributedSampler",
    "ResumableLoader",
    "SampleKey",
    "apply_color_params_pil",
    "build_loader",
    "color_augment",
    "color_views",
    "decode_image",
    "default_cache_dir",
    "make_eval_transform",
    "make_pretrain_transform",
    "random_resized_crop_params",
    "sample_color_params",
    "sample_color_params_batch",
    "sample_generator",
    "sample_seed",
    "seeded_global_rng",
    "split_root",
    "to_views",
]
