"""Small file helpers: atomic writes, crash-safe line appends and PNG image grids."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from typing import Mapping

import numpy as np

from sgm_jax.errors import InputError


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", overwrite: bool = True):
  """Open a temporary file beside `path`, and move it over `path` only once fully written.

  A crash mid-write leaves the old file (or none) in place, never a truncated one. With
  `overwrite=False` an existing `path` is a FileExistsError, checked before writing and again when
  the file is put in place (by a hard link, which never replaces a file, where links exist).
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  exists = f"{path!r} already exists; pass overwrite=True to replace it"
  if not overwrite and os.path.exists(path):
    raise FileExistsError(exists)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path) + "-")
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results unreadable to others
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    if overwrite:
      os.replace(tmp, path)
    else:
      _link_new(tmp, path, exists)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def _link_new(tmp: str, path: str, exists_message: str) -> None:
  """Put `tmp` at `path` unless `path` exists: a hard link (atomic, never replaces a file), or a
  rename where the filesystem has no hard links. `tmp` is left for the caller to remove."""
  try:
    os.link(tmp, path)
  except FileExistsError:
    raise FileExistsError(exists_message) from None
  except OSError:  # no hard links on this filesystem
    if os.path.exists(path):
      raise FileExistsError(exists_message) from None
    os.replace(tmp, path)


def save_npz_atomic(path: str, arrays: Mapping[str, np.ndarray], overwrite: bool = True) -> None:
  """np.savez through `atomic_write`: readers never see half a file."""
  with atomic_write(path, overwrite=overwrite) as f:
    np.savez(f, **arrays)


def _torn_tail_start(f) -> int | None:
  """Where the torn last line of binary file `f` starts (the byte after its last newline), or
  None when the file is empty or ends with a newline."""
  end = f.seek(0, os.SEEK_END)
  if end == 0:
    return None
  f.seek(end - 1)
  if f.read(1) == b"\n":
    return None
  pos = end
  while pos > 0:
    block = min(pos, 1 << 14)
    pos -= block
    f.seek(pos)
    newline = f.read(block).rfind(b"\n")
    if newline >= 0:
      return pos + newline + 1
  return 0


def append_line(path: str, line: str) -> None:
  """Append `line` and a newline to `path` as one write, flushed and fsynced.

  A torn last line left by a process killed mid-append (text after the last newline) is dropped
  first, so every line in the file is whole.
  """
  if "\n" in line or "\r" in line:
    raise InputError(f"append_line writes one line; got text with a newline: {line[:80]!r}")
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with open(path, "ab+") as f:  # append mode: every write goes to the end, even after truncate
    torn = _torn_tail_start(f)
    if torn is not None:
      f.seek(torn)
      logging.warning("%s: dropping a torn last line (%r); a previous writer was interrupted",
                      path, f.read(80))
      f.truncate(torn)
    f.write((line + "\n").encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())


def read_jsonl(path: str) -> list[dict]:
  """The JSON objects of a file written by `append_line`, one a line; blank lines are skipped.

  A torn last line (no final newline: its writer was killed mid-append) is skipped with a
  warning; a bad line anywhere else is a ValueError naming the file and line.
  """
  with open(path, encoding="utf-8") as f:
    text = f.read()
  lines = text.split("\n")
  if lines[-1]:
    logging.warning("%s: skipping a torn last line (%r); its writer was interrupted", path,
                    lines[-1][:80])
  records = []
  for number, line in enumerate(lines[:-1], 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise InputError(f"{path}:{number} is not valid JSON ({e}): {line[:80]!r}. Delete or fix "
                       "that line (an interrupted write by an older version?)") from None
    if not isinstance(record, dict):
      raise InputError(f"{path}:{number} is not a JSON object: {line[:80]!r}")
    records.append(record)
  return records


def image_grid(images, nrow: int | None = None, padding: int = 2,
               data_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
  """Tile (N, H, W, C) images into one uint8 (rows*H', cols*W', C) array, C in {1, 3}."""
  images = np.asarray(images, dtype=np.float32)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise InputError(f"images must have shape (N, H, W, C) with C in (1, 3), got {images.shape}")
  lo, hi = data_range
  images = np.clip((images - lo) / (hi - lo), 0.0, 1.0)
  n, h, w, c = images.shape
  nrow = nrow or int(math.ceil(math.sqrt(n)))
  ncol_rows = int(math.ceil(n / nrow))
  grid = np.ones((ncol_rows * (h + padding) + padding, nrow * (w + padding) + padding, c),
                 np.float32)
  for i in range(n):
    r, col = divmod(i, nrow)
    y, x = padding + r * (h + padding), padding + col * (w + padding)
    grid[y:y + h, x:x + w] = images[i]
  return np.round(grid * 255).astype(np.uint8)


def save_image_grid(images, path: str, nrow: int | None = None, padding: int = 2,
                    data_range: tuple[float, float] = (-1.0, 1.0), upscale: int = 1) -> str:
  """Write a PNG grid of (N, H, W, C) images atomically; returns the path."""
  from PIL import Image
  grid = image_grid(images, nrow, padding, data_range)
  image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  if upscale > 1:
    image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
  with atomic_write(path) as f:
    image.save(f, format="PNG")
  return path


def save_scatter(points, path: str, title: str | None = None) -> str:
  """Write a scatter plot of (N, 2) points as a PNG (atomically); returns the path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  points = np.asarray(points)
  if points.ndim != 2 or points.shape[1] != 2:
    raise InputError(f"points must have shape (N, 2), got {points.shape}")
  fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
  ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
  ax.set_aspect("equal")
  if title:
    ax.set_title(title)
  fig.tight_layout()
  with atomic_write(path) as f:
    fig.savefig(f, format="png")
  plt.close(fig)
  return path


def save_side_by_side(panels, path: str, gap: int = 12) -> str:
  """Write PNG images side by side, each with a caption above it, atomically; returns the path.

  `panels` is a list of (png path, caption).
  """
  from PIL import Image, ImageDraw
  images = [Image.open(p).convert("RGB") for p, _ in panels]
  caption_h = 18
  width = sum(im.width for im in images) + gap * (len(images) + 1)
  height = max(im.height for im in images) + caption_h + 2 * gap
  canvas = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(canvas)
  x = gap
  for im, (_, caption) in zip(images, panels):
    draw.text((x, gap // 2), caption, fill="black")
    canvas.paste(im, (x, gap + caption_h))
    x += im.width + gap
  with atomic_write(path) as f:
    canvas.save(f, format="PNG")
  return path
