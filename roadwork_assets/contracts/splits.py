"""The split policy: which split partitions each asset may read.

This table is the single place where the leakage rules live. The asset graph's
partition mappings must agree with it (a test derives the readable partitions of
every asset from the resolved graph and compares them), and every asset records
the partitions it actually read so a blocking check can compare those too.
"""

from __future__ import annotations

from dataclasses import dataclass
from roadwork_assets.contracts.errors import LeakageError

SPLITS: tuple[str, ...] = ("train", "val_select", "val_calib", "val_test")

# Sentinel for "the partition being materialized, and only that one": a partitioned
# asset computing per-split features/logits reads its own split of its parents.
SAME_PARTITION = "<same partition>"


@dataclass(frozen=True)
class ReadRule:
    """What one asset may read of split-partitioned parents, and why."""

    role: str
    may_read: frozenset[str]
    reason: str

    def allows(self, split: str, own_partition: str | None) -> bool:
        if split in self.may_read:
            return True
        return SAME_PARTITION in self.may_read and own_partition == split


def _rule(role: str, reason: str, *splits: str) -> ReadRule:
    return ReadRule(role=role, may_read=frozenset(splits), reason=reason)


# Unpartitioned assets whose content spans every split (all images and labels): reading
# one of them counts as reading every split partition, for the graph audit and at run
# time alike. Only the splitter may.
ALL_SPLITS_ASSETS: frozenset[str] = frozenset({"source_images", "split_assignment"})

# Asset name -> rule. Assets without split-partitioned parents (source_images,
# split_assignment, bundle, ...) read no split partition and are listed with an
# empty set so that adding a split-partitioned parent to them fails the policy test.
SPLIT_READ_POLICY: dict[str, ReadRule] = {
    "source_images": _rule("ingestion", "reads raw data, before any split exists"),
    "split_assignment": _rule("splitting", "assigns every source image to a split", *SPLITS),
    "split_manifest": _rule(
        "splitting", "selects one split's rows from the full assignment", *SPLITS
    ),
    "embeddings": _rule(
        "feature extraction", "frozen features of its own split only", SAME_PARTITION
    ),
    "checkpoint": _rule(
        "model fitting / selection",
        "weights fit on train, epoch/hyper-parameters selected on val_select",
        "train",
        "val_select",
    ),
    "logits": _rule("inference", "model outputs of its own split only", SAME_PARTITION),
    "thresholds": _rule(
        "policy fitting", "calibrator on val_calib part A, thresholds on part B", "val_calib"
    ),
    "gate_params": _rule("policy fitting", "failure gate on val_calib only", "val_calib"),
    "conformal_sets": _rule("policy fitting", "conformal sets on val_calib only", "val_calib"),
    "bundle": _rule("export", "packages fitted artifacts; reads no partition"),
    "test_report": _rule("final evaluation", "held-out evaluation", "val_test"),
}


def rule_for(asset_name: str) -> ReadRule:
    try:
        return SPLIT_READ_POLICY[asset_name]
    except KeyError:
        raise LeakageError(
            f"asset {asset_name!r} has no entry in the split read policy "
            "(roadwork_assets/contracts/splits.py SPLIT_READ_POLICY); add one that "
            "states which split partitions it may read and why"
        ) from None


def forbidden_reads(
    asset_name: str, reads: set[str] | list[str], own_partition: str | None = None
) -> list[str]:
    """The partitions in `reads` that `asset_name` may not read (sorted)."""
    rule = rule_for(asset_name)
    return sorted(s for s in set(reads) if not rule.allows(s, own_partition))
