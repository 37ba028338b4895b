"""The ComfyUI node's live chart gets the validation loss: a real tiny run with validation on sends the
browser (and keeps for GET /inplace_lora/history) the (step, loss) pairs at the validation steps, and
web/inplace_lora.js draws them; without validation the messages are what they were. ComfyUI's modules
that nodes/progress.py touches (the progress bar, the interrupt check, the server's send_sync) are
stand-ins here that record what they are given; tests/hosts/comfyui runs the real server."""

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from inplace_lora_pack.engine.config import TrainConfig
from inplace_lora_pack.engine.demo import write_dataset
from inplace_lora_pack.engine.models import tiny_sd1
from inplace_lora_pack.engine.train import train
from inplace_lora_pack.nodes import progress

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sent(monkeypatch):
    """The messages the node would send the browser, with ComfyUI's bar and interrupt check stood in."""
    messages = []
    comfy = types.ModuleType("comfy")
    comfy.utils = types.SimpleNamespace(ProgressBar=lambda total, node_id=None: types.SimpleNamespace(
        update_absolute=lambda *a: None))
    comfy.model_management = types.SimpleNamespace(throw_exception_if_processing_interrupted=lambda: None)
    server = types.ModuleType("server")
    server.PromptServer = types.SimpleNamespace(instance=types.SimpleNamespace(
        send_sync=lambda event, data: messages.append(json.loads(json.dumps(data))), last_prompt_id="p1"))
    for name, module in {"comfy": comfy, "comfy.utils": comfy.utils, "comfy.model_management":
                         comfy.model_management, "server": server}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return messages


def _run(tmp_path, node_id, **changes):
    cfg = TrainConfig(train_data_dir=str(write_dataset(tmp_path / "data", n=5)), output_dir=str(tmp_path / "out"),
                      output_name="chart", resolution="64", batch_size=2, max_train_steps=4, learning_rate=1e-3,
                      save_every_n_epochs=0, save_precision="fp32", **changes)
    node = progress.NodeProgress(node_id, "chart", run_folder=tmp_path / "out")
    result = train(cfg, tiny_sd1(), callbacks=[node])
    return result, progress.history(node_id)


def test_a_run_with_validation_sends_the_validation_series(sent, tmp_path):
    result, run = _run(tmp_path, "n1", validation_split=0.4, validate_every_n_steps=2, validate_every_n_epochs=0)
    assert [s for s, _ in result.validation] == [2, 4]
    expected = [[s, v] for s, v in result.validation]
    assert run["validation"] == expected  # what GET /inplace_lora/history gives a reloaded page
    assert sent[-1]["validation"] == expected and sent[-1]["status"] == "done"
    first_with_points = next(m for m in sent if m["validation"])
    assert first_with_points["validation"] == expected[:1] and first_with_points["step"] == 2
    assert [p[0] for p in run["points"]] == [1, 2, 3, 4]  # the training loss series is unchanged


def test_without_validation_the_messages_carry_no_validation_points(sent, tmp_path):
    result, run = _run(tmp_path, "n2")
    assert result.validation == [] and run["validation"] == []
    assert all(m["validation"] == [] for m in sent) and [p[0] for p in run["points"]] == [1, 2, 3, 4]


