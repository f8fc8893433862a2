"""Tasks: one module per kind of model (segjax/tasks/base.py says what each
provides and why the task follows the model). Adding a kind of model is one
module and one line in TASKS (docs/design.md, "Tasks")."""
from segjax import models
from segjax.tasks.base import Task
from segjax.tasks.instance import InstanceTask
from segjax.tasks.semantic import SemanticTask

TASKS = {"semantic": SemanticTask, "instance": InstanceTask}


def for_config(config, model, par) -> Task:
  """The task object of the config's model (kind from segjax.models.task)."""
  return TASKS[models.task(config.model)](config, model, par)
