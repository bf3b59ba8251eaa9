"""The service user in the image's account files."""

from __future__ import annotations

import pytest

from provisioning.image.accounts import AccountFiles, add_service_user
from provisioning.image.errors import ImageInputError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

FILES = AccountFiles(
    passwd="root:x:0:0:root:/root:/bin/bash\nsystemd-network:x:998:998::/:/usr/sbin/nologin\n"
    "pi:x:1000:1000:,,,:/home/pi:/bin/bash\n",
    group="root:x:0:\ndialout:x:20:pi\nshadow:x:42:\nsystemd-network:x:998:\ngpio:x:997:pi\n"
    "pi:x:1000:\n",
    shadow="root:*:19000:0:99999:7:::\nsystemd-network:!*:19000::::::\npi:!:19000:0:99999:7:::\n",
    gshadow="root:*::\ndialout:*::pi\nshadow:*::\ngpio:!::pi\npi:!::\n",
)


def rows(text: str) -> dict[str, list[str]]:
    return {line.split(":")[0]: line.split(":") for line in text.splitlines()}


def test_user_added_with_highest_free_system_id_and_groups() -> None:
    account = add_service_user(FILES)
    assert (account.uid, account.gid) == (999, 999)
    passwd, group = rows(account.files.passwd), rows(account.files.group)
    assert passwd["optogate"] == [
        "optogate",
        "x",
        "999",
        "999",
        "optogate daemons",
        "/var/lib/optogate",
        "/usr/sbin/nologin",
    ]
    assert group["optogate"][2] == "999"
    assert group["dialout"][3] == "pi,optogate"
    assert group["gpio"][3] == "pi,optogate"
    assert rows(account.files.shadow)["optogate"][1] == "!"
    assert rows(account.files.gshadow)["gpio"][3] == "pi,optogate"
    # every other line is kept as it was
    assert passwd["pi"] == rows(FILES.passwd)["pi"]


def test_adding_twice_changes_nothing() -> None:
    once = add_service_user(FILES)
    twice = add_service_user(once.files)
    assert twice == once


def test_existing_user_keeps_its_ids() -> None:
    files = AccountFiles(
        FILES.passwd + "optogate:x:321:654::/var/lib/optogate:/usr/sbin/nologin\n",
        FILES.group + "optogate:x:654:\n",
        FILES.shadow,
        FILES.gshadow,
    )
    account = add_service_user(files)
    assert (account.uid, account.gid) == (321, 654)
    assert "optogate" in rows(account.files.group)["gpio"][3].split(",")


def test_missing_gpio_group_is_created() -> None:
    files = AccountFiles(
        FILES.passwd,
        FILES.group.replace("gpio:x:997:pi\n", ""),
        FILES.shadow,
        FILES.gshadow.replace("gpio:!::pi\n", ""),
    )
    account = add_service_user(files)
    group = rows(account.files.group)
    assert group["gpio"][3] == "optogate"
    ids = [int(r[2]) for r in group.values()]
    assert len(ids) == len(set(ids))


def test_malformed_passwd_refused() -> None:
    with pytest.raises(ImageInputError):
        add_service_user(AccountFiles("root:x:0\n", FILES.group, FILES.shadow, FILES.gshadow))
