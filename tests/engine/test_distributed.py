"""Several processes (gloo on the CPU, as torchrun or `accelerate launch --multi_gpu --num_processes 2`
start them; `--cpu` would start one) train the LoRA one process trains with their global batch: the same loss curve and weights
for SD1, SDXL and a flow model, each sample once per epoch, every encoder input encoded once, files
written by one process while the others go on, resume across process counts, and a dead process ends
the others at once with a checkpoint to resume from.

Tolerance: the processes compute each sample's loss in batches of another size and sum their
share-weighted parts where one process takes the mean of the whole batch: the same sum in another
float32 order (and other GEMM blockings). Losses agree to rel 1e-5 (measured: under 1e-5 for every step;
a wrong split, draw or weighting moves them by 1e-3 to 3e-2, e.g. plain averaging of a 2 + 1 batch: 2e-2).
LoRA weights agree to atol 1e-4 = lr / 10: AdamW divides each entry's step by that entry's own gradient
size, so where a gradient is near zero (lora_down while lora_up is still ~0) a rounding difference can
change that entry's step by a fraction of lr (measured: up to 3e-5 after 4 steps of lr 1e-3).
"""

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors import safe_open

from train_fixtures import quick_config

B, STEPS, WORLD = 2, 4, 2
RTOL_LOSS, ATOL_WEIGHTS = 1e-5, 1e-4
# the text encoder's LoRA trained too (captions encoded every step) and two micro-batches per update
TE_ACCUM = dict(train_text_encoder=True, gradient_accumulation_steps=2, max_train_steps=2)


