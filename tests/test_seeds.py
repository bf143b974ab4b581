"""docs/SEEDS.md: the rows are runnable commands of the registry's scripts, a row's figure is read off the metrics
file its command writes, and the page renders every document's table from what was measured."""

from __future__ import annotations

import re

from multilabel_fusion import settings
from multilabel_fusion.data import demo
from multilabel_fusion.reports import seeds
from multilabel_fusion.stages import registry


def test_rows_have_unique_ids_and_name_scripts_of_the_registry():
    ids = [r.id for r in seeds.ROWS]
    assert len(ids) == len(set(ids)) and all(re.fullmatch(r"[a-z0-9.-]+", i) for i in ids)
    scripts = {s.script for s in registry.default()}
    for row in seeds.ROWS:
        if row.stage is None:
            assert row.needs, f"{row.id}: a row that cannot run must say what it needs"
            assert row.command() == ""
        else:
            assert row.command().split()[1] in scripts
            settings.load(overrides=list(row.overrides))  # every --set of the page is a valid setting


def test_a_row_runs_its_command_and_reads_its_figure(tmp_path):
    data = demo.generate(tmp_path / "data", 60, 12, seed=2, image_size=(40, 30))
    row = seeds.Row("text-demo", "a document", "the text block", "-", "text", ("text.C=2.0", "text.min_df=1"))
    got = seeds.run_row(row, data, tmp_path / "out", tmp_path / "models")
    metrics = (tmp_path / "out" / "metrics" / "text.json").read_text()
    assert 0.0 < got["value"] <= 1.0 and f'"mean_f1_threshold_cv": {got["value"]}' in metrics
    assert got["command"] == ("python3 stages/04_text_ngrams.py --data ../shared/comp5329 --set text.C=2.0 "
                              "--set text.min_df=1")
    assert "min_df: 1\n" in (tmp_path / "out" / "metrics" / "text.config.yaml").read_text()  # both --set applied
    assert got["wall_s"] > 0 and got["artifact_key"]


def test_the_page_has_a_table_per_document_and_says_what_was_not_run(tmp_path):
    measured = {"wall_s": 35.0, "artifact_key": "k", "date": "2026-12-03", "machine": "AMD EPYC"}
    results = seeds.Results(tmp_path / "seeds.json", {"fusion-default": {"value": 0.8915, **measured},
                                                      "fusion-hidden-500": {"value": 0.8906, **measured}})
    results.save()
    page = seeds.render(seeds.Results.load(tmp_path / "seeds.json"))
    for document in {r.document for r in seeds.ROWS}:
        assert f"## {document}" in page
    assert "| **0.8915** | 35 s | `python3 stages/09_fused_network.py --data ../shared/comp5329` |" in page
    assert "not run here: needs a GPU" in page and "not measured yet" in page
    assert "Measured on AMD EPYC (2026-12-03)" in page
    assert "| **0.8906** | 35 s |" in page and "-0.0009 vs `fusion-default`" in page  # read against the defaults' row
    assert all(r.against is None or r.against in {x.id for x in seeds.ROWS} for r in seeds.ROWS)


def test_gpu_rows_are_recorded_from_the_machine_that_ran_them_and_skipped_without_cuda(tmp_path, monkeypatch):
    """A GPU row (the published fine-tuning) runs only where CUDA is; its figure comes from the metrics file its
    command wrote there (``--record``), shown with that machine and the records it ran on."""
    import json

    import pytest
    import torch

    metrics = {"stage": "image", "mean_f1_threshold_cv": 0.7647, "wall_seconds": 351.8, "artifact_key": "32b1",
               "n_eval": 2600, "folds": 5, "machine": {"cpu": "Xeon", "cpu_count": 16, "gpu": "NVIDIA H200"}}
    (tmp_path / "image.json").write_text(json.dumps(metrics))
    (tmp_path / "text.json").write_text(json.dumps({**metrics, "stage": "text"}))
    docs = tmp_path / "docs"
    assert seeds.main(["--docs", str(docs), "--record", "image-finetuned-15", str(tmp_path / "image.json")]) == 0
    row = json.loads((docs / "seeds.json").read_text())["rows"]["image-finetuned-15"]
    assert row["value"] == 0.7647 and row["machine"] == "NVIDIA H200, 16 CPU cores"
    page = (docs / "SEEDS.md").read_text()
    assert "| **0.7647** (2,600 records, 5 folds; NVIDIA H200, 16 CPU cores) | 352 s |" in page
    assert "not measured yet (needs a GPU)" in page  # image-finetuned: not recorded
    with pytest.raises(SystemExit, match="stage 'text'"):  # another stage's metrics: refused, not misread
        seeds.main(["--docs", str(docs), "--record", "image-finetuned", str(tmp_path / "text.json")])
    (tmp_path / "cut.json").write_text('{"stage": "image", "mean_f1')  # a file cut short: one line naming it
    (tmp_path / "bare.json").write_text(json.dumps({"stage": "image", "mean_f1_threshold_cv": 0.7}))
    for name, says in (("missing.json", "not a readable metrics file"), ("cut.json", "not a readable metrics file"),
                       ("bare.json", "no 'wall_seconds' in the metrics file")):
        with pytest.raises(SystemExit, match=f"{name}: {says}"):
            seeds.main(["--docs", str(docs), "--record", "image-finetuned", str(tmp_path / name)])
    assert "image-finetuned" not in json.loads((docs / "seeds.json").read_text())["rows"]  # nothing half-recorded

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(seeds, "run_row", lambda *a: pytest.fail("a GPU row ran without CUDA"))
    assert seeds.main(["--docs", str(docs), "--only", "image-finetuned-15", "image-frozen-lite0"]) == 0
    assert json.loads((docs / "seeds.json").read_text())["rows"]["image-finetuned-15"]["value"] == 0.7647
