"""trainjob: a resumable batch training job for image classification."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("trainjob")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"
