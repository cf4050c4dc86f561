"""Stage 1 (prepare images): sources, record fields, bad files, sampling, dedupe, exclusion, crash and rerun."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from capdpo.errors import InputError
from capdpo.jsonl import read_jsonl
from capdpo.sections import load_config
from capdpo.stages.prepare_images import WRITE_BATCH, run
from tests.helpers import kill_when, run_script

SCRIPT = "1_prepare_images.py"


# ---- helpers ------------------------------------------------------------------------------------------------
def write_config(tmp_path: Path, run_dir: Path, name: str = "run.yaml", seed: int = 0, **images: Any) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"run_dir": str(run_dir), "seed": seed, "images": images}), encoding="utf-8")
    return path


def run_stage(config: Path, *flags: str) -> dict[str, Any]:
    return run(load_config("images", ["--config", str(config), *flags]))


def records_of(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / "01_images.jsonl")


def errors_of(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / "01_images.errors.jsonl")


def make_image(
    path: Path, size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (200, 30, 30), **save: Any
):
    """A small distinct image: a coloured rectangle whose position depends on the colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (245, 245, 245))
    x = colour[0] % max(1, size[0] // 2)
    image.paste(colour, (x, 4, x + size[0] // 3, size[1] - 4))
    image.save(path, **save)
    return path


def make_images(folder: Path, count: int, start: int = 0, suffix: str = ".png") -> list[Path]:
    return [
        make_image(folder / f"im{i:03d}{suffix}", colour=(i * 7 % 256, i * 13 % 256, (i * 29 + 1) % 256))
        for i in range(start, start + count)
    ]


def png_variants(count: int, side: int) -> list[bytes]:
    """Distinct PNG files with the same pixels (a unique tEXt chunk each): cheap to make, costly to decode."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (90, 140, 200)).save(buffer, "PNG", compress_level=1)
    data = buffer.getvalue()
    iend = data.rfind(b"IEND") - 4
    variants = []
    for i in range(count):
        body = b"tEXt" + b"Comment\x00" + f"variant {i}".encode()
        chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
        variants.append(data[:iend] + chunk + data[iend:])
    return variants


def one_line_error(stderr: str) -> str:
    """The error line of a failed run; asserts it is the only non-progress output."""
    lines = [line for line in stderr.strip().splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# ---- folder source: record fields --------------------------------------------------------------------------
def test_folder_records_mean_what_they_say(tmp_path: Path, sample_images: list[Path]) -> None:
    folder = tmp_path / "photos"
    shutil.copytree(sample_images[0].parent, folder)
    make_image(folder / "nested" / "deeper" / "UPPER.JPG", size=(90, 70), colour=(10, 120, 250))
    (folder / "notes.txt").write_text("not an image and not an image extension")
    (folder / ".hidden.png").write_bytes(b"")  # hidden files are not candidates
    run_dir = tmp_path / "run"
    stats = run_stage(write_config(tmp_path, run_dir, path=str(folder)))

    records = records_of(run_dir)
    expected = sorted([*(folder / p.name for p in sample_images), folder / "nested" / "deeper" / "UPPER.JPG"])
    assert sorted(Path(r["path"]) for r in records) == expected
    assert len({r["id"] for r in records}) == len(records) == 7
    for record in records:
        data = Path(record["path"]).read_bytes()
        assert Path(record["path"]).is_absolute()
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["id"] == record["sha256"][:20]
        with Image.open(record["path"]) as image:
            assert (record["width"], record["height"]) == image.size
        assert record["source"] == "folder"
        assert record["source_id"] is None and record["objects"] == [] and record["captions"] == []
    assert errors_of(run_dir) == []
    assert stats["images"] == 7 and stats["candidates"] == 7 and stats["duplicates"] == 0
    for name in ("01_images.meta.json", "01_images.stats.json", "01_images.done", "01_images.config.yaml"):
        assert (run_dir / name).is_file()
    meta = json.loads((run_dir / "01_images.meta.json").read_text())
    assert meta["config"]["images"]["path"] == str(folder)


def test_exif_orientation_swaps_width_and_height(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    rotated, upright = Image.Exif(), Image.Exif()
    rotated[0x0112], upright[0x0112] = 6, 1
    make_image(folder / "rotated.jpg", size=(120, 60), colour=(1, 2, 3), exif=rotated.tobytes())
    make_image(folder / "upright.jpg", size=(120, 60), colour=(40, 50, 60), exif=upright.tobytes())
    run_dir = tmp_path / "run"
    run_stage(write_config(tmp_path, run_dir, path=str(folder)))
    sizes = {Path(r["path"]).name: (r["width"], r["height"]) for r in records_of(run_dir)}
    assert sizes == {"rotated.jpg": (60, 120), "upright.jpg": (120, 60)}


def test_unusable_files_are_listed_with_reasons_and_the_rest_is_written(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    good = make_images(folder, 3)
    jpeg = io.BytesIO()
    Image.effect_noise((80, 80), 60).convert("RGB").save(jpeg, "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    png = bytearray(good[0].read_bytes())
    idat = png.find(b"IDAT")
    png[idat + 4 : idat + 6] = b"\x00\x00"  # a broken zlib header inside an otherwise valid PNG
    (folder / "corrupt.png").write_bytes(bytes(png))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is a text file renamed to .jpg\n")
    make_image(folder / "tiny.png", size=(40, 12), colour=(9, 9, 9))
    run_dir = tmp_path / "run"
    stats = run_stage(write_config(tmp_path, run_dir, path=str(folder), min_side=16))

    assert sorted(Path(r["path"]).name for r in records_of(run_dir)) == sorted(p.name for p in good)
    by_name = {Path(e["path"]).name: e for e in errors_of(run_dir)}
    assert {name: e["kind"] for name, e in by_name.items()} == {
        "truncated.jpg": "truncated",
        "corrupt.png": "corrupt",
        "empty.jpg": "empty",
        "notes.jpg": "not_image",
        "tiny.png": "too_small",
    }
    assert "truncated" in by_name["truncated.jpg"]["reason"]
    assert "0 bytes" in by_name["empty.jpg"]["reason"]
    assert "not an image" in by_name["notes.jpg"]["reason"]
    assert "40x12" in by_name["tiny.png"]["reason"] and "min_side" in by_name["tiny.png"]["reason"]
    assert all(Path(e["path"]).is_absolute() for e in by_name.values())
    assert stats["skipped"] == 5 and stats["unusable_by_kind"]["truncated"] == 1
    assert (run_dir / "01_images.done").exists()


# ---- bad input through the command line ---------------------------------------------------------------------
def test_empty_and_missing_folders_exit_2_naming_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    missing = tmp_path / "no_such_folder"
    for folder in (empty, missing):
        config = write_config(tmp_path, tmp_path / "run", path=str(folder))
        result = run_script(SCRIPT, "--config", str(config))
        assert result.returncode == 2, result.stderr
        assert str(folder) in one_line_error(result.stderr)
    assert not (tmp_path / "run" / "01_images.done").exists()


def test_malformed_yaml_and_unknown_key_exit_2_naming_file_and_key(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("run_dir: runs/x\nimages:\n  path: [unclosed\n  n: 3\n")
    result = run_script(SCRIPT, "--config", str(bad_yaml))
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert str(bad_yaml) in line and "malformed YAML" in line

    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "images": {"path": "x", "nn": 3}}))
    result = run_script(SCRIPT, "--config", str(typo))
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert "'nn'" in line and str(typo) in line and "did you mean 'n'" in line


# ---- COCO ------------------------------------------------------------------------------------------------------
def coco_fixture(tmp_path: Path) -> tuple[Path, Path, Path]:
    images = tmp_path / "val2017"
    make_image(images / "000000000139.jpg", colour=(10, 20, 30))
    make_image(images / "000000000285.jpg", colour=(40, 50, 60))
    make_image(images / "000000000632.jpg", colour=(70, 80, 90))  # on disk, in no annotation file
    categories = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 62, "name": "chair"}]
    listed = [
        {"id": 139, "file_name": "000000000139.jpg", "width": 64, "height": 48},
        {"id": 285, "file_name": "000000000285.jpg", "width": 64, "height": 48},
        {"id": 724, "file_name": "000000000724.jpg", "width": 64, "height": 48},  # annotated, not on disk
    ]
    instances = tmp_path / "instances_val2017.json"
    instances.write_text(
        json.dumps(
            {
                "images": listed,
                "categories": categories,
                "annotations": [
                    {"id": 1, "image_id": 139, "category_id": 62},
                    {"id": 2, "image_id": 139, "category_id": 1},
                    {"id": 3, "image_id": 139, "category_id": 62},
                    {"id": 4, "image_id": 724, "category_id": 18},
                ],
            }
        )
    )
    captions = tmp_path / "captions_val2017.json"
    captions.write_text(
        json.dumps(
            {
                "images": listed,
                "annotations": [
                    {"id": 12, "image_id": 285, "caption": "A dog on a sofa. "},
                    {"id": 11, "image_id": 285, "caption": "A brown dog lies down."},
                    {"id": 13, "image_id": 139, "caption": "A man sits on a chair."},
                ],
            }
        )
    )
    return images, instances, captions


def test_coco_source_keeps_ids_objects_and_captions(tmp_path: Path) -> None:
    images, instances, captions = coco_fixture(tmp_path)
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path, run_dir, source="coco", path=str(images), coco_instances=str(instances), coco_captions=str(captions)
    )
    stats = run_stage(config)
    by_name = {Path(r["path"]).name: r for r in records_of(run_dir)}
    assert set(by_name) == {"000000000139.jpg", "000000000285.jpg", "000000000632.jpg"}
    assert by_name["000000000139.jpg"]["source_id"] == "139"
    assert by_name["000000000139.jpg"]["objects"] == ["chair", "person"]
    assert by_name["000000000139.jpg"]["captions"] == ["A man sits on a chair."]
    assert by_name["000000000285.jpg"]["objects"] == []  # annotated image with no instances
    assert by_name["000000000285.jpg"]["captions"] == ["A brown dog lies down.", "A dog on a sofa."]
    unannotated = by_name["000000000632.jpg"]
    assert unannotated["source_id"] is None and unannotated["objects"] == [] and unannotated["captions"] == []
    assert all(r["source"] == "coco" for r in by_name.values())
    assert stats["coco_annotated_missing_on_disk"] == 1 and stats["coco_unannotated_on_disk"] == 1


def test_malformed_coco_json_is_an_input_error_naming_the_file(tmp_path: Path) -> None:
    images, instances, _ = coco_fixture(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [1, 2,\n')
    config = write_config(tmp_path, tmp_path / "run", source="coco", path=str(images), coco_instances=str(broken))
    with pytest.raises(InputError, match="broken.json:2: not valid JSON"):
        run_stage(config)

    no_categories = tmp_path / "no_categories.json"
    no_categories.write_text(json.dumps({"images": [], "annotations": []}))
    config = write_config(
        tmp_path, tmp_path / "run", source="coco", path=str(images), coco_instances=str(no_categories)
    )
    with pytest.raises(InputError, match=r"no_categories.json: not a COCO annotation file .*'categories'"):
        run_stage(config)

    unknown_category = json.loads(instances.read_text())
    unknown_category["annotations"].append({"id": 9, "image_id": 139, "category_id": 999})
    instances.write_text(json.dumps(unknown_category))
    config = write_config(tmp_path, tmp_path / "run", source="coco", path=str(images), coco_instances=str(instances))
    with pytest.raises(InputError, match=r"instances_val2017.json: annotations\[4\] names unknown category_id 999"):
        run_stage(config)


# ---- HF sources ------------------------------------------------------------------------------------------------
def test_hf_saved_dataset_images_are_written_under_the_run_dir(tmp_path: Path, sample_images: list[Path]) -> None:
    import datasets

    paths = [str(p) for p in sample_images]
    dataset = datasets.Dataset.from_dict({"image": paths, "uid": [f"row-{i}" for i in range(len(paths))]})
    dataset.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    run_dir = tmp_path / "run"
    run_stage(write_config(tmp_path, run_dir, source="hf", path=str(tmp_path / "saved"), hf_id_column="uid"))

    records = records_of(run_dir)
    assert len(records) == len(sample_images)
    originals = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in sample_images}
    for record in records:
        written = Path(record["path"])
        original = originals[record["sha256"]]
        assert written == (run_dir / "images" / f"{record['id']}{original.suffix}").absolute()
        assert written.read_bytes() == original.read_bytes()  # bytes kept unchanged
        assert record["source_id"] == f"row-{sample_images.index(original)}"
        with Image.open(original) as image:
            assert (record["width"], record["height"]) == image.size
        assert record["source"] == "hf"
    assert not list((run_dir / "images").glob("*.tmp"))


def test_hf_parquet_folder_with_raw_bytes_and_sampling(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = make_images(tmp_path / "src", 9)
    blobs = [p.read_bytes() for p in images]
    blobs[4] = b"definitely not an image"
    blobs[7] = b""
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    for part, rows in enumerate((range(0, 5), range(5, 9))):
        table = pa.table({"img": [blobs[i] for i in rows], "key": [1000 + i for i in rows]})
        pq.write_table(table, parquet / f"part-{part}.parquet", row_group_size=2)
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path, run_dir, seed=5, source="hf", path=str(parquet), hf_image_column="img", hf_id_column="key", n=7
    )
    stats = run_stage(config)
    records = records_of(run_dir)
    # 9 rows, two unusable: n=7 needs every usable row, so each unusable one met on the way was replaced
    assert sorted(int(r["source_id"]) - 1000 for r in records) == [0, 1, 2, 3, 5, 6, 8]
    for record in records:
        row = int(record["source_id"]) - 1000
        assert record["sha256"] == hashlib.sha256(blobs[row]).hexdigest()
        assert Path(record["path"]).read_bytes() == blobs[row]
    errors = {(e["source_id"], e["row"], e["kind"]) for e in errors_of(run_dir)}
    assert errors and errors <= {("1004", 4, "not_image"), ("1007", 7, "empty")}
    assert stats["examined"] == 7 + len(errors) and stats["skipped"] == len(errors)


def test_hf_missing_column_or_several_splits_are_input_errors(tmp_path: Path, sample_images: list[Path]) -> None:
    import datasets

    datasets.Dataset.from_dict({"picture": [str(p) for p in sample_images]}).save_to_disk(str(tmp_path / "saved"))
    config = write_config(tmp_path, tmp_path / "run", source="hf", path=str(tmp_path / "saved"))
    with pytest.raises(InputError, match="no column 'image' .*hf_image_column.*picture"):
        run_stage(config)

    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"image": [b"x"]}), "test": datasets.Dataset.from_dict({"image": [b"y"]})}
    )
    splits.save_to_disk(str(tmp_path / "splits"))
    config = write_config(tmp_path, tmp_path / "run", source="hf", path=str(tmp_path / "splits"))
    with pytest.raises(InputError, match="holds the splits train, test; point images.path at one of them"):
        run_stage(config)


# ---- exclusion -----------------------------------------------------------------------------------------------
def test_exclusion_by_name_id_hash_copied_content_and_amber_queries(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    images = make_images(folder, 8, suffix=".jpg")
    make_image(folder / "000000000001.jpg", colour=(77, 77, 77))  # must survive AMBER's query id 1
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in images}
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    copied = shutil.copy(images[3], eval_dir / "AMBER_77.jpg")  # same bytes, another name
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "names.txt").write_text("# evaluation images\nim000.jpg\n\n  im001  \n")
    (lists / "ids.txt").write_text(f"{sha['im002.jpg'][:20]}\n{sha['im004.jpg'].upper()}\n")
    (lists / "copies.txt").write_text(f"{copied}\n")
    (lists / "query_all.json").write_text(
        json.dumps([{"id": 1, "image": "im005.jpg", "query": "Describe this image."}, {"id": 2, "image": "x.jpg"}])
    )
    run_dir = tmp_path / "run"
    exclude = [str(lists / n) for n in ("names.txt", "ids.txt", "copies.txt", "query_all.json")]
    stats = run_stage(write_config(tmp_path, run_dir, path=str(folder), exclude=exclude))

    kept = sorted(Path(r["path"]).name for r in records_of(run_dir))
    assert kept == ["000000000001.jpg", "im006.jpg", "im007.jpg"]
    assert stats["excluded"] == 6
    assert stats["excluded_by"] == {"name": 3, "id": 1, "sha256": 1, "content": 1}


def test_exclusion_by_another_runs_output_and_by_a_folder_of_images(tmp_path: Path) -> None:
    eval_images = make_images(tmp_path / "eval", 3)
    train = tmp_path / "train"
    make_images(train, 4, start=10)
    for path in eval_images:  # the evaluation images leaked into the training folder under other names
        shutil.copy(path, train / f"leaked_{path.name}")
    eval_run = tmp_path / "eval_run"
    run_stage(write_config(tmp_path, eval_run, name="eval.yaml", path=str(tmp_path / "eval")))

    for exclude in (str(eval_run / "01_images.jsonl"), str(tmp_path / "eval")):
        run_dir = tmp_path / f"run_{Path(exclude).name}"
        stats = run_stage(write_config(tmp_path, run_dir, path=str(train), exclude=[exclude]))
        assert sorted(Path(r["path"]).name for r in records_of(run_dir)) == [f"im{i:03d}.png" for i in range(10, 14)]
        assert stats["excluded"] == 3


def test_exclusion_by_coco_id_and_missing_exclusion_file(tmp_path: Path) -> None:
    images, instances, _ = coco_fixture(tmp_path)
    ids = tmp_path / "eval_ids.json"
    ids.write_text(json.dumps([139, 632]))
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path, run_dir, source="coco", path=str(images), coco_instances=str(instances), exclude=[str(ids)]
    )
    stats = run_stage(config)
    assert [r["source_id"] for r in records_of(run_dir)] == ["285"]
    assert stats["excluded_by"] == {"source_id": 1, "coco_id": 1}  # 632 has no annotation: matched by file name

    missing = tmp_path / "nope.txt"
    config = write_config(tmp_path, tmp_path / "run2", path=str(images), exclude=[str(missing)])
    result = run_script(SCRIPT, "--config", str(config))
    assert result.returncode == 2
    assert str(missing) in one_line_error(result.stderr)


# ---- sampling and dedupe -----------------------------------------------------------------------------------------
def test_seeded_sampling_is_deterministic_and_independent_of_listing_order(tmp_path: Path) -> None:
    forward, backward = tmp_path / "a", tmp_path / "b"
    make_images(forward, 20)
    backward.mkdir()
    for path in sorted(forward.iterdir(), reverse=True):  # same files, created in the opposite order
        shutil.copy(path, backward / path.name)

    def names(folder: Path, run: str, n: int, seed: int) -> list[str]:
        run_stage(write_config(tmp_path, tmp_path / run, path=str(folder), n=n, seed=seed))
        return [Path(r["path"]).name for r in records_of(tmp_path / run)]

    first = names(forward, "r1", 5, 3)
    assert len(first) == 5 and len(set(first)) == 5
    assert names(backward, "r2", 5, 3) == first
    assert names(forward, "r3", 5, 4) != first
    assert names(forward, "r4", 10, 3)[:5] == first  # a larger n extends the same sample
    assert sorted(names(forward, "r5", 0, 3)) == sorted(p.name for p in forward.iterdir())


def test_sample_does_not_depend_on_the_file_system_listing_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import capdpo.stages.prepare_images as stage

    folder = tmp_path / "photos"
    make_images(folder / "x", 6)
    make_images(folder / "y", 6, start=6)
    run_stage(write_config(tmp_path, tmp_path / "plain", path=str(folder), n=7, seed=2))
    real_walk = stage.os.walk

    def reversed_walk(top: Any, **kwargs: Any) -> Any:
        for dirpath, dirnames, filenames in real_walk(top, **kwargs):
            dirnames.reverse()
            yield dirpath, dirnames, filenames[::-1]

    monkeypatch.setattr(stage.os, "walk", reversed_walk)
    run_stage(write_config(tmp_path, tmp_path / "reversed", path=str(folder), n=7, seed=2))
    assert records_of(tmp_path / "reversed") == records_of(tmp_path / "plain")


def test_n_is_filled_with_replacements_for_unusable_files(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    good = make_images(folder, 10)
    for i in range(5):
        (folder / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
    for n in (7, 10):
        run_dir = tmp_path / f"run{n}"
        stats = run_stage(write_config(tmp_path, run_dir, path=str(folder), n=n, seed=11))
        names = [Path(r["path"]).name for r in records_of(run_dir)]
        assert len(names) == n and set(names) <= {p.name for p in good}
        assert stats["examined"] == n + len(errors_of(run_dir))
    assert len(errors_of(tmp_path / "run10")) == 5  # every good image was needed, so every bad one was met
    stats = run_stage(write_config(tmp_path, tmp_path / "run12", path=str(folder), n=12, seed=11))
    assert stats["images"] == 10  # asked for more than exist: all usable ones, no error


def test_duplicates_by_content_keep_the_first_in_path_order(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    original = make_image(folder / "b_original.png", colour=(100, 0, 0))
    shutil.copy(original, folder / "c_copy.png")
    (folder / "a").mkdir()
    shutil.copy(original, folder / "a" / "z_copy.png")
    make_images(folder, 2)
    run_dir = tmp_path / "run"
    stats = run_stage(write_config(tmp_path, run_dir, path=str(folder)))
    paths = [Path(r["path"]) for r in records_of(run_dir)]
    assert len(paths) == 3 and len({r["sha256"] for r in records_of(run_dir)}) == 3
    assert folder / "a" / "z_copy.png" in paths  # "a/z_copy.png" sorts before "b_original.png"
    assert stats["duplicates"] == 2
    assert {d["kept"] for d in stats["duplicate_examples"]} == {str(folder / "a" / "z_copy.png")}


# ---- resumability ---------------------------------------------------------------------------------------------
def test_changed_config_on_the_same_run_dir_is_refused_and_nothing_is_lost(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    make_images(folder, 12)
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, run_dir, path=str(folder), n=5, seed=1)
    run_stage(config)
    kept = {
        name: (run_dir / name).read_bytes() for name in ("01_images.jsonl", "01_images.meta.json", "01_images.done")
    }
    for flags in (["--seed", "2"], ["--n", "4"], ["--path", str(tmp_path / "photos2")]):
        if flags[0] == "--path":
            shutil.copytree(folder, tmp_path / "photos2")
        result = run_script(SCRIPT, "--config", str(config), *flags)
        assert result.returncode == 2, flags
        assert str(run_dir / "01_images.jsonl") in one_line_error(result.stderr)
        assert {name: (run_dir / name).read_bytes() for name in kept} == kept  # records, meta and marker intact
    result = run_script(SCRIPT, "--config", str(config))  # the original config still resumes cleanly
    assert result.returncode == 0, result.stderr
    assert (run_dir / "01_images.jsonl").read_bytes() == kept["01_images.jsonl"]
    # A larger n extends the same sample in place.
    run_stage(config, "--n", "8")
    assert records_of(run_dir)[:5] == [json.loads(line) for line in kept["01_images.jsonl"].splitlines()]
    assert len(records_of(run_dir)) == 8


def test_killed_run_resumes_to_the_same_records(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, data in enumerate(png_variants(300, side=768)):
        (folder / f"frame{i:03d}.png").write_bytes(data)
    for i in range(6):
        (folder / f"frame{i:03d}_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    settings = {"path": str(folder), "n": 280, "seed": 7}
    run_stage(write_config(tmp_path, reference, name="reference.yaml", **settings))
    expected = records_of(reference)
    assert len(expected) == 280

    config = write_config(tmp_path, crashed, name="crashed.yaml", **settings)
    output = crashed / "01_images.jsonl"
    lines = kill_when(SCRIPT, ["--config", str(config)], output, min_lines=8 * WRITE_BATCH)
    assert 8 * WRITE_BATCH <= lines < 280
    assert not (crashed / "01_images.done").exists()
    with output.open("ab") as fh:  # as if the kill had landed mid-line
        fh.write(b'{"id": "torn')
    result = run_script(SCRIPT, "--config", str(config))
    assert result.returncode == 0, result.stderr
    got = records_of(crashed)
    assert len({r["id"] for r in got}) == len(got)
    assert got == expected
    assert read_jsonl(crashed / "01_images.errors.jsonl") == read_jsonl(reference / "01_images.errors.jsonl")
    stats = json.loads((crashed / "01_images.stats.json").read_text())
    assert stats["resumed"] == lines and stats["new"] == 280 - lines


# ---- hostile input ------------------------------------------------------------------------------------------
def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels (its data is one compressed empty row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused_from_its_header_and_the_limits_are_configurable(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    good = make_images(folder, 2)
    (folder / "bomb.png").write_bytes(png_claiming(12_000, 12_000))  # 144 M pixels in a few hundred bytes
    (folder / "huge.png").write_bytes(png_claiming(100_000, 100_000))  # 10 G pixels
    run_dir = tmp_path / "run"
    run_stage(write_config(tmp_path, run_dir, path=str(folder)))
    assert sorted(Path(r["path"]).name for r in records_of(run_dir)) == sorted(p.name for p in good)
    by_name = {Path(e["path"]).name: e for e in errors_of(run_dir)}
    assert by_name["bomb.png"]["kind"] == by_name["huge.png"]["kind"] == "too_large"
    assert "144.0 M pixels" in by_name["bomb.png"]["reason"] and "max_image_pixels" in by_name["bomb.png"]["reason"]
    # the limits are the run's: lower ones refuse the ordinary images too, by pixels or by bytes
    for flag, name in (("--max_image_pixels", "run2"), ("--max_image_bytes", "run3")):
        with pytest.raises(InputError, match="no usable images left"):
            run_stage(write_config(tmp_path, tmp_path / name, path=str(folder)), flag, "100")
        assert [e["kind"] for e in errors_of(tmp_path / name)] == ["too_large"] * 4
        reasons = {Path(e["path"]).name: e["reason"] for e in errors_of(tmp_path / name)}
        assert all(flag[2:] in reasons[p.name] for p in good)  # the ordinary images fall to the lowered limit


def test_the_data_report_shows_no_thumbnail_for_an_image_over_the_limits(tmp_path: Path) -> None:
    from capdpo.pairs.report import thumbnail_uri

    (tmp_path / "huge.png").write_bytes(png_claiming(100_000, 100_000))
    assert thumbnail_uri(str(tmp_path / "huge.png")) is None
    assert thumbnail_uri(str(make_image(tmp_path / "ok.png"))) is not None


def test_hf_cells_may_not_name_files_outside_the_dataset_and_huge_cells_are_not_read(
    tmp_path: Path, monkeypatch
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    read: list[int] = []  # the rows of each parquet row group read
    plain_read = pq.ParquetFile.read_row_group

    def recorded(self, i, *args, **kwargs):  # noqa: ANN001, ANN202
        read.append(self.metadata.row_group(i).num_rows)
        return plain_read(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", recorded)

    secret = make_image(tmp_path / "private" / "secret.png", colour=(1, 2, 3))
    inside = make_image(tmp_path / "data" / "inside.png", colour=(4, 5, 6))
    cells = [
        {"bytes": None, "path": "inside.png"},
        {"bytes": None, "path": "../private/secret.png"},
        {"bytes": None, "path": str(secret)},
    ]
    pq.write_table(pa.table({"image": cells}), tmp_path / "data" / "rows.parquet")
    # a separate file whose single row group inflates far beyond the byte limit
    pq.write_table(
        pa.table({"image": [b"\x00" * (3 * 2**20)]}), tmp_path / "data" / "bomb.parquet", compression="zstd"
    )
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, run_dir, source="hf", path=str(tmp_path / "data"))
    run_stage(config, "--max_image_bytes", str(2**20))
    kept = records_of(run_dir)
    assert [r["sha256"] for r in kept] == [hashlib.sha256(inside.read_bytes()).hexdigest()]
    kinds = sorted(e["kind"] for e in errors_of(run_dir))
    assert kinds == ["outside", "outside", "too_large"]
    assert all("leads outside the dataset folder" in e["reason"] for e in errors_of(run_dir) if e["kind"] == "outside")
    assert read == [3], read  # rows.parquet's group of 3 rows was read; bomb.parquet's 1-row group never was


@pytest.mark.parametrize("suffix", [".txt", ".json", ".jsonl"])
def test_a_byte_order_mark_hides_no_entry_of_an_exclusion_list(tmp_path: Path, suffix: str) -> None:
    folder = tmp_path / "photos"
    make_images(folder, 3)
    lists = tmp_path / "lists"
    lists.mkdir()
    body = {
        ".txt": "im000.png\nim001.png\n",
        ".json": json.dumps(["im000.png", "im001.png"]),
        ".jsonl": "".join(json.dumps({"image": n}) + "\n" for n in ("im000.png", "im001.png")),
    }[suffix]
    (lists / f"eval{suffix}").write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    run_dir = tmp_path / "run"
    stats = run_stage(write_config(tmp_path, run_dir, path=str(folder), exclude=[str(lists / f"eval{suffix}")]))
    assert [Path(r["path"]).name for r in records_of(run_dir)] == ["im002.png"]  # the first entry counts too
    assert stats["excluded"] == 2


def test_a_file_name_that_is_not_utf8_is_listed_and_the_run_goes_on(tmp_path: Path) -> None:
    import os

    folder = tmp_path / "photos"
    good = make_images(folder, 2)
    odd = os.path.join(os.fsencode(folder), b"caf\xe9.png")  # Latin-1 bytes: not a valid UTF-8 name
    with open(odd, "wb") as fh:
        fh.write(good[0].read_bytes()[:-1] + b"\x01")
    run_dir = tmp_path / "run"
    for _ in range(2):  # and a rerun does not fail on it either
        result = run_script(SCRIPT, "--config", str(write_config(tmp_path, run_dir, path=str(folder))))
        assert result.returncode == 0, result.stderr
    assert sorted(Path(r["path"]).name for r in records_of(run_dir)) == sorted(p.name for p in good)
    (error,) = errors_of(run_dir)
    assert error["kind"] == "bad_name" and error["path"].endswith("caf\\xe9.png")


def test_upper_case_truncation_messages_are_still_truncation(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image as PILImage

    from capdpo.images import ImageProblem, inspect_image

    def load(self):  # noqa: ANN001
        raise OSError("image file is TRUNCATED (5 bytes not processed)")

    data = make_image(tmp_path / "x.png").read_bytes()
    monkeypatch.setattr(PILImage.Image, "load", load)
    monkeypatch.setattr(PILImage.Image, "getexif", lambda self: {})
    with pytest.raises(ImageProblem) as problem:
        inspect_image(data)
    assert problem.value.kind == "truncated"
