"""Promote an artifact only after its blocking checks pass, and report it to Dagster.

Assets write to a staged path next to the artifact, run their checks on what was
written, then either rename it into place or set it aside as ``*.rejected``. A failed
blocking check therefore stops downstream assets in this run *and* leaves the last
good artifact in place for every later run, `roadwork predict` included. The bundle is
promoted the same way, except that what moves is ``LATEST``: its folder is already
published under its content id.

``materialize_result`` is the one tail every asset ends with: drain the split reads
into their check, promote or reject, and return one ``MaterializeResult`` carrying the
path (for the IO manager), the metadata, every check result, the settings it ran with
and, as Dagster's data version, the artifact's content hash.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import dagster as dg

from roadwork_assets.core.artifacts import (
    file_sha256,
    promote,
    reject,
    settings_sha256,
    staged_path,
)
from roadwork_assets.core.export.bundle import set_latest
from roadwork_assets.defs.metadata import path_meta
from roadwork_assets.defs.split_reads import split_reads_result


class Promotable(Protocol):
    def promote(self) -> Path:
        """Put the checked artifact in place; return the asset's path."""

    def reject(self, context: dg.AssetExecutionContext, failed: list[str]) -> Path:
        """Leave the last good artifact in place; return where the rejected one is."""

    def metadata(self, path: Path, promoted: bool) -> dict[str, dg.MetadataValue]:
        """What the UI shows about the artifact at ``path``."""


@dataclass(frozen=True)
class StagedFiles:
    """Files written at ``staged_path(dest)``, promoted together; the first is the asset's."""

    pairs: tuple[tuple[Path, Path], ...]  # (staged, dest)

    @classmethod
    def at(cls, *dests: Path) -> StagedFiles:
        return cls(tuple((staged_path(dest), Path(dest)) for dest in dests))

    def promote(self) -> Path:
        for src, dst in self.pairs:
            promote(src, dst)
        return self.pairs[0][1]

    def reject(self, context: dg.AssetExecutionContext, failed: list[str]) -> Path:
        rejected = [reject(src, dst) for src, dst in self.pairs]
        context.log.error(
            f"blocking check(s) {failed} failed: kept the previous artifact at "
            f"{self.pairs[0][1]}, wrote the rejected one to {rejected[0]}"
        )
        return rejected[0]

    def metadata(self, path: Path, promoted: bool) -> dict[str, dg.MetadataValue]:
        return {**path_meta(path),
                **({} if promoted else {"rejected_path": dg.MetadataValue.path(str(path))})}


@dataclass(frozen=True)
class LatestBundle:
    """A bundle published under its content id; promoting it switches ``LATEST`` to it,
    so serving only ever moves to a bundle that passed its checks."""

    pointer: Path
    bundle_id: str
    directory: Path

    def promote(self) -> Path:
        set_latest(self.pointer, self.bundle_id)
        return self.pointer

    def reject(self, context: dg.AssetExecutionContext, failed: list[str]) -> Path:
        context.log.error(f"bundle {self.directory} failed a blocking check; LATEST unchanged")
        return self.directory

    def metadata(self, path: Path, promoted: bool) -> dict[str, dg.MetadataValue]:
        return {}  # the bundle asset lists its files and hashes itself


def publish(
    context: dg.AssetExecutionContext,
    artifact: Promotable,
    checks: Sequence[dg.AssetCheckResult],
) -> tuple[Path, dict[str, dg.MetadataValue]]:
    """Promote ``artifact`` if all checks passed, else set it aside.

    Returns the path the asset should report and metadata saying what happened.
    """
    failed = [c.check_name for c in checks if not c.passed]
    promoted = not failed
    path = artifact.promote() if promoted else artifact.reject(context, failed)
    return path, {**artifact.metadata(path, promoted),
                  "promoted": dg.MetadataValue.bool(promoted)}


def materialize_result(
    context: dg.AssetExecutionContext,
    artifact: Promotable,
    *,
    data_version: str | None,
    metadata: Mapping[str, Any],
    checks: Sequence[dg.AssetCheckResult] = (),
    reads: tuple[dict[str, object], dg.AssetCheckResult] | None = None,
) -> dg.MaterializeResult:
    """The end of every asset: its split-read check first, then ``checks``; promotion
    if all pass; one result with the path as value (the IO manager checks it), the
    asset's metadata plus path, reads and promotion metadata, ``data_version`` (the
    lineage version the artifact records) and the settings fingerprint; Dagster's data
    version is the artifact's content (``content_version``). ``reads``: the step's
    ``split_reads_result``, when the asset needed its verdict earlier (it drains the
    step's ledger, so it can be taken once)."""
    reads_meta, reads_check = reads if reads is not None else split_reads_result(context)
    all_checks = [reads_check, *checks]
    path, promo = publish(context, artifact, all_checks)
    lineage = {"data_version": data_version} if data_version else {}
    return dg.MaterializeResult(
        value=path,
        metadata={**lineage, **metadata, **reads_meta, **promo,
                  SETTINGS_KEY: dg.MetadataValue.json(settings_fingerprint(context))},
        check_results=all_checks,
        data_version=dg.DataVersion(content_version(artifact, path, promo)),
    )


SETTINGS_KEY = "settings_sha256"
SETTINGS_GROUPS = ("dataset", "trainer", "exit_policy")


def settings_fingerprint(context: dg.AssetExecutionContext) -> dict[str, str]:
    """{group: sha256} of the settings groups this asset ran with (hashed as the `roadwork
    run` header prints them): `roadwork run` rebuilds an asset whose settings changed,
    which neither its code version nor its inputs' data versions would show."""
    out = {}
    for name in SETTINGS_GROUPS:
        resource = getattr(context.resources, name, None)
        if isinstance(resource, dg.ConfigurableResource):
            out[name] = settings_sha256({k: getattr(resource, k)
                                         for k in type(resource).model_fields})
    return out


def content_version(artifact: Promotable, path: Path, promo: Mapping[str, Any]) -> str:
    """Dagster's data version: what the artifact holds (its sha256; a bundle's content
    id), so a downstream asset is stale exactly when an input it read has new content.
    The lineage ``data_version`` the artifact records (which data went in) stays in the
    metadata: a new setting gives new content from the same data."""
    if isinstance(artifact, LatestBundle):
        return artifact.bundle_id
    sha = promo.get("sha256")
    return sha.value if isinstance(sha, dg.TextMetadataValue) else file_sha256(path)
