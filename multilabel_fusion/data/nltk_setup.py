"""Make NLTK's WordNet available offline, for the caption stage's lemmatiser.

No PyPI package ships NLTK's data, and ``nltk.download`` only works where the internet is
reachable (Colab). So, in order: use a WordNet NLTK already finds; else try ``nltk.download``
with a short timeout; else build it from Debian's WordNet 3.0 (``wordnet-base`` and
``wordnet-sense-index``, installed with apt-get when missing and we are root): the database
files are *copied* (NLTK 3.10 rejects symlinks leaving the folder) into
``<repo>/.nltk_data/corpora/wordnet/`` together with the ``lexnames`` file Debian lacks.
``<repo>/.nltk_data`` is put on ``nltk.data.path`` by :func:`register_data_dir`, which the
text module calls on import. Run ``python -m multilabel_fusion.data.nltk_setup`` (setup.sh does).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..io.assets import socket_timeout
from ..settings import ROOT

#: Repository-local NLTK data folder (ignored by git).
NLTK_DATA_DIR = ROOT / ".nltk_data"
WORDNET_DIR = NLTK_DATA_DIR / "corpora" / "wordnet"
DEBIAN_WORDNET = Path("/usr/share/wordnet")
DEBIAN_PACKAGES = ["wordnet-base", "wordnet-sense-index"]
DOWNLOAD_TIMEOUT_S = 15

#: WordNet 3.0's lexicographer files: number, name, syntactic category (1 noun, 2 verb, 3 adj, 4 adv).
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
]
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
#: Files NLTK's WordNet reader opens; a copy missing any of them is not usable.
REQUIRED_FILES = ["lexnames"] + [f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")] \
    + [f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")]


class WordNetUnavailable(RuntimeError):
    """No source of WordNet worked; the message says what was tried and what to do."""


def register_data_dir() -> None:
    """Put the repository's NLTK data folder first on ``nltk.data.path`` (idempotent)."""
    import nltk

    folder = str(NLTK_DATA_DIR)
    if folder not in nltk.data.path:
        nltk.data.path.insert(0, folder)


def lexnames_text() -> str:
    """The ``lexnames`` file of WordNet 3.0, e.g. ``00\\tadj.all\\t3``."""
    return "".join(f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))


def wordnet_works() -> bool:
    """True when NLTK can load WordNet and lemmatise with it."""
    register_data_dir()
    try:
        from nltk.stem import WordNetLemmatizer

        return WordNetLemmatizer().lemmatize("dogs") == "dog"
    except (LookupError, OSError):
        return False


def try_nltk_download(timeout: float = DOWNLOAD_TIMEOUT_S) -> bool:
    """``nltk.download('wordnet')`` into NLTK's default folder; False when it fails (e.g. offline)."""
    import nltk

    try:
        with socket_timeout(timeout):
            ok = nltk.download("wordnet", quiet=True, raise_on_error=True)
    except Exception as err:  # noqa: BLE001 - any failure means: use the next source
        print(f"nltk_setup: nltk.download('wordnet') failed ({type(err).__name__}: {err})")
        return False
    return bool(ok) and wordnet_works()


def _apt_install(packages: list[str]) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, capture_output=True, text=True, timeout=600).returncode != 0:
        # the package lists may be missing or stale: refresh them once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise WordNetUnavailable(f"apt-get install {' '.join(packages)} failed:\n{result.stderr[-2000:]}")


def install_debian_wordnet(source: Path = DEBIAN_WORDNET, target: Path = WORDNET_DIR) -> Path:
    """Copy Debian's WordNet 3.0 database into an NLTK corpus folder and add ``lexnames``."""
    if not (source / "data.noun").is_file():
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            raise WordNetUnavailable(
                f"{source} has no WordNet database, and apt-get cannot be run here (not root or no apt).\n"
                f"  Install it with: sudo apt-get install -y --no-install-recommends {' '.join(DEBIAN_PACKAGES)}\n"
                f"  then run: python -m multilabel_fusion.data.nltk_setup")
        print(f"nltk_setup: apt-get install {' '.join(DEBIAN_PACKAGES)}")
        _apt_install(DEBIAN_PACKAGES)
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():  # follows symlinks: real copies, never links
            shutil.copyfile(path, target / path.name)
    (target / "lexnames").write_text(lexnames_text(), encoding="ascii")
    missing = [name for name in REQUIRED_FILES if not (target / name).is_file()]
    if missing:
        raise WordNetUnavailable(f"{source} lacks WordNet files NLTK needs: {', '.join(missing)}")
    return target


def ensure_wordnet(*, allow_download: bool = True, allow_apt: bool = True) -> str:
    """Make WordNet loadable by NLTK; returns the source used (``present``, ``nltk.download`` or ``debian``)."""
    if wordnet_works():
        return "present"
    if allow_download and try_nltk_download():
        return "nltk.download"
    if not (DEBIAN_WORDNET / "data.noun").is_file() and not allow_apt:
        raise WordNetUnavailable(
            "WordNet for NLTK not found; run `python -m multilabel_fusion.data.nltk_setup` (or ./setup.sh) once")
    install_debian_wordnet()  # NLTK's lazy loader retries after a failed load, so no reset is needed
    if not wordnet_works():
        raise WordNetUnavailable(f"WordNet copied to {WORDNET_DIR} but NLTK still cannot lemmatise with it")
    return "debian"


def main() -> int:
    try:
        source = ensure_wordnet()
    except WordNetUnavailable as err:
        print(f"nltk_setup: {err}", file=sys.stderr)
        return 1
    where = {"present": "already available to NLTK", "nltk.download": "downloaded with nltk.download",
             "debian": f"built from Debian's WordNet 3.0 in {WORDNET_DIR}"}[source]
    from nltk.stem import WordNetLemmatizer

    lemmatizer = WordNetLemmatizer()
    print(f"nltk_setup: WordNet {where}; lemmatize('dogs') -> {lemmatizer.lemmatize('dogs')!r}, "
          f"lemmatize('horses') -> {lemmatizer.lemmatize('horses')!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
