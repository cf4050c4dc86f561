"""Import other people's preference data as capdpo pairs (`05_pairs.jsonl`), for stage 6 and the exports.

    python -m capdpo import --format rlaifv --input RLAIF-V-Dataset/ --run_dir runs/rlaifv
    python -m capdpo import --format mmrlhf --input MM-RLHF/dpo_pairs.jsonl --run_dir runs/mmrlhf
    python -m capdpo import --format unidpo --input uni_dpo_50k.json --image_root MM-RLHF --run_dir runs/u
    python -m capdpo import --format llamafactory --input data/x.json --dataset_info data/dataset_info.json \\
        --run_dir runs/lf
    python -m capdpo import --format trl --input trl_train.jsonl --run_dir runs/trl
    python 6_train_dpo.py --run_dir runs/rlaifv --strong_model Qwen/Qwen2.5-VL-7B-Instruct

Formats:

Formats (`capdpo.formats.registry.FORMATS`; each module's docstring has the columns): `rlaifv` (RLAIF-V /
topic-overwrite parquet, a file or a folder of shards; embedded images are written once to
`<run_dir>/images/<sha256[:20]>.<ext>`), `mmrlhf` (MM-RLHF `dpo_pairs.jsonl`), and the formats capdpo exports:
`unidpo` (alpaca with scores), `llamafactory` (sharegpt ranking data; columns and tags from `--dataset_info`),
`trl`. Rows capdpo exported come back exactly.

A row that cannot become a pair (no image, an image that is not there or not an image, an empty question,
chosen or rejected, chosen equal to rejected, a duplicate, a malformed row) is skipped and listed in
`05_pairs.errors.jsonl` with its file, row number and reason; a required column that no row has is a one-line
error. Beside the pairs the run directory gets `05_pairs.meta.json`, `.config.yaml`, `.stats.json` and `.done`,
as stage 5 writes them; an existing `05_pairs.jsonl` is only replaced with `--overwrite true`, and only once the
whole input has been read.

Splits (`--split`): `train` or `val` put every pair there; `auto` (default) keeps the split of rows capdpo
exported and sends a seeded `--val_fraction` of the other images (never single pairs) to `val`, as stage 5 does.

Reference log-probs found in the input are kept for analysis only: they come from the dataset authors' own
reference model, chat template and tokenization, so stage 6 computes its own (cached in `06_train/ref_logps/`).
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from capdpo.cli import run_cli
from capdpo.config import LoadedConfig
from capdpo.errors import ConfigError, InputError
from capdpo.formats.config import InteropConfig
from capdpo.formats.registry import FORMATS, write_exports
from capdpo.formats.rows import ImportContext
from capdpo.jsonl import write_jsonl
from capdpo.records import PairRecord
from capdpo.run import Stage
from capdpo.sections import load_config
from capdpo.splits import split_of

IMAGES_DIR = "images"


def check_pair(pair: PairRecord) -> str:
    """Why a parsed pair cannot be trained on ('' when it can)."""
    if not Path(pair.image).is_file():
        return f"image not found: {pair.image}"
    if not pair.prompt.strip():
        return "empty prompt"
    if not pair.chosen.strip():
        return "empty chosen"
    if not pair.rejected.strip():
        return "empty rejected"
    if pair.chosen.strip() == pair.rejected.strip():
        return "chosen and rejected are the same text"
    return ""


def import_pairs(cfg: LoadedConfig) -> dict[str, Any]:
    """Read the input, write `05_pairs.jsonl` and its stage files into run_dir; return the stats.

    Raises:
        ConfigError: an existing 05_pairs.jsonl without --overwrite.
        InputError: a missing input or required column; no usable row at all.
    """
    sec: InteropConfig = cfg.section
    run_dir = Path(cfg.common.run_dir)
    output = run_dir / "05_pairs.jsonl"
    if output.exists() and not sec.overwrite:
        raise ConfigError(
            f"{output}: exists; pass --overwrite true to replace it (its stage files too), or use another run_dir"
        )
    path = Path(sec.input)
    if not path.exists():
        raise InputError(f"--input: {path} not found")
    root = sec.image_root or str((path if path.is_dir() else path.parent).resolve())
    if sec.image_root and not Path(sec.image_root).is_dir():
        raise InputError(f"--image_root: {sec.image_root} is not a folder")
    stage = Stage("pairs", cfg)
    stage.claim()  # no stage 5 or second import writes these files at the same time
    ctx = ImportContext(
        path=path,
        image_root=root,
        images_dir=run_dir / IMAGES_DIR,
        dataset_info=sec.dataset_info or None,
        max_rows=sec.max_rows,
        allowed_roots=tuple(sec.allowed_roots),
    )
    pairs: list[PairRecord] = []
    first_row: dict[str, tuple[str, int]] = {}
    reasons: Counter[str] = Counter()
    rows = 0
    for parsed in FORMATS[sec.format].rows(ctx, sec.format):
        rows += 1
        reason = parsed.reason or (check_pair(parsed.pair) if parsed.pair else "no pair")
        if not reason and parsed.pair.id in first_row:
            reason = "duplicate of {} row {}".format(*first_row[parsed.pair.id])
        if reason:
            stage.skip(reason, file=parsed.source, row=parsed.row)
            reasons[_reason_kind(reason)] += 1
            continue
        pair = parsed.pair
        first_row[pair.id] = (parsed.source, parsed.row)
        if sec.split in ("train", "val"):
            pair.split = sec.split
        elif not parsed.own_split:
            pair.split = split_of(pair.image_id, cfg.common.seed, sec.val_fraction)
        pairs.append(pair)
    if not pairs:
        write_jsonl(stage.errors_path, stage.errors)  # every row's reason, for the user to read
        where = f" (first: {stage.errors[0]['reason']})" if stage.errors else ""
        raise InputError(
            f"{path}: none of its {rows} row(s) gave a usable pair{where}; no pair was written (every reason: {stage.errors_path})"
        )

    # Everything is read and checked: only now is the previous output (with --overwrite) replaced.
    stage.done_path.unlink(missing_ok=True)
    stage.write_meta()
    write_jsonl(output, (p.to_dict() for p in pairs))
    exported: dict[str, list[str]] = {}
    if sec.exports:
        export_dir = run_dir / "05_exports"
        shutil.rmtree(export_dir, ignore_errors=True)
        exported = write_exports(pairs, export_dir, sec.exports, sec.dataset_name)
    n_val = sum(p.split == "val" for p in pairs)
    stats = {
        "format": sec.format,
        "input": str(path),
        "rows": rows,
        "pairs": len(pairs),
        "train": len(pairs) - n_val,
        "val": n_val,
        "images": len({p.image_id for p in pairs}),
        "skipped_by_reason": dict(reasons),
        "scores_given": sum(bool(p.meta.get("scores_given", True)) for p in pairs),
        **dict(ctx.counts),
        "exports": exported,
    }
    summary = (
        f"Imported {len(pairs)} pairs ({len(pairs) - n_val} train / {n_val} val, {stats['images']} images) from "
        f"{rows} {sec.format} rows of {path}."
    )
    return stage.finish(stats, summary)


def _reason_kind(reason: str) -> str:
    """A reason without its row-specific details, for counting."""
    for marker in (": ", " of "):
        if marker in reason and not reason.startswith("'"):
            return reason.split(marker, 1)[0]
    return reason


def main(argv: list[str] | None = None) -> None:
    """`python -m capdpo import --format F --input PATH --run_dir DIR [...]`."""
    run_cli(lambda args: import_pairs(load_config("interop", args, description=__doc__.split("\n\n")[0])), argv)
