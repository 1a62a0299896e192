"""The adapter's model card (``adapter/README.md``): what the adapter is and how it was
made, in place of PEFT's empty template.

It states the privacy guarantee first (epsilon with its delta, unit and accountant, and
where the noise came from; a ``privacy.noise_seed`` run says it is not private), then
the data, the federation, the aggregation rule, the revisions the base model and the
data were loaded at (an unpinned hub load is said to be one: a reader cannot rebuild
it), and the lines that load the adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft import TaskType

from fedlora.core.units import NONE
from fedlora.models.hub import LOCAL, resolve_model_path, revisions
from fedlora.plan import aggregator_name

CARD = "README.md"
SECTION = "## Differential privacy"


def privacy_section(statement: dict[str, Any]) -> str:
    """Markdown for ``statement`` (see RunRecorder.privacy_statement)."""
    lines = [SECTION, ""]
    if statement["unit"] == NONE:
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
        lines += ["", evaluation_text(statement.get("evaluation") or {})]
    return "\n".join(lines) + "\n"


def evaluation_text(evaluation: dict[str, Any]) -> str:
    """One sentence on what clients released about their validation data under DP."""
    mode = evaluation.get("mode")
    if mode == "dp":
        return ("Federated evaluation (privacy.evaluation=dp): clients released their validation accuracy as "
                "Gaussian-noised counts; their cost is composed into the epsilon above.")
    if mode == "plain":
        return ("**Federated evaluation (privacy.evaluation=plain): clients released their validation loss and "
                "accuracy in the clear; the epsilon above does not cover them.**")
    return "Federated evaluation: off (privacy.evaluation=off); clients released nothing about their validation data."


def revision_text(kind: str, facts: dict[str, Any] | None) -> str:
    """One line on what ``kind`` (``base model`` / ``data``) was loaded at."""
    if not facts:
        return f"- {kind.capitalize()} revision: not recorded."
    setting = "model.revision" if kind == "base model" else "data.revision"
    name, resolved = facts["name"], facts.get("resolved")
    if resolved == LOCAL:
        return f"- {kind.capitalize()} revision: `{name}` is {LOCAL} (a packaged model or files on disk; no hub commit)."
    if facts.get("pinned"):
        return f"- {kind.capitalize()} revision: `{name}` pinned at commit `{resolved}` ({setting})."
    at = f"commit `{resolved}` as the hub reported it" if resolved else "a commit the hub did not report"
    requested = facts.get("requested")
    how = f"{setting}={requested!r} is a movable branch or tag" if requested else f"{setting} was not set"
    return (f"- {kind.capitalize()} revision: `{name}` at {at}; **not pinned** ({how}): the repository may "
            "hold something else now.")


def _revision_arg(facts: dict[str, Any] | None) -> str:
    """``, revision="<commit>"`` for the loading lines of a hub base with a known commit."""
    resolved = (facts or {}).get("resolved")
    return f', revision="{resolved}"' if resolved and resolved != LOCAL else ""


def _loading(plan: Any, base: str, revision: str = "") -> str:
    """How to load the adapter: stock transformers + PEFT where the head is the
    architecture's own, else the project's loader (the head is its own module)."""
    num_labels = plan.num_labels
    if plan.task.peft_task_type == TaskType.CAUSAL_LM:
        return (
            "```python\n"
            "from peft import AutoPeftModelForCausalLM\n"
            "from transformers import AutoTokenizer\n\n"
            'model = AutoPeftModelForCausalLM.from_pretrained("adapter")  # this folder; loads the base below\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{base}"{revision})\n'
            "```\n\n"
            'or answer from the command line: `python -m fedlora.generate <run dir> --prompt "..."`.\n'
        )
    if str(plan.cfg.model.get("pooling", "model")) == "model" and plan.task.name == "classification":
        return (
            "```python\n"
            "from peft import PeftModel\n"
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f'base = AutoModelForSequenceClassification.from_pretrained("{base}", num_labels={num_labels}{revision})\n'
            'model = PeftModel.from_pretrained(base, "adapter")  # this folder\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{base}"{revision})\n'
            "```\n"
        )
    return (
        "The head is this project's own module (masked mean pooling + linear), so load the run with its loader:\n\n"
        "```python\n"
        "from fedlora.predict import load_run\n\n"
        'tokenizer, model, labels = load_run("<run dir>")  # the folder that holds this adapter/\n'
        "```\n\n"
        'or predict from the command line: `python -m fedlora.predict <run dir> --text "..."`.\n'
    )


def model_card(statement: dict[str, Any], plan: Any) -> str:
    cfg = plan.cfg
    base = resolve_model_path(str(cfg.model.name_or_path))
    loaded_at = revisions(cfg)
    fed, lora = cfg.federation, cfg.lora
    aggregation = ("client-level DP-FedAvg (clip, Gaussian noise on the sum)" if plan.client_dp
                   else aggregator_name(cfg.strategy))
    header = (
        "---\n"
        f"base_model: {cfg.model.name_or_path}\n"
        "library_name: peft\n"
        "tags: [lora, federated-learning, differential-privacy, dp-federated-lora-lab]\n"
        "---\n"
    )
    body = [
        f"# LoRA adapter ({plan.task.name}) of {cfg.model.name_or_path}",
        "",
        privacy_section(statement),
        "## Training",
        "",
        f"- Data: {cfg.data.name} ({plan.federation_train_size} training rows), "
        + (f"labels {list(plan.label_names)}" if plan.label_names else "open-ended answers") + ", split over {fed.num_clients} clients ({cfg.partition.name} partition).",
        f"- Federation: {statement['rounds_completed']} of {fed.rounds} planned rounds, client sampling "
        f"fraction {fed.fraction_fit}; aggregation: {aggregation}"
        + (" under SecAgg+" if plan.secagg is not None else "") + ".",
        f"- LoRA: r={lora.r}, alpha={lora.alpha}, targets {list(lora.target_modules)}"
        + (" (FFA-LoRA: A frozen)" if lora.freeze_a else "") + f"; base model folder: `{base}`.",
        revision_text("base model", loaded_at.get("model")),
        revision_text("data", loaded_at.get("data")),
        "",
        "## How to load",
        "",
        _loading(plan, base, _revision_arg(loaded_at.get("model"))),
    ]
    return header + "\n" + "\n".join(body)


def write_model_card(adapter_dir: Path | str, statement: dict[str, Any], plan: Any) -> Path:
    """Replace PEFT's template card in ``adapter_dir`` by this run's card."""
    path = Path(adapter_dir) / CARD
    path.write_text(model_card(statement, plan))
    return path
