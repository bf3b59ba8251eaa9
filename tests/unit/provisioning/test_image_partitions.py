"""The Pi layout from ``sfdisk --json``: every malformed table is a typed error."""

from __future__ import annotations

import json

import pytest

from provisioning.image.errors import PartitionTableError
from provisioning.image.partitions import parse_sfdisk_json

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

SIZE = 200 * 2**20


def table(parts: list[dict[str, object]], label: str = "dos", sector: int = 512) -> str:
    return json.dumps(
        {
            "partitiontable": {
                "label": label,
                "id": "0x4e639091",
                "device": "img",
                "unit": "sectors",
                "sectorsize": sector,
                "partitions": parts,
            }
        }
    )


BOOT = {"node": "img1", "start": 8192, "size": 81920, "type": "c"}
ROOT = {"node": "img2", "start": 90112, "size": 98304, "type": "83"}


def test_stock_layout() -> None:
    layout = parse_sfdisk_json(table([BOOT, ROOT]), SIZE)
    assert layout.disk_id == "0x4e639091"
    assert (layout.boot.number, layout.boot.offset, layout.boot.size) == (
        1,
        8192 * 512,
        81920 * 512,
    )
    assert (layout.root.number, layout.root.offset) == (2, 90112 * 512)
    assert layout.root.end == (90112 + 98304) * 512


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "no table"),
        ("{}", "no table"),
        (table([BOOT, ROOT], label="gpt"), "gpt"),
        (table([BOOT, ROOT], sector=4096), "sector"),
        (table([]), "empty"),
        (table([BOOT, {**ROOT, "start": 8192 + 1000}]), "overlap"),
        (table([BOOT, {**ROOT, "size": 10**9}]), "truncated"),
        (table([{**BOOT, "type": "83"}, ROOT]), "no FAT"),
        (table([BOOT, {**ROOT, "type": "82"}]), "no Linux"),
        (
            table([ROOT | {"node": "img1", "start": 8192, "size": 1000}, BOOT | {"start": 9216}]),
            "root not last",
        ),
        (table([BOOT, {**ROOT, "start": "x"}]), "not a number"),
        (table([BOOT, {**ROOT, "size": 0}]), "empty partition"),
    ],
)
def test_malformed_tables_refused(text: str, why: str) -> None:
    with pytest.raises(PartitionTableError):
        parse_sfdisk_json(text, SIZE)
