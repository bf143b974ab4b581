"""Writes the Colab notebooks of this folder from the cells defined once below, so they never drift apart.

    python notebooks/make_notebooks.py                       # (re)write notebooks/*.ipynb and README.md's table
    python notebooks/make_notebooks.py --repo-url URL        # the same, for the repository at URL
    python notebooks/make_notebooks.py --check               # exit 1 if a committed notebook or that table differs

Edit the cells here, never the .ipynb files: the test suite fails when they differ, and when a notebook is
committed with outputs. The repository's address (the notebooks' clone cell, README.md's "Open in Colab" badges)
is read from the checkout's git remote ``origin`` when the notebooks are written (``--repo-url`` overrides it), so a
fork that runs this script gets notebooks and badges of its own; without a remote the notebooks clone nothing and
use the project they find (see the set-up cell). Every notebook: set-up -> Google Drive -> data -> parameters ->
calls into the package -> inline results -> the stage's validated submission. No training logic lives in a notebook.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
from nbformat import v4

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from multilabel_fusion.stages.registry import default as default_registry  # noqa: E402  (the list of stages)

REGISTRY = default_registry()

BRANCH = "main"
HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
#: README.md's table of notebooks lies between these lines, written by :func:`build_readme`.
TABLE_START = "<!-- table of notebooks: written by notebooks/make_notebooks.py from the git remote -->"
TABLE_END = "<!-- end of the table of notebooks -->"
#: Notebook metadata key holding the address a notebook was written for (what ``--check`` compares with).
META = "multilabel_fusion"
_GITHUB = re.compile(r"^(?:https?://|ssh://git@|git@)github\.com[:/](?P<path>[\w.-]+/[\w.-]+?)(?:\.git)?/?$")


def github_url(remote: str) -> str | None:
    """``https://github.com/owner/name`` for a GitHub remote in any of git's spellings (https, ssh, scp-like)."""
    found = _GITHUB.match(remote.strip())
    return f"https://github.com/{found['path']}" if found else None


def remote_url(repo: Path = HERE.parent) -> str:
    """The address of the checkout's remote ``origin`` ("" when it has none): a GitHub one in its https form."""
    try:
        remote = subprocess.run(["git", "remote", "get-url", "origin"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return github_url(remote) or remote


def written_url() -> str:
    """The address the committed notebooks were written for ("" when none, or not written yet)."""
    path = HERE / "00_full_pipeline.ipynb"
    if not path.is_file():
        return ""
    return json.loads(path.read_text(encoding="utf-8")).get("metadata", {}).get(META, {}).get("repo_url", "")


def colab_url(repo_url: str, name: str) -> str | None:
    """The "Open in Colab" address of a notebook (Colab opens notebooks from GitHub only; None otherwise)."""
    github = github_url(repo_url) if repo_url else None
    if github is None:
        return None
    return github.replace("https://github.com/", "https://colab.research.google.com/github/") + \
        f"/blob/{BRANCH}/notebooks/{name}.ipynb"


def badge(repo_url: str, name: str) -> str:
    url = colab_url(repo_url, name)
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})" if url else ""


# ----------------------------------------------------------------------------------------------- shared cells
SETUP_MD = """## Set-up
In Colab this finds the project and puts it in `/content/multilabel-fusion`, on the runtime's local disk: the copy
already there, else `PROJECT` (a folder or zip of the project, e.g. on your Drive), else a copy found on Drive
(`MyDrive/multilabel-fusion*`, folder or zip), else an installed `multilabel_fusion` package, else a clone of
`REPO_URL`. It then runs `setup.sh`, which installs what Colab lacks **without replacing Colab's own torch**, and
mounts Google Drive (`USE_DRIVE`, see the next cell). Outside Colab it uses the checkout this notebook belongs to
(set it up once with `./setup.sh`), or an installed package, and installs nothing. The pipeline uses a GPU when
there is one (Colab: *Runtime → Change runtime type → GPU*)."""

