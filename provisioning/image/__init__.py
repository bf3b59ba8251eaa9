"""SD card images for the two modules, built from a stock Raspberry Pi OS image on the host.

``optogate image build`` edits a copy of the stock image without root,
mounts or loop devices: ``sfdisk`` reads the MBR, ``mtools`` edits the FAT
boot partition and ``debugfs`` the ext4 root partition, each at the offset
the MBR gives.  The pure parts (the partition table, config.txt and
cmdline.txt, the release table, the service account, the root plan, the
manifest) are separate modules with no I/O; ``tools``, ``debugfs`` and
``wheelhouse`` are the adapters; ``build`` composes them.

::

    errors      the ImageError tree
    partitions  sfdisk --json -> the checked Pi layout            (pure)
    bootconfig  config.txt managed block, cmdline.txt consoles     (pure)
    releases    the release table, os-release, dpkg status          (pure)
    accounts    the service user in passwd/group/shadow/gshadow     (pure)
    plan        every directory, file and link of the root partition (pure)
    manifest    the record of what was written                     (pure)
    tools       sfdisk, mtools, resize2fs, e2fsck                  (adapter)
    debugfs     ext4 sessions, write and read back                 (adapter)
    wheelhouse  pip download / pip install --target for aarch64    (adapter)
    build       the steps, in order; nothing is left behind on failure

docs/provisioning.md is the operator's guide.
"""
