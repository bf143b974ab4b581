"""The layout is the architecture: the package's imports point down its layers and never form a cycle, and a stage
of one's own is one object registered with one entry — the main job, the fused network, the predictor and a bundle
take it with no other edit."""

from __future__ import annotations

import ast
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from multilabel_fusion import pipeline
from multilabel_fusion import settings as S
from multilabel_fusion.data import demo
from multilabel_fusion.data import reader as D
from multilabel_fusion.evaluation import submission
from multilabel_fusion.predict import Predictor
from multilabel_fusion.stages.registry import default as default_registry

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "multilabel_fusion"

#: The layers, bottom to top: a module imports only from its own layer or those below (docs/ARCHITECTURE.md).
LAYERS = [
    ["multilabel_fusion", "multilabel_fusion.settings", "multilabel_fusion.io"],
    ["multilabel_fusion.data"],
    ["multilabel_fusion.networks", "multilabel_fusion.evaluation"],
    ["multilabel_fusion.features"],
    ["multilabel_fusion.training"],
    ["multilabel_fusion.stages"],
    ["multilabel_fusion.pipeline", "multilabel_fusion.predict", "multilabel_fusion.retrieve"],
    ["multilabel_fusion.logs"],
    ["multilabel_fusion.reports"],
    ["multilabel_fusion.cli", "multilabel_fusion.__main__", "multilabel_fusion.predict.__main__",
     "multilabel_fusion.retrieve.__main__"],
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, read from the source with ``ast`` (every import statement,
    those inside functions too: a deferred import is still a dependency)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if target.startswith("multilabel_fusion") and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def _layer(module: str) -> int:
    best, found = -1, None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), i
    assert found is not None, f"{module}: in no layer (add it to LAYERS and docs/ARCHITECTURE.md)"
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph (its modules in order, the first again at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [])
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50 and graph["multilabel_fusion.cli"]  # the graph was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_point_down_the_layers():
    upward = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
                    if _layer(b) > _layer(a))
    assert upward == [], "imports that point up a layer:\n" + "\n".join(upward)


def test_the_checks_find_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks themselves can fail: two modules importing each other (one inside a function) are a cycle, and a
    stage importing the pipeline points up."""
    fake = tmp_path / "multilabel_fusion"
    (fake / "stages").mkdir(parents=True)
    for name, text in {"__init__.py": "", "pipeline.py": "", "stages/__init__.py": "", "stages/a.py": "from . import b\n",
                       "stages/b.py": "def f():\n    from .a import x\n    from .. import pipeline\n"}.items():
        (fake / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    graph = import_graph()
    assert graph["multilabel_fusion.stages.a"] == {"multilabel_fusion.stages.b"}
    assert graph["multilabel_fusion.stages.b"] == {"multilabel_fusion.stages.a", "multilabel_fusion.pipeline"}
    assert find_cycle(graph) == ["multilabel_fusion.stages.a", "multilabel_fusion.stages.b", "multilabel_fusion.stages.a"]
    assert _layer("multilabel_fusion.pipeline") > _layer("multilabel_fusion.stages.b")  # the upward edge is seen


# ----------------------------------------------------------------------------------------------- a stage of one's own

TOY_STAGE = '''
"""A stage of one's own: two numbers per caption (its length in words and in characters) as the block ``toy``."""

import numpy as np

from multilabel_fusion.stages.base import BlockPredictor, Stage
from multilabel_fusion.stages.outputs import finish


def caption_numbers(captions):
    return np.array([[len(c.split()), len(c) / 10] for c in captions], dtype=np.float32)


class ToyPredictor(BlockPredictor):
    stage = "toy"

    def transform(self, records, given):
        return {"toy": caption_numbers(records.captions)}

    def export(self):
        return {"columns": 2}, {"about.txt": ("toy numbers", b"words and characters of the caption")}

    @classmethod
    def from_bundle(cls, description, blocks, read, names, device):
        assert read("about.txt").startswith(b"words")
        return cls(blocks)


