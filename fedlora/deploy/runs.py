"""Where a deployed ServerApp may write: its run dir confined to the SuperLink's runs root.

The run config's ``run-dir`` comes from whoever submits the run; the ServerApp runs as
the SuperLink's user. Without a bound, ``run-dir=/home/op/.ssh`` or ``../../etc`` would
let a submitter create and overwrite files anywhere that user can. The root is the
SuperLink operator's choice (``python -m fedlora.deploy superlink --runs-root DIR``, which
sets ``FEDLORA_RUNS_ROOT`` for the ServerApp processes it spawns); a relative run dir
lies under it, and every run dir is checked after resolving ``..`` and symlinks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from fedlora.core.errors import ConfigError

RUNS_ROOT_ENV = "FEDLORA_RUNS_ROOT"
DEFAULT_RUNS_ROOT = "outputs"  # under the SuperLink's working directory, as simulations write


def runs_root(env: Mapping[str, str] | None = None) -> Path:
    """The directory every deployed run dir must lie in (resolved, symlinks followed)."""
    env = os.environ if env is None else env
    return Path(env.get(RUNS_ROOT_ENV) or DEFAULT_RUNS_ROOT).expanduser().resolve()


def confine_run_dir(run_dir: str | Path, root: Path) -> Path:
    """``run_dir`` resolved (relative to ``root``), or ConfigError naming ``run-dir``
    when it lies outside ``root`` by ``..``, an absolute path or a symlink.

    Checked before anything is created: resolving follows every symlink that already
    exists on the way, so a link under the root that points elsewhere is refused too.
    """
    root = Path(root).resolve()
    text = str(run_dir)
    if not text.strip():
        raise ConfigError("run-dir", "is empty; leave it out for the default under the runs root")
    if "\x00" in text:
        raise ConfigError("run-dir", "contains a NUL character")
    candidate = Path(text).expanduser()
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if resolved != root and root not in resolved.parents:
        raise ConfigError(
            "run-dir",
            f"{text!r} resolves to {resolved}, outside the SuperLink's runs root {root}; pick a "
            f"directory under it (a relative run-dir lies under it), or let the SuperLink's "
            f"operator choose another root (`python -m fedlora.deploy superlink --runs-root DIR`, "
            f"{RUNS_ROOT_ENV})",
        )
    if resolved == root:
        raise ConfigError("run-dir", f"is the runs root {root} itself; name a directory under it")
    return resolved
