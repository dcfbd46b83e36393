"""nanoctl: from raw text to a ChatGPT-like model you can talk to (a nanochat re-implementation).

Every stage is a library function taking a typed options dataclass; the `nanoctl` CLI only parses
options and calls them. This module must stay light: importing it never imports torch.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nanoctl")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
