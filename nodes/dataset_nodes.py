"""Load Dataset and Auto Caption: a folder of images becomes a dataset the trainer reads.

Load Dataset checks the folder the way training will read it (engine.check: sizes, buckets,
duplicates, captions) and shows thumbnails, so problems surface before a long run. Auto Caption
captions the images with the template captioner or a model the user keeps in `models/wd14_tagger` or
`models/captioners`, either into sidecar .txt files or into a metadata file in ComfyUI's temp folder
that only this dataset value points at (the user's folder is then left untouched).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from comfy_api.v0_0_2 import io, ui

from ..engine.errors import DatasetError, UserError
from .io_types import CATEGORY, Dataset
from .values import DatasetSpec

CAPTION_SOURCES = {
    "auto": (".txt", False),  # metadata.jsonl/csv if present, else sidecar .txt, else the N_name folder
    ".caption files": (".caption", False),
    "metadata file": (".txt", True),
}
THUMBS, THUMB_SIZE = 16, 128
CAPTIONER_FOLDERS = ("wd14_tagger", "captioners")


def resolve_folder(text: str, what: str = "dataset folder") -> Path:
    """An absolute folder, or one relative to ComfyUI's input folder; a DatasetError says where we looked."""
    import folder_paths

    raw = str(text or "").strip().strip('"').strip("'")
    input_dir = Path(folder_paths.get_input_directory())
    if not raw:
        raise DatasetError(f"the {what} is empty: type a folder inside ComfyUI's input folder ({input_dir}), "
                           f"e.g. my_dataset, or an absolute path.")
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = input_dir / path
    if not path.is_dir():
        hint = "it is a file, not a folder" if path.exists() else "it does not exist"
        raise DatasetError(f"the {what} '{raw}' was not found ({path}: {hint}). Give an absolute path, or a "
                           f"folder inside ComfyUI's input folder ({input_dir}).")
    return path


