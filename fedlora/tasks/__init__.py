"""Tasks: a registry of :class:`fedlora.tasks.base.Task` by name (``model.task``).

A new task registers with ``TASKS["name"] = MyTask()`` or is named by a dotted path
(``model.task=mypackage.tasks.MyTask``), as aggregators are.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedlora.core.errors import ConfigError
from fedlora.tasks.base import Task
from fedlora.tasks.causal_lm import CausalLM
from fedlora.tasks.classification import SequenceClassification

TASKS: dict[str, Task] = {task.name: task for task in (SequenceClassification(), CausalLM())}


def get_task(model_cfg: Any) -> Task:
    """The task of ``model.task`` (default: classification)."""
    name = str(model_cfg.get("task") or SequenceClassification.name)
    if name in TASKS:
        return TASKS[name]
    module, _, attr = name.rpartition(".")
    try:
        task = getattr(importlib.import_module(module), attr)() if module else None
    except (ImportError, AttributeError) as err:
        raise ConfigError("model.task", f"cannot import {name!r}: {err}") from err
    if not isinstance(task, Task):
        raise ConfigError("model.task", f"unknown task {name!r}; choose one of {sorted(TASKS)} or a Task's dotted path")
    return task


__all__ = ["TASKS", "Task", "get_task"]
