"""Command-line options of the pipelines, parsed once into frozen, validated configs.

Beam's `PipelineOptions` carries the flags (so Dataflow and Flex Templates see them);
`EmbedJobConfig.from_options` turns them into the typed objects the transforms take and
rejects bad combinations at launch, not on a worker.
"""

from __future__ import annotations

import dataclasses

from apache_beam.options.pipeline_options import PipelineOptions

from model_handlers.config import DEFAULT_MODEL, DEVICES, PRECISIONS, ModelConfig
from transforms.decode import DEFAULT_MAX_PIXELS
from transforms.download import FetchConfig
from transforms.images import ImageOptions

__all__ = ["EmbedJobConfig", "EmbedOptions"]


class EmbedOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        io = parser.add_argument_group("input and output")
        io.add_argument("--input_file", help="Glob of JSON-lines event files (batch mode).")
        io.add_argument("--output_dir", help="Directory (local or gs://) for embeddings/ and dead_letter/.")

        model = parser.add_argument_group("model")
        model.add_argument("--model", default=DEFAULT_MODEL,
                           help="open_clip:ARCH[/PRETRAINED] or packaged:effnet-lite0+minilm (default).")
        model.add_argument("--device", default="auto", choices=DEVICES, help="Where the model runs.")
        model.add_argument("--precision", default="fp32", choices=PRECISIONS,
                           help="fp16/bf16 run under autocast on the device.")
        model.add_argument("--min_batch_size", type=int, default=1, help="Fewest products per inference batch.")
        model.add_argument("--max_batch_size", type=int, default=32, help="Most products per inference batch.")
        model.add_argument("--image_batch_size", type=int, default=64, help="Images per forward pass.")
        model.add_argument("--share_model_across_processes", action="store_true",
                           help="One model per machine shared by all SDK processes (less memory, less throughput).")
        model.add_argument("--image_weight", type=float, default=0.5,
                           help="Weight of the image part in the fused vector (0..1, exclusive).")

        images = parser.add_argument_group("images")
        images.add_argument("--allow_private_hosts", action="store_true",
                            help="Allow image hosts on loopback (local runs and tests only); private and link-local stay refused.")
        images.add_argument("--max_concurrent_downloads", type=int, default=16,
                            help="Images downloading at once per worker process; bounds image memory.")
        images.add_argument("--max_image_bytes", type=int, default=FetchConfig.max_bytes,
                            help="Largest image body accepted, in bytes.")
        images.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                            help="Largest image accepted, in pixels (decompression-bomb guard).")
        images.add_argument("--download_timeout_secs", type=float, default=FetchConfig.read_timeout_s,
                            help="Connect and read timeout of one image request.")
        images.add_argument("--download_retries", type=int, default=FetchConfig.retries,
                            help="Retries on 5xx and timeouts, with exponential backoff.")


@dataclasses.dataclass(frozen=True)
class EmbedJobConfig:
    model: ModelConfig
    images: ImageOptions
    input_file: str | None = None
    output_dir: str | None = None

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "EmbedJobConfig":
        o = options.view_as(EmbedOptions)
        try:
            model = ModelConfig(
                spec=o.model,
                device=o.device,
                precision=o.precision,
                min_batch_size=o.min_batch_size,
                max_batch_size=o.max_batch_size,
                image_batch_size=o.image_batch_size,
                share_model_across_processes=o.share_model_across_processes,
                image_weight=o.image_weight,
            )
            fetch = FetchConfig(
                connect_timeout_s=min(5.0, o.download_timeout_secs),
                read_timeout_s=o.download_timeout_secs,
                max_bytes=o.max_image_bytes,
                retries=o.download_retries,
                allow_private_hosts=o.allow_private_hosts,
                max_concurrent_downloads=o.max_concurrent_downloads,
            )
            if o.max_image_pixels <= 0:
                raise ValueError("max_image_pixels must be positive")
        except ValueError as e:
            raise SystemExit(f"invalid options: {e}") from e
        config = cls(model, ImageOptions(fetch, o.max_image_pixels), o.input_file, o.output_dir)
        config.validate()
        return config

    def validate(self) -> None:
        if not self.input_file:
            raise SystemExit("invalid options: --input_file is required")
        if not self.output_dir:
            raise SystemExit("invalid options: --output_dir is required")
