"""Quality parity: do our LoRAs learn as well as kohya's, LyCORIS' and the diffusers loop's?

Speed must not cost quality, and "bit-identical to our plain step" does not show that we train as
well as the reference trainers. Each trainer here gets the same recipe on the built-in demo model
(bench/quality_runs.py says what is held equal) and every file it writes is scored the same way
(bench/quality_eval.py): held-out validation loss at fixed timesteps and noise after the last step,
and the step at which the demo's "stripes" concept is first reached (checked every `every` steps,
each prompt's stripiness the mean over `samples` pictures). One row per network type: ours against the
diffusers loop and kohya for LoRA, against LyCORIS (run by kohya's train_network.py with network_module
lycoris.kohya) for LoHa, LoKr and DoRA.

    python -m bench.quality                                  # ours and the diffusers loop, on the CPU
    python -m bench.quality --precision bf16 ...             # on a GPU: the fast step against the peers
    KOHYA_DIR=/path/to/sd-scripts [KOHYA_PYTHON=...] [LYCORIS_DIR=/path/to/LyCORIS] python -m bench.quality \\
        --types lora,loha,lokr,dora
    # KOHYA_EXTRA_PATH: more folders on kohya's PYTHONPATH (stand-ins for packages its venv lacks);
    # --tools kohya,lycoris --types lora, then loha, ...: one type per call, each row on its own
    # --every 10 --samples 4: a finer concept check (saves every 10 steps; four pictures per prompt)
    # --batch-order kohya: ours trains on kohya's batch order (bench/quality_order.py; the engine keeps its own)

The pass marks (bench/README.md has the last table): our validation loss at most 2% above the best
other tool's, and the concept reached in as many steps or fewer. tests/engine/test_quality.py runs
the CPU part (ours and the diffusers loop, LoRA) as a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .quality_eval import Holdout, reached, score, stripes, val_loss
from .quality_order import ORDERS, batch_order
from .quality_runs import Recipe, diffusers_loop, kohya, kohya_available, lycoris_available, ours

RESULTS = Path(__file__).with_name("quality.json")
MARGIN = 1.02


def prepare(root: Path, recipe: Recipe) -> None:
    """The demo's training pictures and a held-out set of the same concept (other places and sizes)."""
    from engine.demo import write_dataset

    if not (root / "train").exists():
        write_dataset(root / "train", n=recipe.images, seed=0)
        write_dataset(root / "val", n=6, seed=99)


def tools_for(network_type: str, wanted: list[str]) -> list[str]:
    peers = ["diffusers", "kohya"] if network_type == "lora" else ["lycoris"]
    return ["ours"] + [t for t in peers if t in wanted]


def run_tool(tool: str, root: Path, recipe: Recipe, network_type: str) -> dict[int, Path]:
    out = root / "runs" / f"{tool}_{network_type}"
    if tool == "ours":
        return ours(root, recipe, network_type, out)
    if tool == "diffusers":
        return diffusers_loop(root, recipe, out)
    return kohya(root, recipe, network_type, out)


def evaluate(files: dict[int, Path], network_type: str, root: Path, base_stripes: list[float],
             samples: int = 1) -> dict:
    """Validation loss of the last file; stripes of every file until the concept is reached."""
    from engine.models.demo_model import demo_model

    model = demo_model()
    holdout = Holdout(model, root / "val")
    last = max(files)
    row = {"val_loss": score(model, files[last], network_type, holdout, with_stripes=False)["val_loss"],
           "reached_at": None, "stripes": {}}
    for step in sorted(files):
        scores = score(model, files[step], network_type, holdout, samples=samples)["stripes"]
        row["stripes"][step] = [round(s, 2) for s in scores]
        if reached(scores, base_stripes):
            row["reached_at"] = step
            break
    return row


def compare(results: dict, network_type: str) -> dict:
    """Ours against the best other tool of the row: val-loss ratio and steps to the concept."""
    rows = results[network_type]
    others = {t: r for t, r in rows.items() if t != "ours" and "val_loss" in r}
    if "ours" not in rows or not others:
        return {}
    best = min(others, key=lambda t: others[t]["val_loss"])
    ratio = rows["ours"]["val_loss"] / others[best]["val_loss"]
    ours_at = rows["ours"]["reached_at"]
    peer_at = [r["reached_at"] for r in others.values() if r["reached_at"] is not None]
    steps_ok = ours_at is not None and (not peer_at or ours_at <= min(peer_at))
    return {"best_other": best, "val_ratio": ratio, "val_ok": ratio <= MARGIN, "steps_ok": steps_ok}


