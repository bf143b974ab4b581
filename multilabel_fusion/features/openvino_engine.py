"""OpenVINO, the inference engine made for CPUs, for the frozen networks: a network is converted once (cached on
disk, keyed by its weights, its input and the engine's version) and run with as many parallel infer requests as
the CPU plugin finds best, each batch split across them. On 2 cores it ran the default ensemble about 5x faster
than torch with the same weights, features agreeing at cosine > 0.99999 (docs/RESULTS.md)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..io.atomic import atomic_dir, write_json
from ..io.hashing import file_digest
from ..io.machine import cpu_name
from ..networks.precision import AUTOCAST_DTYPES

log = logging.getLogger(__name__)


#: Names a folder for converted networks instead of :func:`default_cache` (the test suite sets it, so that its
#: tiny networks never push a user's real conversions out of the shared cache).
CACHE_ENV = "MULTILABEL_FUSION_ENGINE_CACHE"


def default_cache() -> Path:
    """Where converted networks are kept unless ``trainer.engine_cache`` says otherwise: like downloaded weights, a
    converted network depends only on its content (the key), so every project and run on this machine shares it."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "multilabel_fusion" / "openvino"

RECORD = "record.json"
#: Conversions kept in a cache folder, the most recently used first (a backbone's is 20-500 MB).
KEEP = 24


