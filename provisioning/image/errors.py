"""Errors of the SD image builder, beside the code that raises them.

::

    OptogateError
    └── ImageError                          an image could not be built; nothing was written
        ├── ImageInputError(ValueError)     bad arguments or gateway directory
        ├── PartitionTableError(ValueError) the MBR is missing, corrupt or not Pi-shaped
        ├── BootFileError(ValueError)       config.txt / cmdline.txt cannot be edited safely
        ├── UnknownRelease                  the base image is not a release in the table (--force)
        ├── NoSpace                         the root file system is too small (--grow)
        ├── HostToolMissing                 sfdisk, mtools, debugfs... not installed
        ├── ToolFailed                      a host tool failed or reported an error
        └── ReadBackMismatch                what was written does not read back identically

Every error carries a message meant for the operator: what is wrong and, where
there is one, what to do about it.
"""

from __future__ import annotations

from firmware.common.errors import OptogateError


class ImageError(OptogateError):
    """An image could not be built; the output file was not created."""


class ImageInputError(ImageError, ValueError):
    """An argument, the gateway directory or a file it names is unusable."""


class PartitionTableError(ImageError, ValueError):
    """The base image has no usable MBR: missing, corrupt, or not a Pi OS layout."""


class BootFileError(ImageError, ValueError):
    """config.txt or cmdline.txt is in a shape the builder refuses to edit."""


class UnknownRelease(ImageError):
    """The base image is not one of the releases in the table (use --force)."""


class NoSpace(ImageError):
    """The root file system has too little free space for what must be written."""


class HostToolMissing(ImageError):
    """A program the builder drives is not installed on this host."""

    def __init__(self, command: str, package: str) -> None:
        super().__init__(
            f"'{command}' is not installed: install the Debian package '{package}' "
            f"(apt-get install {package}), or run `make sysdeps`"
        )
        self.command = command
        self.package = package


class ToolFailed(ImageError):
    """A host tool exited non-zero or printed an error."""


class ReadBackMismatch(ImageError):
    """A file, mode or owner read back from the image differs from what was written."""
