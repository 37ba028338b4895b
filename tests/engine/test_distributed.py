"""Two processes (gloo on the CPU, as `accelerate launch --cpu --num_processes 2` or torchrun would
start them) train one LoRA: they see different batches, end with identical weights, and only the
first writes files."""

import os
import socket

import torch
import torch.multiprocessing as mp

from train_fixtures import pattern_dataset, quick_config


def _worker(rank, world, port, data, out, results):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from engine.models import tiny_sd1
    from engine.train import train

    result = train(quick_config(data, out, max_train_steps=4, batch_size=1), tiny_sd1())
    results[rank] = ({k: v.clone() for k, v in result.tensors.items()}, result.losses, str(result.lora_path))
    torch.distributed.destroy_process_group()


def test_two_processes_share_the_work_and_agree(tmp_path):
    data = pattern_dataset(tmp_path / "data", n=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, str(data), tmp_path / "out", results), nprocs=2, join=True)
    (t0, losses0, path0), (t1, losses1, path1) = results[0], results[1]
    assert losses0 != losses1  # different batches and noise per process
    assert all(torch.equal(t0[k], t1[k]) for k in t0)  # averaged gradients: one LoRA
    assert path0.endswith("test_lora.safetensors") and path1 == "None"
    assert any(v.abs().sum() > 0 for k, v in t0.items() if k.endswith("lora_up.weight"))
