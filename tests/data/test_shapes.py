"""The segjax_shapes generator, its tfds builder and `load_builder`."""
import numpy as np
import pytest

from conftest import SMALL_DATASET
from segjax import errors
from segjax.data import builders
from segjax.data.builders import shapes

TINY = dict(image_size=64, split_sizes=(6, 2, 2))


def _tiny_config(name="tiny", **kw):
  return shapes.ShapesConfig(name=name, **{**TINY, **kw})


@pytest.fixture(scope="module")
def small_builder(shapes_dir):
  """The built-in "small" config, generated once per session by conftest."""
  return builders.load_builder("segjax_shapes/small", shapes_dir)


def _check_scene(image, semantic, masks, boxes, labels, size):
  """Invariants of one scene; labels are semantic ids 1..3."""
  assert image.shape == (size, size, 3) and image.dtype == np.uint8
  assert semantic.shape == (size, size) and semantic.dtype == np.uint8
  assert set(np.unique(semantic)) <= {0, 1, 2, 3}
  k = len(labels)
  assert k >= 1 and masks.shape == (k, size, size)
  assert boxes.shape == (k, 4) and boxes.dtype == np.float32
  assert set(labels.tolist()) <= {1, 2, 3}
  # Visible masks are disjoint and together make up the foreground.
  assert masks.sum(0).max() <= 1
  np.testing.assert_array_equal(masks.any(0), semantic > 0)
  for mask, box, label in zip(masks, boxes, labels):
    assert mask.any()  # Fully occluded instances were dropped.
    assert np.all(semantic[mask] == label)
    rows, cols = np.nonzero(mask)
    np.testing.assert_array_equal(
        box, [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])


@pytest.mark.parametrize("size", [64, 128])
def test_generate_scene_invariants(size):
  for index in range(15):
    scene = shapes.render_example(0, 0, index, size)
    _check_scene(scene["image"], scene["semantic"], scene["masks"].astype(bool),
                 scene["boxes"], scene["labels"], size)


def test_scenes_are_varied_and_shapes_not_tiny():
  counts, classes = [], set()
  for index in range(40):
    scene = shapes.render_example(0, 0, index)
    counts.append(len(scene["labels"]))
    classes |= set(scene["labels"].tolist())
    # At 128², a visible instance has at least _MIN_AREA pixels.
    assert scene["masks"].sum((1, 2)).min() >= 0.5 * shapes._MIN_AREA
  assert classes == {1, 2, 3}
  assert min(counts) >= 1 and max(counts) >= 4


def test_shapes_contrast_with_background():
  # Learnability: the mean colour of each visible shape differs clearly from
  # the mean background colour around it.
  for index in range(10):
    scene = shapes.render_example(0, 1, index)
    image = scene["image"].astype(np.float32)
    background = image[scene["semantic"] == 0].mean(0)
    for mask in scene["masks"]:
      assert np.linalg.norm(image[mask].mean(0) - background) > 20


def test_render_example_is_deterministic_and_seeded():
  a = shapes.render_example(3, 1, 7)
  b = shapes.render_example(3, 1, 7)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["image"], shapes.render_example(3, 1, 8)["image"])
  assert not np.array_equal(a["image"], shapes.render_example(3, 2, 7)["image"])
  assert not np.array_equal(a["image"], shapes.render_example(4, 1, 7)["image"])


def test_default_config_declares_split_sizes(tmp_path):
  config = shapes.SegjaxShapes.builder_configs["default"]
  assert config.image_size == 128
  assert dict(zip(shapes.SPLITS, config.split_sizes)) == {
      "train": 2000, "validation": 200, "test": 200}
  builder = shapes.SegjaxShapes(data_dir=str(tmp_path))  # Not generated.
  assert builder.builder_config is config
  features = builder.info.features
  assert features["image"].shape == (128, 128, 3)
  assert features["segmentation_mask"].shape == (128, 128, 1)
  assert features["objects"]["label"].names == ["circle", "rectangle",
                                                "triangle"]


