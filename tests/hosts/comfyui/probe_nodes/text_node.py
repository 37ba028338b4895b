"""The shape every probe node here shares: an output node that always runs, takes an optional
`after` link of any type (to order it after another node), and shows a JSON text."""
import json


class TextProbe:
    CATEGORY = "testing"
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)

    @classmethod
    def VALIDATE_INPUTS(cls, input_types=None):
        return True

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    @staticmethod
    def shown(out):
        text = json.dumps(out, sort_keys=True)
        return {"ui": {"text": [text]}, "result": (text,)}