def version() -> str | None:
    """The installed OpenVINO's version (``2026.4.1``), or ``None`` where it is not installed: torch runs all."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__.split("-")[0]


def same_engine(recorded: str | None) -> str:
    """The ``cpu_backend`` for a predictor to compute what a stage cached with the engine it ``recorded``: the same
    one, so that a test record gets exactly its row (two engines agree only to ~1e-6); ``auto`` (torch, said
    loudly) where OpenVINO is not installed on the predicting machine."""
    if not str(recorded or "torch").startswith("OpenVINO"):
        return "torch"
    return "openvino" if version() is not None else "auto"


def network_key(net: nn.Module, example: torch.Tensor, **spec) -> str:
    """What a converted network depends on: every weight and buffer (their bytes), the input's shape and dtype, the
    engine's and torch's versions and ``spec``; 16 hex digits."""
    import openvino

    sha = hashlib.sha256(json.dumps({"input": [list(example.shape[1:]), str(example.dtype)], "graph": "fp32",
                                     "openvino": openvino.__version__, "torch": torch.__version__, **spec},
                                    sort_keys=True, default=str).encode())
    for name, tensor in net.state_dict().items():
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()[:16]


@dataclass
class ConvertedNetwork:
    """An OpenVINO model and its record: the files' sha256, how it was made, the agreement with torch and the
    timings measured per machine (``auto`` times torch against OpenVINO once per machine, then reuses them)."""

    model: Any
    folder: Path | None
    record: dict
    how: str

    def save_record(self) -> None:
        if self.folder is not None:
            write_json(self.folder / RECORD, self.record)


def _files_intact(folder: Path, record: dict) -> bool:
    return all((folder / name).is_file() and file_digest(folder / name, None) == sha
               for name, sha in record.get("files", {}).items()) and len(record.get("files", {})) == 2


def _cached(folder: Path | None) -> ConvertedNetwork | None:
    """The model kept in ``folder`` if its files are intact (a damaged one is made again, never trusted)."""
    import openvino as ov

    if folder is None or not (folder / RECORD).is_file():
        return None
    try:
        record = json.loads((folder / RECORD).read_text())
        if _files_intact(folder, record):
            os.utime(folder / RECORD)  # used now: the last to be pruned
            return ConvertedNetwork(ov.Core().read_model(folder / "model.xml"), folder, record, f"cached in {folder}")
    except (OSError, ValueError, RuntimeError) as err:
        log.warning(f"OpenVINO model in {folder} unreadable ({str(err).splitlines()[0]})")
    log.warning(f"OpenVINO model in {folder} damaged: making it again")
    return None


def _saved(model, folder: Path | None, record: dict, how: str) -> ConvertedNetwork:
    """Save ``model`` with its record into ``folder`` (atomically) and return what was saved, read back: saving
    transforms the graph slightly, and every later run (a predictor) reads the saved one; the first must compute
    exactly what they will."""
    import openvino as ov

    if folder is None:
        return ConvertedNetwork(model, None, record, how)
    with atomic_dir(folder) as tmp:
        ov.save_model(model, tmp / "model.xml", compress_to_fp16=False)
        record["files"] = {name: file_digest(tmp / name, None) for name in ("model.xml", "model.bin")}
        write_json(tmp / RECORD, record)
    prune(folder.parent)
    return ConvertedNetwork(ov.Core().read_model(folder / "model.xml"), folder, record, f"{how}, cached in {folder}")


def converted(graph: nn.Module, weights: nn.Module, example: torch.Tensor, cache_dir: Path | None, **spec):
    """``graph`` as an OpenVINO model (a :class:`ConvertedNetwork`), read from ``cache_dir/<key>/`` when it was
    converted before and its files are intact (the key: the ``weights`` it computes with, ``example``'s shape and
    ``spec``); a dynamic batch dimension, the others those of ``example``. Converting a backbone takes 30-50 s on
    2 cores; a damaged cache is converted again, never trusted."""
    import openvino as ov

    key = network_key(weights, example, **spec)
    folder = Path(cache_dir) / key if cache_dir is not None else None
    found = _cached(folder)
    if found is not None:
        return found
    for module in (graph, weights):
        for p in module.parameters():
            p.requires_grad_(False)  # a traced parameter that needs gradients stops the conversion
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing's notes (deprecation, shapes taken as constants: they are fixed)
        model = ov.convert_model(graph.eval(), example_input=example)
    model.reshape({model.inputs[0]: ov.PartialShape([-1, *example.shape[1:]])})
    seconds = round(time.perf_counter() - start, 1)
    record = {"key": key, "openvino": version(), "torch": torch.__version__, "spec": spec,
              "input": list(example.shape[1:]), "conversion_seconds": seconds, "timings": {}}
    return _saved(model, folder, record, f"converted in {seconds:.0f} s")


#: How a network is quantized to int8 (part of the quantized model's key). Measured on the default ensemble and
#: 300 training photos (docs/EXPERIMENTS.md): NNCF's defaults gave per-image cosine to the fp32 features of median
#: 0.978, worst 0.895; the mixed preset with each member's first and last convolutions kept in fp32 and bias
#: correction on every layer 0.990, worst 0.964, at the same 1.6x speed-up.
INT8_RECIPE = {"preset": "mixed", "fp32": "first and last convolution of each branch", "bias_correction": "full"}


def _end_convolutions(model) -> list[str]:
    """The convolutions with no convolution before them (a branch's first) or after them (its last)."""
    convs = {op.get_friendly_name(): op for op in model.get_ordered_ops()
             if op.get_type_name() in ("Convolution", "GroupConvolution")}

    def reaches_conv(op, upstream: bool) -> bool:
        seen, todo = set(), [op]
        while todo:
            node = todo.pop()
            nexts = ([v.get_node() for v in node.input_values()] if upstream else
                     [t.get_node() for out in node.outputs() for t in out.get_target_inputs()])
            for n in nexts:
                if n.get_friendly_name() in seen:
                    continue
                seen.add(n.get_friendly_name())
                if n.get_friendly_name() in convs:
                    return True
                todo.append(n)
        return False

    return [name for name, op in convs.items() if not reaches_conv(op, True) or not reaches_conv(op, False)]


def quantized(network: ConvertedNetwork, calibration: Callable[[], list[np.ndarray]], calibration_id: str,
              cache_dir: Path | None) -> ConvertedNetwork:
    """``network`` quantized to int8 by NNCF post-training quantization (:data:`INT8_RECIPE`) on ``calibration``'s
    uint8 image batches, read from ``cache_dir`` when made before: keyed by the fp32 network's key, the calibration
    images (``calibration_id``, their content) and NNCF's version. Takes 2-4 minutes on 2 cores for the default
    ensemble and 300 photos; ``calibration`` is called only when the model is made."""
    import nncf

    key = hashlib.sha256(json.dumps({"from": network.record["key"], "calibration": calibration_id,
                                     "nncf": nncf.__version__, "recipe": INT8_RECIPE}, sort_keys=True).encode())
    key = key.hexdigest()[:16]
    folder = Path(cache_dir) / key if cache_dir is not None else None
    found = _cached(folder)
    if found is not None:
        return found
    *batches, check = calibration()
    start = time.perf_counter()
    log.info(f"[int8] quantizing with NNCF on {sum(len(b) for b in batches)} calibration images")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nncf.quantize(network.model, nncf.Dataset(batches), subset_size=len(batches),
                              preset=nncf.QuantizationPreset.MIXED, fast_bias_correction=False,
                              ignored_scope=nncf.IgnoredScope(names=_end_convolutions(network.model)))
    seconds = round(time.perf_counter() - start, 1)
    record = {"key": key, "from": network.record["key"], "openvino": version(), "nncf": nncf.__version__,
              "recipe": INT8_RECIPE, "calibration": calibration_id, "spec": network.record.get("spec", {}),
              "input": network.record.get("input"), "quantization_seconds": seconds, "timings": {}}
    made = _saved(model, folder, record, f"quantized to int8 in {seconds:.0f} s")
    # agreement with the fp32 network on photos the calibration did not see (the last batch)
    fp32, int8 = OpenVINOEngine(network.model, 1, "fp32")(check), OpenVINOEngine(made.model, 1, "int8")(check)
    record["int8_cosine"] = {"min": cosine_min(fp32, int8), "median": cosine_median(fp32, int8), "images": len(check)}
    made.save_record()
    return made


def prune(cache_dir: Path, keep: int = KEEP) -> list[Path]:
    """Remove all but the ``keep`` most recently used conversions (random-weight benchmarks add one per run)."""
    import shutil

    entries = sorted((f for f in Path(cache_dir).iterdir() if (f / RECORD).is_file()),
                     key=lambda f: (f / RECORD).stat().st_mtime, reverse=True)
    for folder in entries[keep:]:
        shutil.rmtree(folder, ignore_errors=True)
    return entries[keep:]


class _Job:
    """One submitted batch: its chunks' outputs arrive from OpenVINO's threads; ``result()`` waits for them all."""

    def __init__(self, chunks: int):
        self.parts: list = [None] * chunks
        self.missing = chunks
        self.lock, self.done = threading.Lock(), threading.Event()
        self.error: str | None = None

    def arrived(self, index: int, outputs: list[np.ndarray] | None, error: str | None = None) -> None:
        with self.lock:
            self.parts[index], self.error = outputs, self.error or error
            self.missing -= 1
            if self.missing == 0:
                self.done.set()

    def result(self) -> list[np.ndarray]:
        self.done.wait()
        if self.error:
            raise RuntimeError(f"OpenVINO inference failed: {self.error}")
        return [np.concatenate(parts) for parts in zip(*self.parts)]


class OpenVINOEngine:
    """A compiled model on the CPU; ``engine(images)`` splits the batch across parallel infer requests and returns
    every output as float32 arrays in the batch's order. ``submit(images)`` starts a batch and returns at once, so
    that the next batch is decoded while this one runs (two batches can be in flight)."""

    def __init__(self, model, threads: int, precision: str = "fp32"):
        import openvino as ov

        hint = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}[precision]  # int8: the layers left in fp32
        self.precision = precision
        self.compiled = ov.Core().compile_model(model, "CPU", {
            "PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": int(threads), "INFERENCE_PRECISION_HINT": hint})
        self.requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.queue = ov.AsyncInferQueue(self.compiled, 2 * self.requests)
        self.queue.set_callback(self._finished)
        self.outputs = len(self.compiled.outputs)

    def describe(self) -> str:
        return (f"OpenVINO {version()} ({self.precision}, {self.requests} parallel requests, "
                f"{self.compiled.get_property('INFERENCE_NUM_THREADS')} threads)")

    def _finished(self, request, userdata) -> None:
        job, index = userdata
        try:
            job.arrived(index, [np.array(request.get_output_tensor(k).data, dtype=np.float32)
                                for k in range(self.outputs)])
        except Exception as err:  # never lost in OpenVINO's thread: result() raises it
            job.arrived(index, None, f"{type(err).__name__}: {err}")

    def submit(self, images: np.ndarray) -> _Job:
        chunks = [c for c in np.array_split(np.ascontiguousarray(images), min(self.requests, len(images))) if len(c)]
        job = _Job(len(chunks))
        for index, chunk in enumerate(chunks):
            self.queue.start_async(chunk, userdata=(job, index))  # waits for a free request, never for a result
        return job

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        return self.submit(images).result()


