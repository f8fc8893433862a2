"""What a kind of model brings to the generic trainer and CLI.

segjax follows Scenic's way rather than big_vision's: the model's kind (its
registry entry, `segjax.models.task`) decides its loss, its data, its
evaluation and its prediction files, and the config's blocks (`loss`,
`augment`, `eval`, `instances`) parameterise them. A detector scored by mIoU,
or a segmenter fed box targets, is not a combination a config should be able
to ask for, so the evaluator is not chosen by the config as in big_vision;
it comes with the task. The trainer (segjax/train/loop.py) and the CLI hold
no task branches: they call the methods below on `segjax.tasks.for_config`'s
object (docs/design.md, "Tasks", shows how to add one).
"""
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import optax

from segjax.train import steps


class Task:
  """The interface; `segjax.tasks.semantic` and `.instance` implement it.

  Args:
    config: the run's config.
    model: the built flax module (segjax.models.build).
    par: segjax.train.parallel.Parallel, the devices and how steps compile
      (None where only the objective is wanted, e.g. a benchmark).
  """
  name = ""

  def __init__(self, config, model, par):
    self.config = config
    self.model = model
    self.par = par

  @property
  def init_shape(self) -> Tuple[int, int, int]:
    """(H, W, 3) of the image the parameters are initialised with."""
    return (*self.config.image_size, 3)

  def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """The optimizer as the task trains (e.g. frozen parameters)."""
    return tx

  def objective(self) -> steps.Objective:
    """The loss the generic train step differentiates (steps.Objective)."""
    raise NotImplementedError

  def train_batches(self, start_step: int) -> Iterator[Dict]:
    """Host-local numpy batches of the training steps from `start_step`."""
    raise NotImplementedError

  def evaluate(self, state, split: str, progress: Optional[Callable] = None) -> Dict:
    """Scores of `split` for the (device) TrainState, on every device of
    every host; every process calls it. `progress` wraps the iterator of
    evaluated images (e.g. a counter that prints)."""
    raise NotImplementedError

  def describe_eval(self) -> str:
    """The evaluation protocol, in a few words for the log."""
    raise NotImplementedError

  def summary_line(self, result: Dict) -> str:
    """The headline figures of `evaluate`'s result, one line."""
    raise NotImplementedError

  def report(self, result: Dict) -> List[str]:
    """Further lines `segjax eval` prints (per-class figures)."""
    return []

  def predict_files(self, variables, paths: Sequence[str], output_dir: str) -> List[str]:
    """Writes prediction files for image files; returns their paths.
    `variables`: {"params", "batch_stats"} on the host."""
    raise NotImplementedError
