"""Everything between a folder of images and a batch of latents + conditioning.

`TrainData` is what the training loop uses. The helpers below it are shared with the captioners
(`engine.caption`) and `python -m engine check DIR`: image discovery and safe opening (images.py),
caption sources (captions.py) and dataset scanning with kohya folder conventions (records.py).
"""

from .buckets import BucketAssigner, Placement, make_bucket_resolutions
from .captions import (CAPTION_EXTENSIONS, MetadataCaptions, find_metadata, load_metadata, read_text,
                       sidecar_caption, sidecar_path)
from .images import (IMAGE_EXTENSIONS, ImageFile, describe_contents, is_image_name, list_image_paths,
                     load_image, probe_image, scan_images, skipped_warning)
from .plan import BatchPlan, Sample
from .records import ImageRecord, ScanResult, Subset, parse_kohya_dirname, scan_dataset
from .text import process_caption, split_tags, tag_frequency
from .train_data import Batch, TrainData

__all__ = [
    "Batch", "BatchPlan", "BucketAssigner", "CAPTION_EXTENSIONS", "IMAGE_EXTENSIONS", "ImageFile", "ImageRecord",
    "MetadataCaptions", "Placement", "Sample", "ScanResult", "Subset", "TrainData", "describe_contents",
    "find_metadata", "is_image_name", "list_image_paths", "load_image", "load_metadata", "make_bucket_resolutions",
    "parse_kohya_dirname", "probe_image", "process_caption", "read_text", "scan_dataset", "scan_images",
    "sidecar_caption", "sidecar_path", "skipped_warning", "split_tags", "tag_frequency",
]
