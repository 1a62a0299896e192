"""Predict with a finished run's model.

    python -m fedlora.predict <run dir> --text "Great coffee, will buy again"
    python -m fedlora.predict <run dir> --file reviews.csv --text-column review [--label-column score]

Loads the base model named by the run's config with the run's final adapter
(``<run dir>/adapter``) through its task, prints one prediction per text (label and
probability) and, when labels are given, the accuracy. In Python::

    from fedlora.predict import load_run
    tokenizer, model, labels = load_run("outputs/2026-12-01/10-00-00")
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from fedlora.core.errors import ConfigError
from fedlora.data.sources import read_table
from fedlora.tasks import get_task


def run_config(run_dir: Path | str) -> Any:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "adapter").is_dir():
        raise ConfigError("run dir", f"{run_dir} has no config.yaml and adapter/: point at a finished run's dir")
    return OmegaConf.load(run_dir / "config.yaml")


def load_run(run_dir: Path | str) -> tuple[Any, torch.nn.Module, list[str]]:
    """(tokenizer, model with the run's final adapter, label names)."""
    cfg = run_config(run_dir)
    return get_task(cfg.model).load_trained(Path(run_dir), cfg)


@torch.no_grad()
def predict(tokenizer: Any, model: torch.nn.Module, texts: list[str], max_length: int,
            batch_size: int = 64) -> tuple[list[int], list[float]]:
    """Class ids and their probabilities for ``texts``."""
    ids, probs = [], []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        p = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float().softmax(-1)
        top = p.max(dim=-1)
        ids += top.indices.tolist()
        probs += top.values.tolist()
    return ids, probs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predict with a finished run's model (base + final adapter).")
    parser.add_argument("run_dir", type=Path)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to classify (repeatable)")
    source.add_argument("--file", type=Path, help="a CSV / JSONL / Parquet file")
    parser.add_argument("--text-column", help="the file's text column")
    parser.add_argument("--label-column", help="the file's label column: also print the accuracy")
    args = parser.parse_args(argv)
    try:
        cfg = run_config(args.run_dir)
        texts, gold = args.text or [], None
        if args.file is not None:
            if not args.text_column:
                raise ConfigError("--text-column", "name the file's text column")
            table = read_table(str(args.file), "--file")
            for column in [args.text_column] + ([args.label_column] if args.label_column else []):
                if column not in table.columns:
                    raise ConfigError("--text-column" if column == args.text_column else "--label-column",
                                      f"{args.file} has no column {column!r}; it has {list(table.columns)}")
            texts = table[args.text_column].astype(str).tolist()
            gold = table[args.label_column].astype(str).tolist() if args.label_column else None
        tokenizer, model, labels = load_run(args.run_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ids, probs = predict(tokenizer, model, texts, int(cfg.model.max_length))
    for text, i, p in zip(texts, ids, probs):
        print(f"{labels[i]}\t{p:.4f}\t{text[:80]}")
    if gold is not None:
        accuracy = sum(labels[i] == g for i, g in zip(ids, gold)) / max(1, len(gold))
        print(f"accuracy {accuracy:.4f} over {len(gold)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
