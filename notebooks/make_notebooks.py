"""Writes the Colab notebooks of this folder from the cells defined once below, so they never drift apart.

    python notebooks/make_notebooks.py           # (re)write notebooks/*.ipynb and README.md's table of notebooks
    python notebooks/make_notebooks.py --check   # exit 1 if a committed notebook or that table differs

Edit the cells here, never the .ipynb files: the test suite fails when they differ, and when a notebook is
committed with outputs. The repository's address is REPO_URL below and nowhere else: a fork changes that one line
and runs this script (the notebooks' clone cell and README.md's "Open in Colab" badges are written from it).
Every notebook: set-up -> optional Google Drive -> data -> parameters -> calls into the package -> inline
results -> the stage's validated submission. No training logic lives in a notebook.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat import v4

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from multilabel_fusion.stages.registry import default as default_registry  # noqa: E402  (the list of stages)

REGISTRY = default_registry()

#: The repository the notebooks clone in Colab and README.md's badges open: a fork changes this line only.
REPO_URL = "https://github.com/OWNER/multilabel-fusion"
BRANCH = "main"
HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
#: README.md's table of notebooks lies between these lines, written by :func:`build_readme`.
TABLE_START = "<!-- table of notebooks: written by notebooks/make_notebooks.py from REPO_URL -->"
TABLE_END = "<!-- end of the table of notebooks -->"


def colab_url(name: str) -> str:
    return REPO_URL.replace("https://github.com/", "https://colab.research.google.com/github/") + \
        f"/blob/{BRANCH}/notebooks/{name}.ipynb"


def badge(name: str) -> str:
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(name)})"


# ----------------------------------------------------------------------------------------------- shared cells
SETUP_MD = """## Set-up
In Colab this clones the repository (or updates it) into `/content/multilabel-fusion`, on the runtime's local disk,
and runs `setup.sh`, which installs the requirements **without replacing Colab's own torch**. Outside Colab it uses
the checkout this notebook belongs to (set it up once with `./setup.sh`) and installs nothing. The pipeline uses a
GPU when there is one (Colab: *Runtime → Change runtime type → GPU*)."""

SETUP = '''\
import importlib
import os
import subprocess
import sys
from pathlib import Path

REPO_URL = "{repo_url}"  # written by notebooks/make_notebooks.py (a fork changes REPO_URL there)
IN_COLAB = "google.colab" in sys.modules
COLAB_DIR = Path("/content")  # Colab's local disk: fast, and empty again in every new runtime


def sh(*command, check=True):
    """Run a command, showing its output here as it comes."""
    print("$", " ".join(command), flush=True)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(line, end="", flush=True)
    if proc.wait() and check:
        raise RuntimeError(f"{{command[0]}} failed with exit status {{proc.returncode}}")
    return proc.returncode


if IN_COLAB:
    REPO = COLAB_DIR / "multilabel-fusion"
    if (REPO / ".git").is_dir():
        if sh("git", "-C", str(REPO), "pull", "--ff-only", check=False):
            print("(could not update the repository: using the copy already here)")
    else:
        sh("git", "clone", "--depth", "1", "--branch", "{branch}", REPO_URL, str(REPO))
    sh("env", f"PYTHON={{sys.executable}}", "bash", str(REPO / "setup.sh"))
    importlib.invalidate_caches()
else:
    REPO = Path.cwd().resolve()  # the checkout holding this notebook: the folder with config.yaml
    while not (REPO / "config.yaml").is_file():
        if REPO == REPO.parent:
            raise RuntimeError("start this notebook inside the multilabel-fusion repository (no config.yaml found)")
        REPO = REPO.parent
os.chdir(REPO)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch

from multilabel_fusion import logs
from multilabel_fusion.networks.device import select_device

logs.show()  # the pipeline's messages appear below each cell
device = select_device("auto")
gpu = f" ({{torch.cuda.get_device_name(0)}})" if device.type == "cuda" else ""
print(f"repository: {{REPO}} | Colab: {{IN_COLAB}} | torch {{torch.__version__}} | device: {{device}}{{gpu}}")
if IN_COLAB and device.type != "cuda":
    print("No GPU in this runtime: Runtime > Change runtime type > GPU makes image features and detection much faster.")
'''.format(repo_url=REPO_URL, branch=BRANCH)

DRIVE_MD = """## Keep the results on Google Drive (optional, Colab only)
With `USE_DRIVE = True`, `output/` (cached features, metrics, submissions) and `models/` (checkpoints) live in a Drive
folder: a new runtime after a disconnect finds them, and every stage resumes where it stopped (set `RESUME = True`
below to continue an interrupted training run). The competition files stay on the runtime's local disk (Drive reads
40,000 small files slowly): the next cell unpacks them there each time a runtime starts, from a zip it keeps on Drive.
Outside Colab this cell does nothing."""

DRIVE = '''\
USE_DRIVE = False
DRIVE_FOLDER = COLAB_DIR / "drive" / "MyDrive" / "multilabel-fusion"  # output/, models/ and the competition zip

if USE_DRIVE and IN_COLAB:
    import shutil

    from google.colab import drive

    drive.mount(str(COLAB_DIR / "drive"))
    for name in ("output", "models"):
        here, there = REPO / name, DRIVE_FOLDER / name
        there.mkdir(parents=True, exist_ok=True)
        if here.is_symlink():
            here.unlink()
        elif here.is_dir():  # the fresh clone's folder: keep what it holds, then replace it by the link
            for item in here.iterdir():
                if not (there / item.name).exists():
                    shutil.move(str(item), str(there / item.name))
            shutil.rmtree(here)
        here.symlink_to(there, target_is_directory=True)
        print(f"{name}/ -> {there}")
    if (REPO / "input").is_symlink():  # input/ on Drive (older notebooks): the data goes to the local disk now
        (REPO / "input").unlink()
elif USE_DRIVE:
    print("USE_DRIVE only applies in Colab: here output/ and models/ are already on this disk.")
'''

DATA_MD = """## Data
The competition files go into `input/` (`train.csv`, `test.csv`, `data/*.jpg`). In Colab `input/` is on the runtime's
local disk, so each new runtime unpacks them again (a minute): from `DATA_ZIP` if you give one; else, with Drive on,
from the copy of the zip this cell keeps on Drive; else with the Kaggle API when `KAGGLE_COMPETITION` is set (you are
asked to upload your `kaggle.json`: kaggle.com → Settings → API → *Create New Token*); else upload the competition zip
when asked. Outside Colab nothing is downloaded: put the files in `input/` or point `DATA` (next cell) at them;
without data the pipeline runs on generated demo data (written under `output/demo/`) and says so."""

DATA = '''\
# The competition's name for the Kaggle API: the last part of its address, kaggle.com/competitions/<name> (the same
# name is in the "kaggle competitions download -c <name>" line on the competition's Data tab).
KAGGLE_COMPETITION = ""
DATA_ZIP = ""  # or a zip of the competition files already at hand, e.g. "/content/drive/MyDrive/comp5329.zip"
INPUT = REPO / "input"  # on the runtime's local disk
KEPT_ZIP = DRIVE_FOLDER / "competition.zip"  # with Drive on: the zip kept for the next runtimes


def unpack(zip_path, into):
    """Unzip, then move the folder holding train.csv (the zip may nest it) to train.csv, test.csv, data/ in `into`."""
    import shutil
    import zipfile

    staging = into / "_unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(staging)
    found = next(staging.rglob("train.csv"), None)
    if found is None:
        raise FileNotFoundError(f"{zip_path}: no train.csv inside; is this the competition zip?")
    for item in found.parent.iterdir():
        shutil.move(str(item), str(into / item.name))
    shutil.rmtree(staging)


if (INPUT / "train.csv").is_file():
    print(f"competition data found in {INPUT}")
elif IN_COLAB:
    import shutil

    from google.colab import files

    INPUT.mkdir(exist_ok=True)
    fetched = False  # a download or an upload, removed once unpacked
    if DATA_ZIP:
        zip_path = Path(DATA_ZIP)
    elif USE_DRIVE and KEPT_ZIP.is_file():
        zip_path = KEPT_ZIP
        print(f"unpacking the competition zip kept on Drive: {KEPT_ZIP}")
    elif KAGGLE_COMPETITION:
        token = Path.home() / ".kaggle" / "kaggle.json"
        if not token.is_file() and "KAGGLE_KEY" not in os.environ:
            print("Upload your kaggle.json (kaggle.com > Settings > API > Create New Token):")
            name, content = next(iter(files.upload().items()))
            (Path.cwd() / name).unlink(missing_ok=True)  # the upload's copy: keep the key only in ~/.kaggle
            token.parent.mkdir(exist_ok=True)
            token.write_bytes(content)
            token.chmod(0o600)
        import kaggle  # the Kaggle API (preinstalled in Colab); it reads the token when imported

        kaggle.api.competition_download_files(KAGGLE_COMPETITION, path=str(COLAB_DIR), quiet=False)
        zip_path, fetched = COLAB_DIR / f"{KAGGLE_COMPETITION}.zip", True
    else:
        print("Upload the competition zip (train.csv, test.csv and the data/ folder of images):")
        zip_path, fetched = Path.cwd() / next(iter(files.upload())), True
    unpack(zip_path, INPUT)
    if USE_DRIVE and zip_path != KEPT_ZIP and not KEPT_ZIP.is_file():
        KEPT_ZIP.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(zip_path, KEPT_ZIP)
        print(f"kept a copy of the zip on Drive for the next runtimes: {KEPT_ZIP}")
    if fetched:
        zip_path.unlink()  # its content is in input/ now
    print(f"competition data unpacked into {INPUT} (the runtime's local disk)")
else:
    print(f"no competition data in {INPUT}: put it there or set DATA below; without data the demo data is used")
'''

PARAMETERS_MD = """## Parameters
Everything else is in [`config.yaml`](../config.yaml): change any key with `OVERRIDES`
(e.g. `"image.fine_tune=true"`, `"caption.epochs=20"`). Relative paths are taken from the repository root."""

PARAMETERS = '''\
DATA = os.environ.get("MLF_DATA", "input")  # competition folder: train.csv, test.csv, data/*.jpg
OUTPUT = os.environ.get("MLF_OUTPUT", "output")  # feature caches, submissions, metrics, figures
MODELS = os.environ.get("MLF_MODELS", "models")  # checkpoints
DEMO = "auto"  # "auto": generated demo data when DATA holds no competition files; True: always; False: never
RESUME = False  # True: continue an interrupted training run from models/<network>/last.pt
OVERRIDES = []  # any config.yaml key as "section.key=value", e.g. ["image.fine_tune=true"]
OVERRIDES += [s.strip() for s in os.environ.get("MLF_OVERRIDES", "").split(";") if s.strip()]
'''

CONFIG = '''\
from multilabel_fusion import pipeline, settings
from multilabel_fusion.stages.context import resolve_data

cfg = settings.load(overrides=OVERRIDES, data=DATA, output=OUTPUT, models=MODELS)
cfg, IS_DEMO = resolve_data(cfg, DEMO)  # "auto": the demo data when DATA holds none (output/demo/)
data_dir, OUT = cfg.path("data"), cfg.path("output")
print(f"data: {data_dir}{' (generated demo data)' if IS_DEMO else ''}\\noutput: {OUT}\\nmodels: {cfg.path('models')}")
if OVERRIDES:
    print("overrides:", "; ".join(OVERRIDES))
'''

HELPERS = '''\
# Display helpers: they only read what the stages wrote (metrics files, figures, probabilities, submissions).
from functools import lru_cache

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Image, Markdown, display
from multilabel_fusion.data import labels as L
from multilabel_fusion.data import reader as D
from multilabel_fusion.data.images import read_rgb
from multilabel_fusion.evaluation import submission
from multilabel_fusion.evaluation.metrics import sample_f1
from multilabel_fusion.evaluation.scoring import decide_as


def show_figures(metrics):
    """The stage's headline figures, then every figure its metrics file names (training curves, per-class F1, ...)."""
    print(f"{metrics['title']}: validation mean-F1 {metrics['val_mean_f1_at_0.5']:.4f} at threshold 0.5, "
          f"{metrics['val_mean_f1_tuned']:.4f} with tuned per-class thresholds ({metrics['n_val']} validation "
          f"images{', demo data' if metrics['demo_data'] else ''})")
    for name, path in metrics.get("figures", {}).items():
        if Path(path).is_file():
            display(Markdown(f"**{name.replace('_', ' ')}**"), Image(filename=str(path)))


