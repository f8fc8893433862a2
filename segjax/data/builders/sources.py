"""The files of a manual download: an extracted folder, a .zip or a .tar.

Datasets such as VOC, Cityscapes or COCO cannot be downloaded at build time
(they need a login, a licence click-through or just a lot of bandwidth), so
their builders read what the user downloaded once into tfds's manual
directory. Users either extract the archives or leave them packed; both work.
A `Source` hides the difference: files are named by '/'-separated paths
relative to the dataset's root folder, whether that folder is on disk or
inside an archive.

Only archives with random access are read in place: .zip, and .tar without
compression (VOC's). A compressed tarball (.tgz) must be extracted first,
since reading one member means decompressing everything before it.
"""
import abc
import dataclasses
import posixpath
import tarfile
import zipfile

from etils import epath

from segjax import errors


class Source(abc.ABC):
  """Read-only files below one root; paths are relative, '/'-separated."""

  @abc.abstractmethod
  def exists(self, path: str) -> bool:
    raise NotImplementedError

  @abc.abstractmethod
  def read(self, path: str) -> bytes:
    """The file's bytes; FileNotFoundError if there is no such file."""
    raise NotImplementedError

  @abc.abstractmethod
  def files(self, folder: str, suffix: str = "") -> list[str]:
    """Sorted paths of every file below `folder` (recursively) ending with
    `suffix`; empty if the folder does not exist."""
    raise NotImplementedError

  @abc.abstractmethod
  def has_folder(self, folder: str) -> bool:
    """Whether `folder` exists and is not empty."""
    raise NotImplementedError

  @abc.abstractmethod
  def where(self, path: str = "") -> str:
    """Where `path` lives, for messages: a full path or archive:member."""
    raise NotImplementedError


