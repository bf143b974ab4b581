"""The one strict image decoder, the bad-image scan, the replace policy and the letterbox geometry."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from multilabel_fusion.data import images
from multilabel_fusion.data.images import BadImageError, find_bad_images, read_rgb
from multilabel_fusion.data.reader import DataError

RED = (255, 0, 0)


def _noise(h: int = 240, w: int = 320, seed: int = 0) -> np.ndarray:
    """Smooth colourful RGB image (compresses like a photo, every part of the file carries pixels)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _save(path, rgb: np.ndarray):
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _red(h: int = 30, w: int = 40) -> np.ndarray:
    return np.full((h, w, 3), RED, dtype=np.uint8)


@pytest.fixture()
def files(tmp_path):
    """Good and bad files side by side: name -> path."""
    f = {
        "good.jpg": _save(tmp_path / "good.jpg", _noise()),
        "good.png": _save(tmp_path / "good.png", _noise(seed=1)),
        "good.bmp": _save(tmp_path / "good.bmp", _noise(seed=2)),
        "red.jpg": _save(tmp_path / "red.jpg", _red()),
    }
    padded = (tmp_path / "good.jpg").read_bytes() + b"\x00" * 7 + b"\r\n"
    (tmp_path / "padded.jpg").write_bytes(padded)  # trailing padding after FF D9 is allowed
    f["padded.jpg"] = tmp_path / "padded.jpg"
    whole = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "half.jpg").write_bytes(whole[: len(whole) // 2])  # cv2.imread decodes this, grey-filled
    png = (tmp_path / "good.png").read_bytes()
    (tmp_path / "half.png").write_bytes(png[: len(png) - 100])
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    (tmp_path / "garbage.bmp").write_bytes(b"BM" + bytes(range(256)) * 4)
    # right start and end markers, no image between them: only the header check (or the decoder) can tell
    (tmp_path / "fake.jpg").write_bytes(b"\xff\xd8" + b"not a jpeg" * 20 + b"\xff\xd9")
    (tmp_path / "fake.png").write_bytes(png[:8] + b"not a png" * 20 + png[-12:])
    for name in ("empty.jpg", "half.jpg", "half.png", "text.jpg", "garbage.bmp", "fake.jpg", "fake.png"):
        f[name] = tmp_path / name
    f["missing.jpg"] = tmp_path / "missing.jpg"
    return f


BAD = {
    "empty.jpg": "empty file (0 bytes)",
    "half.jpg": "truncated JPEG",
    "half.png": "truncated PNG",
    "text.jpg": "not a decodable image",
    "garbage.bmp": "not a decodable image",
    "fake.jpg": "not a decodable image",
    "fake.png": "not a decodable image",
    "missing.jpg": "image file not found",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_are_one_line_errors_naming_the_file(files, name):
    with pytest.raises(BadImageError) as err:
        read_rgb(files[name])
    message = str(err.value)
    assert message.startswith(f"{files[name]}: {BAD[name]}") and "\n" not in message
    assert isinstance(err.value, DataError) and err.value.path == files[name]


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(BadImageError, match=rf"^{tmp_path}: "):
        read_rgb(tmp_path)


def test_good_jpeg_and_png_decode_to_rgb_of_the_right_shape(files, tmp_path):
    red_jpg = read_rgb(files["red.jpg"])
    assert red_jpg.shape == (30, 40, 3) and red_jpg.dtype == np.uint8
    r, g, b = red_jpg.reshape(-1, 3).mean(0)
    assert r > 240 and g < 15 and b < 15  # red is channel 0 (RGB, not OpenCV's BGR)
    Image.fromarray(_red(17, 23)).save(tmp_path / "red.png")  # written by PIL, in RGB order
    red_png = read_rgb(tmp_path / "red.png")
    assert red_png.shape == (17, 23, 3) and (red_png == RED).all()
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((5, 6), 77, np.uint8)).save(grey)  # single channel -> 3 channels
    assert read_rgb(grey).shape == (5, 6, 3) and (read_rgb(grey) == 77).all()
    for name in ("good.jpg", "good.png", "good.bmp", "padded.jpg"):
        assert read_rgb(files[name]).shape == (240, 320, 3)
    assert np.array_equal(read_rgb(files["padded.jpg"]), read_rgb(files["good.jpg"]))
    assert np.array_equal(read_rgb(files["good.png"]), _noise(seed=1))  # lossless: exact pixels


def test_find_bad_images_lists_exactly_the_bad_ones(files):
    order = sorted(files)
    found = find_bad_images([files[n] for n in order])
    assert [p.name for p, _ in found] == [n for n in order if n in BAD]
    for path, problem in found:
        assert problem.startswith(BAD[path.name])
    assert find_bad_images([files[n] for n in order if n not in BAD], desc="check") == []


def test_find_bad_images_agrees_with_the_decoder(files):
    for name, path in files.items():
        try:
            read_rgb(path)
            refused = False
        except BadImageError:
            refused = True
        assert refused == (images.image_problem(path) is not None), name


def test_image_files_error_or_replace(files):
    paths = [files["good.jpg"], files["half.jpg"], files["missing.jpg"]]
    strict = images.ImageFiles(paths, 32)
    assert strict[0].shape == (3, 32, 32) and strict[0].dtype == torch.uint8
    with pytest.raises(BadImageError, match="half.jpg: truncated JPEG"):
        strict[1]
    targets = np.eye(3, 18, dtype=np.uint8)
    lenient = images.ImageFiles(paths, 32, targets=targets, on_bad="replace")
    good, _ = lenient[0]
    assert good.float().std() > 10  # a real picture, not the replacement
    for i in (1, 2):
        image, target = lenient[i]
        assert image.shape == (3, 32, 32) and (image == images.GREY).all()
        assert torch.equal(target, torch.from_numpy(targets[i]).float())
    assert lenient.replaced == [files["half.jpg"], files["missing.jpg"]]
    assert strict.replaced == []
    with pytest.raises(ValueError, match="on_bad"):
        images.ImageFiles(paths, 32, on_bad="skip")


def test_image_files_augmented_replacement_is_grey(files):
    aug = images.augmentation(24, {"scale_min": 0.5, "hflip": 0.5, "vflip": 0.5})
    ds = images.ImageFiles([files["empty.jpg"]], 24, augment=aug, on_bad="replace")
    image = ds[0]
    assert image.shape == (3, 24, 24) and (image == images.GREY).all() and ds.replaced == [files["empty.jpg"]]


def test_bad_image_keeps_its_type_through_a_loader_worker(files):
    """A DataLoader worker's error is re-raised in the main process as ``type(message)``: it must stay a BadImageError.

    (Wrapped by hand, as the worker does: a real worker's error also costs torch a 5 s shutdown.)
    """
    from torch._utils import ExceptionWrapper

    try:
        images.ImageFiles([files["half.jpg"]], 16)[0]
    except BadImageError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(BadImageError, match="half.jpg: truncated JPEG"):
        wrapped.reraise()


def test_image_stream_uses_the_strict_decoder_and_can_replace(files):
    paths = [files["red.jpg"], files["text.jpg"]]
    boxed = images.ImageStream(paths, 64, letterboxed=True)
    tensor, meta = boxed[0]
    assert tensor.shape == (3, 64, 64) and meta == (1.6, 0, 8, 30, 40)
    assert tensor[0, 32, 32] > 240 and tensor[2, 32, 32] < 15  # RGB
    with pytest.raises(BadImageError, match="text.jpg: not a decodable image"):
        boxed[1]
    raw = images.ImageStream(paths, 64, letterboxed=False, on_bad="replace")
    bgr, meta = raw[0]
    assert bgr.shape == (30, 40, 3) and bgr[..., 2].mean() > 240 and bgr[..., 0].mean() < 15  # BGR for ultralytics
    grey, meta = raw[1]
    assert grey.shape == (64, 64, 3) and (grey == images.GREY).all() and meta == (1.0, 0, 0, 64, 64)
    assert raw.replaced == [files["text.jpg"]]
    batch, metas = images._collate([boxed[0], boxed[0]])
    assert batch.shape == (2, 3, 64, 64) and len(metas) == 2


@pytest.mark.parametrize("h, w, size", [(240, 320, 640), (320, 213, 640), (300, 300, 128), (101, 37, 64)])
def test_letterbox_geometry_and_box_round_trip(h, w, size):
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 1] = 200
    boxed, meta = images.letterbox(image, size)
    r, left, top, h0, w0 = meta
    assert boxed.shape == (size, size, 3) and (h0, w0) == (h, w)
    assert r == pytest.approx(size / max(h, w))
    nh, nw = round(h * r), round(w * r)
    assert max(nh, nw) == size
    # centred: padding on both sides differs by at most one pixel, value 114 (YOLOv5's grey)
    assert abs((size - nw - left) - left) <= 1 and abs((size - nh - top) - top) <= 1
    inside = np.zeros((size, size), bool)
    inside[top:top + nh, left:left + nw] = True
    assert (boxed[inside][:, 1] == 200).all() and (boxed[~inside] == 114).all()
    # boxes in original pixels -> letterboxed pixels (as a detector sees them) -> back
    original = np.array([[0, 0, w, h], [w * 0.25, h * 0.5, w * 0.75, h * 0.9], [3, 4, 5, 6]], np.float32)
    on_boxed = original * r + np.array([left, top, left, top], np.float32)
    assert np.allclose(images.unletterbox(on_boxed, meta), original, atol=1e-3)
    # a box reaching into the padding is clipped to the image
    assert np.allclose(images.unletterbox(np.array([[-50, -50, size + 50, size + 50]]), meta), [[0, 0, w, h]])


def test_real_images_decode_and_pass_the_scan(shared_data):
    paths = sorted((shared_data / "data").glob("*.jpg"))[::400][:50]
    assert len(paths) == 50
    assert find_bad_images(paths) == []
    for path in paths:
        rgb = read_rgb(path)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and max(rgb.shape[:2]) <= 640
        with Image.open(path) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), rgb)  # same pixels as the PIL decode it replaces