def per_class_table(metrics):
    """Per-class validation F1, precision, recall and support (tuned thresholds)."""
    pc = metrics["per_class"]
    columns = ("label", "name", "f1", "precision", "recall", "support")
    return pd.DataFrame({k: pc[k] for k in columns}).set_index("label")


@lru_cache(maxsize=1)
def competition_data():
    return D.load(data_dir, check_images=False)


def names(label_ids):
    return ", ".join(L.LABEL_NAMES[i] for i in label_ids)


def sample_predictions(stage, metrics, n=8, seed=0):
    """A few validation images with their caption, true and predicted labels (by the stage's own decision)."""
    saved = np.load(OUT / "probabilities" / f"{stage}.npz")
    data = competition_data()
    n_val = len(saved["val_idx"])
    pick = np.sort(np.random.default_rng(seed).choice(n_val, min(n, n_val), replace=False))
    rows = data.train.iloc[saved["val_idx"][pick]]
    pred = decide_as(metrics, saved["val"][pick])
    true = L.encode(rows["Labels"].tolist())
    f1 = sample_f1(true, pred)
    fig, axes = plt.subplots(2, (len(rows) + 1) // 2, figsize=(16, 7.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image_id, t, p, score in zip(axes.flat, rows["ImageID"], L.decode(true), L.decode(pred), f1):
        ax.imshow(read_rgb(data.image_dir / image_id))
        ax.set_title(f"{image_id}\\ntrue: {names(t)}\\npredicted: {names(p)}", fontsize=8,
                     color="tab:green" if score == 1 else "tab:red")
    fig.suptitle(f"{metrics['title']}: validation samples (green: every label right)")
    plt.show()
    return pd.DataFrame({"ImageID": rows["ImageID"].to_numpy(), "caption": rows["Caption"].to_numpy(),
                         "true": [names(t) for t in L.decode(true)],
                         "predicted": [names(p) for p in L.decode(pred)], "sample F1": f1.round(2)})
'''

SUBMISSION_MD = """## The submission
`submission.validate_file` checks it the way Kaggle reads it: the header, one row per test image, labels as
space-separated ids from the 18 classes."""

SUBMISSION = '''\
SUBMISSION = Path({path})
n_rows = submission.validate_file(SUBMISSION, data_dir / "test.csv")
print(f"OK: {{SUBMISSION}} has one valid row for each of the {{n_rows}} test images")
pd.read_csv(SUBMISSION, dtype=str).head(10)
'''

UPLOAD = '''\
shown = SUBMISSION.relative_to(REPO) if SUBMISSION.is_relative_to(REPO) else SUBMISSION
if IS_DEMO:
    print(f"{{shown}} was made from the generated demo data: it checks the pipeline, it is not a Kaggle submission.\\n"
          "Put the competition files in input/ (or set DATA) and run the notebook again.")
else:
    print(f"Upload {{shown}} to Kaggle: on the competition page, Submit Predictions, or\\n"
          f"  kaggle competitions submit -c {{KAGGLE_COMPETITION or '<competition>'}} -f {{shown}} -m \\"{message}\\"")
    if IN_COLAB:
        from google.colab import files

        files.download(str(SUBMISSION))  # also saves a copy to your computer
'''

# ----------------------------------------------------------------------------------------------- per notebook
#: One notebook per stage of the registry, named as its script; what it says comes from the stage.
STAGE_NOTEBOOKS = {f"{s.number}_{s.module}": {"stage": s.name, "title": f"Stage {s.number}: the {s.title}",
                                              "about": s.about} for s in REGISTRY}

FULL_TITLE = "The whole pipeline: every stage, ending in `output/predictions.csv`"
FULL_ABOUT = ("Runs every stage of `pipeline.stages` in `config.yaml` (image network, caption network, detector, "
              "text n-grams, fused network; choose others with `STAGES` below) with `run_all`, as "
              "`python -m multilabel_fusion` "
              "does, shows their figures and comparison, and validates **`output/predictions.csv`**, the file to "
              "upload to Kaggle. "
              "Every stage caches its work, so running it again, or after a disconnect with Drive, is quick. "
              "Each stage also has its own notebook (01–07).")

RUN_STAGE = '''\
# as stages/{script} does: first the (earlier) stages whose artifacts it reads, where missing for these settings,
# then the stage itself
metrics = pipeline.run_stage("{stage}", cfg, demo_mode=IS_DEMO, resume=RESUME)
'''


def md(text: str):
    return v4.new_markdown_cell(text)


def code(text: str, tags: tuple[str, ...] = ()):
    cell = v4.new_code_cell(text.rstrip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def head(name: str, title: str, about: str) -> list:
    return [md(f"# {title}\n\n{badge(name)}\n\n{about}\n\n"
               "Run every cell from the top (*Runtime → Run all* in Colab). The work itself is done by the package "
               "`multilabel_fusion`; this notebook only sets up, calls it and shows what it wrote.")]


def common(parameters_extra: str = "") -> list:
    return [md(SETUP_MD), code(SETUP), md(DRIVE_MD), code(DRIVE), md(DATA_MD), code(DATA),
            md(PARAMETERS_MD), code(PARAMETERS + parameters_extra, tags=("parameters",)), code(CONFIG), code(HELPERS)]


def tail(path: str, message: str) -> list:
    return [md(SUBMISSION_MD), code(SUBMISSION.format(path=path)), code(UPLOAD.format(message=message))]


def stage_cells(name: str, spec: dict) -> list:
    stage = spec["stage"]
    cells = head(name, spec["title"], spec["about"]) + common()
    cells += [md("## Run the stage\n"
                 "Cached work (features, finished training runs) is reused; any change of setting recomputes what "
                 "depends on it. A stage that reads other stages' artifacts runs those stages first where their "
                 "artifacts are missing, exactly as its script does."),
              code(RUN_STAGE.format(stage=stage, script=REGISTRY.get(stage).script.split("/")[1]))]
    cells += [md("## Results\nValidation figures (the held-out part of `train.csv`), per-class F1 and a few "
                 "validation samples."),
              code("show_figures(metrics)"), code("per_class_table(metrics)"),
              code(f'sample_predictions("{stage}", metrics)')]
    for text, source in REGISTRY.get(stage).notebook_cells:  # what the stage itself has to show
        cells += [md(text), code(source)]
    return cells + tail('metrics["submission"]', spec["title"])


def full_cells() -> list:
    name, final = "00_full_pipeline", REGISTRY.final()
    stages_param = ('STAGES = None  # None: pipeline.stages of config.yaml; without the detector: '
                    '["image", "caption", "fusion"]\n'
                    '#   and OVERRIDES += ["fusion.blocks=[image, caption]"]\n')
    run = '''\
import time

started = time.time()
results = pipeline.run_all(cfg, demo_mode=IS_DEMO, stages=STAGES, resume=RESUME)
print(f"notebook: the pipeline took {time.time() - started:.0f} s")
'''
    figures = '''\
for stage, stage_metrics in results.items():
    if stage == "skipped":
        for name, why in stage_metrics.items():
            display(Markdown(f"### {name}: skipped ({why})"))
        continue
    display(Markdown(f"### {stage_metrics['title']}"))
    show_figures(stage_metrics)
'''
    return (head(name, FULL_TITLE, FULL_ABOUT) + common(stages_param)
            + [md("## Run the pipeline\nCached work (features, finished training runs) is reused; any change of "
                  "setting recomputes only what depends on it."), code(run),
               md("## Results\nEvery stage's validation mean-F1 and per-class F1, their figures, and a few "
                  "validation samples of the fused network."), code(f'metrics = results["{final.name}"]')]
            + [code(source) for _, source in final.notebook_cells]
            + [code(figures), code(f'sample_predictions("{final.name}", metrics)')]
            + tail('OUT / "predictions.csv"', "fused network"))


def notebook(cells: list) -> nbformat.NotebookNode:
    nb = v4.new_notebook()
    section = 0
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i:02d}"  # fixed ids: regenerating gives the same bytes
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            section += 1
            cell.source = f"## {section}. {cell.source[3:]}"
    nb.cells = cells
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "accelerator": "GPU",  # Colab offers a GPU runtime; the notebooks run on CPU too
        "colab": {"provenance": [], "gpuType": "T4"},
    }
    return nb


def build() -> dict[str, str]:
    """File name -> notebook text, exactly as written to disk."""
    books = {"00_full_pipeline": full_cells()}
    books.update({name: stage_cells(name, spec) for name, spec in STAGE_NOTEBOOKS.items()})
    out = {}
    for name, cells in books.items():
        nb = notebook(cells)
        nbformat.validate(nb)
        out[f"{name}.ipynb"] = nbformat.writes(nb) + "\n"
    return out


def readme_table() -> str:
    """README.md's table of notebooks with their "Open in Colab" badges (from REPO_URL)."""
    rows = [("00_full_pipeline", "every stage of `pipeline.stages` in order, ending in `output/predictions.csv`")]
    rows += [(name, f"stage {name[:2]}: {REGISTRY.get(spec['stage']).summary}")
             for name, spec in sorted(STAGE_NOTEBOOKS.items())]
    lines = ["| notebook | what it runs | |", "|---|---|---|"]
    lines += [f"| [`{name}`](notebooks/{name}.ipynb) | {what} | {badge(name)} |" for name, what in rows]
    return "\n".join([TABLE_START, *lines, TABLE_END])


def build_readme(text: str) -> str:
    """``text`` (README.md) with its table of notebooks written anew."""
    if text.count(TABLE_START) != 1 or text.count(TABLE_END) != 1:
        raise ValueError(f"{README}: expected one table of notebooks between {TABLE_START!r} and {TABLE_END!r}")
    before, rest = text.split(TABLE_START)
    return before + readme_table() + rest.split(TABLE_END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the files on disk")
    args = parser.parse_args(argv)
    stale = []
    written = {HERE / name: text for name, text in build().items()}
    written[README] = build_readme(README.read_text(encoding="utf-8"))
    for path, text in written.items():
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        elif not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python notebooks/make_notebooks.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
