"""ComfyUI nodes of the In-Place LoRA Trainer and the adapter that maps ComfyUI's MODEL/CLIP/VAE onto
the engine. Modules that import comfy do so only when ComfyUI loads the pack (see ../__init__.py)."""
