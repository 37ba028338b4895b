"""Text runs end to end on tiny models built in code: what a user would notice.

The loss falls and held-out perplexity drops; the adapter folder loads in PEFT and transformers and
gives the logits the trained model gave; a stopped run resumes tensor for tensor; the merged model is
the base with the adapter folded in; the command line does all of it from one YAML file.
"""

import json

import pytest
import torch
from safetensors import safe_open

from engine.__main__ import main
from engine.errors import TrainingStopped
from engine.events import Callbacks, FunctionCallback
from engine.text.config import TextConfig
from engine.text.tokenize import CHATML
from engine.text.train import TextTrainer, train_text

from compile_probe import GraphCounter
from text_fixtures import one_thread, save_tiny_model, toy_lines, write_lines

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny llama 小")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_lines(tmp_path_factory.mktemp("data") / "toy.txt", toy_lines(160, seed=1))


def _cfg(model, data, out, **changes):
    base = dict(base_model=str(model), train_data=str(data), output_dir=str(out), max_length=64, batch_size=2,
                max_train_steps=40, learning_rate=1e-2, target_modules="all-linear", eval_split=0.1,
                save_every_n_epochs=0)
    base.update(changes)
    return TextConfig(**base)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_loss_falls_perplexity_drops_and_the_adapter_loads_with_the_same_logits(tmp_path, llama, corpus):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg(llama, corpus, tmp_path, sample_prompts=["the red"], sample_max_new_tokens=6, log_with="tensorboard")
    trainer = TextTrainer(cfg, Callbacks())
    result = trainer.run()
    assert result.forward_path == "lean" and result.steps == 40
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.8, result.losses
    before, after = result.evaluation["before"]["perplexity"], result.evaluation["after"]["perplexity"]
    assert after < 0.5 * before, result.evaluation
    folder = result.adapter_dir
    assert json.loads((folder / "eval.json").read_text())["after"]["perplexity"] == after
    assert (folder / "loss.png").is_file() and "## the red" in (folder / "samples.md").read_text()
    assert list((folder / "logs").glob("events.out.tfevents.*"))
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["task_type"] == "text-generation" and "lora_rank: 8" in meta["training_config"]
    assert json.loads(meta["evaluation"])["after"]["perplexity"] == pytest.approx(after)

    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(5))
    trainer.peft_model.eval()
    trained = _logits(trainer.peft_model, ids)
    base = AutoModelForCausalLM.from_pretrained(str(llama))
    assert (trained - _logits(base, ids)).abs().max() > 1e-2  # the LoRA changed the model
    loaded = PeftModel.from_pretrained(base, str(folder))
    torch.testing.assert_close(_logits(loaded, ids), trained, atol=1e-5, rtol=1e-5)
    fresh = AutoModelForCausalLM.from_pretrained(str(llama))
    fresh.load_adapter(str(folder))
    torch.testing.assert_close(_logits(fresh, ids), trained, atol=1e-5, rtol=1e-5)


class StopAt:
    def __init__(self, step, exc=TrainingStopped):
        self.step, self.exc = step, exc

    def on_event(self, event):
        if event.kind == "step" and event.step == self.step:
            raise self.exc()


@pytest.mark.parametrize("graph_body", [False, True])
def test_a_stopped_run_resumes_exactly(tmp_path, llama, corpus, monkeypatch, graph_body):
    if graph_body:  # everything the CUDA graph replays, run without the graph (accumulation off)
        import engine.text.train as train_module
        from engine.text.step import TextGraphStep

        made = []

        class OnCpu(TextGraphStep):
            def __init__(self, trainer, **kw):
                super().__init__(trainer, capture=False)
                made.append(self)

        monkeypatch.setattr(train_module, "unsupported_reason", lambda *a, **k: None)
        monkeypatch.setattr(train_module, "TextGraphStep", OnCpu)
    changes = dict(max_train_steps=12, lora_dropout=0.1, gradient_accumulation_steps=1 if graph_body else 2,
                   save_precision="fp32", eval_split=0, epochs=1)
    whole = train_text(_cfg(llama, corpus, tmp_path / "whole", **changes))
    with pytest.raises(TrainingStopped):
        train_text(_cfg(llama, corpus, tmp_path / "parts", **changes), callbacks=[StopAt(5)])
    assert (tmp_path / "parts" / "my_lora" / "checkpoints" / "step-00000005").is_dir()
    resumed = train_text(_cfg(llama, corpus, tmp_path / "parts", resume_from_checkpoint="latest", **changes))
    assert resumed.losses == whole.losses
    from safetensors.torch import load_file

    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if graph_body:
        assert made and made[-1].params


def test_chat_data_with_a_template_set_by_the_config(tmp_path, llama):
    from transformers import AutoTokenizer

    rows = [{"messages": [{"role": "user", "content": f"what is {a}?"}, {"role": "assistant", "content": line}]}
            for a, line in zip("abcdefghijklmnop" * 3, toy_lines(48, seed=4))]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    result = train_text(_cfg(llama, data, tmp_path, chat_template="chatml", max_train_steps=30, max_length=128,
                             sample_prompts=["what is a?"], sample_max_new_tokens=4))
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    saved = AutoTokenizer.from_pretrained(str(result.adapter_dir))
    assert saved.chat_template == CHATML  # the tokenizer changed, so its files are saved with the adapter


