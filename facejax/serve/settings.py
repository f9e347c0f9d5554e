"""Service settings: every limit the service enforces, checked once at start-up."""

from __future__ import annotations

import dataclasses

from facejax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 8              # images per embedder call (rounded up to a power of two)
    embed_workers: int = 2          # embedder calls running at once (threads)
    max_wait_ms: float = 5.0        # longest a query waits for others to join its batch
    queue_size: int = 256           # queries waiting or being decoded; beyond: 503 Retry-After
    max_upload_bytes: int = 10 * 2**20  # one request body, all its files together
    max_pixels: int = 40_000_000    # per decoded image (decompression bombs); also <= the run's
    max_files: int = 16             # images per enrolment request
    max_k: int = 100                # results per search
    max_label_chars: int = 200
    auth_reads: bool = False        # require the API key on read endpoints too
    cors_origins: tuple[str, ...] = ()  # CORS off unless origins are named
    compact_every: int = 1000       # log records before they are folded into the saved index
    thumb_size: int = 160           # default thumbnail side for /v1/images/{id}

    def __post_init__(self):
        ints = dict(max_batch=(1, 1024), embed_workers=(1, 64), queue_size=(1, 100_000),
                    max_upload_bytes=(1024, 2**31), max_pixels=(64, 2**31), max_files=(1, 1000),
                    max_k=(1, 10_000), max_label_chars=(1, 10_000),
                    compact_every=(1, 10_000_000), thumb_size=(16, 1024))
        for name, (lo, hi) in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(f"serve setting {name} must be a whole number in "
                                  f"[{lo}, {hi}], got {v!r}")
        if not (isinstance(self.max_wait_ms, (int, float)) and 0 <= self.max_wait_ms <= 1000):
            raise ConfigError(f"serve setting max_wait_ms must be in [0, 1000], "
                              f"got {self.max_wait_ms!r}")
        if self.queue_size < self.max_batch:
            raise ConfigError(f"queue_size ({self.queue_size}) must be at least max_batch "
                              f"({self.max_batch})")

    @property
    def batch_sizes(self) -> list[int]:
        """The embedder batch shapes the service compiles: powers of two up to max_batch."""
        sizes, b = [], 1
        while b < self.max_batch:
            sizes.append(b)
            b *= 2
        return sizes + [b]
