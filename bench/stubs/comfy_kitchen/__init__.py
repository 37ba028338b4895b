"""Import-only stand-in for comfy-kitchen, used by the benchmark only when comfy-kitchen is missing.

ComfyUI 0.2x imports it at module level (attention, text encoders) and asks it which of its optional
kernels exist; `comfy.quant_ops` falls back on its own when `comfy_kitchen.tensor` is missing, as it
does here. Its wheel is 58 MB, more than fits beside ComfyUI and the other wheels carried to an
offline GPU machine; SD1.5/SDXL in bf16 use none of its kernels (fp8/fp4/int8 quantization, int8
attention, LLM decode). Every `*_is_available` answers False; anything else raises.
"""


def __getattr__(name):
    if name.endswith("_is_available"):
        return lambda *args, **kwargs: False
    raise AttributeError(f"comfy_kitchen is a benchmark stand-in (comfy-kitchen not installed); "
                         f"comfy_kitchen.{name} is unavailable")
