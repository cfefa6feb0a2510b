"""The split policy: which split partitions each asset may read, and which splits'
content it may never carry.

This table is the single place where the leakage rules live. The asset graph's
partition mappings must agree with it (a test derives the readable partitions of
every asset from the resolved graph and compares them), and every asset records
the partitions it actually read so a blocking check can compare those too.

Direct reads are not enough: an unpartitioned derived asset (``test_report``, built
from val_test) carries the splits whose content made it ("taint"), transitively. A
rule's ``never_carry`` (derived from its role) names the splits an asset may never
see, not directly and not through anything derived from them; the graph audit and
the run-time check both enforce it (``defs/leakage_audit.py`` computes the taint).
"""

from __future__ import annotations

from dataclasses import dataclass

from roadwork_assets.contracts.errors import LeakageError
from roadwork_assets.contracts.policy_schemas import POLICY_ASSET_NAMES

SPLITS: tuple[str, ...] = ("train", "val_select", "val_calib", "val_test")

# Sentinel for "the partition being materialized, and only that one": a partitioned
# asset computing per-split features/logits reads its own split of its parents.
SAME_PARTITION = "<same partition>"

# Sharded assets (embeddings) are partitioned by split x shard; Dagster orders a
# multi-partition's dimensions by name, so their keys read "<shard>|<split>" ("1|train").
SHARD_SEP = "|"


def shard_key(split: str, shard: int) -> str:
    """The partition key of ``shard`` of ``split`` ("1|train")."""
    return f"{shard}{SHARD_SEP}{split}"


def parse_shard_key(key: str) -> tuple[str, int | None]:
    """(split, shard) of a partition key; shard None for a plain split key. Anything else
    is refused, naming the key."""
    shard, sep, split = str(key).partition(SHARD_SEP)
    if not sep:
        shard, split = None, str(key)
    if split not in SPLITS or (shard is not None and not shard.isdigit()):
        raise LeakageError(f"partition key {key!r} is neither a split {list(SPLITS)} nor "
                           f"'<shard>{SHARD_SEP}<split>' (e.g. {shard_key('train', 1)!r})")
    return split, None if shard is None else int(shard)


def split_of(key: str) -> str:
    """The split a partition key belongs to: the key itself for a split partition, its
    split dimension for a split x shard key. Leakage rules compare splits, not shards."""
    return parse_shard_key(key)[0]


ROLE_INGESTION = "ingestion"
ROLE_SPLITTING = "splitting"
ROLE_FEATURES = "feature extraction"
ROLE_MODEL_FITTING = "model fitting / selection"
ROLE_INFERENCE = "inference"
ROLE_POLICY_FITTING = "policy fitting"
ROLE_EXPORT = "export"
ROLE_FINAL_EVALUATION = "final evaluation"
ROLE_ACTIVE_LEARNING = "active learning"

# Splits whose content an asset of a role may never carry, directly or through any
# asset derived from them. A new asset (multi-view checkpoint, cascade policy,
# adapted backbone, drift) only names its role. Why: the model must not have seen
# the data that calibrates or tests it; the policy's FNR guarantee needs val_calib to
# be its only fitting data and val_test to stay unseen; the bundle ships the policy.
NEVER_CARRY_BY_ROLE: dict[str, frozenset[str]] = {
    ROLE_MODEL_FITTING: frozenset({"val_calib", "val_test"}),
    ROLE_POLICY_FITTING: frozenset({"val_test"}),
    ROLE_EXPORT: frozenset({"val_test"}),
    # what gets labelled next must not depend on the held-out test set
    ROLE_ACTIVE_LEARNING: frozenset({"val_test"}),
}

# Splits whose *content* (images, labels, scores of their images) a role may never carry.
# Content stops at a model: an asset of a MODEL_ROLES role passes on what it was fitted
# on as lineage, not content, so every policy legitimately carries train + val_select
# through `checkpoint`, while a policy fitted on val_select's scores is refused.
NEVER_CONTENT_BY_ROLE: dict[str, frozenset[str]] = {
    ROLE_POLICY_FITTING: frozenset({"train", "val_select", "val_test"}),
}
MODEL_ROLES: frozenset[str] = frozenset({ROLE_MODEL_FITTING})

# How an asset's taint is derived: "inputs" (the default) — the union of what every
# input carries, plus each split partition it reads; "own split" — exactly its own
# split partition, because it selects that split's rows out of an all-splits table.
# Only the splitter may narrow taint this way.
CARRIES_INPUTS = "inputs"
CARRIES_OWN_SPLIT = "own split"


