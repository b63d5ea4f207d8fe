"""dcgan.tfevents against TensorBoard's own reader and torch's own writer, on a real photo."""

import struct

import cv2
import numpy as np
import pytest
from skimage import data
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from torch.utils import tensorboard as torch_tb

from dcgan.tfevents import EventWriter, crc32c, png_size


def records(path):
    """(event bytes) of an event file, every CRC checked with TensorBoard's own masked CRC-32C."""
    raw, at, out = path.read_bytes(), 0, []
    while at < len(raw):
        header = raw[at:at + 8]
        assert struct.unpack("<I", raw[at + 8:at + 12])[0] == masked_crc32c(header)
        n = struct.unpack("<Q", header)[0]
        event = raw[at + 12:at + 12 + n]
        assert struct.unpack("<I", raw[at + 12 + n:at + 16 + n])[0] == masked_crc32c(event)
        out.append(event)
        at += 16 + n
    return out


def test_crc32c_is_castagnolis():
    assert crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C
    assert crc32c(b"") == 0


def test_tensorboard_reads_our_scalars_and_pictures_as_torchs_writer_writes_them(tmp_path):
    photo = np.ascontiguousarray(data.astronaut()[::4, ::4])  # (128, 128, 3) RGB
    grey = np.ascontiguousarray(data.camera()[::8, ::8])
    png = cv2.imencode(".png", photo[:, :, ::-1])[1].tobytes()
    ours = EventWriter(tmp_path / "ours", suffix=".eval")
    theirs = torch_tb.SummaryWriter(log_dir=str(tmp_path / "theirs"))
    for step in (0, 7, 2**40):
        ours.scalar("train/loss_d", 0.25 + step % 5, step)
        theirs.add_scalar("train/loss_d", 0.25 + step % 5, step)
    ours.scalar("eval/huge", 1e300, 3)  # beyond float32: stored as inf, as torch's writer stores it
    ours.png("eval/samples", png, 7)
    ours.image("samples/grey", grey, 9)
    ours.image("samples/fixed_z", photo, 9)
    theirs.add_image("samples/fixed_z", photo, 9, dataformats="HWC")
    ours.close()
    theirs.close()

    [path] = (tmp_path / "ours").iterdir()
    assert path.name.startswith("events.out.tfevents.") and path.name.endswith(".eval")
    events = [event_pb2.Event.FromString(e) for e in records(path)]
    theirs_events = [event_pb2.Event.FromString(e) for e in records(next((tmp_path / "theirs").iterdir()))]
    assert events[0].file_version == theirs_events[0].file_version == "brain.Event:2"
    for mine, torch_s in zip(events[1:4], theirs_events[1:4]):  # the scalars: the same Event but for the clock
        mine.ClearField("wall_time")
        torch_s.ClearField("wall_time")
        assert mine == torch_s
    their_image = theirs_events[4].summary.value[0].image
    my_image = events[-1].summary.value[0].image
    assert (my_image.height, my_image.width, my_image.colorspace) == (their_image.height, their_image.width,
                                                                      their_image.colorspace) == (128, 128, 3)
    decoded = cv2.imdecode(np.frombuffer(my_image.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    assert np.array_equal(decoded, photo)

    acc = EventAccumulator(str(tmp_path / "ours"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss_d")] == [(0, 0.25), (7, 2.25), (2**40, 1.25)]
    assert [e.value for e in acc.Scalars("eval/huge")] == [float("inf")]
    [shown] = acc.Images("eval/samples")
    assert shown.step == 7 and shown.encoded_image_string == png and (shown.height, shown.width) == (128, 128)
    [grey_shown] = acc.Images("samples/grey")
    assert png_size(grey_shown.encoded_image_string) == (64, 64, 1)
    for not_png in (b"GIF89a" + bytes(40), png[:20], png[:25] + b"\x07" + png[26:]):  # colour type 7: none
        with pytest.raises(ValueError, match="not a PNG"):
            png_size(not_png)