def test_a_resumed_run_keeps_the_validation_points_before_its_checkpoint(sent, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    node = progress.NodeProgress("n3", "chart", run_folder=folder)
    node.on_event(progress.TrainEvent("start", total_steps=10))
    node.on_event(progress.TrainEvent("step", step=2, total_steps=10, lr=1e-3, loss=0.5, losses=[(1, 0.6), (2, 0.5)]))
    node.on_event(progress.TrainEvent("validation", step=2, loss=0.4, losses=[(2, 0.4)]))
    node.on_event(progress.TrainEvent("checkpoint", step=2, path=str(folder / "ck")))
    node.on_event(progress.TrainEvent("validation", step=3, loss=0.3, losses=[(2, 0.4), (3, 0.3)]))  # after it
    resumed = progress.NodeProgress("n3", "chart", run_folder=folder)
    resumed.on_event(progress.TrainEvent("start", step=2, total_steps=10))
    resumed.on_event(progress.TrainEvent("validation", step=4, loss=0.2, losses=[(4, 0.2)]))
    assert progress.history("n3")["validation"] == [[2, 0.4], [4, 0.2]]
    (folder / progress.HISTORY_FILE).write_text(json.dumps([[1, 0.6, 1e-3]]), encoding="utf-8")  # an older file
    older = progress.NodeProgress("n4", "chart", run_folder=folder)
    older.on_event(progress.TrainEvent("start", step=2, total_steps=10))
    assert progress.history("n4")["points"] == [[1, 0.6, 1e-3]] and progress.history("n4")["validation"] == []


DRIVER = """
import { app, api, drawn } from "./scripts/stub.js";
await import("./extensions/pack/inplace_lora.js");
const node = {id: 7, comfyClass: "InplaceLoRA_Trainer", size: [400, 300], computeSize: () => [400, 300],
              setSize() {}, addDOMWidget: () => ({})};
app.extension.nodeCreated(node);
for (const detail of JSON.parse(process.argv[2])) api.listener({detail});
console.log(JSON.stringify(drawn));
"""

STUB = """
export const drawn = [];
export const app = {registerExtension(e) { app.extension = e; }};
export const api = {addEventListener(name, f) { api.listener = f; }, apiURL: (u) => u, fetchApi: async () => ({ok: false})};
const ctx = new Proxy({}, {get(target, key) {
  if (key === "clearRect") return () => drawn.push([]);  // a new frame
  if (key === "measureText") return (text) => ({width: 6 * text.length});
  if (key === "arc") return (x, y) => drawn[drawn.length - 1].push({color: target.fillStyle, x, y});
  return key in target ? target[key] : () => {};
}, set(target, key, value) { target[key] = value; return true; }});
const element = () => ({style: {}, dataset: {}, append() {}, getContext: () => ctx, clientWidth: 300});
globalThis.window = {};
globalThis.document = {createElement: element};
globalThis.requestAnimationFrame = (f) => f();
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run web/inplace_lora.js")
def test_the_web_chart_draws_the_validation_points(sent, tmp_path):
    """web/inplace_lora.js, fed the run's messages, draws one green point per validation step, left to right
    in step order, and none for a run without validation (a canvas stand-in records the calls)."""
    _run(tmp_path / "a", "n5", validation_split=0.4, validate_every_n_steps=2, validate_every_n_epochs=0)
    with_validation = list(sent)
    sent.clear()
    _run(tmp_path / "b", "n6")
    site = tmp_path / "site"
    (site / "extensions" / "pack").mkdir(parents=True)
    (site / "scripts").mkdir()
    shutil.copy(ROOT / "web" / "inplace_lora.js", site / "extensions" / "pack")
    (site / "scripts" / "stub.js").write_text(STUB, encoding="utf-8")
    for name in ("app", "api"):
        (site / "scripts" / f"{name}.js").write_text(f'export {{ {name} }} from "./stub.js";\n', encoding="utf-8")
    (site / "driver.mjs").write_text(DRIVER, encoding="utf-8")
    (site / "package.json").write_text('{"type": "module"}', encoding="utf-8")

    def arcs(messages) -> list[list[dict]]:
        for m in messages:
            m["node"] = 7
        out = subprocess.run(["node", str(site / "driver.mjs"), json.dumps(messages)], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    frames = arcs(with_validation)
    last = frames[-1]  # the final redraw: one point per validation step
    assert len(last) == 2 and {p["color"] for p in last} == {"#3cc864"} and last[0]["x"] < last[1]["x"]
    assert max(len(f) for f in frames) == 2 and any(len(f) == 1 for f in frames)  # a point appears per validation
    assert all(f == [] for f in arcs(sent))
