"""The privacy statement in the adapter's model card (``adapter/README.md``).

PEFT's ``save_pretrained`` writes a Hugging Face model card; the guarantee the adapter
was trained under goes at its top, under the card's YAML header, so whoever loads the
adapter from the hub or a folder reads it first: epsilon with its delta, unit and
accountant, and where the noise came from (a ``privacy.noise_seed`` run says it is not
private).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CARD = "README.md"
SECTION = "## Differential privacy"


def privacy_section(statement: dict[str, Any]) -> str:
    """Markdown for ``statement`` (see RunRecorder.privacy_statement)."""
    lines = [SECTION, ""]
    if statement["unit"] == "none":
        lines.append("Trained **without differential privacy**: no epsilon holds for this adapter.")
    else:
        eps = statement.get("epsilon")
        eps_text = "n/a" if eps is None else f"{eps:.4g}"
        lines.append(
            f"Trained with **{statement['unit_label']} differential privacy**: "
            f"(epsilon = {eps_text}, delta = {statement['delta']:g}), {statement['scope']}, "
            f"accountant {statement['accountant']}, over {statement['rounds_completed']} federated round(s). "
            "Every epsilon is recomputable from the privacy ledger in the run's results.json."
        )
        noise = statement["noise"]
        lines.append("")
        if noise.get("private"):
            lines.append(f"Noise: {noise['note']}.")
        else:
            lines.append(f"**{noise['warning']}.**")
    return "\n".join(lines) + "\n"


def write_privacy_section(adapter_dir: Path | str, statement: dict[str, Any]) -> Path:
    """Put the privacy section at the top of the card's body (creating the card if PEFT
    wrote none), replacing an earlier one."""
    path = Path(adapter_dir) / CARD
    text = path.read_text() if path.is_file() else ""
    header, body = "", text
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end != -1:
            header, body = text[: end + 5], text[end + 5 :]
    if SECTION in body:
        start = body.index(SECTION)
        nxt = body.find("\n## ", start + len(SECTION))
        body = body[:start] + (body[nxt + 1 :] if nxt != -1 else "")
    path.write_text(header + "\n" + privacy_section(statement) + "\n" + body.lstrip("\n"))
    return path
