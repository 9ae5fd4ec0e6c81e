"""Package discovery for the layout README.md states: `tideserve/` is the package; the top-level folders a
cluster runs (TOP_LEVEL) install into it as `tideserve.<folder>`. Every subpackage is found, none is listed, so
a new one can never be left out of the wheel. The rest of the metadata is in pyproject.toml."""

from setuptools import find_packages, setup

TOP_LEVEL = ("operator", "worker", "crds")

package_dir = {"tideserve": "tideserve"}
packages = ["tideserve", *(f"tideserve.{p}" for p in find_packages("tideserve"))]
for folder in TOP_LEVEL:
    package_dir[f"tideserve.{folder}"] = folder
    packages += [f"tideserve.{folder}", *(f"tideserve.{folder}.{p}" for p in find_packages(folder))]

setup(package_dir=package_dir, packages=packages)