@dataclass(frozen=True)
class ReadRule:
    """What one asset may read of split-partitioned parents, what it may never carry, and why."""

    role: str
    may_read: frozenset[str]
    reason: str
    never_carry: frozenset[str] = frozenset()
    carries: str = CARRIES_INPUTS
    never_content: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.carries not in (CARRIES_INPUTS, CARRIES_OWN_SPLIT):
            raise LeakageError(f"ReadRule.carries must be {CARRIES_INPUTS!r} or "
                               f"{CARRIES_OWN_SPLIT!r}; got {self.carries!r}")
        if self.carries == CARRIES_OWN_SPLIT and self.role != ROLE_SPLITTING:
            raise LeakageError(
                f"a {self.role!r} rule may not narrow its taint to its own split "
                f"(carries={CARRIES_OWN_SPLIT!r}): only the splitter selects one split's "
                "rows; use the default carries='inputs'"
            )

    def allows(self, partition: str, own_partition: str | None) -> bool:
        """May an asset (partition ``own_partition``) read ``partition``? Split x shard
        keys count as their split, on both sides."""
        split = split_of(partition)
        if split in self.may_read:
            return True
        return (SAME_PARTITION in self.may_read and own_partition is not None
                and split_of(own_partition) == split)


def _rule(role: str, reason: str, *splits: str, carries: str = CARRIES_INPUTS) -> ReadRule:
    return ReadRule(role=role, may_read=frozenset(splits), reason=reason,
                    never_carry=NEVER_CARRY_BY_ROLE.get(role, frozenset()), carries=carries,
                    never_content=NEVER_CONTENT_BY_ROLE.get(role, frozenset()))


# Unpartitioned assets whose content spans every split (all images and labels): reading
# one of them counts as reading every split partition, for the graph audit and at run
# time alike. Only the splitter may.
ALL_SPLITS_ASSETS: frozenset[str] = frozenset({"source_images", "split_assignment"})

# Asset name -> rule. Assets without split-partitioned parents (source_images,
# split_assignment, bundle, ...) read no split partition and are listed with an
# empty set so that adding a split-partitioned parent to them fails the policy test.
SPLIT_READ_POLICY: dict[str, ReadRule] = {
    "source_images": _rule(ROLE_INGESTION, "reads raw data, before any split exists"),
    "split_assignment": _rule(ROLE_SPLITTING, "assigns every source image to a split", *SPLITS),
    "split_manifest": _rule(
        ROLE_SPLITTING, "selects one split's rows from the full assignment", *SPLITS,
        carries=CARRIES_OWN_SPLIT,
    ),
    "embeddings": _rule(
        ROLE_FEATURES, "frozen features of its own split only", SAME_PARTITION
    ),
    "adapted_backbone": _rule(
        ROLE_MODEL_FITTING,
        "ExPLoRA: continued self-supervised pre-training on the train split's images "
        "(labels unused; plus an optional unlabelled folder), never a val_* split",
        "train",
    ),
    "checkpoint": _rule(
        ROLE_MODEL_FITTING,
        "weights fit on train, epoch/hyper-parameters selected on val_select",
        "train",
        "val_select",
    ),
    "logits": _rule(ROLE_INFERENCE, "model outputs of its own split only", SAME_PARTITION),
    "multiview_views": _rule(
        ROLE_INFERENCE, "stage-1 outputs on the views of its own split only", SAME_PARTITION
    ),
    "multiview_checkpoint": _rule(
        ROLE_MODEL_FITTING,
        "stage 2: attention aggregator fit on train view logits, aggregator chosen on "
        "val_select",
        "train",
        "val_select",
    ),
    "multiview_logits": _rule(
        ROLE_INFERENCE, "stage-2 outputs of its own split only", SAME_PARTITION
    ),
    POLICY_ASSET_NAMES["softmax"]: _rule(
        ROLE_POLICY_FITTING, "calibrator on val_calib part A, thresholds on part B", "val_calib"
    ),
    POLICY_ASSET_NAMES["gate"]: _rule(ROLE_POLICY_FITTING, "failure gate on val_calib only", "val_calib"),
    POLICY_ASSET_NAMES["scrc"]: _rule(ROLE_POLICY_FITTING, "conformal sets on val_calib only", "val_calib"),
    POLICY_ASSET_NAMES["cascade"]: _rule(
        ROLE_POLICY_FITTING,
        "both stages' calibrators on val_calib part A, the one lambda on part B", "val_calib"),
    "bundle": _rule(ROLE_EXPORT, "packages fitted artifacts; reads no partition"),
    "bundle_int8": _rule(
        ROLE_POLICY_FITTING,
        "re-certifies the bundle's policy on the INT8 network's own val_calib scores "
        "(val_calib images, labels and fp32 logits), never val_test", "val_calib"),
    "test_report": _rule(ROLE_FINAL_EVALUATION, "held-out evaluation", "val_test"),
    "drift": _rule(ROLE_FINAL_EVALUATION,
                   "val_test is the reference incoming images are compared with", "val_test"),
    "label_queue": _rule(ROLE_ACTIVE_LEARNING,
                         "ranks an unlabelled pool with the bundle; reads no split partition"),
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
    """The partitions in `reads` that `asset_name` may not read (sorted), each as read
    (a shard key stays a shard key, judged by its split)."""
    rule = rule_for(asset_name)
    return sorted(s for s in set(reads) if not rule.allows(s, own_partition))


def forbidden_carried(asset_name: str, carried: set[str] | list[str]) -> list[str]:
    """The splits in `carried` (the taint of something it loaded) that `asset_name` may never see."""
    return sorted(set(carried) & rule_for(asset_name).never_carry)
