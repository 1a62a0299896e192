"""Hub revisions: every hub load of the model and the data is pinned by model.revision /
data.revision, an unpinned one warns before it is attempted, and the run records what
each load resolved. Nothing here reaches the hub (HF_HUB_OFFLINE=1): the loaders' hub
calls are replaced by recorders, or the offline failure is what follows the warning."""

import json
import types
import warnings

import datasets
import pytest
import transformers
from omegaconf import OmegaConf

from fedlora.core.config import compose
from fedlora.core.errors import ConfigError
from fedlora.data.sources import load_hub_split
from fedlora.models import hub
from fedlora.models.hub import UnpinnedRevisionWarning, load_tokenizer, revisions
from fedlora.record.model_card import model_card
from fedlora.record.results import RunRecorder
from fedlora.tasks.causal_lm import load_causal_lm
from fedlora.tasks.classification import SequenceClassification, load_classifier

PIN = "0123456789abcdef0123456789abcdef01234567"
REPORTED = "fedcba9876543210fedcba9876543210fedcba98"
HUB_ID = "example-org/example-model"


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Each test starts with no warning given and no commit resolved in this process."""
    monkeypatch.setattr(hub, "_WARNED", set())
    monkeypatch.setattr(hub, "_RESOLVED", {})


def _model_cfg(*overrides, model="hf"):
    return compose([f"model={model}", f"model.name_or_path={HUB_ID}", *overrides]).model


class _Calls:
    """Stands in for a hub call: records its keyword arguments, then fails as offline
    would (or returns ``result``)."""

    def __init__(self, result=None):
        self.kwargs, self.result = [], result

    def __call__(self, *args, **kwargs):
        self.kwargs.append(kwargs)
        if self.result is None:
            raise OSError("offline")
        return self.result


def _causal_config():
    return types.SimpleNamespace(architectures=["LlamaForCausalLM"], _commit_hash=REPORTED)


@pytest.mark.parametrize("revision", [PIN, None])
def test_every_model_load_passes_model_revision(monkeypatch, revision):
    overrides = [f"model.revision={revision}"] if revision else []
    tokenizer, config, classifier, encoder, causal = _Calls(), _Calls(_causal_config()), _Calls(), _Calls(), _Calls()
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", classifier)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", encoder)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", causal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnpinnedRevisionWarning)
        for load in (
            lambda: load_tokenizer(_model_cfg(*overrides)),
            lambda: load_classifier(_model_cfg(*overrides), 2, 0),
            lambda: load_classifier(_model_cfg(*overrides, "model.pooling=mean"), 2, 0),
            lambda: load_causal_lm(_model_cfg(*overrides, model="hf_causal"), 0),
        ):
            with pytest.raises(ConfigError, match="model.name_or_path"):
                load()
    calls = tokenizer.kwargs + config.kwargs + classifier.kwargs + encoder.kwargs + causal.kwargs
    assert len(calls) == 5
    assert all(kw["revision"] == revision for kw in calls)
    # The config the hub served says which commit it came from: that is what the run records.
    facts = revisions(compose(["model=hf_causal", f"model.name_or_path={HUB_ID}", *overrides]))["model"]
    assert facts == {"name": HUB_ID, "requested": revision, "resolved": REPORTED, "pinned": revision is not None}


def test_an_unpinned_hub_model_warns_once_before_the_load(monkeypatch):
    cfg = _model_cfg("model.trust_remote_code=true")
    # The warning comes first; the load then fails offline.
    with (pytest.warns(UnpinnedRevisionWarning, match=r"not pinned.*remote code.*set model\.revision"),
          pytest.raises(ConfigError, match="cannot load a tokenizer")):
        load_tokenizer(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnpinnedRevisionWarning)
        with pytest.raises(ConfigError, match="cannot load a tokenizer"):
            load_tokenizer(cfg)


def test_a_pinned_hub_model_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnpinnedRevisionWarning)
        with pytest.raises(ConfigError, match="cannot load a tokenizer"):
            load_tokenizer(_model_cfg(f"model.revision={PIN.upper()}"))


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/3"])
def test_a_branch_or_tag_is_accepted_with_a_warning_that_it_moves(revision):
    with pytest.warns(UnpinnedRevisionWarning, match=rf"model\.revision='{revision}' is a branch or tag"):
        assert hub.model_revision(_model_cfg(f"model.revision={revision}")) == revision


@pytest.mark.parametrize("revision", ["has space", "../up", "-flag", "x.lock", "a..b", "x@{1}", "x" * 300])
def test_a_malformed_revision_names_the_setting(revision):
    with pytest.raises(ConfigError, match=r"model\.revision.*neither a 40-hex commit hash nor a branch"):
        hub.check_revision(revision, "model.revision")


def test_a_revision_hydra_read_as_a_number_asks_to_quote_it():
    cfg = _model_cfg("model.revision=1234567890123456789012345678901234567890")
    with pytest.raises(ConfigError, match=r"model\.revision: must be a string.*quote it"):
        load_tokenizer(cfg)


def test_a_local_model_takes_no_revision(tmp_path, tiny_cfg):
    """A folder on disk (or a packaged model) is what runs: it loads with no revision and
    no warning, and a revision set for it is refused rather than silently ignored."""
    source = tiny_cfg().model
    folder = tmp_path / "tiny"
    load_tokenizer(source).save_pretrained(folder)
    load_classifier(source, 2, 0).save_pretrained(folder)
    local = compose(["model=hf", f"model.name_or_path={folder}"])
    assert not hub.is_hub_id(str(folder)) and hub.is_hub_id(HUB_ID)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnpinnedRevisionWarning)
        assert load_classifier(local.model, 2, 0).num_labels == 2
    assert revisions(local)["model"] == {"name": str(folder), "requested": None, "resolved": "local", "pinned": None}
    for cfg in (compose(["model=hf", f"model.name_or_path={folder}", f"model.revision={PIN}"]),
                tiny_cfg(f"model.revision={PIN}")):
        with pytest.raises(ConfigError, match=r"model\.revision: .* no hub commit to pin; set model\.revision=null"):
            load_tokenizer(cfg.model)


def _hub_data(revision=None, name="example-org/example-data"):
    return OmegaConf.create({"source": "hf", "name": name, "subset": None, "revision": revision})


def test_a_hub_dataset_is_loaded_at_data_revision(monkeypatch):
    builder = types.SimpleNamespace(hash=PIN, info=types.SimpleNamespace(dataset_size=10),
                                    download_and_prepare=lambda: None, as_dataset=lambda split, in_memory: split)
    calls = _Calls(builder)
    monkeypatch.setattr(datasets, "load_dataset_builder", calls)
    assert load_hub_split(_hub_data(PIN), "train") == "train"
    assert calls.kwargs == [{"revision": PIN}]
    assert revisions({"data": _hub_data(PIN)})["data"]["resolved"] == PIN


def test_an_unpinned_hub_dataset_warns_and_records_the_commit_it_read(monkeypatch):
    builder = types.SimpleNamespace(hash=REPORTED, info=types.SimpleNamespace(dataset_size=10),
                                    download_and_prepare=lambda: None, as_dataset=lambda split, in_memory: split)
    monkeypatch.setattr(datasets, "load_dataset_builder", _Calls(builder))
    with pytest.warns(UnpinnedRevisionWarning, match=r"hub dataset 'example-org/example-data' is not pinned.*data\.revision"):
        load_hub_split(_hub_data(), "train")
    assert revisions({"data": _hub_data()})["data"] == {
        "name": "example-org/example-data", "requested": None, "resolved": REPORTED, "pinned": False}


def test_an_unpinned_hub_dataset_warns_before_the_offline_failure():
    with (pytest.warns(UnpinnedRevisionWarning, match=r"data\.revision"),
          pytest.raises(ConfigError, match=r"data\.name: cannot load hub dataset")):
        load_hub_split(_hub_data(name="no-such-org/no-such-dataset"), "train")


def test_a_dataset_folder_loads_through_the_hub_loader_unpinned_and_unwarned(tmp_path, monkeypatch):
    """The loader's own steps (builder, prepare, split) read a real folder offline."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "rows"
    folder.mkdir()
    (folder / "train.csv").write_text("text,label\na,0\nb,1\nc,0\n")
    (folder / "test.csv").write_text("text,label\nd,1\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnpinnedRevisionWarning)
        rows = load_hub_split(_hub_data(name=str(folder)), "train")
    assert rows["text"] == ["a", "b", "c"]
    assert revisions({"data": _hub_data(name=str(folder))})["data"]["resolved"] == "local"
    with pytest.raises(ConfigError, match=r"data\.revision: .* no hub commit"):
        load_hub_split(_hub_data(PIN, name=str(folder)), "train")


def test_results_json_records_the_revisions(tmp_path):
    config = {"model": {"name_or_path": HUB_ID, "revision": PIN},
              "data": {"source": "finefood", "name": "finefood"}}
    hub.note_resolved("model.revision", HUB_ID, PIN, PIN)
    RunRecorder(tmp_path, config, privacy_unit="none", delta=None, num_rounds=1, echo=lambda _: None).write()
    recorded = json.loads((tmp_path / "results.json").read_text())["revisions"]
    assert recorded["model"] == {"name": HUB_ID, "requested": PIN, "resolved": PIN, "pinned": True}
    assert recorded["data"]["resolved"] == "local"


def _card(cfg):
    plan = types.SimpleNamespace(cfg=cfg, task=SequenceClassification(), num_labels=2, label_names=["a", "b"],
                                 client_dp=None, secagg=None, federation_train_size=100)
    statement = {"unit": "none", "rounds_completed": 1}
    return model_card(statement, plan)


def test_the_model_card_states_the_base_revision_and_loads_at_it(tiny_cfg):
    hub.note_resolved("model.revision", HUB_ID, None, REPORTED)
    unpinned = _card(tiny_cfg(f"model.name_or_path={HUB_ID}"))
    assert f"`{HUB_ID}` at commit `{REPORTED}` as the hub reported it; **not pinned**" in unpinned
    assert f'from_pretrained("{HUB_ID}", num_labels=2, revision="{REPORTED}")' in unpinned
    hub.note_resolved("model.revision", HUB_ID, PIN, PIN)
    pinned = _card(tiny_cfg(f"model.name_or_path={HUB_ID}", f"model.revision={PIN}"))
    assert f"`{HUB_ID}` pinned at commit `{PIN}` (model.revision)" in pinned
    local = _card(tiny_cfg())
    assert "is local (a packaged model" in local and "revision=" not in local
