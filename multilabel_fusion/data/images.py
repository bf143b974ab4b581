"""The one image decoder and the image datasets every stage reads photos through.

Decoding is strict: a missing, empty, truncated or undecodable file is a :class:`BadImageError` naming
the file. OpenCV's libjpeg would otherwise decode a truncated JPEG, fill the missing part with grey
and only print "Premature end of JPEG file" on stderr, so the file is checked before decoding: a JPEG
must end with its end-of-image marker ``FF D9`` and a PNG with its ``IEND`` chunk (trailing zero or
whitespace padding allowed); any other format relies on the decoder.

Datasets take ``on_bad="error"`` (raise) or ``on_bad="replace"`` (a mid-grey image instead, the path
recorded in ``dataset.replaced`` -- only in the process that decoded it: with DataLoader workers that
list stays in the workers, so a stage lists bad files up front with :func:`find_bad_images`).
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .reader import DataError

log = logging.getLogger(__name__)

#: Pixel value of the image that replaces a bad one (``on_bad="replace"``).
GREY = 128
ON_BAD = ("error", "replace")

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk type and its fixed CRC
_PADDING = b"\x00 \t\r\n"


class BadImageError(DataError):
    """An image file that cannot be read exactly; the message is one line: ``<path>: <what is wrong>``.

    Constructible from the message alone, so that the error keeps its type when a DataLoader worker
    re-raises it in the main process.
    """

    def __init__(self, path: str | Path, reason: str | None = None):
        self.path = Path(path) if reason is not None else None
        self.reason = reason
        super().__init__(str(path) if reason is None else f"{path}: {reason}")


def _container_problem(data: bytes) -> str | None:
    """What is wrong with the bytes of an image file before decoding (None: nothing found)."""
    if not data:
        return "empty file (0 bytes)"
    if data.startswith(_JPEG_START):
        if not data.rstrip(_PADDING).endswith(_JPEG_END):
            return "truncated JPEG (no end-of-image marker FF D9 at the end of the file)"
    elif data.startswith(_PNG_START):
        if not data.rstrip(_PADDING).endswith(_PNG_END):
            return "truncated PNG (no IEND chunk at the end of the file)"
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadImageError(path, "image file not found") from None
    except IsADirectoryError:
        raise BadImageError(path, "not a file (a directory)") from None
    except OSError as e:
        raise BadImageError(path, f"cannot read the file ({e.strerror or e})") from None


def read_rgb(path: str | Path) -> np.ndarray:
    """One image as uint8 RGB [H, W, 3] (OpenCV's libjpeg-turbo, about 0.2 ms for a 320-px JPEG).

    Raises :class:`BadImageError` for a missing, empty, truncated or undecodable file.
    """
    path = Path(path)
    return decode_rgb(_read_bytes(path), path)


def decode_rgb(data: bytes, path: str | Path) -> np.ndarray:
    """:func:`read_rgb` of a file's bytes already read (``path`` names it in errors): the GPU decoder's fallback."""
    import cv2

    problem = _container_problem(data)
    if problem:
        raise BadImageError(path, problem)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # applies a JPEG's EXIF orientation
    if image is None or image.size == 0:
        raise BadImageError(path, f"not a decodable image ({len(data)} bytes starting {data[:8].hex(' ')})")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _header_problem(data: bytes) -> str | None:
    """Parse the header only (PIL opens lazily): the image must declare a format and a size."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception as e:  # noqa: BLE001 - any parser failure (ultralytics also patches Image.open, adding its own)
        if not isinstance(e, (OSError, ValueError, SyntaxError)):  # e.g. a patched Image.open's own import error
            return "not a decodable image (unknown format)"
        return f"not a decodable image (header: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if w <= 0 or h <= 0:
        return f"not a decodable image (header declares {w}x{h} pixels)"
    return None


def _jpeg_stream_problem(data: bytes) -> str | None:
    """A JPEG whose compressed data is corrupt (bytes zeroed or changed mid-file, its end marker intact) decodes with
    part of its pixels wrong and only a warning from libjpeg on stderr, naming no file. libjpeg-turbo's strict mode
    (simplejpeg) turns that warning into an error; decoding at 1/8 scale reads every byte at a fraction of the cost
    (about 0.3 ms for a 320-px photo)."""
    import simplejpeg

    try:
        height, width = simplejpeg.decode_jpeg_header(data)[:2]
        simplejpeg.decode_jpeg(data, strict=True, min_height=max(1, height // 8), min_width=max(1, width // 8),
                               fastdct=True, fastupsample=True)
    except ValueError as err:
        return f"corrupt JPEG data ({str(err).strip().rstrip('.')})"
    return None


def image_problem(path: str | Path) -> str | None:
    """Quick check of one file without decoding its pixels (None: looks good).

    Existence, size > 0, JPEG end marker / PNG IEND chunk, a parseable header, and a JPEG's compressed data read in
    strict mode; a format other than JPEG or PNG is fully decoded (they are rare, and the decoder is the only check).
    """
    path = Path(path)
    try:
        data = _read_bytes(path)
    except BadImageError as e:
        return e.reason
    problem = _container_problem(data)
    if problem:
        return problem
    if data.startswith(_JPEG_START):
        return _header_problem(data) or _jpeg_stream_problem(data)
    if data.startswith(_PNG_START):
        return _header_problem(data)
    try:
        read_rgb(path)
    except BadImageError as e:
        return e.reason
    return None


def find_bad_images(paths: Iterable[str | Path], *, desc: str | None = None) -> list[tuple[Path, str]]:
    """``(path, what is wrong)`` for every file among ``paths`` that :func:`read_rgb` would refuse.

    Reads each file once and checks its container and header without decoding the pixels (about
    0.1 ms an image from the page cache, against 0.2 ms for a full decode); ``desc`` shows a
    progress bar with that label.
    """
    paths = [Path(p) for p in paths]
    if desc is not None:
        from ..io.progress import progress

        paths_iter = progress(paths, desc=desc, unit="img", mininterval=1.0)
    else:
        paths_iter = paths
    bad = []
    for path in paths_iter:
        problem = image_problem(path)
        if problem:
            bad.append((path, problem))
    return bad


def _check_on_bad(on_bad: str) -> str:
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
    return on_bad


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size: area averaging when shrinking (antialiased), bilinear when enlarging."""
    import cv2

    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    shrink = h >= size and w >= size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _one_opencv_thread() -> None:
    """Loader workers decode one image at a time: no OpenCV thread pool competing with the forward pass. Set in the
    parent before the workers fork, never in a worker: reconfiguring OpenCV's thread pool in a forked child
    deadlocks when the parent's pool had run (seen as a hung loader worker in pthread_cond_destroy)."""
    import cv2

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


class ImageFiles(Dataset):
    """Image files → uint8 [3, S, S] tensors (strict decode, antialiased resize or a given ``transform``, e.g.
    torchvision weights' resize and centre crop; optional augmentation).

    ``on_bad="replace"`` gives a mid-grey image for a bad file and appends its path to ``self.replaced``.
    """

    def __init__(self, paths: Sequence[str | Path], size: int, augment: Any = None,
                 targets: np.ndarray | None = None, on_bad: str = "error", transform: Any = None):
        self.paths, self.size, self.augment, self.targets = [Path(p) for p in paths], size, augment, targets
        self.transform = transform  # uint8 [3, H, W] -> [3, size, size] instead of the square resize (no augment)
        self.on_bad = _check_on_bad(on_bad)
        self.replaced: list[Path] = []

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, i: int) -> np.ndarray:
        try:
            return read_rgb(self.paths[i])
        except BadImageError:
            if self.on_bad == "error":
                raise
            self.replaced.append(self.paths[i])
            return np.full((self.size, self.size, 3), GREY, dtype=np.uint8)

    def __getitem__(self, i: int):
        image = self._read(i)
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        elif self.transform is None:
            image = resize_square(image, self.size)
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.augment is None and self.transform is not None:
            tensor = self.transform(tensor)
        return tensor if self.targets is None else (tensor, torch.from_numpy(self.targets[i]).float())


# ------------------------------------------------------------------------------------ decoding on the GPU

#: ``image.gpu_decode`` values.
GPU_DECODE = ("auto", True, False)


def gpu_decode_wanted(setting: Any, device: torch.device) -> bool:
    """Decode JPEGs on the device only where the network runs on CUDA (nvjpeg): there the CPU only feeds the GPU,
    and a Colab runtime's 2 cores would decode 40,000 photos; ``auto`` and ``true`` alike, ``false`` never."""
    if setting not in GPU_DECODE:
        raise ValueError(f"image.gpu_decode {setting!r}: choose auto, true or false")
    return torch.device(device).type == "cuda" and setting is not False


def _exif_rotated(data: bytes) -> bool:
    """A JPEG whose EXIF orientation rotates or flips it: OpenCV applies that, torchvision's GPU decoder does not."""
    if b"Exif" not in data[:65536]:  # no EXIF block: skip parsing (the usual case, ~0.1 ms saved an image)
        return False
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.getexif().get(0x0112, 1) not in (0, 1)
    except Exception:  # noqa: BLE001 - a header problem is the CPU decoder's to report
        return True


class EncodedImages(ImageFiles):
    """Image files → ``(bytes, path)``: a JPEG's file bytes as a uint8 1-D tensor, for :class:`JpegDecoder` to decode
    on the GPU, so that loader workers only read files. A file the GPU would decode differently or not at all (not a
    JPEG, EXIF-rotated, truncated, missing) comes already decoded and resized by the CPU path, uint8 [3, S, S]
    (``on_bad`` applies there)."""

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            data = _read_bytes(path)
        except BadImageError:
            data = b""
        if data.startswith(_JPEG_START) and not _container_problem(data) and not _exif_rotated(data):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), str(path)
        return super().__getitem__(i), str(path)


