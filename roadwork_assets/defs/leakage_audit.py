"""Graph-level leakage audit: derive what each asset can read from the asset graph.

For every asset and every split-partitioned parent, the partition mapping tells which
parent partitions each of the asset's own partitions (or the asset as a whole) reads.
Those derived reads must equal the policy table in ``contracts/splits.py`` — not just
fit inside it — so the table and the graph cannot drift apart silently.

Taint: every asset (partition) carries the splits whose content made it, transitively
through every parent edge (inputs and deps alike). ``carried_splits`` computes it from
the graph; the definition-time audit (``audit_taint``) and the run-time check
(``tainted_loads``, used by ``split_reads_allowed``) both use it, against each rule's
``never_carry``.
"""

from __future__ import annotations

import dagster as dg

from roadwork_assets.contracts.errors import LeakageError
from roadwork_assets.contracts.splits import (
    ALL_SPLITS_ASSETS,
    CARRIES_OWN_SPLIT,
    MODEL_ROLES,
    SAME_PARTITION,
    SPLIT_READ_POLICY,
    SPLITS,
    split_of,
)
from roadwork_assets.defs.partitions import shard_count

# {split: where it came from}, e.g. {"val_test": "test_report <- logits[val_test] <- ..."}
Taint = dict[str, str]


def derived_split_reads(asset_graph) -> dict[str, dict[str | None, set[str]]]:
    """{asset: {own partition or None: split partitions readable from parents}}.

    A parent in ALL_SPLITS_ASSETS (unpartitioned, but holding every split's images and
    labels) counts as all four partitions. A split x shard partition (of a parent, or
    the asset's own key) counts as its split.
    """
    out: dict[str, dict[str | None, set[str]]] = {}
    for key in asset_graph.get_all_asset_keys():
        node = asset_graph.get(key)
        own_keys: list[str | None] = (
            list(node.partitions_def.get_partition_keys()) if node.partitions_def else [None]
        )
        reads: dict[str | None, set[str]] = {p: set() for p in own_keys}
        for parent in node.parent_keys:
            if parent.to_user_string() in ALL_SPLITS_ASSETS:
                for own in own_keys:
                    reads[own] |= set(SPLITS)
                continue
            if not _split_keyed(asset_graph.get(parent).partitions_def):
                continue
            for own in own_keys:
                result = asset_graph.get_parent_partition_keys_for_child(own, parent, key)
                reads[own] |= {split_of(p) for p in result.partitions_subset.get_partition_keys()}
        out[key.to_user_string()] = reads
    return out


def audit_split_reads(asset_graph) -> list[str]:
    """Every mismatch between the graph and the policy, as a sentence naming asset and split."""
    problems: list[str] = []
    for asset, by_partition in sorted(derived_split_reads(asset_graph).items()):
        rule = SPLIT_READ_POLICY.get(asset)
        if rule is None:
            problems.append(
                f"asset {asset!r} is not in SPLIT_READ_POLICY (contracts/splits.py): "
                "declare which split partitions it may read"
            )
            continue
        for own, reads in sorted(by_partition.items(), key=lambda kv: str(kv[0])):
            own_split = split_of(own) if own is not None else None
            allowed = {own_split if s == SAME_PARTITION else s for s in rule.may_read} - {None}
            where = f"asset {asset!r}" + (f" partition {own!r}" if own else "")
            for split in sorted(reads - allowed):
                problems.append(
                    f"{where} can read split {split!r}, which its policy forbids "
                    f"({rule.role}: {rule.reason}; allowed: {sorted(allowed) or 'none'})"
                )
            for split in sorted(allowed - reads):
                problems.append(
                    f"{where}: policy allows split {split!r} but the graph never reads it "
                    "(policy table and partition mappings disagree)"
                )
    return problems


def _is_split_key(key: str) -> bool:
    try:
        split_of(key)
    except LeakageError:
        return False
    return True


def _split_keyed(partitions_def) -> bool:
    """Partitioned by split, or by split x shard (every key names a split)."""
    return partitions_def is not None and all(
        _is_split_key(k) for k in partitions_def.get_partition_keys()) and {
        split_of(k) for k in partitions_def.get_partition_keys()} == set(SPLITS)


def _label(asset: str, partition: str | None) -> str:
    return f"{asset}[{partition}]" if partition is not None else asset


def _own_keys(node) -> list[str | None]:
    return list(node.partitions_def.get_partition_keys()) if node.partitions_def else [None]


