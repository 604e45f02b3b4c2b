"""catalog.py through cnn_use_model's command line: catalogs in, output files out, shards, torchrun, resume
and merging."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

import cnn_use_model as cum
from galaxy10 import catalog, inference, shards
from galaxy10.dataset import CLASS_NAMES
from galaxy10.errors import run_cli

from helpers import ROOT, assert_one_line_error, galaxy_array, kill_when, one_thread_env

pytestmark = pytest.mark.usefixtures("cpu_inference")  # the references are CPU float32


def survey_images(folder: Path, n: int, size: int = 40) -> list[str]:
    """`n` small galaxy PNGs in folder/cutouts, named as a catalog in `folder` names them."""
    (folder / "cutouts").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(galaxy_array(i, size=size)).save(folder / "cutouts" / f"g{i}.png")
    return [f"cutouts/g{i}.png" for i in range(n)]


def write_catalog(path: Path, columns: dict[str, list]) -> Path:
    table = pa.table(columns)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(table, path)
    return path


def read_output(path: Path) -> list[dict]:
    """An output file's rows; a CSV's empty fields as None, like Parquet's nulls."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    options = pacsv.ConvertOptions(column_types={"objid": pa.string()}, strings_can_be_null=True)
    return pacsv.read_csv(path, convert_options=options).to_pylist()


@pytest.mark.parametrize("catalog_name, out_name", [("catalog.csv", "preds.parquet"),
                                                    ("catalog.parquet", "preds.csv")])
def test_catalog_rows_are_predicts_with_ids_and_errors(ckpt: Path, tmp_path: Path, catalog_name: str,
                                                       out_name: str, capsys: pytest.CaptureFixture) -> None:
    survey = tmp_path / "survey"
    images = survey_images(survey, 6)
    (survey / "cutouts" / "notes.png").write_text("not an image")
    absolute = str(survey / "cutouts" / "g5.png")
    paths = [*images[:2], "cutouts/missing.png", images[2], "cutouts/notes.png", absolute, "", *images[3:]]
    # As text in a CSV catalog, the ids keep their leading zeros; Parquet's integers stay integers.
    ids = [f"{i:06d}" if catalog_name.endswith(".csv") else i for i in range(len(paths))]
    table = write_catalog(survey / catalog_name, {"ra": [1.5] * len(paths), "path": paths, "objid": ids})
    out = tmp_path / out_name
    args = [str(table), "--model", str(ckpt), "--out", str(out), "--id-column", "objid",
            "--batch-size", "1", "--chunk-size", "3"]
    assert run_cli(cum.cli_main, args) == 1  # relative paths resolve from the catalog's folder, not the cwd
    assert "missing.png not found" in capsys.readouterr().err
    rows = read_output(out)
    trust_columns = ["entropy", "margin", "flag", "bands"]
    assert list(rows[0]) == ["objid", "path", "class_id", "class_name", "confidence", *trust_columns,
                             *CLASS_NAMES, "error"]
    assert [r["path"] or "" for r in rows] == paths  # a CSV reads the empty path back as null
    assert [str(r["objid"]) for r in rows] == [str(i) for i in ids]
    if out.suffix == ".parquet":
        assert pq.read_schema(out).field("objid").type == pa.string()
    for row in rows:
        if row["path"] in ("cutouts/missing.png", "cutouts/notes.png", "", None):
            assert row["class_id"] is None and row["confidence"] is None
            assert any(reason in row["error"] for reason in ("not found", "not a readable image", "is empty"))
            continue
        expected = cum.predict(survey / row["path"], ckpt)  # batches of 1 compute exactly what predict does
        assert row["error"] is None
        assert (row["class_id"], row["class_name"]) == (expected.class_id, expected.class_name)
        assert [row["confidence"], *(row[name] for name in CLASS_NAMES)] == [expected.confidence,
                                                                             *expected.probabilities]
        trust_values = (expected.entropy, expected.margin, expected.flag)
        assert (row["entropy"], row["margin"], row["flag"]) == trust_values


def shard_paths(out: Path, shard: catalog.Shard) -> list[str]:
    folder = catalog.shard_folder(out, shard)
    batches = shards.shard_batches(folder, shards.read_progress(folder))
    return pa.Table.from_batches(batches)["path"].to_pylist()


