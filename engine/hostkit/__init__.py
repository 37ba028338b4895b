"""What host adapters share, whatever the host: ComfyUI (nodes/), A1111 (inplace_lora_a1111/) and a
future Forge adapter import these alike. Pure torch; no host module is imported here.

- ldm_names.py     LDM/sgm UNet names and block layouts -> the SD families' names
- clip_holders.py  ComfyUI-style CLIP holders (clip_l / clip_h / clip_g) -> the family's text encoders
- borrowing.py     borrow a host's loaded modules for training and give them back bit-identical

The events a host listens to and the stop exceptions it passes are the engine's API:
engine/events.py (`TrainEvent`, kinds "caching", "step", ...) and `engine.train.train(stop_exceptions=)`.
"""
