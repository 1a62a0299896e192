import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from fedlora.core.config import compose
from fedlora.core.errors import ConfigError
from fedlora.data import client_split, load_task_data, partition_indices


def _local_cfg(path, **kw):
    base = compose(["data=local", f"data.path={path}"]).data
    return OmegaConf.merge(base, kw)


def _write(tmp_path, df, name="d.csv"):
    path = tmp_path / name
    if name.endswith(".csv"):
        df.to_csv(path, index=False)
    elif name.endswith(".jsonl"):
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    return path


def _reviews(n=60):
    rng = np.random.default_rng(0)
    return pd.DataFrame({"body": [f"text {i}" for i in range(n)], "stars": rng.choice(["pos", "neg", "mid"], n)})


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl", "d.parquet"])
def test_local_files_map_string_labels_in_sorted_order(tmp_path, name):
    path = _write(tmp_path, _reviews(), name)
    task = load_task_data(_local_cfg(path, text_column="body", label_column="stars"), 0)
    assert task.label_names == ["mid", "neg", "pos"]
    assert len(task.train) + len(task.test) == 60
    row = task.train[0]
    df = _reviews().set_index("body")
    assert task.label_names[row["label"]] == df.loc[row["text"], "stars"]


def test_unknown_column_is_named(tmp_path):
    path = _write(tmp_path, _reviews())
    with pytest.raises(ConfigError, match="'review' not found") as err:
        load_task_data(_local_cfg(path, text_column="review", label_column="stars"), 0)
    assert err.value.setting == "data.text_column"


def test_missing_labels_and_single_class_are_refused(tmp_path):
    df = _reviews()
    df.loc[3, "stars"] = None
    path = _write(tmp_path, df)
    with pytest.raises(ConfigError, match="missing values") as err:
        load_task_data(_local_cfg(path, text_column="body", label_column="stars"), 0)
    assert err.value.setting == "data.label_column"
    one = _reviews().assign(stars="pos")
    path = _write(tmp_path, one, "one.csv")
    with pytest.raises(ConfigError, match="only one class"):
        load_task_data(_local_cfg(path, text_column="body", label_column="stars"), 0)


def test_missing_file_and_unknown_source(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_task_data(_local_cfg(tmp_path / "nope.csv"), 0)
    with pytest.raises(ConfigError, match="unknown data source"):
        load_task_data(OmegaConf.create({"source": "nope", "name": "x"}), 0)


def test_finefood_defaults():
    task = load_task_data(compose([]).data, 0)
    assert (len(task.train), len(task.test)) == (4000, 1000)
    assert task.label_names == ["other", "great"]
    assert abs(np.mean(task.train["label"]) - 0.65) < 0.01


def test_caps_apply():
    task = load_task_data(compose(["data.max_train_samples=100", "data.max_test_samples=30"]).data, 0)
    assert (len(task.train), len(task.test)) == (100, 30)


def test_bbc_news_topics_sorted():
    task = load_task_data(compose(["data=bbc_news"]).data, 0)
    assert task.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(task.train) + len(task.test) == 2225


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_partitions_cover_training_set_disjointly(partition):
    cfg = compose([f"partition={partition}", "data.max_train_samples=500"])
    task = load_task_data(cfg.data, 0)
    parts = partition_indices(task.train, 5, cfg.partition)
    allrows = np.concatenate(parts)
    assert len(allrows) == len(set(allrows.tolist())) == 500
    again = partition_indices(task.train, 5, cfg.partition)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_skews_labels():
    cfg = compose(["partition=dirichlet", "partition.alpha=0.1"])
    task = load_task_data(cfg.data, 0)
    labels = np.asarray(task.train["label"])
    shares = [labels[p].mean() for p in partition_indices(task.train, 8, cfg.partition)]
    assert max(shares) - min(shares) > 0.3


def test_more_clients_than_examples():
    cfg = compose(["data.max_train_samples=10"])
    task = load_task_data(cfg.data, 0)
    with pytest.raises(ConfigError, match="only 10 training examples") as err:
        partition_indices(task.train, 11, cfg.partition)
    assert err.value.setting == "federation.num_clients"


def test_replicate_gives_every_client_the_same_rows_at_any_federation_size():
    cfg = compose(["partition=replicate", "partition.examples_per_client=50", "data.max_train_samples=200"])
    task = load_task_data(cfg.data, 0)
    small = partition_indices(task.train, 10, cfg.partition)
    large = partition_indices(task.train, 5000, cfg.partition)  # more clients than rows
    assert len(large) == 5000 and {len(p) for p in large} == {50}
    assert all(len(set(p.tolist())) == 50 and p.max() < 200 for p in large[:50])  # no row twice in one shard
    # A client's shard is its own seeded draw: the same in a federation of 10 or 5,000.
    assert all(np.array_equal(a, b) for a, b in zip(small, large))
    assert not np.array_equal(large[0], large[1])
    with pytest.raises(ConfigError, match=r"\[1, 200\]") as err:
        partition_indices(task.train, 3, compose(["partition=replicate", "partition.examples_per_client=201"]).partition)
    assert err.value.setting == "partition.examples_per_client"


def test_replicate_declares_its_shard_size_under_sample_level_dp():
    from fedlora.plan import build_plan

    cfg = compose(["model=tiny_bert", "train.probe_steps=0", "partition=replicate",
                   "partition.examples_per_client=100", "federation.num_clients=3000", "data.max_train_samples=400"])
    plan = build_plan(cfg)
    # The training part of a 100-row shard (10% validation), not 400 rows / 3000 clients.
    assert {c.num_examples for c in plan.clients} == {90}
    assert plan.clients[0].dp is plan.clients[2999].dp  # one calibration shared by equal clients


def test_client_split_keeps_a_training_row():
    tr, va = client_split(np.arange(10), 0.2, 0)
    assert len(tr) == 8 and len(va) == 2 and not set(tr) & set(va)
    tr, va = client_split(np.arange(1), 0.5, 0)
    assert len(tr) == 1 and len(va) == 0


@pytest.mark.parametrize("overrides", [[], ["experiment=lm"]])
def test_an_unreachable_hub_dataset_names_the_setting(overrides):
    """Classification and instruction data load hub datasets through one loader; without
    the hub (HF_HUB_OFFLINE=1 here) both refuse with the setting to change."""
    from fedlora.tasks import get_task

    cfg = compose([*overrides, "data=hf", "data.name=no-such-org/no-such-dataset", "data.revision=0123456789abcdef0123456789abcdef01234567"])
    with pytest.raises(ConfigError, match=r"data\.name.*no-such-org/no-such-dataset"):
        get_task(cfg.model).load_data(cfg.data, 0)
