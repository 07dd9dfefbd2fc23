"""Which AWS profiles the shared config files define: checked by the supervisor before it serves or reloads.

Read with botocore's own parser (botocore.configloader), the way botocore's Session builds `available_profiles`
(the config file's profiles, then the credentials file's), but without importing the Session: that would pull
all of botocore and aiohttp into the supervisor, which serves nothing (spawn.py keeps it small).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from botocore.configloader import load_config, raw_config_parse
from botocore.exceptions import ConfigNotFound

from .config import EventsConfig, S3Config

__all__ = ["available_profiles", "profile_problems"]


def available_profiles() -> set[str]:
    """Profile names in AWS_CONFIG_FILE (~/.aws/config) and AWS_SHARED_CREDENTIALS_FILE (~/.aws/credentials)."""
    names: set[str] = set()
    with contextlib.suppress(ConfigNotFound):
        names.update(load_config(os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))["profiles"])
    with contextlib.suppress(ConfigNotFound):
        names.update(raw_config_parse(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")))
    return names


def profile_problems(configs: Sequence[S3Config | EventsConfig], key: str = "s3.profile") -> list[str]:
    """A named profile that the AWS config files do not define; checked before starting, like a config error."""
    wanted = sorted({c.profile for c in configs if c.profile})
    if not wanted:
        return []
    known = available_profiles()
    return [f"{key}: {name!r} is not a profile in the AWS config files" for name in wanted if name not in known]