def test_builder_features_and_splits(small_builder):
  splits = small_builder.info.splits
  assert {name: splits[name].num_examples for name in shapes.SPLITS} == {
      "train": 48, "validation": 16, "test": 8}
  ds = small_builder.as_dataset(split="train", shuffle_files=False)
  seen = set()
  for ex in ds.as_numpy_iterator():
    seen.add(int(ex["image_id"]))
    objects = ex["objects"]
    assert ex["segmentation_mask"].shape == (64, 64, 1)
    assert objects["mask"].dtype == np.uint8
    assert objects["label"].dtype == np.int64
    _check_scene(ex["image"], ex["segmentation_mask"][..., 0],
                 objects["mask"][..., 0].astype(bool), objects["bbox"],
                 objects["label"] + 1, 64)
    # The stored example is exactly the generated one.
    scene = shapes.render_example(0, 0, int(ex["image_id"]), 64)
    np.testing.assert_array_equal(ex["image"], scene["image"])
    np.testing.assert_array_equal(ex["segmentation_mask"][..., 0],
                                  scene["semantic"])
  assert seen == set(range(48))


def test_generation_is_deterministic(small_builder, tmp_path):
  # Same seed and size as "small", fewer examples: the common ones match.
  config = _tiny_config(split_sizes=(2, 3, 1))

  def by_id(builder):
    ds = builder.as_dataset(split="validation", shuffle_files=False)
    return {int(ex["image_id"]): ex for ex in ds.as_numpy_iterator()}

  reference = by_id(small_builder)
  for d in ("a", "b"):
    builder = builders.load_builder("segjax_shapes", str(tmp_path / d),
                                    config=config)
    examples = by_id(builder)
    assert set(examples) == {0, 1, 2}
    for i, y in examples.items():
      x = reference[i]
      np.testing.assert_array_equal(x["image"], y["image"])
      np.testing.assert_array_equal(x["segmentation_mask"],
                                    y["segmentation_mask"])
      np.testing.assert_array_equal(x["objects"]["mask"], y["objects"]["mask"])
      np.testing.assert_array_equal(x["objects"]["bbox"], y["objects"]["bbox"])
      np.testing.assert_array_equal(x["objects"]["label"],
                                    y["objects"]["label"])


def test_load_builder_reuses_prepared_data(small_builder, shapes_dir,
                                          monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("prepared data should not be generated again")
  monkeypatch.setattr(shapes.SegjaxShapes, "_generate_examples", fail)
  again = builders.load_builder("segjax_shapes/small", shapes_dir)
  assert again.data_dir == small_builder.data_dir


def test_load_builder_default_data_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert builders.default_data_dir() == str(tmp_path)
  builder = builders.load_builder(
      "segjax_shapes", config=_tiny_config(split_sizes=(1, 1, 1)))
  assert str(builder.data_dir).startswith(str(tmp_path))


def test_load_builder_unknown_name_lists_known(tmp_path):
  with pytest.raises(errors.DataError, match="segjax_shapes"):
    builders.load_builder("no_such_dataset", str(tmp_path))


def test_bad_config_raises(tmp_path):
  with pytest.raises(errors.ConfigError, match="image_size"):
    shapes.SegjaxShapes(data_dir=str(tmp_path),
                        config=_tiny_config("too_small", image_size=8)).info
  with pytest.raises(errors.ConfigError, match="split_sizes"):
    config = _tiny_config("empty", split_sizes=(0, 1, 1))
    shapes.SegjaxShapes(data_dir=str(tmp_path), config=config).info


def test_dataset_info():
  info = builders.DATASET_INFO["segjax_shapes"]
  assert info["num_classes"] == 4
  assert tuple(info["class_names"]) == ("background", "circle", "rectangle",
                                        "triangle")
  assert info["palette"].shape == (4, 3) and info["palette"].dtype == np.uint8
  # One entry per builder, plus "<builder>/<config>" ones.
  assert {k.partition("/")[0] for k in builders.DATASET_INFO} == set(
      builders.BUILDERS)


def test_default_dataset_sizes(shapes_dir):
  """The default config is the documented 2000/200/200 of 128 x 128 (its
  2,400 images take 20 s to write, what the main job does); generation
  yields exactly a config's split_sizes, seen on the small config."""
  default = builders.BUILDERS["segjax_shapes"].builder_configs["default"]
  assert (default.split_sizes, default.image_size) == ((2000, 200, 200), 128)
  small = builders.load_builder(SMALL_DATASET, shapes_dir)
  splits = small.info.splits
  assert tuple(splits[name].num_examples for name in shapes.SPLITS) == (
      small.builder_config.split_sizes)
