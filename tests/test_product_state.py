"""Product state (what a new model re-embeds from) and the re-embed backfill, run as users run them."""

from __future__ import annotations

import datetime as dt
import json
import random

import torch
from hypothesis import given, settings, strategies as st

from model_handlers.projection import build_head, load_projection, save_projection
from schemas import ProductState, bigquery_schema
from tests.conftest import TINY_CLIP, image_bytes
from tests.support.embed_helpers import read_jsonl
from tests.test_cli import cli
from localstack.image_server import Route
from transforms.product_state import LATEST_STATE_VIEW, latest_state

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def state(op: str, version: int, product_id: str = "p1", **fields) -> ProductState:
    return ProductState(product_id=product_id, shop_id="s1", op=op, version=version, event_id=f"e{version}",
                        title=fields.get("title", f"title {version}"), description="",
                        image_urls=("http://127.0.0.1/a.jpg",), attributes=fields.get("attributes", {"v": version}),
                        event_time=T0, recorded_at=T0 + dt.timedelta(seconds=version))


def applied_in_order(rows: list[ProductState]) -> ProductState | None:
    """What the index ends with when the events arrive in version order (patches of no live product refused)."""
    current = None
    for row in sorted(rows, key=lambda r: r.version):
        if current is not None and row.version <= current.version:
            continue
        if row.op == "upsert":
            current = row
        elif row.op == "delete":
            current = None
        elif current is not None:
            current = ProductState(**{**current.__dict__, "attributes": row.attributes, "version": row.version})
    return current


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["upsert", "patch", "delete"]), st.integers(1, 12)), max_size=12),
       st.randoms())
