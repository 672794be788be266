"""The product-embeddings distribution; also what Dataflow installs on workers (--setup_file)."""

from pathlib import Path

import setuptools

HERE = Path(__file__).resolve().parent
REQUIRES = [
    line.strip()
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setuptools.setup(
    name="product-embeddings",
    version="0.1.0",
    description="Streaming product image+text embeddings on Apache Beam, with a FAISS HNSW index for search.",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(include=["pipelines*", "model_handlers*", "media*", "transforms*", "search*", "localstack*", "bench*", "evaluation*",
                                                "sample_catalogue*"]),
    py_modules=["argtypes", "background_server", "schemas", "storage"],
    package_data={"model_handlers": ["model_configs/*.json"]},
    install_requires=REQUIRES,
    extras_require={
        # faiss-cpu and faiss-gpu install the same module: pick exactly one.
        "cpu": ["faiss-cpu==1.15.1"],
        "gpu": ["faiss-gpu==1.15.1"],
        "dev": ["faiss-cpu==1.15.1", "pytest==9.2.0", "hypothesis==6.170.15", "bqemulator==1.4.0", "ruff==0.17.5", "selenium==4.51.0",
                # Qdrant's own engine in process: bench.qdrant_recall measures its filtered HNSW recall.
                "qdrant-edge-py==0.9.0"],
    },
)
