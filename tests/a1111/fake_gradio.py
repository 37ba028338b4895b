"""A minimal stand-in for `gradio` that records the layout and the event bindings the tab makes.

Only the API surface the tab uses exists here; a call the tab makes that Gradio 3.41 and 4 do not
share would have to be added, which is the point: the fake documents the shared subset.
"""

from __future__ import annotations

import types

COMMON = {"label", "value", "elem_id", "scale", "visible", "interactive", "placeholder", "lines", "show_label"}
ALLOWED = {
    "Textbox": COMMON,
    "Dropdown": COMMON | {"choices"},
    "Slider": COMMON | {"minimum", "maximum", "step"},
    "Number": COMMON | {"precision"},
    "Checkbox": COMMON,
    "Button": COMMON | {"variant"},
    "Markdown": {"value", "elem_id", "visible"},
    "Image": COMMON | {"type"},
    "Gallery": COMMON | {"columns", "height"},
}


def make() -> types.ModuleType:
    gr = types.ModuleType("gradio")
    gr.created, gr.events = [], []

    class Layout:
        def __init__(self, *args, **kwargs):
            self.kwargs = kwargs

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    for name in ("Blocks", "Row", "Column", "Accordion"):
        setattr(gr, name, type(name, (Layout,), {}))

    def load(self, fn, inputs=(), outputs=()):  # Blocks.load: runs when a page (re)loads
        gr.events.append({"source": self, "event": "load", "fn": fn, "inputs": list(inputs),
                          "outputs": list(outputs)})

    gr.Blocks.load = load

    def component(kind):
        class Component:
            def __init__(self, value=None, **kwargs):
                unknown = set(kwargs) - ALLOWED[kind]
                assert not unknown, f"gr.{kind} got arguments outside the Gradio 3.41/4 subset: {unknown}"
                self.kind, self.kwargs = kind, dict(kwargs, value=value)
                gr.created.append(self)

            def _bind(self, event, fn, inputs, outputs):
                gr.events.append({"source": self, "event": event, "fn": fn, "inputs": list(inputs),
                                  "outputs": list(outputs)})

            def click(self, fn, inputs=(), outputs=()):
                self._bind("click", fn, inputs, outputs)

            def change(self, fn, inputs=(), outputs=()):
                self._bind("change", fn, inputs, outputs)

        Component.__name__ = kind
        return Component

    for kind in ALLOWED:
        setattr(gr, kind, component(kind))
    gr.update = lambda **kwargs: {"__type__": "update", **kwargs}
    return gr
