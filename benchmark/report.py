"""Reporting: the store as tables, ``results.csv`` (one row per cell, its clean reference beside it)
and ``perturbations.csv`` (one row per protected set: size, visibility, certificate)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from benchmark.plan import reference_key
from benchmark.plugins import Certificate
from benchmark.store import Store

RESULT_COLUMNS = ["dataset", "defense", "attack", "backbone", "seed", "status", "accuracy", "clean_accuracy",
                  "train_accuracy", "seconds", "defense_seconds", "error", "preset", "key"]


def results_frame(store: Store, keys: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per cell with the clean reference (same dataset, attack, backbone, seed) beside it."""
    df = store.frame()
    if keys is not None:
        df = df[df["key"].isin(set(keys))]
    if df.empty:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    # the reference is the clean cell with the very same data, attack config, backbone, seed and zoo
    df = df.assign(ref_key=[reference_key(c) for c in df["config"]])
    ok_clean = df[(df["defense"] == "clean") & (df["status"] == "ok")]
    ref = ok_clean.drop_duplicates("ref_key", keep="last").set_index("ref_key")["accuracy"]
    df = df.assign(clean_accuracy=ref.reindex(df["ref_key"]).to_numpy())
    return df[RESULT_COLUMNS].sort_values(["dataset", "seed", "defense", "attack", "backbone"]).reset_index(drop=True)


def certificate_columns(cert: dict[str, Any] | None) -> dict[str, str | None]:
    """``certificate`` (passed | failed | none) and ``certificate_checks`` (``name=value<=threshold; ...``)."""
    if not cert:
        return {"certificate": "none", "certificate_checks": None}
    c = Certificate.from_dict(cert)
    return {"certificate": "passed" if c.passed else "failed", "certificate_checks": c.compact()}


def perturbations_frame(store: Store, keys: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per protected set (data set, defense, seed): its measured size, visibility and certificate.

    L-inf in /255 units, L2 in [0, 1] pixel units (mean over images), L0 in changed pixel positions,
    PSNR in dB, SSIM in [0, 1], the seconds the defense took to generate it, and the verdict of its
    certificate (passed | failed | none) with the measured checks.
    """
    df = store.frame()
    if keys is not None:
        df = df[df["key"].isin(set(keys))]
    rows = []
    for rec in df[df["status"] == "ok"].itertuples():
        pert = (rec.metrics or {}).get("perturbation") or {}
        rows.append({"dataset": rec.dataset, "defense": rec.defense, "seed": rec.seed,
                     **{c: pert.get(src) for c, src in PERTURBATION_FIELDS.items()},
                     **certificate_columns(pert.get("certificate"))})
    out = pd.DataFrame(rows, columns=["dataset", "defense", "seed", *PERTURBATION_FIELDS, *CERTIFICATE_COLUMNS])
    # every cell of a protected set carries the same numbers; keep the most complete row
    out = out.assign(_n=out.notna().sum(axis=1)).sort_values("_n", kind="stable")
    out = out.drop_duplicates(["dataset", "defense", "seed"], keep="last").drop(columns="_n")
    return out.sort_values(["dataset", "seed", "defense"]).reset_index(drop=True)


PERTURBATION_FIELDS = {"linf_255": "linf", "l2_mean": "l2_mean", "l0_mean": "l0_mean", "psnr_db": "psnr",
                       "ssim": "ssim", "generation_seconds": "seconds"}
CERTIFICATE_COLUMNS = ("certificate", "certificate_checks")


def write_csv(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Write atomically (a killed run never leaves half a file); the temporary file is this writer's
    own, so runners sharing a results directory never write into each other's."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        df.to_csv(tmp, index=False, float_format="%.4f")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return df


def write_results_csv(store: Store, path: Path) -> pd.DataFrame:
    return write_csv(results_frame(store), path)


def write_reports(store: Store, out_dir: Path) -> None:
    """``results.csv`` and ``perturbations.csv`` of every cell in the store, into ``out_dir``."""
    write_results_csv(store, out_dir / "results.csv")
    write_csv(perturbations_frame(store), out_dir / "perturbations.csv")
