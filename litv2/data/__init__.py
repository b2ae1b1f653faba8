"""Data: datasets (ImageFolder / LitData chunks / digits / synthetic), timm transforms and Mixup, loaders."""
from .builder import (DatasetIndex, build_eval_loader, build_mixup_and_criterion, build_train_loader, build_transform,
                      dataset_index, dataset_root)
from .datasets import (
    RobustImageFolder,
    SyntheticDataset,
    check_image_folder,
    collate_skip_corrupt,
    list_image_folder,
    prepare_digits,
)
from .samplers import ChunkWindowSampler, ResumableSampler, ShardSampler
from .shards import ChunkReader, ShardDataset, ShardSource, open_shards, read_manifest