def test_models_outside_the_lean_path_train_through_transformers(tmp_path, corpus):
    gpt2 = save_tiny_model(tmp_path / "gpt2", "gpt2")
    result = train_text(_cfg(gpt2, corpus, tmp_path, target_modules="attention", gradient_checkpointing=True,
                             max_train_steps=25, packing=False))
    assert result.forward_path == "transformers"
    assert result.evaluation["after"]["perplexity"] < result.evaluation["before"]["perplexity"]
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn"] and config["r"] == 8


def test_cli_trains_merges_and_ctrl_c_keeps_a_checkpoint(tmp_path, llama, corpus, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    config = tmp_path / "llm.yaml"
    config.write_text(f"model_config:\n  task_type: text-generation\n  base_model: '{llama}'\n"
                      f"train_config:\n  train_data: '{corpus}'\n  max_length: 64\n  max_train_steps: 8\n"
                      f"  learning_rate: 0.01\n  output_dir: '{tmp_path}'\n  output_name: cli run\n", encoding="utf-8")
    assert main(["train", "--config", str(config), "--merge"]) == 0
    printed = capsys.readouterr().out
    folder = tmp_path / "cli run"
    assert "held-out perplexity:" in printed and f"PeftModel.from_pretrained(model, '{folder}')" in printed
    ids = torch.randint(3, 300, (1, 12))
    from peft import PeftModel

    expected = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llama)), str(folder)), ids)
    merged = AutoModelForCausalLM.from_pretrained(str(folder / "merged"))
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-5, rtol=1e-5)

    import engine.text.train as train_module

    original = train_module.TextTrainer._update

    def interrupted(self):
        original(self)
        if self.position.step == 2:  # Ctrl-C during the third step
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module.TextTrainer, "_update", interrupted)
    monkeypatch.setattr(train_module.TextTrainer, "_setup_fast_step", lambda self: None)
    code = main(["train", "--config", str(config), "--set", "output_name=stopped"])
    printed = capsys.readouterr().out
    assert code == 130 and "--set resume_from_checkpoint=latest" in printed
    assert (tmp_path / "stopped" / "checkpoints" / "step-00000002").is_dir()


def test_torch_compile_trains_like_the_plain_step(tmp_path, llama, corpus, monkeypatch):
    """Each decoder layer through torch.compile (aot_eager here: the same graph, without inductor's CPU code),
    with checkpointing and dropout: the same losses and adapter as the plain lean step. On a CPU the run
    says that it trains without it."""
    import engine.compiled_loss as compiled_loss

    changes = dict(max_train_steps=3, gradient_checkpointing=True, eval_split=0, lora_dropout=0.1)
    notes = []
    plain = train_text(_cfg(llama, corpus, tmp_path / "plain", torch_compile=True, **changes),
                       callbacks=[FunctionCallback(lambda e: notes.append(e.message) if e.kind == "info" else None)])
    assert any("runs on CUDA only" in n for n in notes)
    monkeypatch.setattr(compiled_loss, "DEVICES", ("cpu",))
    counter = GraphCounter()  # aot_eager, counted
    monkeypatch.setattr(compiled_loss, "BACKEND", counter)
    made, original = [], compiled_loss.CompiledLoss

    class Recorded(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(compiled_loss, "CompiledLoss", Recorded)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train_text(_cfg(llama, corpus, tmp_path / "compiled", torch_compile=True, **changes))
    assert made and made[0].failed is None and torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert counter.compiled >= 1 and counter.alive() == 0, "the run's compiled layers outlive it"
    assert compiled.losses == plain.losses


def test_network_weights_continue_an_adapter(tmp_path, llama, corpus):
    first = train_text(_cfg(llama, corpus, tmp_path / "first", max_train_steps=15, eval_split=0))
    fresh_start = train_text(_cfg(llama, corpus, tmp_path / "fresh", max_train_steps=1, eval_split=0)).losses[0]
    again = train_text(_cfg(llama, corpus, tmp_path / "again", max_train_steps=1, eval_split=0,
                            network_weights=str(first.adapter_dir)))
    assert again.losses[0] < fresh_start - 0.5 and again.losses[0] < first.losses[0]


def test_the_graphed_step_accepts_a_text_config_on_cuda(tmp_path, llama, corpus):
    """A text run on a CUDA device must reach the CUDA-graph step: the check once read image-only fields
    (shuffle_caption) and crashed every text run on a GPU with an AttributeError before its first step."""
    from engine.fast_step import unsupported_reason

    cfg = _cfg(llama, corpus, tmp_path / "out", gradient_accumulation_steps=1)
    fused = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=True)
    assert unsupported_reason(cfg, torch.device("cuda"), "bf16", fused, False) is None