def test_latest_state_is_the_events_applied_in_version_order_whatever_order_rows_come_in(ops, rnd):
    rows = list({version: state(op, version) for op, version in ops}.values())  # one event per version
    rows += rnd.sample(rows, k=len(rows) // 2)  # redelivered rows
    rnd.shuffle(rows)
    expected = applied_in_order(rows)
    got = latest_state(rows)
    if expected is None:
        assert got is None
    else:
        assert (got.version, got.title, dict(got.attributes)) == (expected.version, expected.title,
                                                                    dict(expected.attributes))


def test_a_state_row_survives_json_and_bigquery_shapes():
    row = state("upsert", 3, attributes={"brand": "Acme", "price": 9.5, "tags": ["a", "b"]})
    assert ProductState.from_dict(json.loads(row.to_json())) == row
    as_bigquery = {**row.to_dict(), "attributes": json.dumps(dict(row.attributes)), "recorded_at": row.recorded_at,
                   "event_time": row.event_time}
    assert ProductState.from_dict(as_bigquery) == row
    columns = {f["name"]: (f["type"], f["mode"]) for f in bigquery_schema(ProductState)["fields"]}
    assert columns["image_urls"] == ("STRING", "REPEATED")
    assert columns["attributes"] == ("JSON", "NULLABLE")
    assert columns["event_time"] == ("TIMESTAMP", "NULLABLE")
    assert "QUALIFY ROW_NUMBER()" in LATEST_STATE_VIEW


def test_a_table_row_that_is_no_state_keeps_its_ids_in_its_dead_letter():
    from transforms.product_state import _unreadable

    row = {**state("upsert", 3, product_id="sku-1").to_dict(), "version": "three", "when": dt.datetime(2026, 1, 1)}
    letter = _unreadable((row, (ValueError, "version must be an integer", "traceback")))
    assert (letter.stage, letter.error_type, letter.product_id, letter.event_id) == (
        "parse", "ValueError", "sku-1", row["event_id"])
    assert json.loads(letter.payload)["version"] == "three"  # the row as JSON, whatever its values
    unnamed = _unreadable(({"product_id": "x" * 1000}, (KeyError, "'op'", "")))
    assert (unnamed.product_id, unnamed.error_type) == ("", "KeyError")


def test_the_view_and_the_fold_agree_on_bigquery(bigquery_emulator, unique_name):
    """LATEST_STATE_VIEW's query, run by the BigQuery emulator over the same rows, equals `latest_state`."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    client = bigquery.Client(project="test-project", credentials=AnonymousCredentials(),
                             client_options={"api_endpoint": bigquery_emulator.endpoint})
    dataset = f"test-project.{unique_name('ds').replace('-', '_')}"
    client.create_dataset(dataset)
    table = bigquery.Table(f"{dataset}.product_state", schema=[
        bigquery.SchemaField(f["name"], f["type"], mode=f["mode"]) for f in bigquery_schema(ProductState)["fields"]])
    client.create_table(table)
    rnd = random.Random(7)
    rows = []
    for n in range(30):
        ops = [(rnd.choice(["upsert", "upsert", "patch", "delete"]), v) for v in rnd.sample(range(1, 9), 4)]
        rows += [state(op, v, product_id=f"p{n}", attributes={"v": v, "n": n}) for op, v in ops]
    payload = [{**r.to_dict(), "attributes": json.dumps(dict(r.attributes))} for r in rows]
    assert client.insert_rows_json(f"{dataset}.product_state", payload) == []
    query = LATEST_STATE_VIEW.format(table=f"{dataset}.product_state", view="unused").split(" AS\n", 1)[1]
    got = {}
    for row in client.query(query).result():
        if row["op"] == "upsert":
            attributes = row["attributes"]
            got[row["product_id"]] = (row["version"], json.loads(attributes) if isinstance(attributes, str)
                                      else dict(attributes))
    expected = {}
    for n in range(30):
        live = latest_state([r for r in rows if r.product_id == f"p{n}"])
        if live is not None:
            expected[live.product_id] = (live.version, dict(live.attributes))
    assert got == expected and expected


def test_files_mode_writes_state_and_reembed_backfills_the_live_products_with_a_new_head(tmp_path, image_server):
    """Embed (files mode) → product_state/ JSON lines; later changes; `pipelines.reembed --source_dir` with a
    head → one record per live product, at its latest version and attributes, under the head's model id."""
    image_server.routes["/a.jpg"] = Route(body=image_bytes("JPEG"), headers={"Content-Type": "image/jpeg"})
    image_server.routes["/b.jpg"] = Route(body=image_bytes("JPEG", seed=3), headers={"Content-Type": "image/jpeg"})
    url = image_server.url("").rstrip("/")

    def event(n, version, op="upsert", **fields):
        body = {"event_id": f"e{n}-{version}", "product_id": f"p{n}", "op": op, "version": version, "shop_id": "s1"}
        if op == "upsert":
            body |= {"title": f"product {n} v{version}", "description": f"about {n}",
                     "image_urls": [f"{url}/a.jpg", f"{url}/b.jpg"], "attributes": {"brand": f"b{n}"}}
        return json.dumps(body | fields)

    first = [event(n, 1) for n in range(6)] + ["not json"]
    later = [event(1, 2, op="delete"), event(2, 3, op="patch", attributes={"brand": "patched"}), event(3, 4),
             event(9, 5, op="patch", attributes={"brand": "no such product"})]
    for name, lines in (("first", first), ("later", later)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        result = cli("pipelines.embed", "--input_file", str(tmp_path / f"{name}.jsonl"), "--output_dir",
                     str(tmp_path / name), "--model", TINY_CLIP, "--device", "cpu", "--allow_private_hosts",
                     timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    states = read_jsonl(str(tmp_path / "first/product_state/*.jsonl"))
    assert sorted(s["product_id"] for s in states) == [f"p{n}" for n in range(6)]  # not the unparseable line
    assert states[0]["image_urls"] == [f"{url}/a.jpg", f"{url}/b.jpg"] and states[0]["description"]
    source = tmp_path / "state"
    source.mkdir()
    for name in ("first", "later"):
        for n, path in enumerate(sorted((tmp_path / name / "product_state").glob("*.jsonl"))):
            path.rename(source / f"{name}-{n}.jsonl")

    head = tmp_path / "head.pt"
    torch.manual_seed(0)
    save_projection(head, build_head([64, 64]), model=TINY_CLIP, name="test-head", version=1, trained_on="test")
    result = cli("pipelines.reembed", "--source_dir", str(source), "--model", TINY_CLIP, "--projection", str(head),
                 "--output_dir", str(tmp_path / "new"), "--device", "cpu", "--allow_private_hosts", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reembed: DONE" in result.stdout and "5 records, 0 dead letters" in result.stdout, result.stdout
    records = {r["product_id"]: r for r in read_jsonl(str(tmp_path / "new/embeddings/*.jsonl"))}
    assert sorted(records) == ["p0", "p2", "p3", "p4", "p5"]  # p1 deleted, p9 only ever patched
    assert records["p2"]["version"] == 3 and records["p2"]["attributes"] == {"brand": "patched"}
    assert records["p3"]["version"] == 4 and records["p3"]["title"] == "product 3 v4"
    assert {r["model"] for r in records.values()} == {load_projection(str(head)).model_id}
    assert all(r["image_count"] == 2 and r["op"] == "upsert" for r in records.values())


def test_reembed_refuses_what_a_backfill_cannot_do(tmp_path):
    (tmp_path / "s.jsonl").write_text("")
    cases = [
        (["--output_dir", str(tmp_path / "o")], "give exactly one of --source"),
        (["--source_dir", str(tmp_path), "--source", "bigquery:my-project:d.t", "--output_dir", str(tmp_path)],
         "give exactly one of --source"),
        (["--source", "my-project:d.t", "--output_dir", str(tmp_path)], "is not bigquery:PROJECT:DATASET.TABLE"),
        (["--source_dir", str(tmp_path)], "give where the records go"),
        (["--source_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--input_file", "x"],
         "--input_file is not an option of a backfill"),
        (["--source_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")], "matches no files"),
    ]
    for args, message in cases:
        result = cli("pipelines.reembed", "--model", TINY_CLIP, *args)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-2000:])
    helped = cli("pipelines.reembed", "--help")
    assert helped.returncode == 0 and "--source_dir" in helped.stdout and "--output_topic" in helped.stdout


def test_reembed_launches_on_dataflow_from_the_table(tmp_path):
    from tests.test_cli import DATAFLOW

    args = [a for a in DATAFLOW if a != "--streaming"]
    result = cli("pipelines.reembed", *args, "--source", "bigquery:my-project:catalogue.product_state",
                 "--model", TINY_CLIP, "--output_topic", "projects/my-project/topics/product-embeddings-v2",
                 "--dead_letter_topic", "projects/my-project/topics/product-events-dlq", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reembed: dry run, nothing submitted: DataflowRunner job" in result.stdout


def test_reembed_turns_hostile_state_rows_into_dead_letters(tmp_path, image_server):
    """Lines that are not UTF-8, not JSON, nested thousands deep, not an object, or missing fields are dead
    letters of stage parse (or validate); the job still embeds the good row."""
    image_server.routes["/a.jpg"] = Route(body=image_bytes("JPEG"), headers={"Content-Type": "image/jpeg"})
    good = state("upsert", 7, product_id="good")
    good = ProductState(**{**good.__dict__, "image_urls": (image_server.url("a.jpg"),)})
    hostile = [b"\xff\xfe not utf-8 \xc3\x28", b"{not json", b"[" * 5000 + b"]" * 5000,
               b'{"product_id": "p", "op": "upsert"}', b"[1, 2, 3]",
               json.dumps({**good.to_dict(), "product_id": "bad-op", "op": "rename"}).encode(),
               json.dumps({**good.to_dict(), "product_id": "p" * 300}).encode()]
    row = good.to_dict()
    hostile += [json.dumps({**row, "product_id": "no-time", "recorded_at": None}).encode(),
                json.dumps({**row, "product_id": "float-version", "version": 1.9}).encode(),
                json.dumps({**row, "product_id": "url-string", "image_urls": "http://127.0.0.1/a.jpg"}).encode(),
                json.dumps({**row, "product_id": "number-attributes", "attributes": "5"}).encode(),
                json.dumps({**row, "product_id": "int-event-time", "event_time": 12345}).encode()]
    # One product's two rows at one version, one timestamp without a zone: compared, not a crash.
    twins = [json.dumps({**row, "product_id": "tz", "recorded_at": "2026-01-01T00:00:00"}).encode(),
             json.dumps({**row, "product_id": "tz", "recorded_at": "2026-01-01T00:00:01Z"}).encode()]
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "part.jsonl").write_bytes(
        b"\n".join([good.to_json().encode(), b"", b"   ", *twins, *hostile]) + b"\n")
    result = cli("pipelines.reembed", "--source_dir", str(tmp_path / "state"), "--model", TINY_CLIP,
                 "--output_dir", str(tmp_path / "out"), "--device", "cpu", "--allow_private_hosts", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(str(tmp_path / "out/embeddings/*.jsonl"))
    letters = read_jsonl(str(tmp_path / "out/dead_letter/*.jsonl"))
    assert sorted(r["product_id"] for r in records) == ["good", "tz"]
    assert len(letters) == len(hostile), letters  # blank lines are no rows
    assert {letter["stage"] for letter in letters} <= {"parse", "validate"}
    # Each letter names the product its row names, where that id can be read (not 300 characters long).
    assert sorted(letter["product_id"] for letter in letters if letter["product_id"]) == sorted(
        ["p", "bad-op", "no-time", "float-version", "url-string", "number-attributes", "int-event-time"])
    assert f"2 records, {len(hostile)} dead letters" in result.stdout, result.stdout


def test_reembed_answers_a_bad_option_and_help_before_loading_the_pipeline():
    """Parsing needs Beam's options only: the model libraries and the transforms are imported once the options
    are accepted, so a typo is answered in a moment, not after torch has loaded."""
    cases = [(["--modle", TINY_CLIP], 1, "did you mean --model?"),
             (["--image_weight", "abc"], 2, "argument --image_weight:"),
             (["--output_dir", "out"], 1, "give exactly one of --source"),
             (["--help"], 0, "")]
    for args, status, message in cases:
        result = cli("pipelines.reembed", *args, env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert result.returncode == status and message in result.stderr, (args, result.stderr[-2000:])
        imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                    if line.startswith("import time:") and line.count("|") == 2}
        assert "apache_beam.options.pipeline_options" in imported, args  # the profile was read
        assert not {"torch", "open_clip", "pipelines.embed", "transforms.embedding"} & imported, args
