"""A stand-in for the parts of the A1111 WebUI the extension touches, for CI (no WebUI there).

`install(monkeypatch, root)` puts fake `modules.*`, `networks` (the built-in Lora extension) and
`launch` modules into sys.modules. They keep A1111's names and behaviours that matter to the
extension: `shared.opts.data` options, `shared.state` progress fields and `interrupt()`, the queue
lock, `StableDiffusionProcessing.cached_c`, `process_images` rendering with whatever model is
loaded, `sd_models.model_data.sd_model`, and a networks module that records un-merge and refresh.
`install_safe_loading` replaces torch.load as A1111's `modules/safe.py` does (on unless the WebUI
runs with --disable-safe-unpickle). The models themselves are in `fake_models.py`.
"""

from __future__ import annotations

import pickle
import re
import sys
import threading
import types
import zipfile
from pathlib import Path
from types import SimpleNamespace

import torch


class Opts:
    """Like A1111's Options: values live in `.data`, read as attributes."""

    def __init__(self, **data):
        self.__dict__["data"] = dict(data)

    def __getattr__(self, key):
        try:
            return self.data[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        raise AssertionError("the extension must not save settings (use opts.data in memory)")


class State:
    def __init__(self):
        self.job, self.job_no, self.job_count, self.textinfo = "", 0, 0, None
        self.interrupted, self.current_image, self.sampling_step = False, None, 0
        self.begun: list[str] = []
        self.ended = 0
        self.textinfos: list[str] = []

    def __setattr__(self, key, value):
        if key == "textinfo" and value:
            self.__dict__.setdefault("textinfos", []).append(value)
        self.__dict__[key] = value

    def begin(self, job="(unknown)"):
        self.job, self.job_count, self.job_no, self.interrupted = job, -1, 0, False
        self.begun.append(job)

    def end(self):
        self.job, self.job_count = "", 0
        self.ended += 1

    def interrupt(self):
        self.interrupted = True

    def assign_current_image(self, image):
        self.current_image = image


class Processed:
    def __init__(self, images, infotexts):
        self.images, self.infotexts = images, infotexts


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def make_modules(root: Path) -> dict[str, types.ModuleType]:
    shared = _module("modules.shared", sd_model=None, state=State(),
                     opts=Opts(emphasis="Original", CLIP_stop_at_last_layers=1),
                     cmd_opts=SimpleNamespace(lowvram=False, medvram=False, medvram_sdxl=False,
                                              lora_dir=str(root / "models" / "Lora")))
    devices = _module("modules.devices", device=torch.device("cpu"), dtype_unet=torch.float32,
                      dtype_vae=torch.float32, fp8=False)
    call_queue = _module("modules.call_queue", queue_lock=threading.Lock())
    paths_internal = _module("modules.paths_internal", models_path=str(root / "models"),
                             default_output_dir=str(root / "outputs"))
    sd_models = _module("modules.sd_models", model_data=SimpleNamespace(sd_model=None))
    prompt_parser = _module("modules.prompt_parser", SdConditioning=SdConditioning)
    sd_hijack = _module("modules.sd_hijack", model_hijack=SimpleNamespace(extra_generation_params={}, comments=[]))
    callbacks = _module("modules.script_callbacks", ui_tabs=[], app_started=[])
    callbacks.on_ui_tabs = callbacks.ui_tabs.append
    callbacks.on_app_started = callbacks.app_started.append
    lowvram = _module("modules.lowvram", send_everything_to_cpu=lambda: None)
    sd_unet = _module("modules.sd_unet", current_unet=None)

    class StableDiffusionProcessing:
        cached_c = ["stale", "stale"]
        cached_uc = ["stale", "stale"]

    class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)
            self.closed = False

        def close(self):
            self.closed = True

    prompts: list[str] = []

    def process_images(p):
        prompts.append(p.prompt)
        model = shared.sd_model
        image = model.render(p.prompt, seed=p.seed, width=p.width, height=p.height)
        return Processed([image], [f"{p.prompt}\nSteps: {p.steps}, Seed: {p.seed}"])

    processing = _module("modules.processing", StableDiffusionProcessing=StableDiffusionProcessing,
                         StableDiffusionProcessingTxt2Img=StableDiffusionProcessingTxt2Img,
                         process_images=process_images, prompts=prompts)
    package = _module("modules")
    package.__path__ = []
    mods = {"modules": package}
    for m in (shared, devices, call_queue, paths_internal, sd_models, prompt_parser, sd_hijack, callbacks,
              lowvram, sd_unet, processing):
        mods[m.__name__] = m
        setattr(package, m.__name__.split(".")[1], m)
    mods["networks"] = make_networks()
    return mods


