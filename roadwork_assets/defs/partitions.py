"""Split partitions and the partition mappings that encode the split policy."""

from __future__ import annotations

import dagster as dg

from roadwork_assets.contracts.splits import SPLITS

split_partitions = dg.StaticPartitionsDefinition(list(SPLITS))

# Unpartitioned readers of split-partitioned assets read exactly these partitions.
MODEL_FITTING_SPLITS = dg.SpecificPartitionsPartitionMapping(["train", "val_select"])
TRAIN_ONLY = dg.SpecificPartitionsPartitionMapping(["train"])  # adapted_backbone (ExPLoRA)
POLICY_FITTING_SPLITS = dg.SpecificPartitionsPartitionMapping(["val_calib"])
FINAL_EVALUATION_SPLITS = dg.SpecificPartitionsPartitionMapping(["val_test"])
