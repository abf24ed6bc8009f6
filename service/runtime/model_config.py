"""``DIR/<name>/config.json``: a model's own settings (batch size, labels, providers, folding), and the
:class:`BatchPolicy` a loaded model batches by (a field of the model record, read by the batcher)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import ModelLoadError


class DynamicBatching(BaseModel):
    """Triton's ``dynamic_batching`` block: join concurrent requests into one run (:mod:`service.runtime.batcher`)."""

    model_config = ConfigDict(extra="forbid")

    max_queue_delay_microseconds: int = Field(
        0, ge=0, le=10_000_000, description="How long a batch may wait for more rows while the model is busy."
    )
    preferred_batch_size: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, description="Batch sizes worth waiting for (up to the queue delay)."
    )


class ModelConfig(BaseModel):
    """``DIR/<name>/config.json``: every field optional."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(
        None,
        ge=0,
        description="Largest batch (first dim) accepted; 0: no batch dimension. Default BNFOLD_MAX_BATCH_SIZE when "
        "the first dim of every input and output is dynamic, 1 when only the inputs' are, else 0.",
    )
    dynamic_batching: DynamicBatching | None = Field(
        None, description="Run concurrent requests as one batch (needs a dynamic first dim on every tensor)."
    )
    labels: dict[str, list[str]] = Field(default_factory=dict, description="Class labels per output name.")
    providers: list[str] | None = Field(
        None, description="Execution providers for this model (overrides BNFOLD_PROVIDERS)."
    )
    fold_on_load: bool | None = Field(None, description="Overrides BNFOLD_FOLD_ON_LOAD for this model.")
    # How the web page turns a picture or a drawing into the input tensor: pixels read as 0..1, times scale,
    # then (x - mean[c]) / std[c]; layout says where the channels are. The service itself never applies them.
    scale: float | None = Field(None, description="Image inputs: factor for pixel values read as 0..1 (default 1).")
    mean: list[float] | None = Field(None, description="Image inputs: per-channel mean, subtracted after scale.")
    std: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="Image inputs: per-channel standard deviation, divided by after the mean."
    )
    layout: Literal["NCHW", "NHWC"] | None = Field(None, description="Image inputs: where the channels are.")

    @classmethod
    def read(cls, path: Path) -> ModelConfig:
        if not path.exists():
            return cls()
        try:
            return cls.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as exc:
            first = str(exc).replace("\n", " ")[:300]
            raise ModelLoadError(f"{path}: invalid config ({first})") from None


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    max_queue_delay: float  # seconds
    preferred: tuple[int, ...] = ()

    @classmethod
    def of(cls, max_batch_size: int, config: DynamicBatching) -> BatchPolicy:
        return cls(
            max_batch_size,
            config.max_queue_delay_microseconds / 1e6,
            tuple(sorted(p for p in config.preferred_batch_size if p <= max_batch_size)),
        )

    def target(self, queued_rows: int) -> int:
        """Rows worth waiting for: the smallest preferred size above what is queued, else the maximum."""
        return next((p for p in self.preferred if p >= queued_rows), self.max_batch_size)

    def metadata(self) -> dict[str, Any]:
        return {
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_microseconds": round(self.max_queue_delay * 1e6),
            "preferred_batch_size": list(self.preferred),
        }