SETUP = '''\
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO_URL = "{repo_url}"  # from the git remote when the notebooks were written (make notebooks); "": no clone
BRANCH = "{branch}"
PROJECT = ""  # or the project at hand instead of a clone: its folder or zip, e.g. "/content/drive/MyDrive/mlf.zip"
USE_DRIVE = True  # Colab: results copied to Google Drive after every stage and epoch; a new runtime continues
IN_COLAB = "google.colab" in sys.modules
COLAB_DIR = Path("/content")  # Colab's local disk: fast, and empty again in every new runtime
DRIVE_FOLDER = COLAB_DIR / "drive" / "MyDrive" / "multilabel-fusion"  # results and the competition zip


def sh(*command, check=True, env=None):
    """Run a command, showing its output here as it comes."""
    print("$", " ".join(command), flush=True)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={{**os.environ, **(env or {{}})}})
    for line in proc.stdout:
        print(line, end="", flush=True)
    if proc.wait() and check:
        raise RuntimeError(f"{{command[0]}} failed with exit status {{proc.returncode}}")
    return proc.returncode


def checkout_of(folder):
    """The project folder (config.yaml beside multilabel_fusion/) at or above ``folder``, or None."""
    for candidate in (folder, *folder.parents):
        if (candidate / "config.yaml").is_file() and (candidate / "multilabel_fusion").is_dir():
            return candidate
    return None


def installed_package():
    """The folder of an importable ``multilabel_fusion`` (pip install from a path or a wheel), or None."""
    spec = importlib.util.find_spec("multilabel_fusion")
    return Path(spec.origin).resolve().parent if spec and spec.origin else None


def copy_project(source, target):
    """The project in ``source`` (a folder, or a zip that may nest it) copied to ``target`` on the local disk,
    without results or data (those come from Drive and the data cell)."""
    source, staging = Path(source), target.parent / "_project"
    shutil.rmtree(staging, ignore_errors=True)
    if source.suffix == ".zip":
        with zipfile.ZipFile(source) as archive:
            archive.extractall(staging)
        source = next(filter(None, (checkout_of(p.parent) for p in staging.rglob("config.yaml"))), None)
        if source is None:
            raise FileNotFoundError(f"{{PROJECT or 'the zip'}}: no project inside (config.yaml beside multilabel_fusion/)")
    elif checkout_of(source) is None:
        raise FileNotFoundError(f"{{source}}: not the project (no config.yaml beside multilabel_fusion/)")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("output", "models", "input", ".git", "__pycache__"))
    shutil.rmtree(staging, ignore_errors=True)
    print(f"project copied to {{target}}")


if IN_COLAB:
    if USE_DRIVE:
        from google.colab import drive

        drive.mount(str(COLAB_DIR / "drive"))
    REPO = COLAB_DIR / "multilabel-fusion"
    my_drive = COLAB_DIR / "drive" / "MyDrive"
    on_drive = [p.parent for p in sorted(my_drive.glob("multilabel-fusion*/config.yaml"))]
    on_drive += sorted(my_drive.glob("multilabel-fusion*.zip"))
    package = installed_package()
    if (REPO / "config.yaml").is_file():
        if (REPO / ".git").is_dir() and sh("git", "-C", str(REPO), "pull", "--ff-only", check=False):
            print("(could not update the repository: using the copy already here)")
    elif PROJECT or (USE_DRIVE and on_drive):
        copy_project(PROJECT or on_drive[0], REPO)
    elif package is not None:
        REPO = checkout_of(package.parent) or REPO  # an editable install: its checkout; a wheel: work in REPO
    elif REPO_URL:
        sh("git", "clone", "--depth", "1", "--branch", BRANCH, REPO_URL, str(REPO))
    else:
        raise RuntimeError("where is the project? Set REPO_URL to its git address or PROJECT to a folder or zip "
                           "of it, or put it on Drive as MyDrive/multilabel-fusion (a folder or a .zip)")
    REPO.mkdir(parents=True, exist_ok=True)
    if (REPO / "setup.sh").is_file():  # what Colab lacks; Colab's CUDA torch is kept
        sh("bash", str(REPO / "setup.sh"), env={{"PYTHON": sys.executable, "MLF_COLAB": "1"}})
        importlib.invalidate_caches()
else:
    package = installed_package()
    REPO = checkout_of(Path.cwd().resolve()) or (checkout_of(package.parent) if package else None)
    if REPO is None and package is None:
        raise RuntimeError("start this notebook inside the multilabel-fusion project, or pip install it first")
    REPO = REPO or Path.cwd().resolve()  # an installed wheel: output/, models/ and input/ go in this folder
os.chdir(REPO)
if (REPO / "multilabel_fusion").is_dir() and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch

from multilabel_fusion import logs
from multilabel_fusion.networks.device import select_device

logs.show()  # the pipeline's messages appear below each cell
device = select_device("auto")
gpu = f" ({{torch.cuda.get_device_name(0)}})" if device.type == "cuda" else ""
print(f"project: {{REPO}} | Colab: {{IN_COLAB}} | torch {{torch.__version__}} | device: {{device}}{{gpu}}")
if IN_COLAB and device.type != "cuda":
    print("No GPU in this runtime: Runtime > Change runtime type > GPU makes image features and detection much faster.")
'''

