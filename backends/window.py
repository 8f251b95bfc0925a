"""What a sliding-window layer's K/V ring (backends/cuda/window.py, backends/mlx/window.py) knows
of positions, framework-free: rows first .. committed - 1 are in the ring, a drafter's tree's rows
wait after them (`pending`), and `offset` tokens are held."""

from __future__ import annotations


class WindowRows:
    window: int
    first: int  # the oldest position in the ring
    committed: int  # positions before it are in the ring; pending rows follow
    offset: int
    pending: tuple | None  # a tree's (keys, values), (1, H, n, D), not yet in the ring

    def can_trim(self, n_keep: int) -> bool:
        """Whether the rows the token after the first n_keep needs are all held."""
        return n_keep <= self.offset and max(0, n_keep - self.window + 1) >= self.first

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
