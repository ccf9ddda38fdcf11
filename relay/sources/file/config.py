"""The `[sources.NAME]` table of `type = "file"`: README's option table is made from it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from relay.units import Duration, Size


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["file"]
    paths: list[str] = Field(min_length=1, description=(
        'Globs of the files to tail, like "/var/log/app/*.log"; "**" matches any depth of directories. '
        "Relative globs are taken from the working directory. Keep rotated names out of them."))
    exclude: list[str] = Field(default_factory=list, description=(
        'Globs of files to skip; one without "/" is matched against the file name, like "*.gz".'))
    read_from: Literal["beginning", "end"] = Field("beginning", description=(
        "Where the files found at the very first start (no checkpoint file yet) begin; files that appear "
        "later are always read from the beginning, and a file with a checkpoint resumes there."))
    max_line_bytes: Size = Field(1024 * 1024, description=(
        "A longer line goes to the dead letter file with a short preview, and reading goes on at the "
        "next line."))
    fingerprint_bytes: int = Field(256, ge=1, le=65536, description=(
        "How many first bytes of a file (with its device and inode) identify it."))
    glob_interval: Duration = Field(1.0, description="How often the globs are matched again.")
    poll_interval: Duration = Field(0.25, description=(
        "How often every file is checked for new data even without a change event."))
    rotate_wait: Duration = Field(5.0, description=(
        "How long a file that left the glob (renamed or deleted) is followed after reaching its end."))
    checkpoint_interval: Duration = Field(1.0, description="How often settled positions are saved.")
    max_in_flight: int = Field(10_000, ge=1, description=(
        "Lines of one file emitted and not yet settled before reading that file pauses (resumed at half)."))
    batch_size: int = Field(500, ge=1, le=10_000, description=(
        "No longer used (the source engine hands lines to the pipeline in its own chunks); accepted so "
        "older configs still load."))

    @field_validator("paths", "exclude")
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item.strip():
                raise ValueError("an empty glob")
        return value

    @field_validator("glob_interval", "poll_interval", "checkpoint_interval")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be more than 0s")
        return value

    @field_validator("rotate_wait")
    @classmethod
    def _not_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError("must not be negative")
        return value
