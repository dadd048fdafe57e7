"""Sites run only code they approved: the digest of a Flower App Bundle (FAB), a site's list of approved
digests, and the launcher that enforces it (``fedvision/site_launcher.py``).

An app's digest is the sha256 of its FAB, which Flower builds reproducibly from the files of a checkout (fixed
timestamps, .gitignore honoured): a site reviews a checkout (or a ``.fab`` file), approves its digest, and then
runs exactly that code. Any other app, a coordinator's modified checkout included, is refused at the site.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

from fedvision.errors import ConfigError
from fedvision.io import atomic_write_text

LAUNCHER = Path(__file__).with_name("site_launcher.py")


def app_digest(app: str | os.PathLike) -> str:
    """sha256 of the FAB of ``app``: a ``.fab`` file as it is, or a checkout folder as ``flwr run`` builds it."""
    path = Path(app).expanduser()
    if path.is_dir():
        from flwr.cli.build import build_fab_from_disk

        try:
            content = build_fab_from_disk(path)
        except Exception as e:  # Flower's own message names what is wrong with the app folder
            raise ConfigError(f"{path}: cannot build a Flower App Bundle ({e})") from None
    elif path.is_file():
        content = path.read_bytes()
    else:
        raise ConfigError(f"{path}: no such app folder or .fab file")
    return hashlib.sha256(content).hexdigest()


def approve(approved: str | os.PathLike, app: str | os.PathLike) -> str:
    """Add ``app``'s digest to the site's list ``approved`` (written atomically); returns the digest."""
    digest = app_digest(app)
    path = Path(approved).expanduser()
    text = path.read_text() if path.exists() else "# apps this site runs: sha256 of the FAB, then a note\n"
    if digest not in text.split():
        text += f"{digest}  # {Path(app).expanduser().resolve()}, approved {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
        atomic_write_text(path, text)
    return digest


def write_launcher(bin_dir: str | os.PathLike, approved: str | os.PathLike) -> Path:
    """Write ``bin_dir/flwr-clientapp``: Flower's ClientApp runner behind the check of ``approved``. Start the
    SuperNode with ``bin_dir`` first on its PATH (Flower finds ``flwr-clientapp`` by name)."""
    target = Path(bin_dir).expanduser().resolve() / "flwr-clientapp"
    approved_path = Path(approved).expanduser().resolve()
    script = (f"#!{sys.executable}\n"
              "# fedvision: run only apps this site approved (fedvision/site_launcher.py)\n"
              "import runpy\n"
              f"runpy.run_path({str(LAUNCHER)!r}, init_globals={{'APPROVED': {str(approved_path)!r}}}, "
              "run_name='__main__')\n")
    atomic_write_text(target, script)
    target.chmod(0o755)
    return target
