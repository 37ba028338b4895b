"""ComfyUI loads the pack cleanly: the nodes with their inputs, the web extension, the history route."""
import re
import sys

NODES = {
    "InplaceLoRA_LoadDataset": ("Load Dataset", ["folder", "caption_source", "repeats", "resolution", "trigger_word"]),
    "InplaceLoRA_AutoCaption": ("Auto Caption", ["dataset", "captioner", "template", "mode", "write_txt_files"]),
    "InplaceLoRA_Trainer": ("LoRA Trainer", ["model", "clip", "vae", "dataset", "rank", "alpha", "learning_rate",
                                             "steps", "epochs", "batch_size", "grad_accumulation", "optimizer",
                                             "scheduler", "precision", "gradient_checkpointing",
                                             "train_text_encoder", "seed", "preview_prompt",
                                             "preview_every_n_steps", "resume"]),
    "InplaceLoRA_SaveLoRA": ("Save LoRA (kohya)", ["lora", "name", "overwrite"]),
    "InplaceLoRA_PreviewStrengths": ("Preview LoRA Strengths", ["model", "clip", "vae", "lora", "prompt",
                                                                "strengths", "seed", "steps", "cfg",
                                                                "sampler_name"]),
    "InplaceLoRA_LoadLoRA": ("Load LoRA for Training", ["lora_name"]),
}


def test_object_info_lists_every_node_with_its_inputs(comfy_server):
    info = comfy_server.object_info()
    for node_id, (display, inputs) in NODES.items():
        assert node_id in info, f"{node_id} missing; see {comfy_server.log_path}"
        spec = info[node_id]
        assert spec["display_name"] == display and spec["category"] == "LoRA Trainer"
        assert set(inputs) <= set(spec["input"]["required"]), set(inputs) - set(spec["input"]["required"])
    assert info["InplaceLoRA_Trainer"]["output"] == ["INPLACE_LORA", "MODEL", "CLIP", "IMAGE"]
    assert info["InplaceLoRA_Trainer"]["input"]["optional"]["init_lora"][0] == "INPLACE_LORA"
    assert info["InplaceLoRA_LoadDataset"]["output"] == ["INPLACE_DATASET", "IMAGE", "STRING"]
    assert info["InplaceLoRA_LoadDataset"]["input"]["optional"]["masks"][0] == "MASK"  # masked loss
    assert info["SaveLoRA"]["category"] != "LoRA Trainer", "ComfyUI's own SaveLoRA must stay as it is"


def test_the_pack_imports_without_errors(comfy_server):
    log = comfy_server.log_text()
    # Lines about our pack name its folder under custom_nodes/ or a file in this checkout; the cache
    # path of the test venv also contains the project name, so a bare name match is not enough.
    server_module = sys.modules[type(comfy_server).__module__]
    marks = (f"custom_nodes/{server_module.PACK_DIR_NAME}", "custom_nodes/inplace_lora", server_module.REPO_ROOT)
    ours = [line for line in log.splitlines() if any(mark in line for mark in marks)]
    assert not [line for line in ours if re.search(r"IMPORT FAILED|Cannot import|Traceback", line)], ours
    assert "Error while calling comfy_entrypoint" not in log


def test_web_extension_and_history_route_are_served(comfy_server):
    scripts = comfy_server.get_json("/extensions")
    ours = [s for s in scripts if s.startswith("/extensions/inplace-lora-trainer/")]
    assert ours == ["/extensions/inplace-lora-trainer/inplace_lora.js"], scripts
    js = comfy_server.get_bytes(ours[0]).decode()
    assert "inplace_lora.progress" in js and "/inplace_lora/history" in js
    assert isinstance(comfy_server.get_json("/inplace_lora/history"), dict)
    assert isinstance(comfy_server.get_json("/api/inplace_lora/history"), dict)


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def ui_to_api(ui, info):
    """What the frontend queues for a UI-format workflow: widget values in input order (a seed's
    'control after generate' value skipped), links as [source id, slot]."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        spec = info[node["type"]]["input"]
        ordered = list(spec.get("required", {}).items()) + list(spec.get("optional", {}).items())
        values = list(node.get("widgets_values") or [])
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for name, (kind, *rest) in ordered:
            options = rest[0] if rest else {}
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
            elif isinstance(kind, list) or kind in WIDGET_TYPES:
                if not values:
                    continue  # an optional widget the workflow leaves at its default
                inputs[name] = values.pop(0)
                if options.get("control_after_generate") or (kind == "INT" and name in ("seed", "noise_seed")
                                                             and options.get("control_after_generate") is not False):
                    values.pop(0)
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def test_ui_workflows_are_the_same_graphs_as_their_api_copies(comfy_server):
    import json
    import os

    from comfy_workflows import EXAMPLES

    info = comfy_server.object_info()
    names = sorted(f[: -len(".api.json")] for f in os.listdir(EXAMPLES) if f.endswith(".api.json"))
    assert names == ["caption_folder_then_train", "train_flux_lora", "train_style_lora_compare_strengths"]
    for name in names:
        with open(os.path.join(EXAMPLES, f"{name}.json"), encoding="utf-8") as f:
            ui = json.load(f)
        with open(os.path.join(EXAMPLES, f"{name}.api.json"), encoding="utf-8") as f:
            api = json.load(f)
        converted = ui_to_api(ui, info)
        assert converted == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}, name
