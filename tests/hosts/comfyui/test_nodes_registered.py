"""ComfyUI loads the pack cleanly: the nodes with their inputs, the web extension, the history route."""
import re

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
    assert info["SaveLoRA"]["category"] != "LoRA Trainer", "ComfyUI's own SaveLoRA must stay as it is"


def test_the_pack_imports_without_errors(comfy_server):
    log = comfy_server.log_text()
    ours = [line for line in log.splitlines() if "inplace-lora-trainer" in line or "inplace_lora" in line]
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