def _area_weights(n: int, size: int, device: torch.device) -> torch.Tensor:
    """[size, n]: the share of each of ``n`` input pixels in each of ``size`` output pixels under OpenCV's area
    averaging (each output pixel averages the ``n / size`` input pixels it covers, fractions included)."""
    scale = n / size
    edges = torch.arange(size + 1, dtype=torch.float64, device=device) * scale
    pixel = torch.arange(n, dtype=torch.float64, device=device)
    overlap = torch.minimum(edges[1:, None], pixel + 1) - torch.maximum(edges[:-1, None], pixel)
    return (overlap.clamp(min=0) / scale).float()


def collate_encoded(items: list[tuple[torch.Tensor, str]]) -> tuple:
    """A batch of :class:`EncodedImages` items as one byte buffer, their sizes (0: an image decoded already), those
    images and the paths. One buffer, not a tensor a file: a loader worker passes each tensor through a shared-memory
    file descriptor of its own, and 128 a batch with several batches in flight could exhaust the process's limit."""
    jpegs = [t for t, _ in items if t.dim() == 1]
    return (torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8),
            [t.numel() if t.dim() == 1 else 0 for t, _ in items],
            [t if t.dim() == 3 else None for t, _ in items], [path for _, path in items])


def resize_square_tensor(image: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`resize_square` of a uint8 [3, H, W] tensor on its own device, to 1 grey level of OpenCV's result.

    Enlarging: torchvision's bilinear (OpenCV's, half-pixel centres). Shrinking: OpenCV's area averaging, which no
    torch or torchvision function computes (``interpolate(mode="area")`` drops fractional pixels, antialiased
    bilinear is a wider filter: features of real photos at 96 px only 0.98 cosine-similar), so as two small
    weight matrices (:func:`_area_weights`) applied with one ``einsum``.
    """
    from torchvision.transforms.v2 import functional as TF

    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image
    if h >= size and w >= size:
        rows, cols = _area_weights(h, size, image.device), _area_weights(w, size, image.device)
        out = torch.einsum("sh,chw,tw->cst", rows, image.float(), cols)
    else:
        out = TF.resize(image.float(), [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def decode_jpegs(data: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """torchvision's JPEG decoder on ``device`` (nvjpeg on CUDA, one call a batch): uint8 [3, H, W] RGB each."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


