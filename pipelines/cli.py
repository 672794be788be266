"""What both pipelines' command lines share: help, flag checks, logging, launch and summary.

Beam's `PipelineOptions` parses flags leniently (an unknown or mistyped flag is only warned
about, and `--help` lists nothing); a user launching a job needs the opposite. `parse_options`
prints this project's options with their defaults on `--help` and refuses a flag that is one
typo away from a known one. `launch` runs the pipeline the way the runner wants: a local batch
job is waited for and summarised; a remote job is submitted, its id printed, and the terminal
handed back (`--wait` waits); a Dataflow `--dry_run` prints what it would submit.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import os
import re
import shutil
import sqlite3
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions, StandardOptions,
                                                  TestOptions, _BeamArgumentParser)
from apache_beam.runners.runner import PipelineResult

from pipelines.options import LOCAL_RUNNERS, LaunchOptions

__all__ = ["UsageError", "configure_logging", "describe_failure", "is_dry_run", "launch", "parse_options"]

_log = logging.getLogger(__name__)
BEAM_OPTIONS_URL = "https://cloud.google.com/dataflow/docs/reference/pipeline-options"


class UsageError(SystemExit):
    """argparse's refusal of a flag or value: exit status 2 as argparse's, with its message kept as
    the exception's text (what a caller of `run(argv)` sees; the user sees it on stderr)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _Parser(_BeamArgumentParser):
    def error(self, message: str):
        self.print_usage(sys.stderr)
        text = f"{self.prog}: error: {message}"
        print(text, file=sys.stderr, flush=True)
        raise UsageError(text)


def _help_parser(prog: str, description: str, option_classes: Sequence[type[PipelineOptions]],
                 defaults: dict) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog, usage="%(prog)s [options]", description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=f"Beam's and Dataflow's own options (--project, --region, --temp_location, --job_name, "
               f"--sdk_container_image, --max_num_workers, ...) are accepted too: {BEAM_OPTIONS_URL}")
    for cls in (*option_classes, LaunchOptions):
        cls._add_argparse_args(parser)
    parser.set_defaults(**defaults)
    beam = parser.add_argument_group("Beam")
    beam.add_argument("--runner", default="DirectRunner",
                      help="DataflowRunner to launch on Dataflow; DirectRunner or BundleBasedDirectRunner locally.")
    beam.add_argument("--streaming", action="store_true", help="Run as a streaming job (Pub/Sub in and out).")
    return parser


def _beam_and(option_classes: Sequence[type[PipelineOptions]]) -> argparse.ArgumentParser:
    """A parser of Beam's own options and `option_classes` (not another pipeline's), as Beam builds it."""
    parser = _BeamArgumentParser(allow_abbrev=False)
    beam = [c for c in PipelineOptions.__subclasses__() if c.__module__.startswith("apache_beam.")]
    for cls in {str(c): c for c in (*beam, *option_classes, LaunchOptions)}.values():
        cls._add_argparse_args(parser)
    return parser


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [flag for action in parser._actions for flag in action.option_strings]


