"""What DP-SGD costs per step on the causal-LM task: plain vs Opacus hooks vs ghost clipping.

One step of SmolLM2-135M-Instruct with the LoRA of ``experiment=lm`` on a fixed batch of
the packaged instruction data, in three modes, each in its own process (so each peak
memory is its own):

- ``plain``: the non-DP step (batch gradient, no clipping).
- ``hooks``: Opacus's GradSampleModule (per-example gradients materialised for the LoRA
  tensors), DPOptimizer clipping and noise: what the clients run.
- ``ghost``: Opacus's fast gradient clipping with ghost norms (Li et al. 2022; Bu et al.
  2023): per-example norms without per-example gradients, two backward passes.
- ``cached``: the ``hooks`` step from the frozen-prefix cache (``model.cache_frozen_prefix``,
  :mod:`fedlora.tasks.frozen_prefix`): with LoRA on the top layers only
  (``lora.layers_to_transform``), the frozen layers below run once per example, outside
  the step; ``prefix_s_per_example`` is that one-time cost. Without a frozen prefix it
  equals ``hooks``.

Prints seconds per step, tokens per second and peak RSS above the loaded model, with the
ratios to the plain step, and writes ``benchmarks/results/lm_dp_cost.{json,md}``.

    python benchmarks/lm_dp_cost.py [--steps 4] [--batch 16] [extra Hydra overrides...]
    python benchmarks/lm_dp_cost.py --name lm_dp_cost_top_layers 'lora.layers_to_transform=[26,27,28,29]'

"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
MODES = ("plain", "hooks", "ghost", "cached")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, steps: int, batch_size: int, overrides: list[str]) -> dict:
    import torch
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    from fedlora.client.training import make_optimizer
    from fedlora.core.config import compose
    from fedlora.tasks import get_task
    from fedlora.tasks.runtime import get_bundle

    torch.set_num_threads(2)
    # The prefix is computed here, not read from a client's folder: its one-time cost is measured.
    cached = [f"model.cache_frozen_prefix={str(mode == 'cached').lower()}", "model.frozen_prefix_dir=null"]
    cfg = compose(["experiment=lm", "tracking=none", *overrides, *cached])
    task = get_task(cfg.model)
    data = task.load_data(cfg.data, int(cfg.seed))
    bundle = get_bundle(cfg, len(data.label_names))
    model = bundle.model
    model.train()
    encoded = task.encode(data.train.select(range(batch_size)), bundle.tokenizer, cfg.model)
    start = time.perf_counter()
    batch = task.training_data(model, encoded, cfg.model, batch_size).tensors
    prefix_s = (time.perf_counter() - start) / batch_size if batch is not encoded.tensors else 0.0
    tokens = int(batch[1].sum())
    optimizer = make_optimizer(model, cfg.train)
    clip, sigma = float(cfg.privacy.max_grad_norm), 1.0
    if mode in ("hooks", "cached"):
        module = GradSampleModule(model)
        optimizer = DPOptimizer(optimizer, noise_multiplier=sigma, max_grad_norm=clip,
                                expected_batch_size=batch_size, loss_reduction="mean")
    elif mode == "ghost":
        module = GradSampleModuleFastGradientClipping(model, max_grad_norm=clip, use_ghost_clipping=True,
                                                      loss_reduction="mean")
        optimizer = DPOptimizerFastGradientClipping(optimizer, noise_multiplier=sigma, max_grad_norm=clip,
                                                    expected_batch_size=batch_size, loss_reduction="mean")
    else:
        module = model
    loaded = _rss_mb()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    times = []
    for step in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        if mode == "ghost":
            losses = task.per_example_loss(module, batch)
            DPTensorFastGradientClipping(module, optimizer, losses, "mean").backward()
        else:
            task.loss(module, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    params = dict(model.named_parameters())
    moved = sum(bool((params[n].detach() - before[n]).abs().max() > 0) for n in names if "lora_B" in n)
    return {"mode": mode, "s_per_step": sum(times) / len(times), "tokens_per_step": tokens,
            "tokens_per_s": tokens / (sum(times) / len(times)), "peak_rss_mb": _rss_mb(),
            "peak_rss_above_loaded_mb": _rss_mb() - loaded, "lora_b_moved": f"{moved}/{sum('lora_B' in n for n in names)}",
            "steps": steps, "batch": batch_size, "prefix_s_per_example": prefix_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--name", default="lm_dp_cost", help="results file name under benchmarks/results")
    args, extra = parser.parse_known_args()
    if args.mode:  # one measurement, in this process
        print(json.dumps(measure(args.mode, args.steps, args.batch, extra)))
        return
    rows = []
    for mode in MODES:
        proc = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--batch",
                               str(args.batch), *extra], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"mode": mode, "error": proc.stderr.strip().splitlines()[-1][:300]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    plain = next(r for r in rows if r["mode"] == "plain")
    lines = ["| step | s / step | x plain | tokens / s | peak RSS above model (MB) | LoRA B moved | "
             "one-time prefix s / example |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed: {r['error']} | | | | | |")
            continue
        r["ratio_to_plain"] = r["s_per_step"] / plain["s_per_step"]
        lines.append(f"| {r['mode']} | {r['s_per_step']:.2f} | {r['ratio_to_plain']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_rss_above_loaded_mb']:.0f} | {r['lora_b_moved']} | {r['prefix_s_per_example']:.3f} |")
    table = "\n".join(lines)
    print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 2 threads",
            "command": "python benchmarks/lm_dp_cost.py " + " ".join(sys.argv[1:]), "rows": rows}
    (OUT / f"{args.name}.json").write_text(json.dumps(meta, indent=2))
    (OUT / f"{args.name}.md").write_text(f"`{meta['command']}` ({meta['machine']}), batch {args.batch}, "
                                       f"mean of {args.steps} steps after one warm-up:\n\n{table}\n")


if __name__ == "__main__":
    main()