class JpegDecoder:
    """Batches of :class:`EncodedImages` (collated by :func:`collate_encoded`) → uint8 [B, 3, S, S] on ``device``: JPEGs decoded there
    (:func:`decode_jpegs`) and resized there (:func:`resize_square_tensor`). A file the decoder rejects is decoded
    on the CPU; if nothing has decoded yet when a batch fails (torchvision without nvjpeg, ...), every later batch is
    decoded on the CPU, said in one log line. ``device`` may be the CPU: the tests compare the two paths there."""

    def __init__(self, device: torch.device | str, size: int, on_bad: str = "error", transform: Any = None):
        self.device, self.size, self.on_bad = torch.device(device), size, _check_on_bad(on_bad)
        self.transform = transform  # a weights' own resize and crop (torchvision ops: on any device), else the square
        self.active = True
        self.fallback: str | None = None  # why decoding moved to the CPU wholesale
        self.counts = {"device": 0, "cpu": 0}  # images decoded on the device / on the CPU

    def __call__(self, batch: tuple) -> torch.Tensor:
        """``batch``: what :func:`collate_encoded` makes of a list of :class:`EncodedImages` items."""
        buffer, sizes, images, paths = batch
        files = iter(torch.split(buffer, [n for n in sizes if n]))
        items = [(next(files) if n else image, path) for n, image, path in zip(sizes, images, paths)]
        out = torch.empty((len(items), 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        jpegs = [i for i, (t, _) in enumerate(items) if t.dim() == 1]
        tried = self.active and bool(jpegs)
        decoded, error = self._on_device([items[i][0] for i in jpegs]) if tried else ({}, None)
        readable_on_cpu = False
        for k, i in enumerate(jpegs):
            if k in decoded:
                out[i] = self.transform(decoded[k]) if self.transform is not None else \
                    resize_square_tensor(decoded[k], self.size)
            else:
                out[i], readable = self._on_cpu(*items[i])
                readable_on_cpu |= readable
        for i, (t, _) in enumerate(items):
            if t.dim() == 3:  # decoded by the CPU path in the loader
                out[i] = t
        if tried and not decoded and readable_on_cpu and not self.counts["device"]:
            # good files, and the device has never decoded one: its decoder does not work here
            self.active = False
            self.fallback = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            log.warning(f"[image] decoding JPEGs on {self.device} failed ({self.fallback}): decoding on the CPU")
        self.counts["device"] += len(decoded)
        self.counts["cpu"] += len(items) - len(decoded)
        return out

    def _on_device(self, data: list[torch.Tensor]) -> tuple[dict[int, torch.Tensor], Exception | None]:
        """The decoded images by position in ``data`` (those it rejects missing) and the last rejection."""
        try:
            return dict(enumerate(decode_jpegs(data, self.device))), None
        except Exception as err:  # noqa: BLE001 - one file the decoder rejects fails its batch: again one by one
            error = err
        decoded = {}
        for k, one in enumerate(data):
            try:
                decoded[k] = decode_jpegs([one], self.device)[0]
            except Exception as err:  # noqa: BLE001 - that file goes to the CPU decoder
                error = err
        return decoded, error

    def _on_cpu(self, data: torch.Tensor, path: str) -> tuple[torch.Tensor, bool]:
        """The CPU path's image of these file bytes on the device, and whether it decoded (False: a grey stand-in)."""
        try:
            image, readable = decode_rgb(data.numpy().tobytes(), path), True
        except BadImageError:
            if self.on_bad == "error":
                raise
            image, readable = np.full((self.size, self.size, 3), GREY, dtype=np.uint8), False
        if readable and self.transform is None:
            image = resize_square(image, self.size)
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if readable and self.transform is not None:
            tensor = self.transform(tensor)
        return tensor.to(self.device), readable


def augmentation(size: int, aug: dict | Any):
    """The published training augmentation: random resized crop, horizontal and vertical flips.

    ``aug`` is any mapping (or config section) with ``scale_min``, ``hflip`` and ``vflip``.
    """
    import albumentations as A

    return A.Compose([
        A.RandomResizedCrop(size=(size, size), scale=(aug["scale_min"], 1.0)),
        A.HorizontalFlip(p=aug["hflip"]),
        A.VerticalFlip(p=aug["vflip"]),
    ])


def image_loader(dataset: Dataset, batch_size: int, workers: int, shuffle: bool = False, seed: int = 0,
                 collate_fn: Any = None) -> DataLoader:
    """``collate_fn``: e.g. :func:`collate_encoded` for :class:`EncodedImages` (file bytes of differing lengths)."""
    if workers:
        _one_opencv_thread()
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=collate_fn,
                      persistent_workers=False, pin_memory=torch.cuda.is_available() and collate_fn is None,
                      prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(seed))


def letterbox(image: np.ndarray, size: int, fill: int = 114) -> tuple[np.ndarray, tuple[float, int, int, int, int]]:
    """Resize (long side = ``size``) and pad to ``size`` x ``size`` centred, as YOLOv5.

    meta = (ratio, left, top, h, w): ``ratio`` scales original pixels to letterboxed ones, ``left``/``top``
    are the padding before the image, ``h``/``w`` the original size. The resize is PIL's bilinear
    (antialiased when shrinking), as the detector stage always used.
    """
    from PIL import Image

    h, w = image.shape[:2]
    r = min(size / h, size / w)
    nw, nh = int(round(w * r)), int(round(h * r))
    if (nw, nh) != (w, h):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    px, py = (size - nw) / 2, (size - nh) / 2
    top, left = int(round(py - 0.1)), int(round(px - 0.1))
    out = np.full((size, size, 3), fill, dtype=np.uint8)
    out[top:top + nh, left:left + nw] = image
    return out, (r, left, top, h, w)


def unletterbox(xyxy: np.ndarray, meta) -> np.ndarray:
    """Boxes (x1, y1, x2, y2) in letterboxed pixels → original image pixels (clipped to the image)."""
    r, left, top, h, w = meta
    out = np.asarray(xyxy, dtype=np.float32).reshape(-1, 4).copy()
    out[:, [0, 2]] = ((out[:, [0, 2]] - left) / r).clip(0, w)
    out[:, [1, 3]] = ((out[:, [1, 3]] - top) / r).clip(0, h)
    return out


class ImageStream(Dataset):
    """Decodes (and letterboxes) images for the detector in DataLoader workers, with :func:`read_rgb`.

    Letterboxed: (uint8 [3, S, S] RGB tensor, meta); otherwise (BGR HxWx3 array, as ultralytics wants,
    meta). ``on_bad="replace"`` gives a mid-grey S x S image and appends the path to ``self.replaced``.
    """

    def __init__(self, paths: Sequence[str | Path], size: int, letterboxed: bool, on_bad: str = "error"):
        self.paths, self.size, self.letterboxed = [Path(p) for p in paths], size, letterboxed
        self.on_bad = _check_on_bad(on_bad)
        self.replaced: list[Path] = []

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            image = read_rgb(self.paths[i])
        except BadImageError:
            if self.on_bad == "error":
                raise
            self.replaced.append(self.paths[i])
            image = np.full((self.size, self.size, 3), GREY, dtype=np.uint8)
        if self.letterboxed:
            boxed, meta = letterbox(image, self.size)
            return torch.from_numpy(np.ascontiguousarray(boxed.transpose(2, 0, 1))), meta
        return np.ascontiguousarray(image[..., ::-1]), (1.0, 0, 0) + image.shape[:2]  # BGR, as ultralytics wants


def _collate(items):
    images, metas = zip(*items)
    if isinstance(images[0], torch.Tensor):
        return torch.stack(images), list(metas)
    return list(images), list(metas)