class FolderSource(Source):
  """An extracted folder."""

  def __init__(self, root: epath.PathLike):
    self.root = epath.Path(root)

  def exists(self, path):
    return (self.root / path).is_file()

  def read(self, path):
    try:
      return (self.root / path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
      raise FileNotFoundError(self.where(path)) from e

  def files(self, folder, suffix=""):
    top = self.root / folder if folder else self.root
    if not top.is_dir():
      return []
    # walk(), not rglob(): tfds hands over an epath, whose rglob refuses "**".
    found = []
    for dirpath, _, names in top.walk():
      rel = str(dirpath.relative_to(self.root)).replace("\\", "/")
      prefix = "" if rel == "." else rel + "/"
      found.extend(prefix + n for n in names if n.endswith(suffix))
    return sorted(found)

  def has_folder(self, folder):
    top = self.root / folder
    return top.is_dir() and any(True for _ in top.iterdir())

  def where(self, path=""):
    return str(self.root / path) if path else str(self.root)


class _ArchiveSource(Source):
  """Shared by zip and tar: an index of member names under a prefix."""

  def __init__(self, archive: epath.Path, prefix: str, members: dict):
    self.archive = archive
    self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    # Relative path -> whatever the archive needs to read the member.
    self._members = {name[len(self.prefix):]: info
                     for name, info in members.items()
                     if name.startswith(self.prefix)}

  def exists(self, path):
    return path in self._members

  def read(self, path):
    if path not in self._members:
      raise FileNotFoundError(self.where(path))
    return self._read_member(self._members[path])

  @abc.abstractmethod
  def _read_member(self, info) -> bytes:
    raise NotImplementedError

  def files(self, folder, suffix=""):
    head = folder.strip("/") + "/" if folder.strip("/") else ""
    return sorted(p for p in self._members
                  if p.startswith(head) and p.endswith(suffix))

  def has_folder(self, folder):
    head = folder.strip("/") + "/"
    return any(p.startswith(head) for p in self._members)

  def where(self, path=""):
    return f"{self.archive}:{self.prefix}{path}"


class ZipSource(_ArchiveSource):
  """A .zip archive, read in place."""

  def __init__(self, archive: epath.PathLike, prefix: str = ""):
    archive = epath.Path(archive)
    self._zip = zipfile.ZipFile(archive.open("rb"))
    members = {i.filename: i for i in self._zip.infolist() if not i.is_dir()}
    super().__init__(archive, prefix, members)

  def _read_member(self, info):
    return self._zip.read(info)


class TarSource(_ArchiveSource):
  """An uncompressed .tar archive, read in place."""

  def __init__(self, archive: epath.PathLike, prefix: str = ""):
    archive = epath.Path(archive)
    # "r:" refuses compressed tars, which cannot be read out of order.
    self._tar = tarfile.open(fileobj=archive.open("rb"), mode="r:")
    members = {posixpath.normpath(m.name): m for m in self._tar.getmembers()
               if m.isfile()}
    super().__init__(archive, prefix, members)

  def _read_member(self, info):
    return self._tar.extractfile(info).read()


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One place a dataset's root may be found, relative to the manual dir.

  Attributes:
    path: a folder (the extracted root) or a .zip/.tar archive.
    inner: for an archive, the root's path inside it ("" for its top).
  """
  path: str
  inner: str = ""

  def open(self, manual_dir: epath.Path) -> Source | None:
    """The source, or None if nothing usable is at this place."""
    full = manual_dir / self.path
    if self.path.endswith(".zip") and full.is_file():
      return ZipSource(full, self.inner)
    if self.path.endswith(".tar") and full.is_file():
      try:
        return TarSource(full, self.inner)
      except tarfile.ReadError:
        return None  # e.g. a compressed tar renamed .tar; reported below.
    if not self.path.endswith((".zip", ".tar")) and full.is_dir():
      return FolderSource(full)
    return None


def locate(manual_dir: epath.PathLike, what: str,
           candidates: list[Candidate], how_to_fix: str,
           required: tuple[str, ...] = ()) -> Source:
  """The first candidate that exists and holds every `required` path.

  Args:
    manual_dir: tfds's manual directory.
    what: the data looked for, for the message, e.g. "PASCAL VOC 2012".
    candidates: places to look, in order of preference.
    how_to_fix: what to download and where to put it.
    required: relative paths (files or folders) that must exist in the root,
      to tell a right folder from a half-extracted one.

  Raises:
    DataError: naming every place looked at and how to fix it.
  """
  manual_dir = epath.Path(manual_dir)
  how_to_fix = how_to_fix.replace("<manual_dir>", str(manual_dir))
  incomplete = []
  for candidate in candidates:
    source = candidate.open(manual_dir)
    if source is None:
      continue
    missing = [p for p in required if not _has(source, p)]
    if not missing:
      return source
    incomplete.append(f"{source.where()} lacks {', '.join(missing)}")
  looked = "\n".join(
      f"  {manual_dir / c.path}" + (f" (containing {c.inner}/)" if c.inner else "")
      for c in candidates)
  detail = ("\nFound, but incomplete:\n  " + "\n  ".join(incomplete)
            if incomplete else "")
  raise errors.DataError(
      f"Cannot find {what}. Looked for:\n{looked}{detail}\n{how_to_fix}")


def _has(source: Source, path: str) -> bool:
  """Whether `path` is a file or a non-empty folder of `source`."""
  return source.exists(path) or source.has_folder(path)


def require_file(source: Source, path: str, what: str, how_to_fix: str) -> bytes:
  """The bytes of a file every example needs, or a DataError saying so."""
  try:
    return source.read(path)
  except FileNotFoundError as e:
    raise errors.DataError(
        f"Cannot find {what}: {source.where(path)} does not exist.\n"
        f"{how_to_fix}") from e


def locate_file(manual_dir: epath.PathLike, what: str, paths: list[str],
                how_to_fix: str) -> epath.Path:
  """The first of `paths` (relative to `manual_dir`) that is a file.

  Raises:
    DataError: naming every place looked at and how to fix it.
  """
  manual_dir = epath.Path(manual_dir)
  how_to_fix = how_to_fix.replace("<manual_dir>", str(manual_dir))
  for path in paths:
    if (manual_dir / path).is_file():
      return manual_dir / path
  looked = "\n".join(f"  {manual_dir / p}" for p in paths)
  raise errors.DataError(
      f"Cannot find {what}. Looked for:\n{looked}\n{how_to_fix}")