def parse_options(argv: Sequence[str] | None, prog: str, description: str,
                  option_classes: Sequence[type[PipelineOptions]], defaults: dict | None = None) -> PipelineOptions:
    """`PipelineOptions` of `argv`, after `--help` and the flag checks (each exits like argparse).
    `defaults`: this pipeline's own defaults of shared options, as its config applies them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours = _help_parser(prog, description, option_classes, defaults or {})
    if "-h" in argv or "--help" in argv:
        ours.print_help()
        raise SystemExit(0)
    ours.parse_known_args(argv)  # a bad value (`--image_weight abc`) is refused with this pipeline's usage
    parser = _beam_and(option_classes)
    known = _flags(parser)
    others = set(_flags(_beam_and([c for c in PipelineOptions.__subclasses__() if c.__module__.startswith("pipelines.")])))
    _, unknown = parser.parse_known_args(argv)
    for flag in (arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")):
        if flag in others:
            raise SystemExit(f"{prog}: {flag} is an option of the other pipeline, not of this one (see --help)")
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.8)
        if close:
            raise SystemExit(f"{prog}: unknown option {flag}: did you mean {close[0]}? (see --help)")
        # A flag like no known one may be a runner's own: Beam passes those on, with a warning.
        _log.warning("%s is not an option of this project or of Beam; passing it on to the runner", flag)
    options = PipelineOptions(argv)
    if options.view_as(StandardOptions).runner == "DataflowRunner":
        _check_dataflow(options, prog)
    return options


_BUCKET = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,61}[a-z0-9](/.*)?$")


def _check_dataflow(options: PipelineOptions, prog: str) -> None:
    """What Dataflow needs before it can take a job, refused in one line instead of after minutes of retries."""
    cloud = options.view_as(GoogleCloudOptions)
    problems = [f"--{flag} is required on Dataflow" for flag in ("project", "region") if not getattr(cloud, flag)]
    staging = cloud.temp_location or cloud.staging_location
    if not staging:
        problems.append("--temp_location gs://BUCKET/PATH is required on Dataflow")
    elif not _BUCKET.match(staging):
        problems.append(f"--temp_location {staging!r} must be gs://BUCKET/PATH with a valid bucket name")
    if problems:
        raise SystemExit(f"{prog}: invalid options: " + "; ".join(problems))


def configure_logging() -> None:
    """INFO for the job's own lines; Beam's type-hint chatter and libraries' progress bars off."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("apache_beam.typehints", "apache_beam.runners.portability.fn_api_runner.translations",
                  "apache_beam.io.filebasedsink", "apache_beam.io.iobase", "apache_beam.transforms.util",
                  "apache_beam.runners.worker.statecache"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A directory with `[` in its name is read through an escaped glob (`[[]`), which Beam's pattern
    # translation hands to `re` as a set starting with `[`: correct, but `re` warns about it.
    warnings.filterwarnings("ignore", message="Possible nested set", category=FutureWarning,
                            module=r"apache_beam\.")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


def is_dry_run(options: PipelineOptions) -> bool:
    return bool(options.view_as(TestOptions).dry_run)


def is_remote(options: PipelineOptions) -> bool:
    return (options.view_as(StandardOptions).runner or "DirectRunner") not in LOCAL_RUNNERS


def launch(pipeline, options: PipelineOptions, name: str, summary: Callable[[PipelineResult], str]) -> PipelineResult:
    """Runs `pipeline` as its runner wants (see the module docstring) and prints one closing line.
    A failure the machine caused (a full disk, a file that cannot be written) ends in one line
    naming it, not in Beam's tracebacks; any other failure is raised as it is."""
    started = time.monotonic()
    outputs = _local_outputs(options)
    quiet = _DropEnvironmentFailures(outputs)
    handlers = logging.getLogger().handlers
    for handler in handlers:  # Beam logs a worker's exception (with its traceback) before raising it
        handler.addFilter(quiet)
    try:
        return _launch(pipeline, options, name, summary, started)
    except Exception as e:
        message = describe_failure(e, outputs)
        if message is None:
            raise
        raise SystemExit(f"{name}: failed: {message}") from e
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


_OUTPUT_FLAGS = ("index_dir", "output_dir", "dead_letter_dir", "cache_dir")
_LOW_SPACE_BYTES = 1 << 20  # a write that failed with less than this free on its disk failed for want of it


def _local_outputs(options: PipelineOptions) -> list[tuple[str, str]]:
    """(flag, path) of each local directory the job writes."""
    beam_options = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_options.level
    beam_options.setLevel(logging.ERROR)  # its warnings about a runner's own flags were given already
    try:
        values = options.get_all_options()
    finally:
        beam_options.setLevel(level)
    return [(f"--{flag}", str(values[flag])) for flag in _OUTPUT_FLAGS
            if values.get(flag) and "://" not in str(values[flag])]


def _free_bytes(path: str) -> int | None:
    try:
        existing = next(p for p in (Path(path), *Path(path).parents) if p.exists())
        return shutil.disk_usage(existing).free
    except (OSError, StopIteration):
        return None


