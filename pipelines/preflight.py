"""Launch-time checks of what a streaming job reads and writes, answered within seconds.

Without them an unreachable emulator or missing credentials surface only inside the running
job: Beam's Pub/Sub reader retries for ever on the DirectRunner, and on Dataflow the failure
comes after the workers boot. Each check asks Pub/Sub once, with a short deadline, and fails
with one line that says what to fix.
"""

from __future__ import annotations

import os

__all__ = ["PreflightError", "check_pubsub"]

EMULATOR_ENV = "PUBSUB_EMULATOR_HOST"


class PreflightError(RuntimeError):
    """A resource the job needs is missing or unreachable; the message says what to do."""


def _where() -> str:
    host = os.environ.get(EMULATOR_ENV)
    if host:
        return f"the Pub/Sub emulator at {host} ({EMULATOR_ENV})"
    return "Google Cloud Pub/Sub"


def _hint() -> str:
    if os.environ.get(EMULATOR_ENV):
        return f"is the emulator running? ({EMULATOR_ENV} names its host:port)"
    return (f"check the network and the credentials (gcloud auth application-default login); "
            f"for a local run, start the emulator and set {EMULATOR_ENV}=host:port")


def check_pubsub(subscription: str | None = None, topics: tuple[str | None, ...] = (),
                 timeout_s: float = 5.0) -> None:
    """PreflightError unless the subscription and every topic exist and answer within `timeout_s`."""
    import google.auth.exceptions
    from google.api_core import exceptions, retry
    from google.cloud import pubsub_v1

    # Unavailable is retried (an emulator that is still starting) until the deadline.
    policy = retry.Retry(initial=0.2, maximum=1.0, timeout=timeout_s,
                         predicate=retry.if_exception_type(exceptions.ServiceUnavailable))
    try:
        subscriber = pubsub_v1.SubscriberClient() if subscription else None
        publisher = pubsub_v1.PublisherClient() if any(topics) else None
    except google.auth.exceptions.DefaultCredentialsError as e:
        raise PreflightError(f"no Google Cloud credentials to reach Pub/Sub: run `gcloud auth application-default "
                             f"login` (or use a service account); for a local run against the emulator set "
                             f"{EMULATOR_ENV}=host:port") from e
    checks = [("subscription", subscription, subscriber.get_subscription)] if subscription else []
    checks += [("topic", topic, publisher.get_topic) for topic in topics if topic]
    try:
        for kind, name, call in checks:
            try:
                call(request={kind: name}, retry=policy, timeout=timeout_s)
            except exceptions.NotFound as e:
                raise PreflightError(f"{kind} {name} does not exist in {_where()}: create it first") from e
            except exceptions.PermissionDenied as e:
                raise PreflightError(f"no permission to use {kind} {name}: {e.message}") from e
            except (exceptions.RetryError, exceptions.DeadlineExceeded, exceptions.ServiceUnavailable) as e:
                raise PreflightError(f"cannot reach {_where()} within {timeout_s:g} s to check {kind} {name}: "
                                     f"{_hint()}") from e
            except google.auth.exceptions.GoogleAuthError as e:
                raise PreflightError(f"cannot authenticate to Pub/Sub to check {kind} {name}: {e}; {_hint()}") from e
    finally:
        for client in (subscriber, publisher):
            if client is not None:
                _close(client)


def _close(client) -> None:
    transport = getattr(client, "transport", None) or getattr(getattr(client, "api", None), "transport", None)
    if transport is not None:
        transport.close()
