"""What Opacus's ``secure_mode`` noise costs per DP-SGD step on the default model.

``secure_mode=True`` draws each Gaussian as a sum of four (Jin et al. 2021, against the
floating-point attack on the sampler); the clients always use it. This measures one
DP-SGD step of the packaged MiniLM with LoRA r=8 on query/value plus the head (the
default experiment's model) on a fixed shard, secure_mode on and off, interleaved, and
the noise draw alone for the same number of parameters. Prints the table and writes
``benchmarks/results/secure_noise.{json,md}``.

    python benchmarks/secure_noise.py [--steps 8] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from opacus.optimizers.optimizer import _generate_noise

from fedlora.client.training import DPGenerators, _dp_parts, _step, make_optimizer
from fedlora.core.config import compose
from fedlora.data.sources import load_task_data_cached
from fedlora.privacy.calibration import DPPlan
from fedlora.privacy.randomness import NoiseSource
from fedlora.tasks import get_task
from fedlora.tasks.runtime import get_bundle

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = compose(["model.max_length=64"])
    task = load_task_data_cached(cfg.data, int(cfg.seed))
    bundle = get_bundle(cfg, task.num_labels)
    classification = get_task(cfg.model)
    data = classification.encode(task.train.select(range(512)), bundle.tokenizer, cfg.model)
    plan = DPPlan(sample_rate=args.batch / len(data), noise_multiplier=1.0, steps_per_round=args.steps,
                  expected_batch_size=args.batch, probe_steps=0,
                  planned_rounds=1, max_grad_norm=0.3, target_epsilon=8.0, delta=1e-5, accountant="rdp")
    gsm = bundle.grad_sample_module()
    noise = NoiseSource()
    times = {True: [], False: []}
    for _ in range(args.steps):
        for secure in (False, True):
            gens = DPGenerators(noise=noise.torch_generator(), sampling=noise.torch_generator())
            optimizer, loader = _dp_parts(make_optimizer(gsm._module, cfg.train), data, plan, gens, secure_mode=secure)
            batch = next(iter(loader))
            gsm.train()
            start = time.perf_counter()
            _step(gsm, optimizer, batch, classification.loss)
            times[secure].append(time.perf_counter() - start)
    d = sum(p.numel() for p in bundle.model.parameters() if p.requires_grad)
    ref = torch.zeros(d)
    draw = {}
    for secure in (False, True):
        gen = noise.torch_generator()
        start = time.perf_counter()
        for _ in range(50):
            _generate_noise(1.0, ref, generator=gen, secure_mode=secure)
        draw[secure] = (time.perf_counter() - start) / 50
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    row = {
        "trainable_parameters": d,
        "batch": args.batch,
        "max_length": 64,
        "steps_each": args.steps,
        "step_s_median": {"secure_mode_off": med[False], "secure_mode_on": med[True]},
        "step_ratio": med[True] / med[False],
        "noise_draw_ms": {"secure_mode_off": 1e3 * draw[False], "secure_mode_on": 1e3 * draw[True]},
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 2 threads",
    }
    table = "\n".join([
        "| trainable params | step s (off) | step s (on) | ratio | noise draw ms (off) | noise draw ms (on) |",
        "|---|---|---|---|---|---|",
        f"| {d:,} | {med[False]:.3f} | {med[True]:.3f} | {row['step_ratio']:.3f}x | "
        f"{1e3 * draw[False]:.2f} | {1e3 * draw[True]:.2f} |",
    ])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "secure_noise.json").write_text(json.dumps(row, indent=2))
    (OUT / "secure_noise.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