def _chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen and len(chain) < 50:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def describe_failure(error: BaseException, outputs: Sequence[tuple[str, str]]) -> str | None:
    """One line for a failure of the machine, not of the job: the disk under an output directory
    (`outputs`: (flag, path)) is full, or a file cannot be read or written (an OSError naming it).
    None for anything else. A full disk shows as ENOSPC (or EDQUOT), as SQLite's "database or disk
    is full" or "disk I/O error", or as a short write with no errno (numpy): what those have in
    common is that the disk has (next to) no space left, so that is checked too."""
    chain = _chain(error)
    storage_errors = [e for e in chain if isinstance(e, (OSError, sqlite3.Error))]
    if not storage_errors:
        return None
    named_full = any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or
                     (isinstance(e, sqlite3.Error) and "disk is full" in str(e)) for e in chain)
    free = {flag_path: _free_bytes(flag_path[1]) for flag_path in outputs}
    low = [flag_path for flag_path, left in free.items() if left is not None and left < _LOW_SPACE_BYTES]
    if named_full or low:
        filename = next((str(e.filename) for e in chain if getattr(e, "filename", None)), "")
        where = [fp for fp in outputs if filename and filename.startswith(fp[1].rstrip("/") + "/")] or low or \
            list(outputs)
        if not where:
            return f"no space left on device{f' writing {filename}' if filename else ''}: free some space and run again"
        flag, path = where[0]
        left = free.get((flag, path))
        left_text = f", {left:,} bytes free" if left is not None else ""
        return (f"no space left on device under {path} ({flag}{left_text}): free space there, or point {flag} "
                f"at a disk with room, and run again")
    named = next((e for e in storage_errors if isinstance(e, OSError) and e.errno and e.filename), None)
    if named is not None:
        return f"{named.strerror or 'error'}: {named.filename}"
    return None


class _DropEnvironmentFailures(logging.Filter):
    """Drops the log records of exceptions `describe_failure` turns into one line (launch prints it)."""

    def __init__(self, outputs: Sequence[tuple[str, str]]):
        super().__init__()
        self.outputs = outputs

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or describe_failure(error, self.outputs) is None


def _launch(pipeline, options: PipelineOptions, name: str, summary: Callable[[PipelineResult], str],
            started: float) -> PipelineResult:
    result = pipeline.run()
    if is_dry_run(options):
        print(f"{name}: dry run, nothing submitted: {_describe_job(result, options)}", flush=True)
        return result
    if is_remote(options) and not options.view_as(LaunchOptions).wait:
        print(f"{name}: submitted {_describe_job(result, options)}; it runs until it ends or is cancelled "
              f"(--wait to wait here)", flush=True)
        return result
    result.wait_until_finish()  # a local streaming job runs until it is cancelled
    print(f"{name}: {result.state} in {time.monotonic() - started:.1f} s: {summary(result)}", flush=True)
    return result


def _describe_job(result: PipelineResult, options: PipelineOptions) -> str:
    cloud = options.view_as(GoogleCloudOptions)
    runner = options.view_as(StandardOptions).runner
    job = getattr(result, "job", None)
    proto = getattr(job, "proto", None)
    parts = [f"{runner} job {getattr(proto, 'name', '') or cloud.job_name or '(unnamed)'}"]
    if cloud.project:
        parts.append(f"project {cloud.project}, region {cloud.region or '(default)'}")
    if proto is not None and proto.steps:
        parts.append(f"{len(proto.steps)} steps")
    elif job is not None and getattr(job, "proto_pipeline", None) is not None:
        parts.append(f"{len(job.proto_pipeline.components.transforms)} transforms")
    stateful = _stateful_steps(getattr(job, "proto_pipeline", None))
    if stateful:
        parts.append(f"stateful: {', '.join(stateful)}")
    job_id = _job_id(result)
    if job_id:
        parts.append(f"id {job_id}")
        if cloud.project and cloud.region:
            parts.append(f"console https://console.cloud.google.com/dataflow/jobs/{cloud.region}/{job_id}"
                         f"?project={cloud.project}")
    return ", ".join(parts)


def _stateful_steps(pipeline) -> list[str]:
    """The steps that keep per-key state or timers (what Dataflow checkpoints before it acks)."""
    if pipeline is None:
        return []
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2

    steps = []
    for transform in pipeline.components.transforms.values():
        if transform.spec.urn == common_urns.primitives.PAR_DO.urn:
            payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
            if payload.state_specs or payload.timer_family_specs:
                steps.append(transform.unique_name)
    return sorted(steps)


def _job_id(result: PipelineResult) -> str:
    try:
        return result.job_id() or ""
    except (AttributeError, NotImplementedError):
        return ""