class ToyStage(Stage):
    name = "toy"
    number = "08"
    title = "toy caption numbers"
    module = "toy"
    blocks = ("toy",)
    writes = "two numbers per caption"
    predictor_type = ToyPredictor

    def spec(self, ws):
        return {"version": 1}

    def fit(self, ctx):
        found = ctx.store.load("toy", ctx.key())
        if found is None:
            found = ctx.store.save("toy", ctx.key(), ctx.spec(), {
                "train": caption_numbers(ctx.data.train["Caption"]), "test": caption_numbers(ctx.data.test["Caption"]),
                "train_ids": ctx.data.train["ImageID"].to_numpy(str), "test_ids": ctx.data.test["ImageID"].to_numpy(str)})
        return found

    def run(self, ctx):
        self.fit(ctx)
        prior = ctx.targets.mean(0, dtype=np.float32)  # its own (weak) submission: every label at its frequency
        return finish(ctx, np.tile(prior, (len(ctx.eval_idx), 1)), np.tile(prior, (len(ctx.data.test), 1)))

    def predictor(self, ws, blocks):
        return ToyPredictor(blocks)
'''


@pytest.fixture
def toy_registry(tmp_path, monkeypatch):
    """The default registry and the toy stage, defined in a module of its own: one entry, nothing else edited."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "toy_stage.py").write_text(textwrap.dedent(TOY_STAGE))
    monkeypatch.syspath_prepend(str(folder))
    import toy_stage

    yield default_registry().with_stage(toy_stage.ToyStage())
    sys.modules.pop("toy_stage", None)


def test_a_new_stage_is_one_object_and_one_entry(toy_registry, tmp_path):
    data = demo.generate(tmp_path / "data", n_train=80, n_test=20, seed=2, image_size=(32, 24))
    settings = S.load(overrides=["caption.epochs=2", "fusion.epochs=2", "fusion.hidden=16", "trainer.num_workers=0",
                                 "fusion.blocks=[caption_probs, toy]", "pipeline.stages=[caption, toy, fusion]"],
                      data=data, output=tmp_path / "output", models=tmp_path / "models")
    # the main job runs it (before the fused network, which reads its block) and the fused network stacks it
    results = pipeline.run_all(settings, demo_mode=False, registry=toy_registry)
    assert list(results) == ["caption", "toy", "fusion", "skipped"]
    fused = results["fusion"]
    assert fused["blocks"]["toy"]["dim"] == 2 and fused["blocks"]["toy"]["stage"] == "toy"
    assert submission.validate_file(results["toy"]["submission"], data / "test.csv") == 20
    predictions = (tmp_path / "output" / "predictions.csv").read_text()
    # the predictor computes its block for new records; its test rows are the stage's
    predictor = Predictor.load(settings, registry=toy_registry, warm_up=False)
    assert list(predictor.predictors) == ["caption", "toy", "fusion"]
    test = D.load(data).test
    rows = predictor.blocks([data / "data" / i for i in test["ImageID"]], test["Caption"].tolist())
    ws = pipeline.workspace(settings, registry=toy_registry)
    np.testing.assert_array_equal(rows["toy"], ws.block_arrays("toy")[1])
    assert predictor.predict_csv(data / "test.csv", data / "data", tmp_path / "labels.csv").read_text() == predictions
    # and a bundle carries it: written, read back with the same registry, the same labels
    size = predictor.export(tmp_path / "predictor.zip")
    assert "toy numbers" in size["parts_mb"]
    again = Predictor.load(bundle=tmp_path / "predictor.zip", registry=toy_registry, warm_up=False)
    assert again.predict_csv(data / "test.csv", data / "data", tmp_path / "again.csv").read_text() == predictions
    import zipfile

    with zipfile.ZipFile(tmp_path / "predictor.zip") as archive:
        manifest = json.loads(archive.read("manifest.json"))
        assert "toy/about.txt" in archive.namelist() and manifest["stages"]["toy"]["blocks"] == ["toy"]
    # without the stage installed, the bundle cannot be read, and says so in one line
    from multilabel_fusion.predict import PredictorError

    with pytest.raises(PredictorError, match="needs a stage 'toy'"):
        Predictor.load(bundle=tmp_path / "predictor.zip", warm_up=False)


def test_the_checkout_holds_no_symbolic_links():
    """A clean clone must set itself up: a link committed by mistake (once ``.nltk_data`` pointing at itself) made
    ``./setup.sh`` fail with 'Too many levels of symbolic links' on a fresh machine. Folders that only ever hold
    local data (input, output, models, assets, virtual environments) are not part of a checkout."""
    local_only = {".git", "input", "output", "models", "assets", ".venv", ".whl", ".pytest_cache"}
    links = []
    for top in REPO.iterdir():
        if top.name in local_only:
            continue
        candidates = [top] if top.is_symlink() or not top.is_dir() else [top, *top.rglob("*")]
        links += [str(path.relative_to(REPO)) for path in candidates if path.is_symlink()]
    assert links == [], f"symbolic links in the checkout: {links}"
