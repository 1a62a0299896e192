"""The task registry: model.task picks a task by name or by dotted path."""

import pytest
from omegaconf import OmegaConf

from fedlora.core.errors import ConfigError
from fedlora.tasks import TASKS, get_task
from fedlora.tasks.classification import SequenceClassification


class EchoTask(SequenceClassification):
    """A user's own task, importable by dotted path."""

    name = "echo"


class NotATask:
    pass


def _model(task=None):
    return OmegaConf.create({} if task is None else {"task": task})


def test_the_default_and_registered_tasks():
    assert get_task(_model()) is TASKS["classification"]
    assert get_task(_model("classification")) is TASKS["classification"]


def test_a_users_task_by_dotted_path():
    task = get_task(_model(f"{__name__}.EchoTask"))
    assert isinstance(task, EchoTask) and task.name == "echo"


@pytest.mark.parametrize("name,message", [
    ("regression", "unknown task 'regression'"),
    (f"{__name__}.NotATask", "unknown task"),
    (f"{__name__}.Missing", "cannot import"),
    ("no_such_package.Task", "cannot import"),
])
def test_bad_task_names_the_setting(name, message):
    with pytest.raises(ConfigError) as err:
        get_task(_model(name))
    assert err.value.setting == "model.task" and message in str(err.value)
