"""Crash-safe appends: a torn last line (process killed mid-write) never breaks the next run."""
import json
import logging
import os

import pytest

from sgm_jax import io_utils


def test_append_line_drops_a_torn_final_line_and_ends_every_line(tmp_path):
  path = str(tmp_path / "results.jsonl")
  with open(path, "w") as f:
    f.write('{"a": 1}\n{"b": 2, "c')  # the process was killed half-way through the 2nd record
  io_utils.append_line(path, json.dumps({"d": 4}))
  io_utils.append_line(path, json.dumps({"e": 5}))
  with open(path) as f:
    assert f.read() == '{"a": 1}\n{"d": 4}\n{"e": 5}\n'
  assert io_utils.read_jsonl(path) == [{"a": 1}, {"d": 4}, {"e": 5}]


def test_append_line_creates_the_file_and_syncs_each_line(tmp_path, monkeypatch):
  synced = []
  real_fsync = os.fsync
  monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
  path = str(tmp_path / "new" / "log.jsonl")
  io_utils.append_line(path, "{}")
  io_utils.append_line(path, "[1]")
  with open(path) as f:
    assert f.read() == "{}\n[1]\n"
  assert len(synced) == 2
  with pytest.raises(ValueError, match="newline"):
    io_utils.append_line(path, "{}\n{}")


def test_append_line_keeps_a_file_that_ends_with_a_newline_or_is_empty(tmp_path):
  path = str(tmp_path / "a.txt")
  open(path, "w").close()
  io_utils.append_line(path, "x")
  io_utils.append_line(path, "y")
  with open(path) as f:
    assert f.read() == "x\ny\n"
  long_torn = "z" * 20000  # a torn line longer than one backwards-read block
  with open(path, "a") as f:
    f.write(long_torn)
  io_utils.append_line(path, "w")
  with open(path) as f:
    assert f.read() == "x\ny\nw\n"


def test_read_jsonl_skips_a_torn_final_line_with_a_warning(tmp_path, caplog):
  path = tmp_path / "results.jsonl"
  path.write_text('{"a": 1}\n\n{"b": 2}\n{"c": 3, "d"')
  with caplog.at_level(logging.WARNING):
    assert io_utils.read_jsonl(str(path)) == [{"a": 1}, {"b": 2}]
  assert "torn" in caplog.text and "results.jsonl" in caplog.text
  # an unterminated last line is torn even if it happens to parse: append_line would drop it too
  path.write_text('{"a": 1}\n{"b": 2}')
  assert io_utils.read_jsonl(str(path)) == [{"a": 1}]
  path.write_text("")
  assert io_utils.read_jsonl(str(path)) == []


def test_read_jsonl_fails_clearly_on_a_bad_line_in_the_middle(tmp_path):
  path = tmp_path / "results.jsonl"
  # what the old open(path, "a") writer left after a crash and one more run
  path.write_text('{"a": 1}\n{"b": 2, "c{"d": 4}\n{"e": 5}\n')
  with pytest.raises(ValueError, match=r"results.jsonl:2 .*not valid JSON"):
    io_utils.read_jsonl(str(path))
  path.write_text('{"a": 1}\n[1, 2]\n')
  with pytest.raises(ValueError, match=r"results.jsonl:2 .*not a JSON object"):
    io_utils.read_jsonl(str(path))


def test_atomic_write_replaces_or_refuses_and_leaves_no_temporary_file(tmp_path):
  path = str(tmp_path / "sub" / "out.bin")
  with io_utils.atomic_write(path) as f:
    f.write(b"one")
  with pytest.raises(FileExistsError, match="overwrite"):
    with io_utils.atomic_write(path, overwrite=False) as f:
      f.write(b"two")
  with open(path, "rb") as f:
    assert f.read() == b"one"
  with pytest.raises(RuntimeError):  # a writer that fails half-way keeps the old file
    with io_utils.atomic_write(path) as f:
      f.write(b"thr")
      raise RuntimeError("killed")
  with open(path, "rb") as f:
    assert f.read() == b"one"
  io_utils.save_npz_atomic(str(tmp_path / "sub" / "new.npz"), {"a": [1, 2]}, overwrite=False)
  with io_utils.atomic_write(path) as f:
    f.write(b"two")
  with open(path, "rb") as f:
    assert f.read() == b"two"
  assert sorted(os.listdir(tmp_path / "sub")) == ["new.npz", "out.bin"]
