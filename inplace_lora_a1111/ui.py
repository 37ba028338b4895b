"""The "LoRA Trainer" tab: Gradio layout only (the behaviour is in `tab.py`).

Only idioms that Gradio 3.41 (A1111 1.10) and Gradio 4 (Forge) share: Blocks/Row/Column/Accordion,
plain components, `gr.update`, generator callbacks for live progress (the WebUI's queue is on), a
PIL image for the loss chart, and `Blocks.load` (as A1111's own Extensions tab uses it) so that a
reloaded page reattaches to a running job by itself. The same tab serves Forge and its forks
(forge_adapter.py trains there).
"""

from __future__ import annotations

from . import tab

ELEM = "inplace_lora"


def _component(gr, knob, value):
    label = knob.label
    if knob.kind == "bool":
        return gr.Checkbox(label=label, value=bool(value))
    if knob.kind == "choice":
        return gr.Dropdown(label=label, choices=list(knob.choices), value=value)
    if knob.kind == "slider":
        return gr.Slider(label=label, minimum=knob.minimum, maximum=knob.maximum, step=knob.step, value=value)
    if knob.kind in ("int", "number"):
        return gr.Number(label=label, value=value, precision=0 if knob.kind == "int" else None)
    return gr.Textbox(label=label, value=str(value or ""), lines=1, placeholder=knob.placeholder)


def build_tab():
    import gradio as gr

    with gr.Blocks(analytics_enabled=False) as block:
        with gr.Row():
            with gr.Column(scale=3):
                folder = gr.Textbox(label="Dataset folder (images with .txt captions)", elem_id=f"{ELEM}_folder",
                                    placeholder="/path/to/my_dataset")
                with gr.Row():
                    trigger = gr.Textbox(label="Trigger word (put first in every caption)", scale=2)
                    presets = tab.preset_names()
                    preset = gr.Dropdown(label="Preset", choices=presets, value=tab.DEFAULT, scale=1)
                with gr.Accordion("Captions and dataset check", open=False):
                    with gr.Row():
                        captioner = gr.Dropdown(label="Captioner", choices=_captioners(), value="template", scale=2)
                        refresh = gr.Button("Refresh list", scale=0)
                        mode = gr.Dropdown(label="Existing captions", choices=["skip", "overwrite", "append",
                                                                                 "prepend"], value="skip", scale=1)
                    with gr.Row():
                        caption_btn = gr.Button("Caption the folder")
                        check_btn = gr.Button("Check the dataset")
                    report = gr.Textbox(label="Report", lines=8, interactive=False)
                with gr.Accordion("Settings", open=True):
                    values = tab.knob_values(tab.DEFAULT)
                    knobs = []
                    for start in range(0, len(tab.KNOBS), 4):
                        with gr.Row():
                            for knob, value in zip(tab.KNOBS[start:start + 4], values[start:start + 4]):
                                knobs.append(_component(gr, knob, value))
                with gr.Accordion("Previews", open=False):
                    preview_prompt = gr.Textbox(label="Preview prompt (empty: the first caption)")
                    with gr.Row():
                        strengths = gr.Textbox(label="Strengths tried after training", value="0, 0.5, 0.8, 1")
                        preview_steps = gr.Number(label="Sampling steps", value=20, precision=0)
            with gr.Column(scale=2):
                with gr.Row():
                    train = gr.Button("Train", variant="primary", elem_id=f"{ELEM}_train")
                    resume = gr.Button("Resume", elem_id=f"{ELEM}_resume")
                    stop = gr.Button("Stop", elem_id=f"{ELEM}_stop")
                    watch = gr.Button("Show progress")
                status = gr.Markdown(tab.format_status({"status": "idle"}), elem_id=f"{ELEM}_status")
                # the chart draws its own title and axes; Gradio's label badge would cover the title
                chart = gr.Image(label="Loss", show_label=False, type="pil", interactive=False)
                gallery = gr.Gallery(label="Previews", columns=4, height="auto", elem_id=f"{ELEM}_gallery")

        live = [status, chart, gallery]
        form = [folder, trigger, preset, *knobs, preview_prompt, strengths, preview_steps]
        train.click(fn=tab.on_train, inputs=form, outputs=live)
        resume.click(fn=tab.on_resume, inputs=form, outputs=live)
        watch.click(fn=tab.on_watch, inputs=[], outputs=live)
        block.load(fn=tab.on_watch, inputs=[], outputs=live)  # a reloaded page shows the running job
        stop.click(fn=tab.on_stop, inputs=[], outputs=[status])
        preset.change(fn=tab.knob_values, inputs=[preset], outputs=knobs)
        caption_btn.click(fn=tab.on_caption, inputs=[folder, captioner, mode, trigger], outputs=[report])
        check_btn.click(fn=tab.on_check, inputs=[folder, trigger, preset, *knobs], outputs=[report])
        refresh.click(fn=lambda: gr.update(choices=_captioners()), inputs=[], outputs=[captioner])
    return block


def _captioners() -> list[str]:
    from .captioning import captioner_choices

    try:
        return captioner_choices()
    except Exception:  # a broken model folder must not take the tab down
        return ["template"]