DRIVE_MD = """## Survive a disconnect (Google Drive, Colab only)
With `USE_DRIVE` (on by default in Colab) the work happens on the runtime's fast local disk, and after every stage
and every training epoch what changed in `output/` (features, metrics, submissions) and `models/` (checkpoints) is
copied to `MyDrive/multilabel-fusion`, each file whole or not at all. After a disconnect, reconnect and *Run all*:
the new runtime copies back what was finished, finished stages are reused, and an interrupted training run
continues from its last copied epoch. Nothing is read from Drive while working. Outside Colab this cell does
nothing."""

DRIVE = '''\
MIRROR = DRIVE_FOLDER if IN_COLAB and USE_DRIVE else None  # paths.mirror: where output/ and models/ are copied
if MIRROR is not None:
    for name in ("output", "models"):
        if (REPO / name).is_symlink():  # notebooks of an older version linked these folders to Drive
            (REPO / name).unlink()
    print(f"output/ and models/ are copied to {MIRROR} after every stage and epoch, and restored from there")
elif IN_COLAB:
    print("USE_DRIVE is off: a disconnect loses output/ and models/")
'''

DATA_MD = """## Data
The competition files go into `input/` (`train.csv`, `test.csv`, `data/*.jpg`). In Colab `input/` is on the runtime's
local disk, so each new runtime unpacks them again (a minute): from `DATA_ZIP` if you give one; else, with Drive on,
from the copy of the zip this cell keeps on Drive; else with the Kaggle API when `KAGGLE_COMPETITION` is set (you are
asked to upload your `kaggle.json`: kaggle.com → Settings → API → *Create New Token*; join the competition first, or
Kaggle answers 403); else upload the competition zip when asked. Outside Colab nothing is downloaded: put the files
in `input/` or point `DATA` (next cell) at them; without data the pipeline runs on generated demo data (written
under `output/demo/`) and says so."""

DATA = '''\
# The competition's name for the Kaggle API: the last part of its address, kaggle.com/competitions/<name> (the same
# name is in the "kaggle competitions download -c <name>" line on the competition's Data tab).
KAGGLE_COMPETITION = ""
DATA_ZIP = ""  # or a zip of the competition files already at hand, e.g. "/content/drive/MyDrive/comp5329.zip"
INPUT = REPO / "input"  # on the runtime's local disk
KEPT_ZIP = DRIVE_FOLDER / "competition.zip"  # with Drive on: the zip kept for the next runtimes


def unpack(zip_path, into):
    """Unzip, then move the folder holding train.csv (the zip may nest it) to train.csv, test.csv, data/ in `into`."""
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


def kaggle_download(competition, into):
    """The competition's zip through the Kaggle API; a refusal says what to do, not only its HTTP status."""
    import kaggle  # the Kaggle API (preinstalled in Colab); it reads the token when imported

    try:
        kaggle.api.competition_download_files(competition, path=str(into), quiet=False)
    except Exception as err:  # the API raises its own HTTP error types, all with the status in their text
        status = getattr(err, "status", None) or getattr(getattr(err, "response", None), "status_code", None)
        if status == 403 or "403" in str(err):
            raise RuntimeError(f"Kaggle refused the download (403 Forbidden): open kaggle.com/competitions/"
                               f"{competition}, join the competition (accept its rules) with the account of your "
                               "kaggle.json, then run this cell again") from None
        if status == 404 or "404" in str(err):
            raise RuntimeError(f"Kaggle knows no competition {competition!r} (404): KAGGLE_COMPETITION is the last "
                               "part of the competition's address") from None
        raise
    return into / f"{competition}.zip"


if (INPUT / "train.csv").is_file():
    print(f"competition data found in {INPUT}")
elif IN_COLAB:
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
        zip_path, fetched = kaggle_download(KAGGLE_COMPETITION, COLAB_DIR), True
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
RESUME = True  # continue an interrupted training run from its last epoch (False: stop and say so instead)
OVERRIDES = []  # any config.yaml key as "section.key=value", e.g. ["image.fine_tune=true"]
OVERRIDES += [s.strip() for s in os.environ.get("MLF_OVERRIDES", "").split(";") if s.strip()]
'''

