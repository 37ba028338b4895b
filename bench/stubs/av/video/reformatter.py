"""Stand-in (see av/__init__.py)."""


class _Members(type):
    """ComfyUI 0.2x builds dicts of these enums' members at import (`ColorTrc.BT709: "sRGB"`): every
    member name answers a distinct, hashable placeholder; nothing uses them without PyAV."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


class ColorPrimaries(metaclass=_Members):
    pass


class ColorRange(metaclass=_Members):
    pass


class ColorTrc(metaclass=_Members):
    pass
