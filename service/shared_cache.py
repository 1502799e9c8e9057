"""The sensitivity cache a fleet's workers share through its object store (issue 44).

Each worker keeps its cache in its own data folder (``DATA_DIR/cache``, which nobody else reads). With an object
store configured, a local miss is looked up under the store's ``cache/`` keys, and every entry a job writes is
uploaded there (whole objects only, like artifacts), so a job on one host takes the sensitivity and calibration
statistics another host measured; its report says so (``"sensitivity_cache_from": "the shared object store"``).
The cache is a shortcut: a store that cannot be reached makes a miss (logged), never a failed job.
"""

from __future__ import annotations

import logging
from pathlib import Path

from bitplan.service.objects import ChecksumMismatch, ObjectNotFound, ObjectStore, ObjectStoreUnavailable, from_url

log = logging.getLogger(__name__)

CACHE_PREFIX = "cache"


class StoreCacheMirror:
    """A :class:`~bitplan.sensitivity.cache.CacheMirror` over an object store's ``cache/`` keys."""

    where = "the shared object store"

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    @classmethod
    def from_url(cls, url: str, scratch: Path) -> StoreCacheMirror:
        return cls(from_url(url, scratch=scratch))

    def fetch(self, name: str, dest: Path) -> bool:
        try:
            self.store.get_file(f"{CACHE_PREFIX}/{name}", dest)  # checked against its sha256, renamed into place
        except ObjectNotFound:
            return False
        except (ObjectStoreUnavailable, ChecksumMismatch) as error:
            log.warning("shared cache: %s not fetched (%s); measuring it here", name, error)
            return False
        return True

    def publish(self, name: str, path: Path) -> None:
        try:
            self.store.put_file(f"{CACHE_PREFIX}/{name}", path)
        except ObjectStoreUnavailable as error:
            log.warning("shared cache: %s not published (%s); other hosts will measure it again", name, error)