class SdConditioning(list):
    def __init__(self, prompts, width=1024, height=1024):
        super().__init__(prompts)
        self.width, self.height = width, height


def make_networks() -> types.ModuleType:
    net = _module("networks", loaded_networks=[], restored=[], reset=[], refreshed=[0])

    def network_restore_weights_from_backup(module):
        backup = getattr(module, "network_weights_backup", None)
        if backup is not None:
            with torch.no_grad():
                module.weight.copy_(backup)
            net.restored.append(module)

    def network_reset_cached_weight(module):
        module.network_current_names = ()
        module.network_weights_backup = None
        net.reset.append(module)

    def list_available_networks():
        net.refreshed[0] += 1

    net.network_restore_weights_from_backup = network_restore_weights_from_backup
    net.network_reset_cached_weight = network_reset_cached_weight
    net.list_available_networks = list_available_networks
    return net


def install(monkeypatch, root: Path) -> SimpleNamespace:
    """Install the fake WebUI; returns its modules by short name (shared, processing, networks, ...)."""
    mods = make_modules(root)
    for name, module in mods.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "modules_forge", raising=False)
    return SimpleNamespace(**{name.split(".")[-1]: module for name, module in mods.items()})


def load_model(webui: SimpleNamespace, model) -> None:
    """What A1111 does when a checkpoint is loaded: shared.sd_model and model_data point at it."""
    webui.shared.sd_model = model
    webui.sd_models.model_data.sd_model = model


def quick_request(folder: Path, **changes) -> dict:
    request = {"train_data_dir": str(folder), "output_name": "tiny", "resolution": "64", "max_train_steps": 3,
               "batch_size": 2, "lora_rank": 4, "learning_rate": 1e-3, "save_every_n_epochs": 0,
               "save_precision": "fp32", "preview_strengths": [0, 0.8], "preview_steps": 2}
    request.update(changes)
    return request


# --- A1111's safe loading (modules/safe.py, v1.10.1), rebuilt from its behaviour ------------------------
# Before torch.load reads a file, A1111 checks the zip's entry names and unpickles data.pkl with an
# allowlist of globals; a file that fails either check is reported and torch.load returns None.
_SAFE_ENTRY = re.compile(r"^[^/]+/(data\.pkl|version|byteorder|\.data/serialization_id|data/\d+)$")
_SAFE_GLOBALS = {
    "collections": {"OrderedDict"},
    "torch._utils": {"_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy"},
    "torch": {"FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage", "ByteStorage",
              "float32", "BFloat16Storage"},
    "torch.nn.modules.container": {"ParameterDict"},
    "numpy.core.multiarray": {"scalar", "_reconstruct"},
    "numpy": {"dtype", "ndarray"},
    "_codecs": {"encode"},
    "__builtin__": {"set"},
}


class _CheckingUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in _SAFE_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")

    def persistent_load(self, saved_id):
        return torch.storage.TypedStorage(_internal=True)  # storages are not read during the check


def install_safe_loading(monkeypatch, webui: SimpleNamespace) -> list[str]:
    """torch.load as A1111 patches it; returns the list of refusals it reported."""
    original = torch.load
    refused: list[str] = []
    webui.shared.cmd_opts.disable_safe_unpickle = False

    def check(filename):
        with zipfile.ZipFile(filename) as archive:
            names = archive.namelist()
            bad = [n for n in names if not _SAFE_ENTRY.match(n)]
            if bad:
                raise ValueError(f"bad file inside {filename}: {bad[0]}")
            with archive.open(next(n for n in names if n.endswith("/data.pkl"))) as fh:
                _CheckingUnpickler(fh).load()

    def safe_load(filename, *args, **kwargs):
        if not webui.shared.cmd_opts.disable_safe_unpickle:
            try:
                check(filename)
            except Exception as exc:
                refused.append(f"Error verifying pickled file from {filename}: {exc}")
                return None
        return original(filename, *args, **kwargs)

    monkeypatch.setattr(torch, "load", safe_load)
    return refused


def stop_training_at(monkeypatch, webui: SimpleNamespace, step: int):
    """Press the WebUI's Interrupt once training reports `step`; returns a function that stops doing so."""
    from inplace_lora_a1111.job import TrainJob

    original = TrainJob.on_event

    def on_event(self, event):
        original(self, event)
        if event.kind == "step" and event.step == step:
            webui.shared.state.interrupt()

    monkeypatch.setattr(TrainJob, "on_event", on_event)
    return lambda: monkeypatch.setattr(TrainJob, "on_event", original)
