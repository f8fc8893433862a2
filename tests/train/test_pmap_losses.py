"""pmap trains as jit does, for every loss the registry offers.

A tiny model (synchronised BatchNorm, then 1x1 convolutions for the logits,
one aux head and UNet 3+'s image-level "cls" head) runs the real
`steps.train_step` with the semantic task's objective under jit on one
device and under pmap on 8, with ignore pixels spread unevenly over the
devices (one device has none counted). The
optimizer keeps the gradient as its state, so the test compares gradients,
not updates.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from segjax import losses
from segjax.tasks import semantic
from segjax.train import parallel, steps
from segjax.train.state import init_state

K = 3
SIZE = 16  # MS-SSIM's five scales need 16 pixels a side
BATCH = 8

# Every registered loss (with the options that exercise it), aux_weight, and
# "sum" combinations: of splittable terms only, and with a region term.
CASES = {
    "cross_entropy": {},
    "cross_entropy_class_weights": dict(name="cross_entropy",
                                        class_weights=(0.5, 2.0, 1.0)),
    "ohem_cross_entropy": dict(min_kept=20),
    "ohem_top_k": dict(name="ohem_cross_entropy", mode="top_k", top_k=0.3),
    "unet_weighted": dict(class_weights=(1.0, 3.0, 0.5)),
    "focal": dict(alpha=(0.25, 0.5, 0.75)),
    "dice": {},
    "iou": {},
    "lovasz_softmax": {},
    "ms_ssim": {},
    "unet3p_hybrid": {},
    "cgm": {},
    "sum_of_means": dict(name="sum", terms=[
        ("cross_entropy", 1.0, {"class_weights": (1.0, 2.0, 3.0)}),
        ("focal", 0.5), ("cgm", 0.2)]),
    "sum_with_region": dict(name="sum", terms=[("focal", 1.0), ("dice", 0.5),
                                               ("lovasz_softmax", 0.3)]),
    "aux_weight": dict(name="cross_entropy", aux_weight=0.4),
}


class Tiny(nn.Module):
  """BatchNorm (synchronised under pmap) + 1x1 convs: logits, aux, cls."""
  axis_name: str = None

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x)
    h = jnp.tanh(nn.Conv(6, (1, 1))(x))
    return {"logits": nn.Conv(K, (1, 1))(h), "aux": [nn.Conv(K, (1, 1))(h)],
            "cls": nn.Dense(2)(jnp.mean(h, axis=(1, 2)))}


def _keep_grads():
  """An optimizer whose state is the last gradient, and no update."""
  return optax.GradientTransformation(
      lambda params: jax.tree_util.tree_map(jnp.zeros_like, params),
      lambda grads, state, params=None: (
          jax.tree_util.tree_map(jnp.zeros_like, grads), grads))


def _batch():
  rng = np.random.default_rng(0)
  label = rng.integers(0, K, (BATCH, SIZE, SIZE)).astype(np.int32)
  label[0] = 255               # a device with nothing counted
  label[1, :12] = 255          # ... one mostly ignored
  label[2, :, :3] = 255
  label[5] = np.where(rng.random((SIZE, SIZE)) < 0.5, 255, label[5])
  label[6] = 0                 # an image of background only (cgm)
  image = rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)
  image[..., 0] += np.where(label == 255, 0, label)
  weight = rng.uniform(0.5, 2.0, (BATCH, SIZE, SIZE)).astype(np.float32)
  return {"image": image, "label": label, "weight": weight}


def _every_case(state, batch, rng, *, model, tx, axis_name=None):
  """steps.train_step once per case, in one program (one compilation)."""
  out = {}
  for case, options in CASES.items():
    options = dict(options)
    loss_fn = losses.get_loss(options.pop("name", case), **options)
    new_state, metrics = steps.train_step(
        state, batch, rng, model=model, tx=tx, objective=semantic.make_objective(loss_fn),
        schedule=lambda count: 0.0, axis_name=axis_name)
    out[case] = (new_state.opt_state, metrics["loss"])
  return out


def _run(mode):
  """{case: (gradient, loss)} of one train step under `mode`."""
  devices = jax.devices()[:1] if mode == "jit" else jax.devices()[:8]
  par = parallel.Parallel(mode, parallel.make_mesh(devices))
  model = Tiny(axis_name=par.axis_name)
  tx = _keep_grads()
  state = par.put_state(jax.device_get(
      init_state(model, tx, jax.random.PRNGKey(0), (SIZE, SIZE, 3))))
  step = par.compile(_every_case, model=model, tx=tx)
  out = step(state, par.put_batch(_batch()), par.put_replicated(jax.random.PRNGKey(1)))
  return {case: (par.host_state(g), float(par.fetch(loss)))
          for case, (g, loss) in out.items()}


@pytest.fixture(scope="module")
def jit_and_pmap():
  return _run("jit"), _run("pmap")


@pytest.mark.parametrize("case", sorted(CASES))
def test_pmap_gradient_equals_jit(case, jit_and_pmap):
  (grads_jit, loss_jit), (grads_pmap, loss_pmap) = (
      run[case] for run in jit_and_pmap)
  assert loss_jit > 0
  # The relative error of the whole gradient (over the parameters the loss
  # reaches); float32 rounding of the reordered sums gives up to ~1e-6.
  diff = total = 0.0
  for (path, p), j in zip(jax.tree_util.tree_leaves_with_path(grads_pmap),
                          jax.tree_util.tree_leaves(grads_jit)):
    if _reached(path, case):
      assert np.any(j), jax.tree_util.keystr(path)  # the loss reaches it
      diff += float(np.sum((np.asarray(p) - np.asarray(j)) ** 2))
      total += float(np.sum(np.asarray(j) ** 2))
  print(f"{case}: relative gradient error {np.sqrt(diff / total):.2e}, "
        f"loss {abs(loss_pmap / loss_jit - 1):.2e}")
  assert np.sqrt(diff / total) < 1e-5
  np.testing.assert_allclose(loss_pmap, loss_jit, rtol=1e-5)


def _reached(path, case):
  """Whether the loss of `case` depends on the parameter at `path`."""
  name = jax.tree_util.keystr(path)
  head = {"Conv_1": "logits", "Conv_2": "aux", "Dense_0": "cls"}
  for module, output in head.items():
    if module in name:
      if output == "aux":
        return case.startswith("aux")
      if output == "cls":
        return case in ("cgm", "sum_of_means")
      return case != "cgm"
  return True