def _dataset(folder: Path) -> Path:
    """Three buckets at resolution 96: 4 squares, 3 wide and 1 tall image. With 2 processes of batch 2 the
    global batches are 4 (2 + 2), 3 (2 + 1) and 1 (1 + a weight-0 stand-in)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate([(96, 96)] * 4 + [(128, 64)] * 3 + [(64, 128)]):
        y, x = np.mgrid[0:h, 0:w]
        arr = np.stack([np.sin(x / (3 + i)) * 127 + 128, np.cos(y / (4 + i)) * 127 + 128,
                        np.full((h, w), 30 * i)], -1).astype("uint8")
        Image.fromarray(arr).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"stripes {i}", encoding="utf-8")
    return folder


def _config(kind: str, data, out, batch_size: int = B, **changes):
    base = dict(resolution="96", bucket_reso_steps=32, min_bucket_reso=64, batch_size=batch_size,
                max_train_steps=STEPS, seed=5, lr_scheduler="constant")
    if kind == "flow":
        base.update(lora_rank=8, learning_rate=1e-2, noise_offset=0.05)
    return quick_config(data, out, **{**base, **changes})


def _model(kind: str):
    from engine.models import tiny_sd1, tiny_sdxl

    if kind == "flow":
        from engine.families import FAMILIES
        from test_flow_training import TINY_FLOW, TinyFlowModel

        FAMILIES["tinyflow"] = TINY_FLOW
        return TinyFlowModel()
    return tiny_sd1() if kind == "sd1" else tiny_sdxl()


def _train(kind: str, cfg, die_at_predict: int | None = None, catch: bool = False) -> dict:
    """Train, counting what the encoders are given; `die_at_predict`: this process exits (as a killed
    process would) at that denoiser call; `catch`: an error is returned (what a surviving process said)."""
    from engine.train import train

    model = _model(kind)
    counts = {"images": 0, "captions": 0, "predicts": 0}
    encode_images, encode_text, predict = model.encode_images, model.encode_text, model.predict

    def images(pixels):
        counts["images"] += pixels.shape[0]
        return encode_images(pixels)

    def text(captions):
        counts["captions"] += len(captions)
        return encode_text(captions)

    def denoise(*args):
        counts["predicts"] += 1
        if counts["predicts"] == die_at_predict:
            (Path(cfg.output_dir) / "died_at").write_text(str(time.time()))
            os._exit(3)
        return predict(*args)

    model.encode_images, model.encode_text, model.predict = images, text, denoise
    try:
        result = train(cfg, model)
    except Exception as exc:
        if not catch:
            raise
        return {"error": f"{type(exc).__name__}: {exc}", "ended_at": time.time()}
    return {"tensors": {k: v.clone() for k, v in result.tensors.items()}, "losses": list(result.losses),
            "lora_path": str(result.lora_path), "counts": counts}


def _worker(rank: int, port: int, jobs: list, results) -> None:
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    for name, kind, cfg, die_at in jobs:
        results[(name, rank)] = _train(kind, cfg, die_at if rank == 1 else None, catch=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(jobs: list, timeout: float = 240) -> dict:
    """Start WORLD processes like a launcher does; a process that exits early does not stop the others."""
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, jobs, results)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"processes {hung} did not end"
    return dict(results)


def _assert_same_run(one: dict, several: dict) -> None:
    assert several["losses"] == pytest.approx(one["losses"], rel=RTOL_LOSS)
    assert one["tensors"].keys() == several["tensors"].keys()
    for key, value in one["tensors"].items():
        torch.testing.assert_close(several["tensors"][key], value, rtol=0, atol=ATOL_WEIGHTS, msg=key)
    assert any(v.abs().sum() > 0 for k, v in one["tensors"].items() if k.endswith("lora_up.weight"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with batch 4 and two processes with batch 2, for each family, plus a resume 1 -> 2."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dist")
    data = _dataset(root / "data")
    preview = dict(save_steps=2, sample_prompts=["stripes 1 --s 2 --w 64 --h 64"], sample_every_n_steps=2)
    one = {"sd1": _train("sd1", _config("sd1", data, root / "sd1_1p", 2 * B, **preview)),
           "sdxl": _train("sdxl", _config("sdxl", data, root / "sdxl_1p", 2 * B, cache_latents="disk",
                                          cache_dir=str(root / "cache_1p"))),
           "flow": _train("flow", _config("flow", data, root / "flow_1p", 2 * B)),
           "sd1-te": _train("sd1", _config("sd1", data, root / "te_1p", 2 * B, **TE_ACCUM))}
    # 1 -> 2: the one-process run's checkpoint at step 2, continued by two processes
    ckpt = root / "sd1_1p" / "test_lora" / "checkpoints" / "step-00000002"
    shutil.copytree(ckpt, root / "resume_2p" / "test_lora" / "checkpoints" / ckpt.name)
    jobs = [("sd1", "sd1", _config("sd1", data, root / "sd1_2p", B, **preview), None),
            ("sdxl", "sdxl", _config("sdxl", data, root / "sdxl_2p", B, cache_latents="disk",
                                     cache_dir=str(root / "cache_2p")), None),
            ("flow", "flow", _config("flow", data, root / "flow_2p", B), None),
            ("sd1-te", "sd1", _config("sd1", data, root / "te_2p", B, **TE_ACCUM), None),
            ("resume", "sd1", _config("sd1", data, root / "resume_2p", B, resume_from_checkpoint="latest"), None),
            # last: process 1 exits at its third denoiser call (steps 1 and 2 done; process 0 is in step 3)
            ("dying", "sd1", _config("sd1", data, root / "dying_2p", B), 3)]
    several = _launch(jobs)
    return root, data, one, several


@pytest.mark.parametrize("kind", ["sd1", "sdxl", "flow", "sd1-te"])
def test_two_processes_train_the_one_process_lora(runs, kind):
    _, _, one, several = runs
    first, second = several[(kind, 0)], several[(kind, 1)]
    _assert_same_run(one[kind], first)
    assert first["losses"] == second["losses"]  # the summed loss, the same on every process
    assert all(torch.equal(first["tensors"][k], second["tensors"][k]) for k in first["tensors"])  # one LoRA
    assert first["lora_path"].endswith("test_lora.safetensors") and second["lora_path"] == "None"
    metadata = safe_open(first["lora_path"], "pt").metadata()  # kohya's numbers for a run of several GPUs
    assert (metadata["ss_batch_size_per_device"], metadata["ss_total_batch_size"]) == \
        (str(B), str(B * WORLD * (2 if kind == "sd1-te" else 1)))
    assert metadata["ss_num_batches_per_epoch"] == "3"
    if kind == "sd1-te":  # the text encoder's LoRA learned too, the same on both
        assert any(v.abs().sum() > 0 for k, v in first["tensors"].items() if k.startswith("lora_te_")
                   and k.endswith("lora_up.weight"))


def test_caching_encodes_every_image_and_caption_once(runs):
    root, _, one, several = runs
    for kind in ("sd1", "sdxl"):
        ranks = [several[(kind, r)]["counts"] for r in range(WORLD)]
        assert all(c["images"] > 0 for c in ranks), ranks  # the work is shared ...
        for what in ("images", "captions"):  # ... and done once
            assert sum(c[what] for c in ranks) == one[kind]["counts"][what], (kind, what, ranks)
    assert one["sd1"]["counts"]["images"] == 8
    assert len(list((root / "cache_2p").glob("*.safetensors"))) == 8  # shared through the disk cache


def test_the_main_process_writes_checkpoints_and_previews(runs):
    root = runs[0]
    out = root / "sd1_2p" / "test_lora"
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-00000002"]
    assert (out / "test_lora-step00000002.safetensors").is_file() and (out / "test_lora.safetensors").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == \
        sorted(p.name for p in (root / "sd1_1p" / "test_lora" / "samples").iterdir())
    assert not list(out.rglob("*.tmp*"))


def test_resume_from_one_process_on_two(runs):
    _, _, one, several = runs
    resumed = several[("resume", 0)]
    assert len(resumed["losses"]) == STEPS - 2
    assert resumed["losses"] == pytest.approx(one["sd1"]["losses"][2:], rel=RTOL_LOSS)
    _assert_same_run({**one["sd1"], "losses": one["sd1"]["losses"][2:]}, resumed)


def test_a_dead_process_ends_the_other_with_a_checkpoint_to_resume_two_on_one(runs):
    from engine.checkpoint import ResumeMismatch

    root, data, one, several = runs
    out = root / "dying_2p"
    survivor = several[("dying", 0)]
    assert ("dying", 1) not in several  # it died (and the launch waited for both processes to end)
    assert survivor["ended_at"] - float((out / "died_at").read_text()) < 60
    assert survivor["error"].startswith("ProcessLost: process 0 of 2: another process of this run stopped")
    assert "resume_from_checkpoint: latest" in survivor["error"]
    assert survivor["error"].endswith(f"The checkpoint: {out / 'test_lora' / 'checkpoints' / 'step-00000002'}")
    assert [p.name for p in (out / "test_lora" / "checkpoints").iterdir()] == ["step-00000002"]
    # 2 -> 1: the same global batch on one process continues the run exactly
    resumed = _train("sd1", _config("sd1", data, out, 2 * B, resume_from_checkpoint="latest"))
    assert resumed["losses"] == pytest.approx(one["sd1"]["losses"][2:], rel=RTOL_LOSS)
    _assert_same_run({**one["sd1"], "losses": one["sd1"]["losses"][2:]}, resumed)
    # another global batch is another run: refused, saying why
    with pytest.raises(ResumeMismatch, match=r"batch_size: 4 -> 2 \(the global batch: batch_size x processes; "
                                             r"the checkpoint's run had 2 process\(es\), this one has 1\)"):
        _train("sd1", _config("sd1", data, out, B, resume_from_checkpoint="latest"))


def test_a_run_stopped_between_accumulated_micro_batches_resumes_exactly(runs, tmp_path):
    """Ctrl-C (or a dead process) inside a step: the checkpoint is the last finished step, not a data
    position and generator state halfway into the next one."""
    _, data, _, _ = runs
    cfg = dict(gradient_accumulation_steps=2, batch_size=2, max_train_steps=3)
    whole = _train("sd1", _config("sd1", data, tmp_path / "whole", **cfg))
    with pytest.raises(KeyboardInterrupt):
        _train_interrupted(_config("sd1", data, tmp_path / "cut", **cfg), at_predict=4)  # step 2's second half
    assert [p.name for p in (tmp_path / "cut" / "test_lora" / "checkpoints").iterdir()] == ["step-00000001"]
    resumed = _train("sd1", _config("sd1", data, tmp_path / "cut", resume_from_checkpoint="latest", **cfg))
    assert resumed["losses"] == pytest.approx(whole["losses"][1:], rel=RTOL_LOSS)
    _assert_same_run({**whole, "losses": whole["losses"][1:]}, resumed)


def _train_interrupted(cfg, at_predict: int):
    from engine.train import train

    model, calls = _model("sd1"), []
    predict = model.predict

    def interrupted(*args):
        calls.append(1)
        if len(calls) == at_predict:
            raise KeyboardInterrupt
        return predict(*args)

    model.predict = interrupted
    train(cfg, model)


@pytest.mark.parametrize("world,batch_size", [(2, 1), (2, 3), (3, 2), (4, 2)])
def test_every_sample_is_trained_once_per_epoch_across_processes(tmp_path, world, batch_size):
    """Buckets, repeats and regularisation images split between processes: each epoch sample (its slot)
    lands on exactly one process, in the global batch one process with batch_size x processes takes."""
    from collections import Counter
    from types import SimpleNamespace

    from engine.data.shards import ShardedData
    from engine.data.train_data import TrainData

    data = _dataset(tmp_path / "data")
    reg = _dataset(tmp_path / "reg")
    cfg = _config("sd1", data, tmp_path / "out", batch_size, repeats=3, reg_data_dir=str(reg))
    whole = TrainData(cfg, native_resolution=64, model_key="k", train_text_encoder=False)
    parts = [ShardedData(whole, SimpleNamespace(rank=r, world=world)) for r in range(world)]
    assert len(whole.samples) == 2 * 8 * 3  # 8 images x 3 repeats, as many reg samples
    for epoch in (0, 1):
        reference = whole.epoch_plan(epoch, batch_size * world)
        plans = [p.epoch_plan(epoch) for p in parts]
        assert all(len(plan) == len(reference) == p.batches_per_epoch() for plan, p in zip(plans, parts))
        seen = Counter()
        for i, batch in enumerate(reference):
            shares = [plan[i] for plan in plans]
            assert {s.bucket for s in shares} == {batch.bucket}
            assert sum(s.share.weight for s in shares) == pytest.approx(1.0)
            taken = [sample for s in shares if s.share.count for sample in s.samples]
            assert tuple(taken) == batch.samples  # the global batch, in order, split by rank
            seen.update(sample.slot for sample in taken)
        assert seen == Counter(range(len(whole.samples)))  # every sample once: none twice, none skipped
    parts[0].step_encode_precision = "bf16"  # what the run sets reaches the batches
    assert whole.step_encode_precision == "bf16"


def test_sigterm_from_the_launcher_stops_the_run():
    import signal

    from engine.distributed import Distributed
    from engine.errors import TrainingStopped

    dist = Distributed()  # one process: no handler, SIGTERM keeps its meaning
    dist.enabled, dist.rank, dist.world = True, 1, 2
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped, match="process 1 of 2 stopped by the launcher"):
        with dist.stop_on_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) == before
