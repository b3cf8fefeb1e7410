"""The record every dataset reader returns, and the split container."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sample:
    """One person crop: where it is on disk, who it is, which camera saw it.

    ``pid`` is the dataset's original identity (``0`` = distractor in Market-style
    galleries); ``camid`` is 0-based.
    """

    path: str
    pid: int
    camid: int


@dataclass
class ReidDataset:
    """The three splits of one re-ID dataset as read from disk.

    ``junk`` counts the gallery images dropped because their identity is -1
    (Market-1501 convention); they are never in ``gallery``.
    """

    name: str
    root: str
    train: list[Sample] = field(default_factory=list)
    query: list[Sample] = field(default_factory=list)
    gallery: list[Sample] = field(default_factory=list)
    junk: int = 0

    @property
    def num_train_pids(self) -> int:
        return len({s.pid for s in self.train})

    @property
    def num_cams(self) -> int:
        return len({s.camid for s in self.train + self.query + self.gallery})

    def relabelled_train(self) -> list[Sample]:
        """Training samples with identities mapped to 0..N-1 (sorted by original id)."""
        return relabel(self.train)


def relabel(samples: list[Sample]) -> list[Sample]:
    """Map identities to 0..N-1 in order of the sorted original ids."""
    mapping = {pid: i for i, pid in enumerate(sorted({s.pid for s in samples}))}
    return [Sample(s.path, mapping[s.pid], s.camid) for s in samples]
