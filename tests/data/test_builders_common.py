"""What the manual-download builders share: sources, decoding, registry."""
import io
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

import fake_downloads as fake
from segjax import errors
from segjax.data import builders
from segjax.data.builders import manual, sources


def _decoded(data):
  with Image.open(io.BytesIO(data)) as image:
    return image.format, image.mode, np.asarray(image)


def test_rgb_image_keeps_rgb_files_and_converts_the_rest():
  rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 3), np.uint8)
  for fmt in ("PNG", "JPEG"):
    data = fake.image_bytes(rgb, fmt)
    kept, size = manual.rgb_image(data, "x")
    assert kept is data and size == (3, 4)  # Stored byte for byte.
  rgba = np.concatenate([rgb, np.full((3, 4, 1), 7, np.uint8)], -1)
  out, _ = manual.rgb_image(fake.image_bytes(rgba), "x")
  fmt, mode, pixels = _decoded(out)
  assert (fmt, mode) == ("PNG", "RGB")
  np.testing.assert_array_equal(pixels, rgb)  # Alpha dropped, lossless.
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  _, mode, pixels = _decoded(manual.rgb_image(fake.image_bytes(grey), "x")[0])
  assert mode == "RGB"
  np.testing.assert_array_equal(pixels, np.repeat(grey[..., None], 3, -1))
  buffer = io.BytesIO()
  Image.new("CMYK", (4, 3), (0, 255, 255, 0)).save(buffer, "JPEG")
  _, mode, pixels = _decoded(manual.rgb_image(buffer.getvalue(), "x")[0])
  assert mode == "RGB" and pixels.shape == (3, 4, 3)
  assert pixels[..., 0].min() > 200 and pixels[..., 1].max() < 60  # Red.


def test_corrupt_files_are_bad_examples():
  with pytest.raises(manual.BadExample, match="cannot decode image a.jpg"):
    manual.rgb_image(b"\xff\xd8 not a jpeg", "a.jpg")
  rgb_label = fake.image_bytes(np.zeros((2, 2, 3), np.uint8))
  with pytest.raises(manual.BadExample, match="mode 'RGB'"):
    manual.label_map(rgb_label, "b.png")
  with pytest.raises(manual.BadExample, match=r"c.png has ids \[9\]"):
    manual.remap(np.array([[0, 9]]), manual.lookup_table([(0, 0)]), "c.png")
  with pytest.raises(manual.BadExample, match="is 2x2 .* image is 3x2"):
    manual.check_size(np.zeros((2, 2)), (3, 2), "d.png")


def test_sources_read_folders_zips_and_tars_alike(tmp_path):
  root = tmp_path / "data" / "Root"
  fake.write_text(root / "a" / "x.txt", ["x"])
  fake.write_text(root / "a" / "b" / "y.txt", ["y"])
  fake.write_text(root / "z.csv", ["z"])
  with zipfile.ZipFile(tmp_path / "root.zip", "w") as z:
    for name in ("a/x.txt", "a/b/y.txt", "z.csv"):
      z.write(root / name, f"Root/{name}")
  with tarfile.open(tmp_path / "root.tar", "w") as tar:
    tar.add(root, arcname="Root")
  for source in (sources.FolderSource(root),
                 sources.ZipSource(tmp_path / "root.zip", "Root"),
                 sources.TarSource(tmp_path / "root.tar", "Root")):
    assert source.files("a", ".txt") == ["a/b/y.txt", "a/x.txt"]
    assert source.files("", ".csv") == ["z.csv"]
    assert source.files("missing") == []
    assert source.read("a/b/y.txt") == b"y\n"
    assert source.exists("z.csv") and not source.exists("a")
    assert source.has_folder("a/b") and not source.has_folder("c")
    with pytest.raises(FileNotFoundError):
      source.read("nope.txt")


def test_locate_prefers_folders_and_reports_incomplete_ones(tmp_path):
  fake.write_text(tmp_path / "Root" / "list.txt", ["a"])
  with zipfile.ZipFile(tmp_path / "root.zip", "w") as z:
    z.writestr("Root/list.txt", "a\n")
    z.writestr("Root/images/1.jpg", "")
  places = [sources.Candidate("Root"), sources.Candidate("root.zip", "Root")]
  found = sources.locate(tmp_path, "Root", places, "fix it",
                         required=("list.txt", "images"))
  assert isinstance(found, sources.ZipSource)  # The folder lacks images/.
  with pytest.raises(errors.DataError) as info:
    sources.locate(tmp_path, "Root", places[:1], "fix it <manual_dir>",
                   required=("images",))
  message = str(info.value)
  assert "lacks images" in message and f"fix it {tmp_path}" in message


def test_registry_and_dataset_info():
  for name, cls in builders.BUILDERS.items():
    info = builders.dataset_info(name)
    assert info["ignore_index"] == 255 and info["image_key"] == "image"
    assert info["palette"].shape == (info["num_classes"], 3)
    assert info["palette"].dtype == np.uint8
    assert len(info["class_names"]) == info["num_classes"]
    if name != "segjax_shapes":  # Every manual builder names its archives.
      assert issubclass(cls, manual.ManualBuilder)
      assert ".zip" in cls.MANUAL_DOWNLOAD_INSTRUCTIONS or (
          ".tar" in cls.MANUAL_DOWNLOAD_INSTRUCTIONS)
  assert builders.dataset_info("voc2012_segmentation/aug")["num_classes"] == 21
  with pytest.raises(errors.DataError, match="voc2012_segmentation"):
    builders.dataset_info("nope/aug")


def test_unprepared_dataset_without_download_says_where_to_put_it(tmp_path):
  # What the trainer meets: load_builder(config.dataset, config.data_dir)
  # with no manual_dir looks in tfds's default manual folder.
  with pytest.raises(errors.DataError) as info:
    builders.load_builder("ade20k", str(tmp_path))
  message = str(info.value)
  assert f"{tmp_path}/downloads/manual does not exist or is empty" in message
  assert "ADEChallengeData2016.zip" in message
