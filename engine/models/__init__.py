"""The standalone model path: load SD1.x/SD2.x/SDXL checkpoints offline and drive them through the seam.

    load_base_model(path, device=, dtype=, prediction_type="auto", clip_skip=0) -> DiffusersModel
    detect_path(path) -> Detection            # family, or a ModelError naming what the file is
    tiny_sd1(), tiny_sd2(), tiny_sdxl(), full_size_model(family)   # test and demo models

diffusers and transformers are imported only when a model is built, so hosts can import this
package cheaply.
"""

from .checkpoint_file import file_sha256
from .detect import Detection, detect_checkpoint, detect_folder, detect_path
from .diffusers_adapter import DiffusersModel
from .load import load_base_model, resolve_device, resolve_dtype
from .tiny import full_size_model, tiny_configs, tiny_sd1, tiny_sd2, tiny_sdxl

__all__ = ["Detection", "DiffusersModel", "detect_checkpoint", "detect_folder", "detect_path", "file_sha256",
           "full_size_model", "load_base_model", "resolve_device", "resolve_dtype", "tiny_configs", "tiny_sd1",
           "tiny_sd2", "tiny_sdxl"]
