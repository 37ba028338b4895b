"""Recorded training runs that must stay bit-identical: the digest, the fixture file and the comparison.

Used by tests/engine/test_redesign_parity.py (standalone models) and tests/a1111/test_a1111_parity.py
(the A1111 adapter on its fake WebUI). A run records what a user could notice: the loss of every step,
every tensor of the saved LoRA file (sha256 of its bytes, and its sum of absolute values) and the
metadata fields that name the model.

Bit-identity holds on one machine and torch build: runs use one CPU thread, and the fixture keeps the
torch version, CPU capability and kernel fingerprint (`environment`) it was recorded with. Elsewhere
float kernels may round differently, so losses and tensor sums are compared with a 1e-5 relative
tolerance instead, and the failure message says which comparison was made. (Records made before the
fingerprint was kept are compared that way on every machine until re-recorded.) Re-record (only on a
commit whose results are known good) by running the test with INPLACE_LORA_RECORD_PARITY=1: each
recorded run then fails on purpose, saying so.

Each test module keeps two records:
- fixtures/recorded_runs.json, the engine as it is (re-recorded, as above, when a change of the draws
  or the step is intended; first recorded when the noise generator got its own seed, `noise_seed`);
- fixtures/redesign_parity.json, recorded by the engine before the family/objective/step redesign and
  never re-recorded: the same runs with the noise generator seeded as that engine seeded it (with the
  run's seed itself, `seed_as_noise_seed`) must still give it bit for bit, so everything but the noise
  seed is still tied to the old engine.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from pathlib import Path

import torch

RECORD = os.environ.get("INPLACE_LORA_RECORD_PARITY") == "1"
CURRENT, PRE_REDESIGN = "recorded_runs.json", "redesign_parity.json"  # file names in each test's fixtures/
METADATA_KEYS = ("ss_base_model_version", "ss_v2", "ss_network_args", "ss_network_dim", "ss_network_alpha",
                 "ss_max_token_length", "ss_min_snr_gamma", "ss_noise_offset", "ss_resolution",
                 "ss_sd_model_name", "modelspec.architecture", "modelspec.implementation",
                 "modelspec.prediction_type", "modelspec.resolution", "modelspec.timestep_range")


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_as_noise_seed(seed: int) -> int:
    """`engine.runtime.noise_seed` as the engine before the redesign had it: the run's seed itself."""
    return seed


def environment() -> dict:
    """What bit-identity depends on besides the code: the torch build, the CPU capability torch dispatches
    to, and how this machine's float kernels round (`kernel_fingerprint`): two machines that report the
    same AVX512 capability can still round a matrix product differently (seen on two Xeons; BLAS blocking
    by cache size is the likely reason), so the capability alone let a recording made on one kind of CPU
    fail exactly on another."""
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "kernels": kernel_fingerprint()}


@functools.lru_cache(maxsize=1)
def kernel_fingerprint() -> str:
    """A digest of a few float32 and bfloat16 products and convolutions on fixed inputs, one thread, at
    shapes like the recorded runs' (small widths, long reductions): equal digests, same rounding."""
    g = torch.Generator().manual_seed(0)
    outs = []
    with one_thread():
        for m, k, n in ((64, 320, 1280), (1024, 40, 320), (4, 1024, 768), (257, 2049, 33)):
            a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
            outs += [a @ b, (a.bfloat16() @ b.bfloat16()).float(), torch.addmm(b[0], a, b)]
        x, w = torch.randn(2, 32, 24, 24, generator=g), torch.randn(64, 32, 3, 3, generator=g)
        outs += [torch.nn.functional.conv2d(x, w, padding=1), torch.nn.functional.group_norm(x, 8),
                 torch.nn.functional.scaled_dot_product_attention(*torch.randn(3, 2, 4, 77, 40, generator=g))]
    return hashlib.sha256(" ".join(digest(t)[0] for t in outs).encode()).hexdigest()[:16]


def digest(t: torch.Tensor) -> list:
    """[sha256 of dtype, shape and bytes (16 hex digits), sum of absolute values]."""
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return [h.hexdigest()[:16], float(t.double().abs().sum())]


def result_record(losses: list[float], tensors: dict[str, torch.Tensor], metadata: dict[str, str], **extra) -> dict:
    return {"losses": [float(x).hex() for x in losses],
            "tensors": {k: digest(v) for k, v in sorted(tensors.items())},
            "metadata": {k: metadata.get(k) for k in METADATA_KEYS}, **extra}


class Recorder:
    """Collects the runs of one test module; writes the fixture once every run is in."""

    def __init__(self, path: Path, names: list[str]):
        self.path, self.names, self.runs = Path(path), list(names), {}

    def record(self, name: str, record: dict) -> None:
        self.runs[name] = record
        if len(self.runs) == len(self.names):
            lines = ['{"environment": ' + json.dumps(environment(), sort_keys=True) + ', "runs": {']
            for i, (key, doc) in enumerate(sorted(self.runs.items())):
                comma = "," if i < len(self.runs) - 1 else ""
                lines.append(f" {json.dumps(key)}: " + json.dumps(doc, sort_keys=True) + comma)
            self.path.write_text("\n".join(lines) + "\n}}\n", encoding="utf-8")

    def load(self) -> dict:
        return json.loads(self.path.read_text(encoding="utf-8"))


def differences(got: dict, doc: dict, name: str) -> list[str]:
    """What differs between this run and the recorded one (empty: the same)."""
    exact = doc["environment"] == environment()
    how = "exact" if exact else "rtol 1e-5"
    want = doc["runs"][name]
    problems = []
    for key in set(got) - {"losses", "tensors", "metadata"}:
        if got[key] != want.get(key):
            problems.append(f"{key}: {got[key]!r}, recorded {want.get(key)!r}")
    mine = [float.fromhex(x) for x in got["losses"]]
    theirs = [float.fromhex(x) for x in want["losses"]]
    if len(mine) != len(theirs):
        problems.append(f"{len(mine)} losses, recorded {len(theirs)}")
    for step, (a, b) in enumerate(zip(mine, theirs), 1):
        if not (a == b if exact else abs(a - b) <= 1e-5 * max(abs(a), abs(b))):
            problems.append(f"step {step}: loss {a!r}, recorded {b!r} ({how} comparison)")
    if sorted(got["tensors"]) != sorted(want["tensors"]):
        problems.append(f"saved keys differ: {sorted(set(got['tensors']) ^ set(want['tensors']))[:5]}")
    for key, (sha, total) in got["tensors"].items():
        rec = want["tensors"].get(key)
        if rec is None:
            continue
        same = sha == rec[0] if exact else abs(total - rec[1]) <= 1e-5 * max(abs(rec[1]), 1e-12)
        if not same:
            problems.append(f"{key} differs ({how} comparison)")
    if got["metadata"] != want["metadata"]:
        problems.append(f"metadata: {got['metadata']}, recorded {want['metadata']}")
    return problems
