"""Answer prompts with a finished causal-LM run's model (base + final adapter).

    python -m fedlora.generate <run dir> --prompt "Is this review great or not? ..."
    python -m fedlora.generate <run dir> --prompt "..." --prompt "..." --max-new-tokens 64

Each prompt is one user turn, rendered as in training (the tokenizer's chat template, or
the Alpaca template), with the run's system prompt; the answer is greedy. In Python the
adapter loads with stock PEFT::

    from peft import AutoPeftModelForCausalLM
    model = AutoPeftModelForCausalLM.from_pretrained("<run dir>/adapter")
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedlora.core.errors import ConfigError
from fedlora.predict import run_config
from fedlora.tasks import get_task
from fedlora.tasks.causal_lm import CausalLM, has_template, render


def answer(run_dir: Path | str, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
    """The fine-tuned model's greedy answers to ``prompts``."""
    cfg = run_config(run_dir)
    task = get_task(cfg.model)
    if not isinstance(task, CausalLM):
        raise ConfigError("run dir", f"{run_dir} is a {task.name} run; generation needs a causal_lm run "
                          "(python -m fedlora.predict classifies)")
    tokenizer, model, _ = task.load_trained(Path(run_dir), cfg)
    system = cfg.data.get("system_prompt")
    template = has_template(tokenizer, cfg.model)
    ids = [render(tokenizer, ([{"role": "system", "content": system}] if system else [])
                  + [{"role": "user", "content": p}], "", template).prompt for p in prompts]
    return task.generate(model, tokenizer, ids, max_new_tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Answer prompts with a finished causal-LM run's model.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        print("error: --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        answers = answer(args.run_dir, args.prompt, args.max_new_tokens)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for prompt, text in zip(args.prompt, answers):
        print(f"> {prompt}\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
