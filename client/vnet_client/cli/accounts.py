"""Users and groups named on the command line."""

from __future__ import annotations

import grp
import os
import pwd
from typing import Any, overload

from vnet_common.limits import MAX_UID

from .parser import Usage


@overload
def uid_of(user: str) -> int: ...
@overload
def uid_of(user: None) -> None: ...
def uid_of(user: str | None) -> int | None:
    if user is None:
        return None
    if user.isascii() and user.isdigit():  # not '²', which isdigit() takes too
        if int(user) > MAX_UID:
            raise Usage(f"{user} is not a uid: uids run from 0 to {MAX_UID}.")
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise Usage(f"There is no user named '{user}' on this host (give a user name or a "
                    "uid).") from None


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def file_group(path: Any) -> str | None:
    try:
        return grp.getgrgid(os.stat(path).st_gid).gr_name
    except (KeyError, OSError):
        return None
