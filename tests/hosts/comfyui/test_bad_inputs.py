"""Bad input through the graph gets a ComfyUI error that says what to fix, and writes nothing
(models/loras, output/ and input/ are compared file by file before and after)."""
import json
import os

import pytest

from comfy_workflows import STYLE, cpu_sized, load_api, make_images, one


def snapshot(server):
    files = {}
    for top in ("models", "output", "input"):
        for dirpath, _, names in os.walk(server.path(top)):
            for name in names:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                files[os.path.relpath(p, server.base_dir)] = (st.st_size, st.st_mtime_ns)
    return files


def rejected(server, graph):
    """The /prompt validation error text, or None when the prompt was queued."""
    try:
        pid = server.post_prompt(graph)
    except Exception as exc:  # PromptRejected of the conftest-loaded module
        if type(exc).__name__ != "PromptRejected":
            raise
        return json.dumps(exc.body)
    entry = server.wait(pid, timeout=600)
    error = server.status_events(entry).get("execution_error")
    assert error is not None, f"expected an error, got {entry['status']}"
    return error["exception_message"]


@pytest.fixture(scope="module")
def style_graph(comfy_server):
    make_images(comfy_server.path("input", "style_ds"))
    g = cpu_sized(load_api(STYLE), comfy_server.checkpoint, "style_ds", name="bad_input_test")
    return {k: v for k, v in g.items() if v["class_type"] in (
        "CheckpointLoaderSimple", "InplaceLoRA_LoadDataset", "InplaceLoRA_Trainer", "InplaceLoRA_SaveLoRA")}


def with_inputs(graph, class_type, **inputs):
    g = json.loads(json.dumps(graph))
    g[one(g, class_type)]["inputs"].update(inputs)
    return g


def test_missing_folder_is_refused_at_queue_time(comfy_server, style_graph):
    before = snapshot(comfy_server)
    msg = rejected(comfy_server, with_inputs(style_graph, "InplaceLoRA_LoadDataset", folder="no_such_folder"))
    assert "no_such_folder" in msg and "was not found" in msg and "input folder" in msg, msg
    assert snapshot(comfy_server) == before


def test_a_validation_message_is_attached_to_the_input_it_is_about(comfy_server, style_graph):
    graph = with_inputs(style_graph, "InplaceLoRA_LoadDataset", folder="no_such_folder")
    with pytest.raises(Exception) as rejection:
        comfy_server.post_prompt(graph)
    node = one(graph, "InplaceLoRA_LoadDataset")
    errors = rejection.value.body["node_errors"][node]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == ["folder"], errors
    msg = rejected(comfy_server, with_inputs(style_graph, "InplaceLoRA_LoadDataset", resolution="big"))
    assert "resolution must be a size like 512" in msg and "'big'" in msg and "was not found" not in msg, msg


def test_folder_without_images_lists_what_it_found(comfy_server, style_graph):
    folder = comfy_server.path("input", "only_text")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not an image")
    before = snapshot(comfy_server)
    msg = rejected(comfy_server, with_inputs(style_graph, "InplaceLoRA_LoadDataset", folder="only_text"))
    assert "No training images" in msg and "1 file (.txt" in msg, msg
    assert snapshot(comfy_server) == before


def test_unreadable_images_are_named_in_the_error(comfy_server, style_graph):
    folder = comfy_server.path("input", "broken_only")
    os.makedirs(folder, exist_ok=True)
    for name in ("broken.png", "half.jpg"):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"\x89PNG not really an image")
    before = snapshot(comfy_server)
    msg = rejected(comfy_server, with_inputs(style_graph, "InplaceLoRA_LoadDataset", folder="broken_only"))
    assert msg.count("broken.png") == 1 and msg.count("half.jpg") == 1, msg
    assert "warning" not in msg.lower(), msg
    assert snapshot(comfy_server) == before


def test_sdxl_resolution_on_an_sd15_model_says_what_to_change(comfy_server, style_graph):
    before = snapshot(comfy_server)
    msg = rejected(comfy_server, with_inputs(style_graph, "InplaceLoRA_LoadDataset", resolution="1024"))
    assert "SDXL" in msg and "SD1.x" in msg and "512" in msg, msg
    assert snapshot(comfy_server) == before


@pytest.mark.parametrize("name", ["../escaped", "styles/../../escaped", "/tmp/escaped"])
def test_lora_name_leaving_models_loras_is_refused(comfy_server, style_graph, name):
    before = snapshot(comfy_server)
    msg = rejected(comfy_server, with_inputs(style_graph, "InplaceLoRA_SaveLoRA", name=name))
    assert "models/loras" in msg and ("'..'" in msg or "absolute path" in msg), msg
    assert snapshot(comfy_server) == before
