"""Stand-in (see av/__init__.py)."""


class SubtitleStream:  # referenced in type annotations only
    pass
