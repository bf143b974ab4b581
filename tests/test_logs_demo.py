"""Runs keep their console output in output/logs/, progress bars outside a terminal stay quiet, and a demo run never
writes over results made from real data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from multilabel_fusion.evaluation import submission
from multilabel_fusion.io.progress import BarLog

REPO = Path(__file__).resolve().parent.parent
SMALL = ["image.offline_fallback=efficientnet_lite0", "image.image_size=64", "image.head_epochs=2", "image.head_hidden=16", "caption.epochs=2", "fusion.epochs=2",
         "fusion.hidden=16", "trainer.num_workers=0", "detector.image_size=64", "detector.zoom_size=96", "detector.batch_size=16"]


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("TQDM_")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_demo_main_job_leaves_real_results_alone_and_keeps_its_log(tmp_path):
    out = tmp_path / "output"
    (out / "metrics").mkdir(parents=True)
    real = {out / "predictions.csv": "ImageID,Labels\n30000.jpg,1 3\n", out / "metrics" / "fusion.json": "{}\n"}
    for path, text in real.items():
        path.write_text(text)
    result = _run("-m", "multilabel_fusion", "--data", str(tmp_path / "no_data"), "--output", str(out),
                  "--models", str(tmp_path / "models"), *[a for s in SMALL for a in ("--set", s)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "running on generated demo data" in result.stdout and f"Demo results go to {out / 'demo'}/" in result.stdout
    for path, text in real.items():
        assert path.read_text() == text  # untouched
    assert submission.validate_file(out / "demo" / "predictions.csv", out / "demo" / "input" / "test.csv") == 100
    assert not (tmp_path / "models" / "fusion").exists() and (tmp_path / "models" / "demo" / "fusion").is_dir()

    logs = list((out / "demo" / "logs").glob("main-*.log"))
    assert len(logs) == 1
    log = logs[0].read_text()
    assert log.startswith("# __main__.py --data") and log.rstrip().splitlines()[-1].startswith("# finished at ")
    for line in result.stdout.splitlines():  # the console's lines, all in the log, in order
        assert line.rstrip() in log, line
    assert "\r" not in log and "\x1b[" not in log
    bars = [line for line in log.splitlines() if "|" in line and ("it/s]" in line or "img/s]" in line
                                                                   or "epoch/s" in line or "/s," in line)]
    assert len(bars) < 40, bars  # a few lines per bar at most, not one per update


def test_a_stage_script_error_ends_its_log_and_the_console_stays_one_line(tmp_path):
    result = _run("stages/04_text_ngrams.py", "--data", str(tmp_path / "nothing"), "--output", str(tmp_path / "out"))
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    log = next((tmp_path / "out" / "logs").glob("text-*.log")).read_text()
    assert log.startswith("# 04_text_ngrams.py --data") and log.rstrip().splitlines()[-1].startswith("# error: ")


def test_progress_bars_outside_a_terminal_write_at_most_every_few_seconds_even_after_torch(tmp_path):
    """torch imports tqdm before this package sets its defaults; nested bars that end quickly write nothing."""
    script = ("import sys, time, torch, multilabel_fusion\n"
              "from tqdm.auto import tqdm\n"
              "from torch.utils.data import DataLoader, TensorDataset\n"
              "from multilabel_fusion.training import trainer\n"
              "for epoch in tqdm(range(3), desc='outer'):\n"
              "    for batch in tqdm(range(40), desc=f'epoch {epoch}', leave=False):\n"
              "        time.sleep(0.005)\n"
              "x, y = torch.randn(480, 4), (torch.rand(480, 18) < 0.3).float()\n"  # the trainer's epoch bars
              "model = torch.nn.Linear(4, 18)\n"
              "trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True,\n"
              "            generator=torch.Generator().manual_seed(0)), DataLoader(TensorDataset(x, y), batch_size=480),\n"
              "            y.numpy(), loss_fn=torch.nn.BCEWithLogitsLoss(), run_dir=sys.argv[1], epochs=25, patience=99,\n"
              "            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), device=torch.device('cpu'))\n"
              "with tqdm(total=400, desc='long') as bar:\n"
              "    for i in range(400):\n"
              "        time.sleep(0.015)\n"
              "        bar.update()\n")
    result = _run("-c", script, str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    updates = [u for u in result.stderr.replace("\n", "\r").split("\r") if u.strip()]
    assert all(u.startswith("long") for u in updates), updates  # the short bars: nothing
    assert 1 <= len(updates) <= 3 and updates[-1].startswith("long: 100%"), updates


def test_a_log_keeps_lines_and_a_bar_every_few_seconds(tmp_path):
    import logging

    logger = logging.getLogger("multilabel_fusion.test_bar_log")
    handler = logging.FileHandler(tmp_path / "log")
    logger.addHandler(handler)
    try:
        clock = iter([0.0, 1.0, 2.0, 6.0, 7.0])  # one reading at each update of the bar
        bar = BarLog(logger, clock=lambda: next(clock))
        logger.info("data: here")
        for i in range(5):  # five updates of one bar: at t = 0, 1, 2, 6, 7 s (terminal codes dropped)
            bar.update(f"bar: {i * 20}%\x1b[A")
        bar.close("bar: 100%")
        logger.info("done")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert (tmp_path / "log").read_text().splitlines() == ["data: here", "bar: 0%", "bar: 60%", "bar: 100%", "done"]
