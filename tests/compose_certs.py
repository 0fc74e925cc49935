"""The compose stack's configuration as a container sees it, for tests on the host.

The stack's TLS tables name files in the ``/certs`` volume, which
docker/certs/make-certs.sh fills when the stack starts. A test makes the same
files with the same script into a temporary directory and reads the
configuration through a copy whose ``/certs/`` paths lead there.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Final

DOCKER: Final = Path(__file__).resolve().parent.parent / "docker"
MAKE_CERTS: Final = DOCKER / "certs" / "make-certs.sh"
#: Where the compose file mounts the `certs` volume in every part.
VOLUME: Final = "/certs"
#: A path in the volume (and not docker/certs/, where the script lives).
IN_VOLUME: Final = re.compile(rf"(?<![\w.-]){VOLUME}/")


def make_certs(directory: Path) -> subprocess.CompletedProcess[str]:
    """docker/certs/make-certs.sh into ``directory``, the keys given to this test's user."""
    uid = str(os.getuid())
    return subprocess.run(
        ["sh", str(MAKE_CERTS), str(directory)],
        env={"PATH": os.environ["PATH"], "ZKGATE_UID": uid, "ENVOY_UID": uid},
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip


def in_volume(text: str, certs: Path) -> str:
    """``text`` with the volume's mount point replaced by ``certs``."""
    return IN_VOLUME.sub(f"{certs}/", text)


def stack_configs(certs: Path, directory: Path) -> Path:
    """Copies of docker/config in ``directory``, their certificate paths leading to ``certs``."""
    directory.mkdir(parents=True, exist_ok=True)
    for source in (DOCKER / "config").iterdir():
        (directory / source.name).write_text(in_volume(source.read_text(), certs))
    return directory
