"""How bytes arrive: streaming to disk, Range resume, parallel ranges, hashing, stall watchdog.

`Downloader.fetch(remote, partial, file)` fills a partial file and verifies it (every size the
server and the catalog state, sha256, the GGUF header's declared extent). One module per job:

- `downloader`: the front (`Downloader`, `Fetched`), local parts in `parts`
- `transfer`: the loop of one file over HTTP, its segments' workers, retries and stalls
- `ranges`: the `Segment`s of a file, the watermark, splitting a slow stream
- `validators`: validators and the resume rules
- `checks`: hashing, the GGUF header probe, the checks at the end
- `disk`: preallocation, writeback, the syncs that make a sidecar true
- `sidecar`: when the progress sidecar is saved, and the thread that saves it
- `http`: clients, ranged GETs and redirects, header deadlines, status codes

It knows the catalog's file entries (`ModelFile`: sizes, sha256) and the store's `Partial`, never
catalogs as such, locks, or which source comes next.
"""

from __future__ import annotations

from .checks import verify_gguf
from .downloader import Downloader, Fetched
from .http import send_with_deadline
from .transfer import ProgressFn
from .validators import can_resume

__all__ = [
    "Downloader",
    "Fetched",
    "ProgressFn",
    "can_resume",
    "send_with_deadline",
    "verify_gguf",
]