def test_shards_are_disjoint_and_the_last_merges_them(ckpt: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    paths = survey_images(tmp_path, 11)
    table = write_catalog(tmp_path / "catalog.parquet", {"path": paths, "objid": list(range(100, 111))})
    common = [str(table), "--model", str(ckpt), "--id-column", "objid", "--batch-size", "1",
              "--chunk-size", "2"]
    single, sharded = tmp_path / "single.parquet", tmp_path / "sharded.parquet"
    assert run_cli(cum.cli_main, [*common, "--out", str(single)]) == 0
    for index in (2, 0):
        assert run_cli(cum.cli_main, [*common, "--out", str(sharded), "--shard", f"{index}/3"]) == 0
        assert "the last of the 3 shards to finish writes" in capsys.readouterr().out
        assert not sharded.exists()
        assert shard_paths(sharded, catalog.Shard(index, 3)) == paths[index::3]
    assert run_cli(cum.cli_main, [*common, "--out", str(sharded), "--shard", "1/3"]) == 0
    assert f"wrote {sharded} (11 rows;" in capsys.readouterr().out
    # Exact: batches of one image compute each row alone, in this process, as the single run did.
    assert pq.read_table(sharded).equals(pq.read_table(single))
    assert pq.read_schema(sharded).field("objid").type == pa.int64()
    # What the run says of itself, counted over every shard's rows, in the file's metadata.
    about = json.loads(pq.read_metadata(sharded).metadata[shards.ABOUT_KEY.encode()])
    flags = pq.read_table(sharded).column("flag").to_pylist()
    assert about["rows"] == 11 and about["flags"] == {flag: flags.count(flag) for flag in set(flags)}
    assert about["model"] == ckpt.name and about == json.loads(
        pq.read_metadata(single).metadata[shards.ABOUT_KEY.encode()])
    assert not catalog.parts_folder(sharded).exists()


def test_chunks_are_whole_batches(ckpt: Path, tmp_path: Path) -> None:
    """--chunk-size 5 with batches of 4 writes chunks of 8 rows, so a resumed run batches as an
    uninterrupted one did."""
    table = write_catalog(tmp_path / "catalog.csv", {"path": survey_images(tmp_path, 21)})
    out = tmp_path / "preds.parquet"
    args = [str(table), "--model", str(ckpt), "--out", str(out), "--batch-size", "4", "--chunk-size", "5",
            "--shard", "0/2"]  # shard 1 never runs, so the chunks stay in the parts folder to be read
    assert run_cli(cum.cli_main, args) == 0
    folder = catalog.shard_folder(out, catalog.Shard(0, 2))
    chunks = shards.shard_batches(folder, shards.read_progress(folder))
    assert [chunk.num_rows for chunk in chunks] == [8, 3]


def test_a_merge_that_died_is_finished_by_a_rerun_once_its_claim_is_deleted(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    table = write_catalog(tmp_path / "catalog.parquet", {"path": survey_images(tmp_path, 5)})
    common = [str(table), "--model", str(ckpt), "--batch-size", "1"]
    single, sharded = tmp_path / "single.parquet", tmp_path / "sharded.parquet"
    assert run_cli(cum.cli_main, [*common, "--out", str(single)]) == 0
    assert run_cli(cum.cli_main, [*common, "--out", str(sharded), "--shard", "0/2"]) == 0
    claim = catalog.parts_folder(sharded) / shards.MERGE_CLAIM
    claim.touch()  # as left by a merging process that was killed
    assert run_cli(cum.cli_main, [*common, "--out", str(sharded), "--shard", "1/2"]) == 0
    assert f"if none is, delete {claim} and rerun" in capsys.readouterr().out
    assert not sharded.exists()
    claim.unlink()
    assert run_cli(cum.cli_main, [*common, "--out", str(sharded), "--shard", "1/2", "--resume"]) == 0
    assert f"wrote {sharded} (5 rows;" in capsys.readouterr().out
    # Exact: batches of one image compute each row alone, in this process, as the single run did.
    assert pq.read_table(sharded).equals(pq.read_table(single))
    assert not catalog.parts_folder(sharded).exists()


def assert_same_predictions(table: pa.Table, reference: pa.Table) -> None:
    """Same schema, rows, ids, paths, classes and errors; probabilities and embeddings equal to float32
    rounding. Another batching or process may move them in the last bits: 1e-6 was seen; a wrong row or
    model would move them by far more than 1e-4."""
    assert table.schema == reference.schema and table.num_rows == reference.num_rows
    for name in table.column_names:
        kind = table.schema.field(name).type
        if pa.types.is_floating(kind):
            np.testing.assert_allclose(table[name].to_numpy(zero_copy_only=False),
                                       reference[name].to_numpy(zero_copy_only=False), rtol=0, atol=1e-5)
        elif pa.types.is_fixed_size_list(kind):  # embeddings: a vector per readable row, else None
            rows, expected = table[name].to_pylist(), reference[name].to_pylist()
            assert [r is None for r in rows] == [r is None for r in expected], name
            np.testing.assert_allclose(np.array([r for r in rows if r is not None]),
                                       np.array([r for r in expected if r is not None]), rtol=0, atol=1e-4)
        else:
            assert table[name].to_pylist() == reference[name].to_pylist(), name


@pytest.mark.distributed
def test_torchrun_output_equals_one_process_and_rank_0_writes_it(ckpt: Path, tmp_path: Path) -> None:
    """With --embeddings: the --out table and the features column, both through torchrun's shards."""
    paths = [*survey_images(tmp_path, 9), "cutouts/missing.png"]
    table = write_catalog(tmp_path / "catalog.csv", {"path": paths})
    common = [str(table), "--model", str(ckpt), "--batch-size", "1", "--chunk-size", "2", "--device", "cpu"]
    single, merged, logs = tmp_path / "single.parquet", tmp_path / "merged.parquet", tmp_path / "logs"
    assert run_cli(cum.cli_main, [*common, "--embeddings", str(single)]) == 1
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--log-dir", str(logs), "--redirects", "3"]
    result = subprocess.run([*torchrun, str(ROOT / "cnn_use_model.py"), *common, "--embeddings", str(merged)],
                            capture_output=True, text=True, timeout=300, env=one_thread_env())
    assert result.returncode == 0, result.stderr  # an unreadable row must not make torchrun fail the run
    assert_same_predictions(pq.read_table(merged), pq.read_table(single))
    assert pq.read_table(merged).column("embedding").null_count == 1  # the missing image's
    stdout = {log.parent.name: log.read_text() for log in logs.rglob("stdout.log")}
    assert f"wrote {merged} (10 rows;" in stdout["0"]
    assert "wrote" not in stdout["1"] and f"shard 1/2 done (5 rows); rank 0 writes {merged}" in stdout["1"]
    assert not catalog.parts_folder(merged).exists()


@pytest.mark.slow
def test_killed_catalog_job_resumes_to_the_uninterrupted_result(ckpt: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """SIGKILL after the first chunk is on disk; images large enough that decoding the rest takes a while.
    With --embeddings: the --out table and the features column, both resumed."""
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(tmp_path / f"big{i}.png")
    table = write_catalog(tmp_path / "catalog.csv", {"path": [f"big{i % 4}.png" for i in range(48)]})
    command = [sys.executable, str(ROOT / "cnn_use_model.py"), str(table), "--model", str(ckpt),
               "--chunk-size", "4", "--batch-size", "4", "--device", "cpu"]
    killed, uninterrupted = tmp_path / "killed.parquet", tmp_path / "uninterrupted.parquet"
    env = one_thread_env()
    process = subprocess.Popen([*command, "--embeddings", str(killed)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress = catalog.shard_folder(killed, catalog.Shard()) / shards.PROGRESS
    kill_when(process, progress.exists)  # 11 of 12 chunks still ahead, each 4 decodes of 700 px
    written = shards.read_progress(progress.parent)
    assert not written["done"] and 4 <= shards.written_rows(written) < 48 and not killed.exists()

    assert run_cli(cum.cli_main, [*command[2:], "--embeddings", str(killed), "--resume", "--tta"]) == 2
    assert_one_line_error(capsys, "other inputs, model or options", "without --resume")
    subprocess.run([*command, "--embeddings", str(killed), "--resume"], env=env, check=True,
                   capture_output=True)
    subprocess.run([*command, "--embeddings", str(uninterrupted)], env=env, check=True, capture_output=True)
    # Exact: the same command and thread count; chunks are whole batches, so the resumed run batched every
    # row with the same others as the uninterrupted one.
    assert pq.read_table(killed).equals(pq.read_table(uninterrupted))


@pytest.mark.parametrize("out, args, words", [
    ("o.parquet", [], ["no column 'path'", "--path-column"]),
    ("o.parquet", ["--path-column", "file", "--id-column", "objid"], ["no column 'objid'", "--id-column"]),
    ("o.parquet", ["--path-column", "file", "--shard", "3/2"], ["--shard 3/2", "0 <= I < N"]),
    ("o.txt", ["--path-column", "file"], ["name a .parquet or .csv file"]),
    (None, ["--path-column", "file"], ["add --out"]),
    (None, ["--path-column", "file", "--resume"], ["--resume needs an output file"]),
], ids=["no-path-column", "unknown-id-column", "shard-3-of-2", "out-suffix", "no-out", "resume-without-out"])
def test_catalog_bad_input_is_a_one_line_error(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                               out: str | None, args: list[str], words: list[str]) -> None:
    table = write_catalog(tmp_path / "catalog.csv", {"file": ["a.png"], "ra": [1.0]})
    if out is not None:
        args = [*args, "--out", str(tmp_path / out)]
    assert run_cli(cum.cli_main, [str(table), "--model", str(ckpt), *args]) == 2
    assert_one_line_error(capsys, *words)


def test_catalog_that_is_not_a_table_and_shard_under_torchrun(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = tmp_path / "catalog.csv"
    table.write_bytes(b"")
    assert run_cli(cum.cli_main, [str(table), "--model", str(ckpt), "--out", str(tmp_path / "o.csv")]) == 2
    assert_one_line_error(capsys, "catalog.csv is not a readable CSV table")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run_cli(cum.cli_main, [str(table), "--out", str(tmp_path / "o.csv"), "--shard", "1/2"]) == 2
    assert_one_line_error(capsys, "torchrun", "drop --shard")


def test_embeddings_are_the_penultimate_features_per_row_through_shards(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    paths = survey_images(tmp_path, 7)
    paths[3] = "cutouts/missing.png"
    table = write_catalog(tmp_path / "catalog.parquet", {"path": paths, "objid": list(range(200, 207))})
    common = [str(table), "--model", str(ckpt), "--id-column", "objid", "--batch-size", "2",
              "--chunk-size", "2", "--exact"]  # float32, as features(exact=True) computes them
    whole, sharded = tmp_path / "whole.parquet", tmp_path / "sharded.parquet"
    assert run_cli(cum.cli_main, [*common, "--embeddings", str(whole)]) == 1  # one row is unreadable
    for index, unreadable in ((1, 1), (0, 0)):  # row 3, the unreadable one, is shard 1's
        args = [*common, "--embeddings", str(sharded), "--shard", f"{index}/2"]
        assert run_cli(cum.cli_main, args) == unreadable
    rows, merged = read_output(whole), read_output(sharded)
    assert [r["objid"] for r in rows] == [r["objid"] for r in merged] == list(range(200, 207))
    assert [(r["path"], r["class_id"], r["error"]) for r in rows] == [(r["path"], r["class_id"], r["error"])
                                                                      for r in merged]
    readable = [i for i, r in enumerate(rows) if r["error"] is None]
    expected = cum.features([tmp_path / rows[i]["path"] for i in readable], ckpt, exact=True)
    assert expected.shape == (6, cum.load_model(ckpt).embedding_size)
    for output in (rows, merged):  # other batches: equal up to float32 rounding
        embeddings = np.array([output[i]["embedding"] for i in readable])
        np.testing.assert_allclose(embeddings, expected, rtol=0, atol=1e-4)
    assert rows[3]["embedding"] is None and "not found" in rows[3]["error"]
    # A CSV cannot hold the vectors, and --embeddings is --out with them: not both.
    assert run_cli(cum.cli_main, [*common, "--embeddings", str(tmp_path / "e.csv")]) == 2
    assert run_cli(cum.cli_main, [*common, "--embeddings", str(whole), "--out", str(whole)]) == 2
    err = capsys.readouterr().err
    assert "name a .parquet file" in err and "give one of them" in err


def test_embeddings_on_the_command_line_and_from_python_agree_by_default(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both computed as the answers are: here in bfloat16 (forced on this CPU, emulated where it lacks it)."""
    monkeypatch.setattr(inference, "native_bf16", lambda device: device.type == "cpu")
    monkeypatch.setattr(inference, "_models", inference.FileCache())
    paths = survey_images(tmp_path, 4)
    table = write_catalog(tmp_path / "catalog.parquet", {"path": paths})
    out = tmp_path / "embeddings.parquet"
    assert run_cli(cum.cli_main, [str(table), "--model", str(ckpt), "--embeddings", str(out)]) == 0
    written = np.array([row["embedding"] for row in read_output(out)])
    from_python = cum.features([tmp_path / path for path in paths], ckpt)
    scale = np.abs(from_python).max()
    assert np.abs(written - from_python).max() < 1e-5 * scale  # the same computation
    exact = cum.features([tmp_path / path for path in paths], ckpt, exact=True)
    assert np.abs(exact - from_python).max() > 1e-3 * scale  # bfloat16 did round them