class UInt8Graph(nn.Module):
    """What the engine runs: uint8 images in, the extraction's outputs out (normalisation inside the graph)."""

    def __init__(self, net: nn.Module, normalise: Callable[[torch.Tensor], torch.Tensor], forward: Callable):
        super().__init__()
        self.net = net  # registered, so that its parameters are frozen before tracing
        self.normalise, self.forward_normalised = normalise, forward

    def forward(self, images_uint8: torch.Tensor):
        outputs = self.forward_normalised(self.normalise(images_uint8))
        return tuple(o for o in outputs if o is not None)


def _row_cosines(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    """Per-row cosines between two engines' outputs, output by output (float64: tiny values too)."""
    out = []
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64).reshape(len(x), -1), np.asarray(y, np.float64).reshape(len(y), -1)
        out.append((x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-300))
    return out


def cosine_min(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The smallest per-row cosine between two engines' outputs, over every output."""
    return round(min([1.0] + [float(c.min()) for c in _row_cosines(a, b)]), 6)


def cosine_median(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The median per-row cosine between two engines' outputs, the lowest over the outputs."""
    return round(min([1.0] + [float(np.median(c)) for c in _row_cosines(a, b)]), 6)


def _images_per_s(call: Callable, x, rounds: int = 2) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        call(x)
    return rounds * len(x) / (time.perf_counter() - start)


#: An int8 network is refused when its features are further from the fp32 network's than this on the photos the
#: calibration did not see (measured on the default ensemble: median 0.990, worst 0.964).
INT8_AGREEMENT = {"median": 0.98, "min": 0.9}


def select_int8(setting: str, what: str, *, graph: nn.Module, weights: nn.Module, example: torch.Tensor,
                cache_dir: Path | None, calibration: Callable[[], list[np.ndarray]], calibration_id: str,
                threads: int | None = None, stored: tuple[bytes, bytes] | None = None,
                **spec) -> tuple["OpenVINOEngine", str, ConvertedNetwork | None]:
    """The int8 engine for a frozen network on a CPU (``<what>.cpu_precision: int8``): the network converted as for
    fp32, quantized by :func:`quantized` (cached), refused with an error where its features drift from fp32's
    beyond :data:`INT8_AGREEMENT`. ``stored``: the model's (xml, bin) bytes as a stage kept them (a predictor
    computes exactly the stage's features with them, whatever this machine's cache holds). Returns (engine,
    what runs and why, the quantized network or None when ``stored``)."""
    if setting == "torch":
        raise ValueError(f"{what}.cpu_precision int8 runs through OpenVINO: set {what}.cpu_backend to auto or "
                         "openvino, or choose another cpu_precision")
    if version() is None:
        raise ValueError(f"{what}.cpu_precision int8: OpenVINO is not installed (pip install openvino)")
    threads = int(threads or torch.get_num_threads())
    if stored is not None:
        import openvino as ov

        model = ov.Core().read_model(stored[0].decode(), ov.Tensor(np.frombuffer(stored[1], np.uint8).copy()))
        engine = OpenVINOEngine(model, threads, "int8")
        return engine, f"{engine.describe()} (the model the stage quantized, from its artifact)", None
    try:
        import nncf  # noqa: F401
    except ImportError:
        raise ValueError(f"{what}.cpu_precision int8: NNCF is not installed (pip install nncf)") from None
    network = converted(graph, weights, example, Path(cache_dir or default_cache()), **spec)
    made = quantized(network, calibration, calibration_id, Path(cache_dir or default_cache()))
    agreement = made.record["int8_cosine"]
    if agreement["median"] < INT8_AGREEMENT["median"] or agreement["min"] < INT8_AGREEMENT["min"]:
        raise ValueError(f"{what}.cpu_precision int8: the int8 network's features drift from fp32's (per-image "
                         f"cosine median {agreement['median']:.4f}, worst {agreement['min']:.4f} on "
                         f"{agreement['images']} photos; needed {INT8_AGREEMENT['median']} / "
                         f"{INT8_AGREEMENT['min']}): choose cpu_precision auto")
    engine = OpenVINOEngine(made.model, threads, "int8")
    return engine, (f"{engine.describe()} (asked for; model {made.how}; features' cosine to fp32 median "
                    f"{agreement['median']:.4f}, worst {agreement['min']:.4f} on {agreement['images']} held photos)"), made


#: The per-row cosine to torch's fp32 outputs that an fp32 engine must reach (a conversion error gives far less).
AGREEMENT = 0.999
#: How much further than torch's own reduced-precision outputs an engine in that precision may stray from fp32.
REDUCED_MARGIN = 0.005
#: The highest bar in a reduced precision: rounding alone may cost more than torch's own agreement suggests.
REDUCED_BAR = 0.99


def agreement_bar(precision: str, torch_own: float | None) -> float:
    """The cosine to torch's fp32 outputs an engine must reach: :data:`AGREEMENT` in fp32; in bf16 the rounding
    alone moves the outputs, so there it is torch's own agreement in that precision less :data:`REDUCED_MARGIN`. On
    the default ensemble with its depth outputs (an AVX-512 BF16 + AMX CPU), worst per-image cosine to fp32: torch
    bf16 0.9991 on random images and 0.9964 on real photos, OpenVINO bf16 0.9976 and 0.9957; the fp32 bar of
    0.999 had sent every bf16 machine back to torch, 3-4x slower. The reduced-precision bar is at most
    :data:`REDUCED_BAR`: EfficientNet-Lite0 alone at 224 px (torch bf16 0.9987) refused OpenVINO bf16 at 0.9930
    against a bar of 0.9937, though a wrong conversion lands far lower."""
    if precision not in AUTOCAST_DTYPES or torch_own is None:
        return AGREEMENT
    return round(min(AGREEMENT, REDUCED_BAR, torch_own - REDUCED_MARGIN), 6)


def select(setting: str, what: str, *, graph: nn.Module, weights: nn.Module, example: torch.Tensor,
           cache_dir: Path | None, precision: str = "fp32", threads: int | None = None,
           torch_call: Callable | None = None, **spec) -> tuple[OpenVINOEngine | None, str, float | None]:
    """The engine for a frozen network on a CPU, as ``<what>.cpu_backend`` asks: ``torch`` (None), ``openvino``, or
    ``auto``: OpenVINO where installed and timed faster (interleaved, at the real batch, once per machine; the
    figures are kept in the conversion's record). OpenVINO is used only if its outputs agree with torch's (every
    output's per-row cosine to torch's fp32 outputs on ``example`` reaches :func:`agreement_bar`, checked once per
    conversion and precision). ``graph`` computes in fp32 (it is what is converted; the engine's precision is its own
    setting).

    ``graph`` maps uint8 images to a tuple of outputs; ``torch_call`` is how torch runs it in production (timed
    against the engine; default ``graph``); ``cache_dir`` None: :func:`default_cache`. Returns (engine or None, what was chosen and why, the agreement)."""
    if setting not in ("auto", "torch", "openvino"):
        raise ValueError(f"{what}.cpu_backend {setting!r}: choose auto, torch or openvino")
    installed = version()
    if setting == "auto" and installed is None:
        log.warning(f"[{what}] OpenVINO is not installed: torch runs, several times slower on a CPU "
                    "(pip install openvino, or set cpu_backend: torch to silence this)")
        return None, "torch (OpenVINO not installed)", None
    if setting == "torch":
        return None, "torch (asked for)", None
    if installed is None:
        raise ValueError(f"{what}.cpu_backend openvino: OpenVINO is not installed (pip install openvino), "
                         "or choose auto or torch")
    threads = int(threads or torch.get_num_threads())
    network = converted(graph, weights, example, Path(cache_dir or default_cache()), **spec)
    engine = OpenVINOEngine(network.model, threads, precision)
    record, x = network.record, example.numpy()
    if precision not in record.setdefault("cosine_min", {}):  # checked once, when first compiled this way
        with torch.inference_mode():
            reference = [o.float().numpy() for o in graph(example)]  # torch in fp32
            record["cosine_min"][precision] = cosine_min(reference, engine(x))
            if precision in AUTOCAST_DTYPES:  # how far torch's own reduced precision strays from fp32 sets the bar
                with torch.autocast("cpu", dtype=AUTOCAST_DTYPES[precision]):
                    own = [o.float().numpy() for o in graph(example)]
                record.setdefault("torch_cosine_min", {})[precision] = cosine_min(reference, own)
        network.save_record()
    agreement = record["cosine_min"][precision]
    bar = agreement_bar(precision, record.get("torch_cosine_min", {}).get(precision))
    if agreement < bar:
        log.warning(f"[{what}] OpenVINO's outputs disagree with torch's fp32 (cosine {agreement:.4f}, needs "
                    f"{bar:.4f}): torch runs")
        return None, f"torch (OpenVINO's outputs disagreed: cosine {agreement:.4f} < {bar:.4f})", agreement
    if setting == "openvino":
        return engine, f"{engine.describe()} (asked for; model {network.how})", agreement
    machine = f"{cpu_name()} | {threads} threads | batch {len(x)} | {precision}"
    rate = record.setdefault("timings", {}).get(machine)
    measured = "measured on this machine before" if rate else "measured here"
    if rate is None:
        run_torch = torch_call or graph
        with torch.inference_mode():
            run_torch(example), engine(x)  # warm-up: kernels are chosen on the first call
            rates: dict[str, list[float]] = {"torch": [], "openvino": []}
            for _ in range(2):
                rates["torch"].append(_images_per_s(run_torch, example, 1))
                rates["openvino"].append(_images_per_s(engine, x, 2))
        rate = record["timings"][machine] = {k: round(float(np.median(v)), 1) for k, v in rates.items()}
        network.save_record()
    chosen = engine if rate["openvino"] >= rate["torch"] else None
    return chosen, (f"{engine.describe() if chosen else 'torch'} ({measured}: torch {rate['torch']} img/s, "
                    f"OpenVINO {rate['openvino']} img/s; model {network.how})"), agreement
