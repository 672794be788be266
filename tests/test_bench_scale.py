"""bench.scale as `make bench` runs it, at a size a test can afford: every figure docs/PERFORMANCE.md cites."""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_scale_benchmark_measures_every_kind_and_scope_and_writes_json_and_a_plot(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.scale", "--sizes", "12000", "--large", "0",
                             "--kinds", "hnsw,ivf_pq", "--queries", "20", "--ef_construction", "40",
                             "--output", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "scale.json").read_text())
    assert set(report["cells"]) == {"hnsw/12000", "ivf_pq/12000"}
    for kind in ("hnsw", "ivf_pq"):
        cell = report["cells"][f"{kind}/12000"]
        assert cell["segments"] == [[kind, 12000]]  # one built segment of the kind, nothing left flat
        assert set(cell["scopes"]) == {"all", "shop-500", "shop-5000", "shop-50000"}
        for scope in cell["scopes"].values():
            assert scope["k10"]["recall@10"]["mean"] >= 0.9 and scope["k100"]["p50_ms"] > 0
        memory = cell["memory"]
        assert memory["file_bytes_per_vector"] > 1000  # the float vectors, memory-mapped: 2 KB a vector
        assert cell["ingest"]["searchable_s_max"] < 5 and cell["build_per_s"] > 0
    hnsw, pq = report["cells"]["hnsw/12000"]["memory"], report["cells"]["ivf_pq/12000"]["memory"]
    assert pq["index_file_bytes_per_vector"] < 0.15 * hnsw["index_file_bytes_per_vector"]
    assert hnsw["index_file_bytes_per_vector"] > 2048  # the floats are in the graph
    assert (tmp_path / "scale.png").stat().st_size > 10_000
    assert "memory per vector" in result.stdout


def test_the_exact_switch_benchmark_compares_the_rule_with_its_baseline_on_one_store(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.exact_switch", "--vectors", "20000", "--queries", "10",
                             "--ef_construction", "40", "--output", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "exact_switch.json").read_text())
    assert report["graph_step_cost"] > 0 and report["vectors"] == 20000
    assert [(row["shop"], row["k"]) for row in report["rows"]] == [
        (shop, k) for shop in ("shop-500", "shop-5000", "shop-50000") for k in (10, 100)]
    for row in report["rows"]:
        for arm in ("rule", "exact_below only"):
            assert row[arm][f"recall@{row['k']}"]["mean"] >= 0.9 and row[arm]["p50_ms"] > 0
    assert "exact_below only" in result.stdout


def test_the_freshness_benchmark_times_a_separate_server_and_memory_under_updates(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.freshness_scale", "--sizes", "3000,6000", "--rounds", "3",
                             "--update_size", "3000", "--output", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "freshness_scale.json").read_text())
    assert [cell["live_products"] for cell in report["cells"]] == [3000, 6000]
    for cell in report["cells"]:
        assert 0 < cell["visible_p50_s"] <= cell["visible_p99_s"] < 30
        assert cell["commit_p50_ms"] > 0 and cell["reader_refresh_cpu_p50_ms"] >= 0 and cell["cold_open_s"] > 0
    assert len(report["update_rounds"]["server_rss_mb_by_round"]) == 10
    assert set(report["checks"]) >= {"writer commit p50 grows <= 1.5x",
                                     "server memory after 10 update rounds <= 1.2x the first"}
    assert (tmp_path / "freshness_scale.png").stat().st_size > 10_000


def test_the_backfill_benchmark_runs_the_index_pipeline_and_queries_over_http(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.backfill_scale", "--sizes", "2000,4000", "--queries", "20",
                             "--output", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "backfill_scale.json").read_text())
    for cell, size in zip(report["cells"], (2000, 4000)):
        assert cell["products"] == cell["live_docs"] == size and cell["within_policy"]
        assert cell["shop_query_p50_ms"] > 0


def test_the_qdrant_recall_benchmark_builds_qdrants_engine_and_the_store_on_the_same_vectors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.qdrant_recall", "--sizes", "2500", "--queries", "8",
                             "--ef_search", "16,256", "--output_dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "qdrant_recall.json").read_text())
    row = report["sizes"]["2500"]
    assert row["qdrant"]["indexed_vectors"] == 2500  # Qdrant's graph was built, not a plain segment
    for engine in ("qdrant", "faiss"):
        scopes = row[engine]["scopes"]
        assert set(scopes) == {"unscoped", "shop-50pct", "shop-5pct", "shop-0.5pct"}
        for rows in scopes.values():
            assert set(rows) == {"16", "256"}
            assert all(0 <= r["recall_min"] <= r["recall_mean"] <= 1 and r["p50_ms"] > 0 for r in rows.values())
            assert rows["256"]["recall_mean"] >= 0.9  # a deep search over 2,500 vectors finds nearly all


def test_the_decode_scaling_benchmark_compares_threads_with_processes(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.decode_scaling", "--threads", "1,2", "--processes", "2",
                             "--images", "2", "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "decode_scaling.json").read_text())
    assert set(report["images_per_s"]) == {"1 threads", "2 threads", "2 processes"}
    assert all(v > 0 for v in report["images_per_s"].values()) and report["speedup_vs_one_thread"]["1 threads"] == 1.0