def folder_signature(folder: str) -> str:
    """Changes whenever a file in the folder (or a kohya subfolder) is added, removed or edited."""
    h = hashlib.sha1(str(folder).encode())
    try:
        root = resolve_folder(folder)
    except UserError:
        return f"missing:{folder}:{time.time()}"
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"{dirpath}/{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def thumbnails(paths: list[Path]):
    """Up to THUMBS images letterboxed into THUMB_SIZE squares, as an IMAGE batch."""
    from PIL import Image

    from ..engine.data import load_image
    from .plot import pil_to_image_tensor

    tiles = []
    for p in paths[:THUMBS]:
        try:
            img = load_image(p)
        except UserError:
            continue
        img.thumbnail((THUMB_SIZE, THUMB_SIZE))
        tile = Image.new("RGB", (THUMB_SIZE, THUMB_SIZE), (32, 32, 32))
        tile.paste(img, ((THUMB_SIZE - img.width) // 2, (THUMB_SIZE - img.height) // 2))
        tiles.append(tile)
    return pil_to_image_tensor(tiles or [Image.new("RGB", (THUMB_SIZE, THUMB_SIZE))])


def with_bad_files(message: str, root: Path) -> str:
    """An error message plus every image file under `root` (and its subfolders) that cannot be read and
    that the message does not name already (each file is named once)."""
    from ..engine.data.images import describe_skipped, relative_name, scan_images

    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    skipped = [bad for folder in folders for bad in scan_images(folder)[1]
               if relative_name(bad[0], root) not in message]
    return f"{message} Also: {describe_skipped(skipped, root)}." if skipped else message


# LoRA Trainer inputs that decide the step plan -> their config field
_PLAN_INPUTS = {"steps": "max_train_steps", "epochs": "epochs", "batch_size": "batch_size",
                "grad_accumulation": "gradient_accumulation_steps"}


def trainer_plan(prompt: dict | None, node_id) -> dict:
    """The plan settings (as config fields) of the LoRA Trainer this dataset feeds, directly or through
    nodes that pass the dataset on (Auto Caption); {} when there is none or its values are links."""
    if not prompt or node_id is None:
        return {}
    frontier, seen = [str(node_id)], set()
    while frontier:
        source = frontier.pop(0)
        seen.add(source)
        for nid, node in prompt.items():
            link = node.get("inputs", {}).get("dataset")
            if not (isinstance(link, list) and link and str(link[0]) == source) or str(nid) in seen:
                continue
            if node.get("class_type") == "InplaceLoRA_Trainer":
                inputs = node["inputs"]
                return {field: inputs[name] for name, field in _PLAN_INPUTS.items()
                        if isinstance(inputs.get(name), int) and not isinstance(inputs.get(name), bool)}
            frontier.append(str(nid))
    return {}


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


class LoadDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InplaceLoRA_LoadDataset", display_name="Load Dataset", category=CATEGORY,
            description="A folder of training images (flat, or kohya 'N_name' subfolders) with their captions.",
            inputs=[
                io.String.Input("folder", default="", tooltip="Folder inside ComfyUI's input folder (e.g. "
                                "my_dataset) or an absolute path."),
                io.Combo.Input("caption_source", options=list(CAPTION_SOURCES), default="auto",
                               tooltip="auto: metadata.jsonl/csv in the folder, else <image>.txt, else the "
                               "name of a kohya 'N_name' folder. '.caption files' reads <image>.caption. "
                               "'metadata file' requires metadata.jsonl or metadata.csv."),
                io.Int.Input("repeats", default=1, min=1, max=1000, tooltip="Repeats per epoch for a flat "
                             "folder (kohya 'N_name' folders set their own)."),
                io.String.Input("resolution", default="auto", tooltip="auto (512 for SD1/SD2, 1024 for "
                                "SDXL), 512, 768, 1024, or width,height such as 768,512."),
                io.Boolean.Input("buckets", default=True, tooltip="Aspect-ratio buckets instead of square crops."),
                io.String.Input("trigger_word", default="", tooltip="Put first in every caption."),
                io.String.Input("reg_folder", default="", optional=True,
                                tooltip="Optional regularisation (class) images, same rules as folder."),
            ],
            outputs=[Dataset.Output(display_name="DATASET"),
                     io.Image.Output(display_name="thumbnails"),
                     io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, folder=None):
        # ComfyUI attaches what this returns to every input named in the signature: only `folder` is
        # checked here, so its message is on `folder`; a bad `resolution` is refused when the node runs,
        # with a message that names it.
        try:
            if folder is not None:
                resolve_folder(folder)
        except UserError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, caption_source, repeats, resolution, buckets, trigger_word, reg_folder=""):
        return (folder_signature(folder), folder_signature(reg_folder) if reg_folder else "",
                caption_source, repeats, resolution, buckets, trigger_word)

    @classmethod
    def execute(cls, folder, caption_source, repeats, resolution, buckets, trigger_word, reg_folder=""):
        from ..engine.check import check_dataset
        from ..engine.config import TrainConfig
        from ..engine.data import find_metadata, scan_dataset

        root = resolve_folder(folder)
        TrainConfig.from_dict({"resolution": str(resolution).strip() or "auto"}, source="Load Dataset")  # says what is wrong
        reg = str(resolve_folder(reg_folder, "regularisation folder")) if str(reg_folder or "").strip() else ""
        extension, need_metadata = CAPTION_SOURCES[caption_source]
        if need_metadata and find_metadata(root) is None:
            raise DatasetError(f"caption_source is 'metadata file', but '{root}' has no metadata.jsonl or "
                               f"metadata.csv. Add one (file_name,text) or pick 'auto'.")
        spec = DatasetSpec(folder=str(root), repeats=repeats, resolution=str(resolution).strip() or "auto",
                           enable_bucket=buckets, trigger_word=trigger_word.strip(), caption_extension=extension,
                           reg_folder=reg)
        plan = trainer_plan(cls.hidden.prompt, cls.hidden.unique_id)
        cfg = TrainConfig.from_dict({**spec.config_values(), **plan}, source="Load Dataset")
        try:
            report = check_dataset(cfg)
        except DatasetError as exc:
            raise DatasetError(with_bad_files(str(exc), root)) from None
        if plan:
            report.plan_source = "the steps, epochs and batch size set on the LoRA Trainer"
        scan = scan_dataset(root, repeats=repeats, caption_extension=extension)
        records = scan.records
        captions = tuple((_relative(r.path, root), r.caption) for r in records)
        spec = spec.with_captions(image_count=len(records), report=report.to_text(), captions=captions)
        return io.NodeOutput(spec, thumbnails([r.path for r in records]), spec.report,
                             ui=ui.PreviewText(spec.report))


def captioner_folders() -> list[str]:
    import folder_paths

    out = []
    for name in CAPTIONER_FOLDERS:
        try:
            out += folder_paths.get_folder_paths(name)
        except KeyError:
            pass
    return out


def captioner_choices() -> list[str]:
    from ..engine.caption import find_captioner_models

    return ["template"] + sorted({m.name for m in find_captioner_models(captioner_folders())})


class AutoCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..engine.caption import DEFAULT_TEMPLATE, MODES

        return io.Schema(
            node_id="InplaceLoRA_AutoCaption", display_name="Auto Caption", category=CATEGORY,
            description="Caption the dataset's images: a template, or a WD14 tagger / image-to-text model "
                        "from models/wd14_tagger or models/captioners.",
            inputs=[
                Dataset.Input("dataset"),
                io.Combo.Input("captioner", options=captioner_choices(), default="template"),
                io.String.Input("template", default=DEFAULT_TEMPLATE, tooltip="For the template captioner: "
                                "{trigger}, {folder}, {name} (file name as words), {stem}."),
                io.Combo.Input("mode", options=list(MODES), default="skip", tooltip="skip: keep captions "
                               "that exist; overwrite; append / prepend to the existing caption."),
                io.Boolean.Input("write_txt_files", default=False, tooltip="Write <image>.txt beside each "
                                 "image (old files kept as .bak). Off: the captions live only in this "
                                 "dataset value (a metadata file in ComfyUI's temp folder)."),
                io.Float.Input("tag_threshold", default=0.35, min=0.0, max=1.0, step=0.01,
                               tooltip="WD14 taggers: minimum tag probability."),
            ],
            outputs=[Dataset.Output(display_name="DATASET"), io.String.Output(display_name="captions")],
        )

    @classmethod
    def execute(cls, dataset: DatasetSpec, captioner, template, mode, write_txt_files, tag_threshold):
        import comfy.utils
        import folder_paths

        from ..engine.caption import CaptionOptions, TagOptions, caption_dataset, load_captioner
        from .progress import check_interrupt

        model = load_captioner(captioner, captioner_folders(), template=template, trigger=dataset.trigger_word,
                               tag_options=TagOptions(general_threshold=tag_threshold))
        target = "txt"
        if not write_txt_files:
            key = hashlib.sha1(f"{dataset.folder}|{captioner}|{template}|{mode}|{time.time()}".encode()).hexdigest()
            folder = Path(folder_paths.get_temp_directory()) / "inplace_lora"
            folder.mkdir(parents=True, exist_ok=True)
            target = str(folder / f"captions_{key[:12]}.jsonl")
        bar = comfy.utils.ProgressBar(max(dataset.image_count, 1))

        def progress(done, total, _path):
            bar.update_absolute(done, total)
            check_interrupt()

        options = CaptionOptions(mode=mode, trigger=dataset.trigger_word, output=target,
                                 caption_extension=dataset.caption_extension, metadata_path=dataset.metadata_path)
        result = caption_dataset(dataset.folder, model, options, progress=progress)
        root = Path(dataset.folder)
        captions = tuple((_relative(e.path, root), e.caption) for e in result.entries if e.status != "failed")
        metadata = target if not write_txt_files and Path(target).is_file() else dataset.metadata_path
        spec = dataset.with_captions(captions=captions, metadata_path=metadata)
        listing = "\n".join(f"{name}: {text}" for name, text in captions[:50])
        more = f"\n... and {len(captions) - 50} more" if len(captions) > 50 else ""
        text = f"{result.summary()}\n\n{listing}{more}"
        return io.NodeOutput(spec, text, ui=ui.PreviewText(text))
