"""Captions from a template, for users with no captioning model.

`"a photo of {trigger}, {folder}"` fills in the trigger word, the image's folder name (a kohya
`10_sks_dog` folder reads as `sks dog`) and the file name (`{name}`: `red_car-2` reads as `red car 2`;
`{stem}` is the raw file stem). Placeholders that are empty leave no dangling commas behind. A
template that places `{trigger}` itself is not given a second copy of it in front.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from .tags import clean_caption

FIELDS = ("trigger", "folder", "name", "stem")
DEFAULT_TEMPLATE = "a photo of {trigger}, {folder}"


def folder_words(folder: str) -> str:
    """`10_sks_dog` -> `sks dog`: the kohya repeat count dropped, underscores read as spaces."""
    match = re.match(r"^\d+_(.*)$", folder)
    return (match.group(1) if match else folder).replace("_", " ").strip()


def name_words(stem: str) -> str:
    """`red_car-02` -> `red car 02`."""
    return re.sub(r"[\s_\-.]+", " ", stem).strip()


class TemplateCaptioner:
    """Fills a template per image; needs no model and no pixels."""

    kind = "template"
    needs_images = False
    batch_size = 64

    def __init__(self, template: str = DEFAULT_TEMPLATE, *, trigger: str = ""):
        self.template, self.trigger = template, trigger.strip()
        self.name = "template"
        self.warnings: list[str] = []
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as exc:
            raise UserError(f"caption template {template!r} is malformed ({exc}); write fields as "
                            f"{{trigger}}, {{folder}}, {{name}} or {{stem}}.") from None
        unknown = used - set(FIELDS)
        if unknown:
            raise UserError(f"caption template {template!r} uses unknown field(s) "
                            f"{', '.join('{' + u + '}' for u in sorted(unknown))}; allowed: "
                            f"{', '.join('{' + f + '}' for f in FIELDS)}.")
        self.uses_trigger = "trigger" in used

    def fill(self, path: Path) -> str:
        folder = folder_words(path.parent.name)
        if self.trigger and folder.lower() == self.trigger.lower():
            folder = ""  # a kohya `10_sks` folder named after the trigger would only repeat it
        text = self.template.format(trigger=self.trigger, folder=folder,
                                    name=name_words(path.stem), stem=path.stem)
        return clean_caption(re.sub(r"\s+", " ", text))

    def caption(self, images: Sequence, paths: Sequence[Path] | None = None) -> list[str]:
        if paths is None:
            raise ValueError("the template captioner needs the image paths")
        return [self.fill(Path(p)) for p in paths]
