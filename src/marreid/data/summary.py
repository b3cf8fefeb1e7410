"""Per-split counts of a dataset: images, identities, cameras, junk and distractors."""

from __future__ import annotations

from marreid.data.sample import DISTRACTOR_PID, SPLITS, ReidDataset, Sample, zero_is_distractor


def split_counts(samples: list[Sample]) -> dict[str, int]:
    """Number of images, distinct identities and distinct cameras in one split."""
    return {
        "images": len(samples),
        "ids": len({s.pid for s in samples}),
        "cams": len({s.camid for s in samples}),
    }


def summarize(ds: ReidDataset) -> dict[str, dict[str, int]]:
    """Counts per split; the gallery adds dropped junk and kept distractors.

    A distractor is a gallery image of identity 0 when no query has identity 0
    (Market-1501's convention; in MSMT17 identity 0 is a real person). The
    gallery's ``ids`` count identity 0 like any other.
    """
    counts = {split: split_counts(getattr(ds, split)) for split in SPLITS}
    counts["gallery"]["junk"] = ds.junk
    distractors = sum(s.pid == DISTRACTOR_PID for s in ds.gallery) if zero_is_distractor(ds) else 0
    counts["gallery"]["distractors"] = distractors
    return counts


def format_summary(summary: dict[str, dict[str, int]], title: str) -> str:
    """A small table of ``summarize``'s counts under a title line."""
    lines = [title, f"{'split':<8}{'images':>9}{'ids':>7}{'cams':>6}"]
    for split in SPLITS:
        row = summary[split]
        lines.append(f"{split:<8}{row['images']:>9,}{row['ids']:>7,}{row['cams']:>6,}")
    gallery = summary["gallery"]
    lines.append(
        f"gallery: {gallery['junk']:,} junk images left out (id -1), "
        f"{gallery['distractors']:,} distractors kept (id 0)"
    )
    return "\n".join(lines)
