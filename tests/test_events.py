"""TensorBoard event files from EventWriter (tensorboardX), read back with CRC checks."""

import glob
import os

import numpy as np
import pytest

from facejax.train.events import EventWriter
from tests._tfevents import crc32c, read_events, read_scalars


def test_the_test_reader_crc_is_crc32c():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_scalars_round_trip_with_the_same_tags_and_steps(tmp_path):
    writer = EventWriter(str(tmp_path / "events"))
    writer.scalars(3, {"train/loss_running": 1.25, "train/learning_rate": np.float32(1e-3)})
    writer.scalars(10, {"epoch/val_top1": 0.5, "epoch/val_accuracy": 0.75})
    writer.close()
    (path,) = glob.glob(str(tmp_path / "events" / "events.out.tfevents.*"))
    assert f".{os.getpid()}." in os.path.basename(path)
    events = read_events(path)
    assert events[0].file_version == "brain.Event:2"
    assert read_scalars(path) == [(3, "train/loss_running", 1.25),
                                  (3, "train/learning_rate", pytest.approx(1e-3)),
                                  (10, "epoch/val_top1", 0.5), (10, "epoch/val_accuracy", 0.75)]


def test_two_writers_in_one_second_keep_both_files(tmp_path):
    """tensorboardX names files by the second and truncates a file of the same name: a run
    resumed at once in the same process must not erase the first file's scalars."""
    for step in (1, 2):
        writer = EventWriter(str(tmp_path))
        writer.scalars(step, {"train/loss_running": float(step)})
        writer.close()
    files = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    assert sorted(s for f in files for s, _, _ in read_scalars(f)) == [1, 2]


def test_a_damaged_event_file_is_detected_by_the_reader(tmp_path):
    writer = EventWriter(str(tmp_path))
    writer.scalars(1, {"a": 1.0})
    writer.close()
    (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    with open(path, "r+b") as f:
        f.seek(-6, os.SEEK_END)
        byte = f.read(1)
        f.seek(-6, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="crc"):
        read_events(path)
