"""Import-only stand-in for PyAV, used by the benchmark only when PyAV is missing.

ComfyUI's node API imports `av` at module level for its video types; the training node never uses
them. PyAV's wheel is 36 MB, which would not fit next to the other wheels carried to an offline GPU
machine. Any real use raises.
"""


def __getattr__(name):
    raise AttributeError(f"av is a benchmark stand-in (PyAV not installed); av.{name} is unavailable")