def _parent_reads(asset_graph, key, own: str | None) -> list[tuple[str, str | None]]:
    """(parent asset, parent partition or None) pairs that `key[own]` reads."""
    out: list[tuple[str, str | None]] = []
    for parent in sorted(asset_graph.get(key).parent_keys, key=lambda k: k.to_user_string()):
        name = parent.to_user_string()
        if asset_graph.get(parent).partitions_def is None:
            out.append((name, None))
            continue
        result = asset_graph.get_parent_partition_keys_for_child(own, parent, key)
        out += [(name, p) for p in sorted(result.partitions_subset.get_partition_keys())]
    return out


def _shortest(into: Taint, split: str, chain: str) -> None:
    if split not in into or chain.count(" <- ") < into[split].count(" <- "):
        into[split] = chain


def carried_by_load(carried: dict[str, dict[str | None, Taint]], asset: str,
                    partition: str | None) -> Taint:
    """What loading `asset[partition]` carries: its taint, plus the split partition itself."""
    by_part = carried[asset]
    own = partition if partition in by_part else None
    label = _label(asset, own)
    taint = {s: c if c.startswith(label) else f"{label} <- {c}"
             for s, c in by_part.get(own, {}).items()}
    if partition is not None and _is_split_key(partition):
        _shortest(taint, split_of(partition), _label(asset, partition))
    return taint


def carried_splits(asset_graph, *, content: bool = False) -> dict[str, dict[str | None, Taint]]:
    """{asset: {own partition or None: {split carried: chain it came through}}}.

    An asset in ALL_SPLITS_ASSETS carries every split; a rule with carries="own split"
    (the splitter's split_manifest) carries exactly its own partition; every other asset
    carries the union of what it reads (parent taint plus split partitions read).
    ``content=True``: only data content, which stops at a model (MODEL_ROLES): a model
    passes on what it was fitted on as lineage, not as content.
    """
    out: dict[str, dict[str | None, Taint]] = {}
    for key in asset_graph.toposorted_asset_keys:
        name = key.to_user_string()
        rule = SPLIT_READ_POLICY.get(name)
        out[name] = {}
        for own in _own_keys(asset_graph.get(key)):
            taint: Taint = {}
            if content and rule is not None and rule.role in MODEL_ROLES:
                pass  # a model's weights are not its training data
            elif name in ALL_SPLITS_ASSETS:
                taint = {s: name for s in SPLITS}
            elif rule is not None and rule.carries == CARRIES_OWN_SPLIT and own in SPLITS:
                taint = {own: _label(name, own)}
            else:
                for parent, part in _parent_reads(asset_graph, key, own):
                    for split, chain in carried_by_load(out, parent, part).items():
                        _shortest(taint, split, f"{_label(name, own)} <- {chain}")
            out[name][own] = taint
    return out


def _violations(rule, load: Taint, load_content: Taint) -> list[tuple[str, str, bool]]:
    """(split, chain, is_content) for every split a load carries that `rule` forbids: any
    taint in never_carry, and data content in never_content (lineage through a model is
    allowed there)."""
    out = [(s, c, False) for s, c in sorted(load.items()) if s in rule.never_carry]
    out += [(s, c, True) for s, c in sorted(load_content.items())
            if s in rule.never_content - rule.never_carry]
    return out


def _taint_problem(rule, subject: str, split: str, chain: str, content: bool, tail: str) -> str:
    if content:
        return (f"{subject} carries the content of split {split!r} (taint: {chain}); "
                f"{rule.role} may never use the data of {sorted(rule.never_content)}{tail}")
    return (f"{subject} carries split {split!r} (taint: {chain}); {rule.role} may never see "
            f"{sorted(rule.never_carry)}{tail}")


def audit_taint(asset_graph, carried: dict[str, dict[str | None, Taint]] | None = None
                ) -> list[str]:
    """Every input whose taint includes a split its reader's role may never see."""
    carried = carried if carried is not None else carried_splits(asset_graph)
    content = carried_splits(asset_graph, content=True)
    problems: list[str] = []
    for key in asset_graph.toposorted_asset_keys:
        name = key.to_user_string()
        rule = SPLIT_READ_POLICY.get(name)
        if rule is None or not (rule.never_carry or rule.never_content):
            continue
        for own in _own_keys(asset_graph.get(key)):
            for parent, part in _parent_reads(asset_graph, key, own):
                subject = f"asset {_label(name, own)!r} input {_label(parent, part)!r}"
                for split, chain, is_content in _violations(
                        rule, carried_by_load(carried, parent, part),
                        carried_by_load(content, parent, part)):
                    tail = (" (a model trained on them is fine): remove that input" if is_content
                            else f": remove that input, or re-derive it without {split!r}")
                    problems.append(_taint_problem(
                        rule, subject, split, chain, is_content,
                        ", not even through a derived asset" + tail))
    return problems


