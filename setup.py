"""Only to put config.yaml into built wheels: an installed package (no checkout beside it) reads its defaults there.
Everything else about the package is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithConfig(build_py):
    """The standard build, plus the repository's config.yaml as ``multilabel_fusion/resources/config.yaml``."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "multilabel_fusion" / "resources" / "config.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(__file__).resolve().parent / "config.yaml", target)


setup(cmdclass={"build_py": BuildWithConfig})
