"""What a cache that holds only a sliding window knows of positions, framework-free: a token at
position p sees p - window + 1 .. p, so a window layer keeps the newest `window` positions and
drops the rest. `first` is the oldest position it holds.

`WindowRows`: the exact K/V ring (backends/cuda/window.py, backends/mlx/window.py): rows first ..
committed - 1 are in the ring, a drafter's tree's rows wait after them (`pending`).
`WindowStores`: a quantized kind's window layer (kv-quant, xquant, xquant-cl), whose token stores
(each backend's cache.py, `TokenStore.slide`) drop the sink and every whole group of `group`
tokens that holds none of the newest `window` positions."""

from __future__ import annotations


class Sliding:
    window: int  # 0: a global layer, which holds every position
    first: int
    offset: int

    def can_trim(self, n_keep: int) -> bool:
        """Whether the rows the token after the first n_keep needs are all held."""
        return n_keep <= self.offset and max(0, n_keep - self.window + 1) >= self.first


class WindowRows(Sliding):
    first: int  # the oldest position in the ring
    committed: int  # positions before it are in the ring; pending rows follow
    pending: tuple | None  # a tree's (keys, values), (1, H, n, D), not yet in the ring

    def trim(self, n_keep: int) -> None:
        assert self.can_trim(n_keep), "the session restores a checkpoint first"
        if n_keep < self.committed:
            self.committed = n_keep
            self.pending = None
        elif self.pending is not None:
            cut = n_keep - self.committed
            self.pending = (self.pending[0][:, :, :cut], self.pending[1][:, :, :cut])
        self.offset = n_keep

    @property
    def room(self) -> int:
        return self.window  # a tree's rows wait beside the ring; nothing held changes


class SlidingStore:
    """What each backend's TokenStore (cache.py) does to hold only a window: the store keeps
    `sink` exact rows, flushed `blocks` of `group` rows and the newest `exact` rows, and counts
    them from `first`, the oldest position it holds."""

    window: int  # 0: every row is held
    first: int
    group: int

    def slide(self, end: int) -> None:
        """The store at `end` positions: drop the sink once all of it is older than the newest
        `window` positions, then each whole group of `group` rows (flushed or still exact) that
        is. The rows kept are stored as they would be with nothing dropped: groups flush at the
        same positions, so attention within the window sees the same values."""
        older = end - self.window - self.first  # held rows before the newest window
        if not self.window or older <= 0:
            return
        n_sink = self.sink.shape[0]
        if n_sink:
            if older < n_sink:
                return
            self.first, older, self.sink = self.first + n_sink, older - n_sink, self.sink[:0]
        groups = older // self.group
        from_blocks = min(groups, self.n_blocks)
        if from_blocks:
            self._drop_blocks(from_blocks)
        self.exact = self.exact[(groups - from_blocks) * self.group :]
        self.first += groups * self.group


class WindowStores(Sliding):
    """Mixed into the quantized kinds' caches (window 0: a global layer, nothing dropped). A
    forward first drops what its tokens no longer see and, unless it is a drafter's tree (whose
    path `keep` and the rewind still choose), what the next token will not see either."""

    stores: list  # the cache's TokenStores, which all drop the same positions

    @property
    def first(self) -> int:
        return self.stores[0].first

    def slide(self, end: int) -> None:
        for store in self.stores:
            store.slide(end)