def test_find_bad_images_works_after_ultralytics_patched_pil(tmp_path):
    """ultralytics replaces PIL.Image.open with a version that raises ModuleNotFoundError (no pi_heif) on an
    unidentified file; the scan must still report the file, not crash (found when stage 04 ran first)."""
    import ultralytics  # noqa: F401 - imported for its patch of PIL.Image.open

    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"\xff\xd8 not a jpeg at all \xff\xd9")
    good = tmp_path / "good.png"
    import cv2
    import numpy as np

    cv2.imwrite(str(good), np.zeros((8, 8, 3), np.uint8))
    found = images.find_bad_images([good, fake])
    assert [p for p, _ in found] == [fake] and "not a decodable image" in found[0][1]


def test_a_loader_worker_forked_after_opencv_ran_threads_does_not_hang(shared_data):
    """Regression: the workers used to call cv2.setNumThreads themselves; after the parent had run OpenCV's thread
    pool, the forked worker hung in pthread_cond_destroy (seen in CI-like runs of the GPU-decoding tests)."""
    import subprocess
    import sys

    script = f"""
import cv2, numpy as np, torch
from multilabel_fusion.data.images import ImageFiles, image_loader
cv2.setNumThreads(2)
big = np.random.default_rng(0).integers(0, 255, (2000, 2000, 3), dtype=np.uint8)
for _ in range(20):  # the parent's OpenCV pool runs (and is idle at the fork)
    cv2.resize(big, (1000, 1000), interpolation=cv2.INTER_AREA)
paths = sorted(__import__("pathlib").Path({str(shared_data / "data")!r}).glob("*.jpg"))[:8]
batches = list(image_loader(ImageFiles(paths, 64), 4, workers=2))
print("batches", len(batches), tuple(batches[0].shape))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "batches 2 (4, 3, 64, 64)" in done.stdout
