"""Instruction data for causal-LM fine-tuning, normalised to one shape.

Every source becomes rows of ``prompt`` (the conversation before the answer, as JSON
chat messages ``[{"role": ..., "content": ...}]``), ``response`` (the answer the loss
is taken on) and ``label`` (the answer's index in a closed answer set, else 0).
Formats, detected from the columns (``data.format=auto``) or named:

- ``alpaca``: ``instruction`` / ``input`` / ``output`` columns (Stanford Alpaca; also
  FlowerTune's ``flwrlabs/alpaca-gpt4``, ``medalpaca/medical_meadow_medical_flashcards``
  and ``FinGPT/fingpt-sentiment-train``); the column names are ``data.instruction_column``,
  ``data.input_column`` and ``data.response_column``.
- ``chat``: a ``messages`` list of turns (``data.messages_column``); the last turn is the
  assistant's answer, the turns before it the prompt.
- ``classification``: a text and a label column (the packaged fine-food reviews and BBC
  News): the prompt is ``data.prompt_template`` filled with the text and the answer set,
  the answer the label's name (or its entry in ``data.answers``), as in FlowerTune's
  finance sentiment track.
- ``text``: ``data.text_column`` only: plain next-token prediction on all of it.

The answer set is closed when the data has one (classification; or ``data.answers=auto``
and at most :data:`MAX_CLOSED_ANSWERS` distinct answers that cover the test split): the
task then scores each answer's log-likelihood for accuracy.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import pandas as pd
from datasets import Dataset

from fedlora.core.config import canonical_json
from fedlora.core.errors import ConfigError
from fedlora.data.sources import (
    SOURCES,
    TaskData,
    _cap,
    _normalise,
    load_hub_split,
    read_table,
)

FORMATS = ("auto", "alpaca", "chat", "classification", "text")
MAX_CLOSED_ANSWERS = 16
DEFAULT_TEMPLATE = "{text}\n\nAnswer with one of: {answers}."


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key) if hasattr(cfg, "get") else None
    return default if value is None else value


def detect_format(columns: list[str], cfg: Any) -> str:
    """The data's format from its columns, or ``data.format`` as configured."""
    fmt = str(_get(cfg, "format", "auto"))
    if fmt not in FORMATS:
        raise ConfigError("data.format", f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    if fmt != "auto":
        return fmt
    if _get(cfg, "messages_column", "messages") in columns:
        return "chat"
    if {_get(cfg, "instruction_column", "instruction"), _get(cfg, "response_column", "output")} <= set(columns):
        return "alpaca"
    text, label = _get(cfg, "text_column", "text"), _get(cfg, "label_column", "label")
    if text in columns and label in columns:
        return "classification"
    if text in columns:
        return "text"
    raise ConfigError(
        "data.format", f"cannot tell the data's format from its columns {columns}: give instruction/input/"
        "output columns (alpaca), a messages list (chat), a text and a label column (classification) or a "
        "text column (plain text), or name them with data.instruction_column / data.response_column / "
        "data.messages_column / data.text_column")


def _require(df: pd.DataFrame, columns: dict[str, str], where: str) -> None:
    for setting, column in columns.items():
        if column not in df.columns:
            raise ConfigError(setting, f"column {column!r} not found in {where}; columns are {list(df.columns)}")


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


def _messages(system: str | None, user: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def _alpaca(df: pd.DataFrame, cfg: Any, where: str) -> pd.DataFrame:
    ins, inp, out = (_get(cfg, "instruction_column", "instruction"), _get(cfg, "input_column", "input"),
                     _get(cfg, "response_column", "output"))
    _require(df, {"data.instruction_column": ins, "data.response_column": out}, where)
    system = _get(cfg, "system_prompt")
    extra = df[inp] if inp in df.columns else [""] * len(df)
    prompts = [json.dumps(_messages(system, _text(i) + (f"\n\n{_text(x)}" if _text(x).strip() else "")))
               for i, x in zip(df[ins], extra)]
    return pd.DataFrame({"prompt": prompts, "response": [_text(v) for v in df[out]]})


def _turns(value: Any, where: str) -> list[dict[str, str]]:
    turns = json.loads(value) if isinstance(value, str) else list(value)
    out = []
    for turn in turns:
        if not hasattr(turn, "get") or "role" not in turn or "content" not in turn:
            raise ConfigError("data.messages_column", f"{where}: every message needs 'role' and 'content', got "
                              f"{str(turn)[:80]}")
        out.append({"role": str(turn["role"]), "content": _text(turn["content"])})
    return out


def _chat(df: pd.DataFrame, cfg: Any, where: str) -> pd.DataFrame:
    column = _get(cfg, "messages_column", "messages")
    _require(df, {"data.messages_column": column}, where)
    system = _get(cfg, "system_prompt")
    prompts, responses = [], []
    for value in df[column]:
        turns = _turns(value, where)
        if not turns or turns[-1]["role"] != "assistant":
            raise ConfigError("data.messages_column", f"{where}: a conversation must end with the assistant's "
                              f"answer (role 'assistant'), got {[t['role'] for t in turns]}")
        prompt = turns[:-1]
        if system and not any(t["role"] == "system" for t in prompt):
            prompt = [{"role": "system", "content": system}] + prompt
        prompts.append(json.dumps(prompt))
        responses.append(turns[-1]["content"])
    return pd.DataFrame({"prompt": prompts, "response": responses})


def _plain(df: pd.DataFrame, cfg: Any, where: str) -> pd.DataFrame:
    column = _get(cfg, "text_column", "text")
    _require(df, {"data.text_column": column}, where)
    return pd.DataFrame({"prompt": ["[]"] * len(df), "response": [_text(v) for v in df[column]]})


def _classification(train: pd.DataFrame, test: pd.DataFrame, label_names: list[str] | None, cfg: Any,
                    where: str) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Text + label as an instruction: the template asks, the label's answer replies."""
    train, test, label_names = _normalise(train, test, _get(cfg, "text_column", "text"),
                                          _get(cfg, "label_column", "label"), label_names, where)
    answers = _get(cfg, "answers", "auto")
    if answers == "auto":
        answers = list(label_names)
    answers = [str(a) for a in answers]
    if len(answers) != len(label_names) or len(set(answers)) != len(answers):
        raise ConfigError("data.answers", f"give one distinct answer per label {label_names}, got {answers}")
    template = str(_get(cfg, "prompt_template", DEFAULT_TEMPLATE))
    system = _get(cfg, "system_prompt")

    def rows(df: pd.DataFrame) -> pd.DataFrame:
        try:
            prompts = [json.dumps(_messages(system, template.format(text=t, answers=" or ".join(answers))))
                       for t in df["text"]]
        except (KeyError, IndexError) as err:
            raise ConfigError("data.prompt_template", f"only {{text}} and {{answers}} can be filled in: {err}") from err
        return pd.DataFrame({"prompt": prompts, "response": [answers[i] for i in df["label"]],
                             "label": df["label"].to_numpy()})

    return rows(train), rows(test), answers


def _frames(cfg: Any, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, list[str] | None]:
    """(train, test, label names or None) of the configured source, before formatting."""
    source = str(cfg.source)
    if source in ("finefood", "bbc_news"):
        return SOURCES[source](cfg)
    if source == "local":
        df = read_table(str(cfg.path), "data.path")
        if cfg.get("test_path"):
            return df, read_table(str(cfg.test_path), "data.test_path"), None
        return (*_hold_out(df, cfg, seed), None)
    if source == "hf":
        return _hub(cfg, seed)
    raise ConfigError("data", f"unknown data source {source!r}; choose one of {sorted(SOURCES)}")


def _hold_out(df: pd.DataFrame, cfg: Any, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded test split of ``data.test_fraction`` of the rows."""
    fraction = float(_get(cfg, "test_fraction", 0.1))
    if not 0 < fraction < 1:
        raise ConfigError("data.test_fraction", f"must lie in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(df))
    n_test = max(1, int(round(fraction * len(df))))
    return df.iloc[np.sort(order[n_test:])].reset_index(drop=True), df.iloc[np.sort(order[:n_test])].reset_index(drop=True)


def _hub(cfg: Any, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, None]:
    train = load_hub_split(cfg, cfg.train_split).to_pandas()
    if not cfg.get("test_split"):  # e.g. flwrlabs/alpaca-gpt4 has a train split only
        return (*_hold_out(train, cfg, seed), None)
    return train, load_hub_split(cfg, cfg.test_split).to_pandas(), None


FORMATTERS = {"alpaca": _alpaca, "chat": _chat, "text": _plain}


def format_rows(df: pd.DataFrame, fmt: str, cfg: Any, where: str) -> pd.DataFrame:
    """``df`` of an unlabelled format as (prompt, response) rows."""
    return FORMATTERS[fmt](df, cfg, where)


def _closed_answers(train: pd.DataFrame, test: pd.DataFrame, cfg: Any) -> list[str]:
    answers = _get(cfg, "answers", "auto")
    if answers != "auto":
        return [str(a) for a in answers]
    values = sorted(set(train["response"]))
    if 2 <= len(values) <= MAX_CLOSED_ANSWERS and set(test["response"]) <= set(values):
        return values
    return []


def _drop_empty(df: pd.DataFrame, part: str, where: str) -> pd.DataFrame:
    keep = df["response"].str.strip().str.len() > 0
    if not keep.any():
        raise ConfigError("data.response_column", f"every response of the {part} split of {where} is empty; "
                          "name the column holding the answers")
    return df[keep].reset_index(drop=True)


def load_instruction_data(cfg: Any, seed: int) -> TaskData:
    """Load, format, validate and cap the instruction data of ``data.*``."""
    train, test, label_names = _frames(cfg, seed)
    where = f"dataset {cfg.get('name') or cfg.get('path')!r}"
    fmt = detect_format(list(train.columns), cfg)
    if fmt == "classification":
        train, test, answers = _classification(train, test, label_names, cfg, where)
    else:
        train, test = format_rows(train, fmt, cfg, where), format_rows(test, fmt, cfg, where)
        train, test = _drop_empty(train, "train", where), _drop_empty(test, "test", where)
        answers = [] if fmt == "text" else _closed_answers(train, test, cfg)
        index = {a: i for i, a in enumerate(answers)}
        for df in (train, test):
            df["label"] = [index.get(r, 0) for r in df["response"]]
    train = _cap(train, cfg.get("max_train_samples"), seed, "data.max_train_samples")
    test = _cap(test, cfg.get("max_test_samples"), seed, "data.max_test_samples")
    return TaskData(
        train=Dataset.from_pandas(train, preserve_index=False),
        test=Dataset.from_pandas(test, preserve_index=False),
        label_names=answers,
        meta={"name": cfg.get("name"), "format": fmt, "num_train": len(train), "num_test": len(test),
              "answers": answers},
    )


def load_node_instructions(path: str, cfg: Any, answers: list[str]) -> Dataset:
    """A SuperNode's own instruction file (``data-path``), in the federation's format and
    answer set."""
    df = read_table(path, "node-config data-path")
    where = f"data-path {path}"
    fmt = detect_format(list(df.columns), cfg)
    if fmt == "classification":
        if not answers:
            raise ConfigError("node-config data-path", f"{where} is labelled data but the federation's task "
                              "has no answer set")
        # Its labels are the federation's answers (e.g. "great" / "not great").
        rows, _, _ = _classification(df, df.iloc[:0], list(answers), cfg, where)
    else:
        rows = _drop_empty(format_rows(df, fmt, cfg, where), "train", where)
        index = {a: i for i, a in enumerate(answers)}
        rows["label"] = [index.get(r, 0) for r in rows["response"]]
    if len(rows) == 0:
        raise ConfigError("node-config data-path", f"{path} has no rows")
    return Dataset.from_pandas(rows, preserve_index=False)


@functools.lru_cache(maxsize=2)
def _cached(cfg_json: str, seed: int) -> TaskData:
    from omegaconf import OmegaConf

    return load_instruction_data(OmegaConf.create(json.loads(cfg_json)), seed)


def load_instruction_data_cached(cfg: Any, seed: int) -> TaskData:
    """One load per process for the same settings."""
    return _cached(canonical_json(cfg), seed)