def tainted_loads(asset_graph, asset: str, own: str | None,
                  loads: list[tuple[str, str | None]]) -> tuple[Taint, list[str]]:
    """Run time: (what `asset[own]` carries, given the graph and what it loaded; problems).

    A load of an asset missing from the graph counts as carrying every split: its
    lineage is unknown, so it cannot be shown clean.
    """
    carried = carried_splits(asset_graph)
    content = carried_splits(asset_graph, content=True)
    taint: Taint = dict(carried.get(asset, {}).get(own, {}))
    rule = SPLIT_READ_POLICY.get(asset)
    problems: list[str] = []
    for loaded, part in sorted(set(loads), key=lambda lp: (lp[0], str(lp[1]))):
        if loaded in carried:
            got = carried_by_load(carried, loaded, part)
            got_content = carried_by_load(content, loaded, part)
        else:
            got = {s: f"{_label(loaded, part)} (not in the asset graph: lineage unknown)"
                   for s in SPLITS}
            got_content = got
        for split, chain in got.items():
            _shortest(taint, split, f"{_label(asset, own)} <- {chain}")
        if rule is None:
            continue
        subject = f"{asset} loaded {_label(loaded, part)!r}, which"
        problems += [_taint_problem(rule, subject, split, chain, is_content, ": stop loading it")
                     for split, chain, is_content in _violations(rule, got, got_content)]
    return taint, problems


def assert_graph_obeys_policy(defs: dg.Definitions) -> None:
    graph = defs.resolve_asset_graph()
    problems = audit_split_reads(graph) + audit_taint(graph) + audit_shard_mappings(graph)
    if problems:
        raise LeakageError("split policy violated by the asset graph:\n  " + "\n  ".join(problems))


def _shard_edge_problems(asset_graph, parent, child) -> list[str]:
    """An edge into or out of a split x shard asset keeps the split and reads whole splits:
    a partitioned side maps by split (``MultiToSingleDimensionPartitionMapping`` on
    "split": every shard of its own split, nothing else), an unpartitioned reader names
    whole splits (``SpecificPartitionsPartitionMapping`` over every shard of each)."""
    p_name, c_name = parent.to_user_string(), child.to_user_string()
    mapping = asset_graph.get_partition_mapping(child, parent)
    c_def = asset_graph.get(child).partitions_def
    pinned = isinstance(mapping, dg.MultiToSingleDimensionPartitionMapping) and \
        mapping.partition_dimension_name == "split"
    problems = []
    if not (pinned or (c_def is None and isinstance(
            mapping, dg.SpecificPartitionsPartitionMapping))):
        problems.append(
            f"asset {c_name!r} reads {p_name!r} through {type(mapping).__name__}, which does "
            "not pin the split dimension of a split x shard asset: use "
            "defs.partitions.BY_SPLIT (partitioned) or shards_of(<split mapping>) "
            "(unpartitioned)")
    p_keys = list(asset_graph.get(parent).partitions_def.get_partition_keys())
    for own in _own_keys(asset_graph.get(child)):
        result = asset_graph.get_parent_partition_keys_for_child(own, parent, child)
        reads = set(result.partitions_subset.get_partition_keys())
        where = f"asset {_label(c_name, own)!r}"
        if own is not None and {split_of(k) for k in reads} - {split_of(own)}:
            problems.append(f"{where} reads {p_name} partitions of another split "
                            f"{sorted(reads)}: a split x shard mapping must keep the split")
        for split in sorted({split_of(k) for k in reads}):
            missing = sorted(k for k in p_keys if split_of(k) == split and k not in reads)
            if missing:
                problems.append(f"{where} reads only some shards of {p_name}[{split}] (not "
                                f"{missing}): a reader must read every shard of a split")
    return problems


def audit_shard_mappings(asset_graph) -> list[str]:
    """Every edge into or out of a split x shard asset (``embeddings``) keeps the split
    and reads whole splits, so the split audit above, which counts a shard as its
    split, is exact for them too (``_shard_edge_problems``)."""
    problems: list[str] = []
    for key in asset_graph.toposorted_asset_keys:
        for parent in sorted(asset_graph.get(key).parent_keys, key=lambda k: k.to_user_string()):
            p_def, c_def = asset_graph.get(parent).partitions_def, asset_graph.get(key).partitions_def
            if shard_count(p_def) is None and shard_count(c_def) is None:
                continue
            if p_def is None:  # an unpartitioned parent of a shard (none today) reads no split
                continue
            problems += _shard_edge_problems(asset_graph, parent, key)
    return problems