def run(types: list[str], tools: list[str], recipe: Recipe, root: Path, log=print) -> dict:
    from engine.models.demo_model import demo_model

    prepare(root, recipe)
    model = demo_model()
    base = stripes(model, recipe.samples)
    results = {"base_stripes": base, "base_val_loss": val_loss(model, Holdout(model, root / "val"))}
    for network_type in types:
        results[network_type] = {}
        for tool in tools_for(network_type, tools):
            why = {"kohya": kohya_available, "lycoris": lycoris_available}.get(tool, lambda: None)()
            if why:
                results[network_type][tool] = {"skipped": why}
                log(f"{network_type:5} {tool:9} skipped: {why}")
                continue
            files = run_tool(tool, root, recipe, network_type)
            results[network_type][tool] = evaluate(files, network_type, root, base, recipe.samples)
            r = results[network_type][tool]
            log(f"{network_type:5} {tool:9} val loss {r['val_loss']:.5f}, concept at step {r['reached_at']}")
        results[network_type]["compare"] = compare(results, network_type)
    return results


def table(results: dict) -> str:
    lines = [f"Validation loss of the demo model without a LoRA: {results['base_val_loss']:.5f}.", "",
             "| type | tool | val loss | vs best other | concept reached at step |", "|---|---|---|---|---|"]
    for network_type, rows in results.items():
        if not isinstance(rows, dict) or "compare" not in rows:
            continue
        cmp = rows["compare"]
        for tool, r in rows.items():
            if tool == "compare":
                continue
            if "skipped" in r:
                lines.append(f"| {network_type} | {tool} | skipped: {r['skipped']} | | |")
                continue
            vs = f"{cmp['val_ratio'] - 1:+.1%}" if tool == "ours" and cmp else ""
            lines.append(f"| {network_type} | {tool} | {r['val_loss']:.5f} | {vs} | {r['reached_at'] or 'not reached'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="lora", help="network types: lora,loha,lokr,dora")
    ap.add_argument("--tools", default="diffusers,kohya,lycoris", help="peers to run beside ours")
    ap.add_argument("--steps", type=int, default=Recipe.steps)
    ap.add_argument("--every", type=int, default=Recipe.every)
    ap.add_argument("--samples", type=int, default=Recipe.samples,
                    help="pictures per prompt for the concept check, their stripiness averaged (seeds 1, 2, ...)")
    ap.add_argument("--lr", type=float, default=Recipe.lr)
    ap.add_argument("--seed", type=int, default=Recipe.seed)
    ap.add_argument("--precision", default="no", choices=("no", "bf16"),
                    help="bf16 on a GPU: ours' CUDA-graphed step, kohya's and the loop's bf16 autocast")
    ap.add_argument("--batch-order", default="ours", choices=ORDERS,
                    help="kohya: our trainer batches as kohya's train_network does (bench/quality_order.py)")
    ap.add_argument("--workdir", default="", help="keep runs here (default: a temporary folder)")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    recipe = Recipe(steps=a.steps, every=a.every, lr=a.lr, seed=a.seed, precision=a.precision, samples=a.samples)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.workdir) if a.workdir else Path(tmp)
        with batch_order(a.batch_order):  # only our trainer forms its batches with engine's TrainData
            results = run(a.types.split(","), a.tools.split(","), recipe, root, log=lambda s: print(s, file=sys.stderr))
    results["recipe"] = {k: getattr(recipe, k) for k in Recipe.__dataclass_fields__}
    results["batch_order"] = a.batch_order
    Path(a.out).write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    print(table(results))
    for network_type in a.types.split(","):
        cmp = results[network_type]["compare"]
        if cmp:
            print(f"{network_type}: ours {cmp['val_ratio'] - 1:+.1%} against {cmp['best_other']} "
                  f"({'pass' if cmp['val_ok'] else 'FAIL'}), steps to the concept "
                  f"{'pass' if cmp['steps_ok'] else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
