"""Stand-in (see av/__init__.py)."""


class InputContainer:  # referenced in type annotations only
    pass


class OutputContainer:
    pass
