"""Google's Pub/Sub emulator on 127.0.0.1 (docs/ARCHITECTURE.md §14), plus the topic/subscription plumbing.

The emulator is Debian's `google-cloud-cli-pubsub-emulator` (Java 17). Clients find it through
`PUBSUB_EMULATOR_HOST`, which `env()` returns for child processes and pipelines.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from localstack.emulator import Emulator, EmulatorProcess, free_port

__all__ = ["PubSubEmulator", "EMULATOR_BIN"]

EMULATOR_BIN = os.environ.get(
    "PUBSUB_EMULATOR_BIN", "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
)
INSTALL_HINT = (
    "the Pub/Sub emulator is missing: `make setup` installs Debian's google-cloud-cli-pubsub-emulator "
    "(from Google's Cloud SDK apt repository) and openjdk-17-jre-headless; or set PUBSUB_EMULATOR_BIN"
)


class PubSubEmulator(Emulator):
    def __init__(self, project: str = "test-project", log_dir: Path | None = None):
        if not Path(EMULATOR_BIN).exists() or not shutil.which("java"):
            raise FileNotFoundError(INSTALL_HINT)
        self.project = project
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix="pubsub-emulator-"))
        self._process = EmulatorProcess(
            "pubsub-emulator",
            [EMULATOR_BIN, "--host=127.0.0.1", f"--port={self.port}"],
            ready=self._ready,
            log_path=log_dir / "pubsub-emulator.log",
        )

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def env(self) -> dict[str, str]:
        return {"PUBSUB_EMULATOR_HOST": self.host}


    # Names ------------------------------------------------------------------------------
    def topic(self, name: str) -> str:
        return f"projects/{self.project}/topics/{name}"

    def subscription(self, name: str) -> str:
        return f"projects/{self.project}/subscriptions/{name}"

    def create_topic(self, name: str) -> str:
        from google.cloud import pubsub_v1

        path = self.topic(name)
        pubsub_v1.PublisherClient().create_topic(name=path)
        return path

    def create_subscription(self, topic_name: str, name: str) -> str:
        from google.cloud import pubsub_v1

        path = self.subscription(name)
        with pubsub_v1.SubscriberClient() as subscriber:
            subscriber.create_subscription(name=path, topic=self.topic(topic_name), ack_deadline_seconds=60)
        return path
