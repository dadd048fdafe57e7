"""A site's ``flwr-clientapp``: it runs Flower's own, after refusing any app the site has not approved.

Flower starts a ClientApp by running ``flwr-clientapp`` (found through PATH), which receives the run's Flower App
Bundle (FAB) from the SuperNode, unpacks it and imports the ClientApp from it. So the code that enforces a site's
privacy policy is whatever the coordinator shipped. Flower 1.42 can verify a FAB only against signatures from
Flower Hub (online); this launcher is the offline equivalent: before the FAB is unpacked or imported, its sha256
must be on the site's list of approved apps (``fedvision site approve``). A refused app gets an error reply
that names its digest, so the coordinator sees why; nothing of it runs at the site.

``fedvision site launcher --bin DIR`` writes the ``flwr-clientapp`` that runs this file; the SuperNode gets DIR
first on its PATH. This file imports nothing from fedvision, so that the approved app's own fedvision is the
only one the ClientApp uses. The list is read afresh for every task (each task is a new process).
"""

import hashlib
import sys
from pathlib import Path


def approved_digests(path: Path) -> set[str]:
    """The sha256 digests in the site's list: one per line, the digest first; ``#`` starts a comment."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return set()  # no list: nothing is approved
    return {line.split()[0].lower() for line in lines if line.strip() and not line.lstrip().startswith("#")}


def main(approved: str) -> int:
    import flwr.supernode.runtime.run_clientapp as run_clientapp
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    install = run_clientapp.install_from_fab

    def install_if_approved(fab, *args, **kwargs):
        content = fab if isinstance(fab, bytes) else Path(fab).read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        if digest not in approved_digests(Path(approved)):
            raise PermissionError(f"this site has not approved app sha256 {digest}; refused before unpacking it "
                                  "(the site approves an app with `fedvision site approve`)")
        return install(fab, *args, **kwargs)

    # Flower's task runner calls install_from_fab by this module-level name before it imports anything of the app.
    run_clientapp.install_from_fab = install_if_approved
    return flwr_clientapp()


if __name__ == "__main__":
    sys.exit(main(APPROVED))  # noqa: F821 — set by the generated launcher (fedvision.approval.write_launcher)
