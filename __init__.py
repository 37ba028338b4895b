"""ComfyUI entry point of the In-Place LoRA Trainer node pack.

ComfyUI imports this folder as a package and calls `comfy_entrypoint()`; everything heavy (torch,
the engine, comfy itself) is imported inside it, so importing the package elsewhere (the CLI, the
A1111 extension, tests) costs nothing and never fails for want of ComfyUI.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import InplaceLoRAExtension

    extension = InplaceLoRAExtension()
    await extension.on_load()
    return extension