CONFIG = '''\
from multilabel_fusion import pipeline, settings
from multilabel_fusion.stages.context import resolve_data

cfg = settings.load(overrides=OVERRIDES, data=DATA, output=OUTPUT, models=MODELS, mirror=MIRROR)
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
              "Each stage also has its own notebook (01–08).")

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


def head(repo_url: str, name: str, title: str, about: str) -> list:
    return [md(f"# {title}\n\n{badge(repo_url, name) or ''}\n\n{about}\n\n".replace("\n\n\n\n", "\n\n") +
               "Run every cell from the top (*Runtime → Run all* in Colab). The work itself is done by the package "
               "`multilabel_fusion`; this notebook only sets up, calls it and shows what it wrote.")]


def common(repo_url: str, parameters_extra: str = "") -> list:
    setup = SETUP.format(repo_url=repo_url, branch=BRANCH)
    return [md(SETUP_MD), code(setup), md(DRIVE_MD), code(DRIVE), md(DATA_MD), code(DATA),
            md(PARAMETERS_MD), code(PARAMETERS + parameters_extra, tags=("parameters",)), code(CONFIG), code(HELPERS)]


def tail(path: str, message: str) -> list:
    return [md(SUBMISSION_MD), code(SUBMISSION.format(path=path)), code(UPLOAD.format(message=message))]


def stage_cells(repo_url: str, name: str, spec: dict) -> list:
    stage = spec["stage"]
    cells = head(repo_url, name, spec["title"], spec["about"]) + common(repo_url)
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


def full_cells(repo_url: str) -> list:
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
    return (head(repo_url, name, FULL_TITLE, FULL_ABOUT) + common(repo_url, stages_param)
            + [md("## Run the pipeline\nCached work (features, finished training runs) is reused; any change of "
                  "setting recomputes only what depends on it."), code(run),
               md("## Results\nEvery stage's validation mean-F1 and per-class F1, their figures, and a few "
                  "validation samples of the fused network."), code(f'metrics = results["{final.name}"]')]
            + [code(source) for _, source in final.notebook_cells]
            + [code(figures), code(f'sample_predictions("{final.name}", metrics)')]
            + tail('OUT / "predictions.csv"', "fused network"))


def notebook(cells: list, repo_url: str) -> nbformat.NotebookNode:
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
        META: {"repo_url": repo_url},  # the address it was written for (make_notebooks.py --check)
    }
    return nb


def build(repo_url: str) -> dict[str, str]:
    """File name -> notebook text, exactly as written to disk, for the repository at ``repo_url``."""
    books = {"00_full_pipeline": full_cells(repo_url)}
    books.update({name: stage_cells(repo_url, name, spec) for name, spec in STAGE_NOTEBOOKS.items()})
    out = {}
    for name, cells in books.items():
        nb = notebook(cells, repo_url)
        nbformat.validate(nb)
        out[f"{name}.ipynb"] = nbformat.writes(nb) + "\n"
    return out


def readme_table(repo_url: str) -> str:
    """README.md's table of notebooks with their "Open in Colab" badges (for a GitHub ``repo_url``; without one,
    a line saying how to get them)."""
    rows = [("00_full_pipeline", "every stage of `pipeline.stages` in order, ending in `output/predictions.csv`")]
    rows += [(name, f"stage {name[:2]}: {REGISTRY.get(spec['stage']).summary}")
             for name, spec in sorted(STAGE_NOTEBOOKS.items())]
    if colab_url(repo_url, "00_full_pipeline") is not None:
        lines = ["| notebook | what it runs | |", "|---|---|---|"]
        lines += [f"| [`{name}`](notebooks/{name}.ipynb) | {what} | {badge(repo_url, name)} |" for name, what in rows]
    else:
        lines = ["| notebook | what it runs |", "|---|---|"]
        lines += [f"| [`{name}`](notebooks/{name}.ipynb) | {what} |" for name, what in rows]
        lines += ["", "No \"Open in Colab\" badges: these notebooks were written in a checkout without a GitHub remote. "
                      "In your clone or fork, `git remote add origin https://github.com/<you>/<repository>` (or "
                      "`make notebooks REPO_URL=https://github.com/<you>/<repository>`), then `make notebooks` and "
                      "commit: the badges and the notebooks' clone cell then point at your repository."]
    return "\n".join([TABLE_START, *lines, TABLE_END])


def build_readme(text: str, repo_url: str) -> str:
    """``text`` (README.md) with its table of notebooks written anew."""
    if text.count(TABLE_START) != 1 or text.count(TABLE_END) != 1:
        raise ValueError(f"{README}: expected one table of notebooks between {TABLE_START!r} and {TABLE_END!r}")
    before, rest = text.split(TABLE_START)
    return before + readme_table(repo_url) + rest.split(TABLE_END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only compare with the files on disk (for the address they were written for)")
    parser.add_argument("--repo-url", default=None,
                        help="the repository's address (default: the checkout's git remote origin)")
    args = parser.parse_args(argv)
    repo_url = args.repo_url if args.repo_url is not None else (written_url() if args.check else remote_url())
    repo_url = github_url(repo_url) or repo_url
    stale = []
    written = {HERE / name: text for name, text in build(repo_url).items()}
    written[README] = build_readme(README.read_text(encoding="utf-8"), repo_url)
    for path, text in written.items():
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        elif not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if not args.check:
        print(f"repository address: {repo_url or '(none: no git remote; the notebooks clone nothing, no badges)'}")
    if stale:
        print(f"out of date (run python notebooks/make_notebooks.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
