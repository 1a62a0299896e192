"""The privacy units, named once: what every epsilon is about.

- ``sample``: sample-level DP, one training example of a client is protected; each
  client holds its own guarantee, the federation reports the largest.
- ``client``: client-level DP, a whole client is protected; one guarantee covers every
  client alike.
- ``none``: no differential privacy.
"""

from __future__ import annotations

from typing import Any

NONE, SAMPLE, CLIENT = "none", "sample", "client"
UNITS = (NONE, SAMPLE, CLIENT)
LABEL = {SAMPLE: "sample-level", CLIENT: "client-level", NONE: "no DP"}
# Sample-level: each client holds its own guarantee and the federation reports the
# worst; client-level: one guarantee covers every client.
SCOPE = {SAMPLE: "max over clients", CLIENT: "every client"}


def unit_of(cfg: Any) -> str:
    """The privacy unit of an experiment config (``privacy.unit``)."""
    return str(cfg.privacy.unit)
