"""Launch-time validation: bad combinations stop at the CLI, not on a worker."""

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import EmbedJobConfig

STREAM = ["--streaming", "--input_subscription", "projects/test-project/subscriptions/events",
          "--output_topic", "projects/test-project/topics/records",
          "--dead_letter_topic", "projects/test-project/topics/dead"]


def config(argv):
    return EmbedJobConfig.from_options(PipelineOptions(argv), preflight=False)


def test_streaming_options_parse_into_the_config(monkeypatch):
    monkeypatch.delenv("BIGQUERY_EMULATOR_HOST", raising=False)
    job = config(STREAM + ["--bigquery_table", "test-project:ds.t", "--max_batch_duration_secs", "0.5",
                           "--timestamp_attribute", "ts", "--max_concurrent_downloads", "4"])
    assert job.streaming and job.output_topic.endswith("/records")
    assert job.model.max_batch_duration_secs == 0.5 and job.images.fetch.max_concurrent_downloads == 4
    assert job.bigquery_write_method == "STREAMING_INSERTS"


def test_auto_write_method_is_the_storage_write_api_on_dataflow(monkeypatch):
    monkeypatch.delenv("BIGQUERY_EMULATOR_HOST", raising=False)
    argv = STREAM + ["--bigquery_table", "test-project:ds.t", "--runner", "DataflowRunner", "--id_label", "event_id"]
    assert config(argv).bigquery_write_method == "STORAGE_WRITE_API"
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", "127.0.0.1:1")
    assert config(argv).bigquery_write_method == "STREAMING_INSERTS"
    with pytest.raises(SystemExit, match="no Storage Write API"):
        config(argv + ["--bigquery_write_method", "STORAGE_WRITE_API"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (STREAM[:1], "--input_subscription is required with --streaming"),
        (STREAM + ["--output_dir", "out"], "--output_dir is for the files mode"),
        (STREAM + ["--id_label", "event_id"], "--id_label is Dataflow-only"),
        (STREAM + ["--id_label", "event_id", "--runner", "BundleBasedDirectRunner"], "cannot deduplicate"),
        (STREAM + ["--bigquery_write_method", "FILE_LOADS"], "FILE_LOADS is for batch"),
        (["--input_file", "x", "--output_dir", "y", "--max_batch_duration_secs", "1"], "needs --streaming"),
        (["--input_file", "x", "--output_dir", "y", "--output_topic", "projects/test-project/topics/t"],
         "needs --streaming"),
        (["--streaming", "--input_subscription", "events", "--output_topic", "projects/test-project/topics/r",
          "--dead_letter_topic", "projects/test-project/topics/d"], "not a valid name"),
        (STREAM + ["--bigquery_table", "just-a-table"], "not a valid name"),
        (STREAM + ["--number_of_worker_harness_threads", "0"], "at least 1"),
    ],
)
def test_bad_combinations_are_refused_at_launch(argv, message):
    with pytest.raises(SystemExit, match=message):
        config(argv)
