"""The data holder's own policy, enforced on its node.

In a deployment the run config comes from whoever submits the run, and every
ClientApp rebuilds its plan from it: without a check on the node, a submitter could ask
for ``privacy=none``, any epsilon, ``model.trust_remote_code=true`` or
``data.path=<any file on the node>``. Each organisation, not the server, decides what it
gives (the inter-domain policy of cross-silo FL; Kairouz et al. 2021, "Advances and Open
Problems in Federated Learning", Sec. 4.4.3 on trust boundaries): the SuperNode's
``--node-config`` carries its policy, and its ClientApp refuses a run that asks for less,
before it loads data or a model.

Node-config keys (all optional; Flower's node config is ``key=value`` pairs):

- ``max-epsilon=<float>``: the largest epsilon this node spends over the run, in its
  privacy unit; a run without DP, with a larger budget for this client, with plain
  (uncounted) federated evaluation or with a fixed noise seed is refused.
- ``privacy-unit=sample|client``: the privacy unit the node requires (implies DP).
- ``require-secagg=true``: the node's update leaves it only masked by SecAgg+; a run
  without SecAgg+ is refused, and a training message without the SecAgg+ setup is
  refused whatever the run config says (:func:`fedlora.client.app.secure_mod`).
- ``allow-remote-code=true``: let the run set ``model.trust_remote_code=true``
  (refused by default: it executes the model repository's code on the node).
- ``allow-data-paths=true``: let the run name files or folders on the node (``data.path``,
  ``data.test_path``, caches such as ``model.frozen_prefix_dir``, or a path given as
  ``data.name`` / ``model.name_or_path``; :func:`node_paths`); refused by default: the
  node's own data is its ``data-path`` node config, set by the data holder.
- ``data-root=<dir>``: the node's own ``data-path`` must resolve inside it
  (:func:`fedlora.client.numpy_client.node_data_path`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedlora.core.errors import ConfigError
from fedlora.core.secure import secure_enabled
from fedlora.core.units import CLIENT, NONE, SAMPLE, unit_of
from fedlora.privacy.budgets import client_epsilon

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}
# The node-config keys of a data holder's policy (data-root confines its own data-path).
POLICY_KEYS = ("max-epsilon", "privacy-unit", "require-secagg", "allow-remote-code", "allow-data-paths", "data-root")


class PolicyRefusal(ConfigError):
    """A run this node's policy does not allow; the message names the node-config key."""


def _flag(node_config: Any, key: str) -> bool:
    value = str(node_config.get(key, "")).strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ConfigError(f"node-config {key}", f"must be true or false, got {node_config.get(key)!r}")


def _looks_like_path(name: Any) -> bool:
    """A name a loader would read from this node's disk rather than the hub (judged by
    its form, so that a refusal never says whether a file exists)."""
    text = str(name or "")
    return text.startswith(("/", ".", "~", "\\")) or text.count("/") > 1 or ":" in text[:3]


def node_paths(cfg: Any) -> list[str]:
    """The settings of ``cfg`` that name a file or folder on the node: data files
    (``*path``), caches the node would write (``*_dir``), and hub names given as paths."""
    named = []
    for group in ("data", "model"):
        for key, value in (cfg.get(group) or {}).items():
            if value in (None, ""):
                continue
            if key.endswith(("path", "_dir")) and key != "name_or_path":
                named.append(f"{group}.{key}")
            elif key in ("name", "name_or_path") and _looks_like_path(value):
                named.append(f"{group}.{key}")
    return named


@dataclass(frozen=True)
class NodePolicy:
    max_epsilon: float | None = None
    privacy_unit: str | None = None
    require_secagg: bool = False
    allow_remote_code: bool = False
    allow_data_paths: bool = False

    @classmethod
    def from_node_config(cls, node_config: Any) -> "NodePolicy":
        max_eps = node_config.get("max-epsilon")
        if max_eps is not None:
            try:
                max_eps = float(max_eps)
            except (TypeError, ValueError):
                max_eps = float("nan")
            if not max_eps > 0:
                raise ConfigError("node-config max-epsilon", f"must be a positive number, got "
                                  f"{node_config.get('max-epsilon')!r}")
        unit = node_config.get("privacy-unit")
        if unit is not None and str(unit) not in (SAMPLE, CLIENT):
            raise ConfigError("node-config privacy-unit", f"must be {SAMPLE} or {CLIENT}, got {unit!r}")
        return cls(max_epsilon=max_eps, privacy_unit=None if unit is None else str(unit),
                   require_secagg=_flag(node_config, "require-secagg"),
                   allow_remote_code=_flag(node_config, "allow-remote-code"),
                   allow_data_paths=_flag(node_config, "allow-data-paths"))

    @property
    def requires_dp(self) -> bool:
        return self.max_epsilon is not None or self.privacy_unit is not None

    def refusals(self, cfg: Any, client: int) -> list[str]:
        """Why this node refuses the run ``cfg`` as client ``client`` (empty: it takes part)."""
        why = []
        unit = unit_of(cfg)
        if self.requires_dp and unit == NONE:
            why.append("the run has no differential privacy (privacy=none) but this node requires it "
                       "(node-config max-epsilon / privacy-unit)")
        if self.privacy_unit is not None and unit not in (NONE, self.privacy_unit):
            why.append(f"the run protects {unit}-level units; this node requires privacy-unit={self.privacy_unit}")
        if self.max_epsilon is not None and unit != NONE:
            eps = (client_epsilon(cfg.privacy, client, int(cfg.federation.num_clients)) if unit == SAMPLE
                   else float(cfg.privacy.target_epsilon))
            if eps > self.max_epsilon:
                why.append(f"the run asks this node for epsilon {eps:g}; its node-config max-epsilon is "
                           f"{self.max_epsilon:g}")
        if self.requires_dp and unit != NONE:
            if str(cfg.privacy.get("evaluation") or "off") == "plain":
                why.append("privacy.evaluation=plain releases validation statistics no epsilon covers; this "
                           "node requires DP (use privacy.evaluation=dp or off)")
            if cfg.privacy.get("noise_seed") is not None:
                why.append("privacy.noise_seed makes the DP noise predictable to whoever knows the seed; "
                           "this node requires DP")
        if self.require_secagg and not secure_enabled(cfg):
            why.append("the run does not use SecAgg+ but this node's node-config require-secagg=true")
        if not self.allow_remote_code and bool(cfg.model.get("trust_remote_code")):
            why.append("model.trust_remote_code=true would run the model repository's code on this node; "
                       "allow it with node-config allow-remote-code=true")
        if not self.allow_data_paths:
            named = node_paths(cfg)
            if named:
                why.append(f"the run names files on this node ({', '.join(named)}); this node's own data is its "
                           "data-path node config (allow run-config paths with node-config allow-data-paths=true)")
        return why

    def check(self, cfg: Any, client: int) -> None:
        """Raise :class:`PolicyRefusal` when this node refuses the run."""
        why = self.refusals(cfg, client)
        if why:
            raise PolicyRefusal("node-config", "this node refuses the run: " + "; ".join(why))
