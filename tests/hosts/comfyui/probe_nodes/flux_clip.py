"""Test-only stand-in for DualCLIPLoader (type flux) over a small T5.

ComfyUI builds T5 from its fixed T5-XXL config (comfy/text_encoders/t5_config_xxl.json, 4.76 B
parameters): DualCLIPLoader cannot load a small T5 file. This node runs the same loader call
(`comfy.sd.load_clip`, CLIPType.FLUX, files from models/text_encoders) and adds only
`model_options["t5xxl_model_config"]`, which ComfyUI's SDClipModel merges into that config, so the
CLIP it returns is ComfyUI's own FluxClipModel with a narrow T5. The issue allows this stand-in in CI;
tests/hosts/comfyui/manual_flux_full_t5.py runs DualCLIPLoader itself on the real layouts.
"""
import json


class TinyFluxCLIPLoader:
    CATEGORY = "testing"
    FUNCTION = "load_clip"
    RETURN_TYPES = ("CLIP",)

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        files = folder_paths.get_filename_list("text_encoders")
        return {"required": {"clip_name1": (files,), "clip_name2": (files,),
                             "t5xxl_model_config": ("STRING", {"default": "{}"})}}

    def load_clip(self, clip_name1, clip_name2, t5xxl_model_config):
        import comfy.sd
        import folder_paths

        paths = [folder_paths.get_full_path_or_raise("text_encoders", n) for n in (clip_name1, clip_name2)]
        clip = comfy.sd.load_clip(ckpt_paths=paths, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                  clip_type=comfy.sd.CLIPType.FLUX,
                                  model_options={"t5xxl_model_config": json.loads(t5xxl_model_config)})
        return (clip,)
