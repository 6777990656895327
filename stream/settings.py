"""One frozen settings object, read from ``RFM_*`` environment variables.

Every knob of the service lives here (README "Configuration" lists them): ``RFM_*``
environment variables over an optional TOML file (``RFM_CONFIG_FILE``). Nothing else reads
``os.environ`` for configuration.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from state.codec import FORMAT as STATE_FORMAT
from state.keys import check_namespace
from state.rfm import Limits, Window
from stream.allocator import MAX_GC_THRESHOLD
from stream.scoring import FixedThresholds, ScoringConfig
from stream.timeline import TimePolicy
from stream.trainer import TrainerConfig
from stream.validation import InputRules


class Settings(BaseSettings):
    """Service configuration. Environment: ``RFM_<FIELD>`` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="RFM_", frozen=True, extra="ignore")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then ``RFM_*`` environment variables, then the optional TOML file named
        by ``RFM_CONFIG_FILE`` (field names as keys, e.g. ``partitions = 8``)."""
        path = os.environ.get("RFM_CONFIG_FILE")
        if not path:
            return (init_settings, env_settings)
        import tomllib

        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"RFM_CONFIG_FILE {path!r} does not exist")
        unknown = set(tomllib.loads(file.read_text("utf-8"))) - set(cls.model_fields)
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=file))

    # --- connections
    kafka_url: str = Field("kafka://127.0.0.1:9092", description="faust broker URL(s), kafka://host:port;host2:port")
    redis_url: SecretStr = Field(SecretStr("redis://127.0.0.1:6379/0"),
                                 description="Redis URL (redis:// or rediss://; may hold a password)")
    namespace: str = Field("live", description="State key namespace (rfm:<namespace>:...)")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol of every client (worker, load, replay)")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = Field(None, description="CA bundle for SSL/SASL_SSL "
                                         "(default: the system's)")

    # --- topics
    app_id: str = Field("rfm-stream", description="faust app id = Kafka consumer group id")
    purchases_topic: str = "purchases"
    dead_letter_topic: str = "purchases-dlq"
    segment_changes_topic: str = "segment-changes"
    customer_segments_topic: str = Field("customer-segments",
                                         description="Compacted: each customer's latest change")
    partitions: int = Field(4, ge=1, description="Partitions of the purchases topic")

    # --- worker
    stream_processing_timeout_s: float = Field(300.0, gt=0, description="faust logs a "
                                               "partition whose records wait unprocessed this "
                                               "long (seconds)")
    fetch_max_wait_ms: int = Field(20, ge=0, le=10_000, description="How long the broker may "
                                   "hold a fetch that found nothing (ms): the worst delay of a "
                                   "record arriving at an idle worker")
    batch_max: int = Field(2000, ge=1, description="Max records per processing batch (one "
                           "fetch from the broker)")
    session_timeout_s: float = Field(30.0, gt=0, description="Kafka consumer session timeout (s)")
    heartbeat_interval_s: float = Field(3.0, gt=0, description="Kafka heartbeat interval (s)")
    commit_interval_s: float = Field(1.0, gt=0, description="Offset commit interval (s)")
    web_bind: str = Field("127.0.0.1", description="Address of the HTTP server (/metrics, ...)")
    web_port: int = Field(6066, ge=1, le=65535, description="Port of the HTTP server")
    http_token: SecretStr | None = Field(None, description="When set, every endpoint but "
                                         "/health requires 'Authorization: Bearer <token>'")
    ready_stall_s: float = Field(60.0, gt=0, description="/ready fails when records wait and "
                                 "no batch was applied for this long (s)")
    metrics_prefix: str = "rfm"
    data_dir: str = Field(str(Path(tempfile.gettempdir()) / f"rfm-stream-{os.getuid()}"),
                          description="faust's data directory (this service keeps no faust "
                          "tables); per user by default: another user's is not writable")

    # --- input rules
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$", description="Reporting currency (ISO 4217)")
    currency_decimals: int = Field(2, ge=0, le=4, description="Minor-unit digits of the currency")
    max_message_bytes: int = Field(65536, ge=256, description="Larger records are dead letters")
    max_future_skew_s: float = Field(86400.0, ge=0,
                                     description="Event times further in the future than this "
                                     "(vs. the wall clock) are dead letters (seconds)")
    recent_event_ids: int = Field(32, ge=1, description="Event ids remembered per customer")
    recent_order_ids: int = Field(32, ge=1, description="Order ids remembered per customer")
    state_format: int = Field(STATE_FORMAT, ge=2, le=STATE_FORMAT,
                              description="Format of the customer values written: 4, or 3 or 2 "
                              "while workers of a release before format 4 or 3 may still run "
                              "(all are read)")
    population_layout: Literal["auto", "sorted_sets", "chunked"] = Field(
        "auto", description="How Redis keeps each partition's recency, frequency and monetary "
        "populations: one sorted set each (~310 B per customer), or chunks of at most 127 "
        "customers (~60 B per customer, about twice the Redis time per write and several times "
        "per threshold refresh; no window_days). A namespace keeps the layout it was written "
        "with; auto: that one, and for a new namespace chunked (sorted_sets with window_days)")

    # --- scoring
    scoring_mode: Literal["quintiles", "fixed"] = Field(
        "quintiles", description="quintiles of the population, or always the fixed thresholds")
    threshold_refresh_every: int = Field(1000, ge=1,
                                         description="Offsets per partition between refreshes "
                                         "of the quintile thresholds")
    min_population: int = Field(100, ge=1,
                                description="Below this many customers, fixed thresholds score")
    fixed_recency_days: tuple[int, int, int, int] = Field(
        (30, 90, 180, 365), description="Recency upper bounds (days) for R = 5, 4, 3, 2")
    fixed_frequency: tuple[int, int, int, int] = Field(
        (2, 3, 5, 8), description="Frequency lower bounds for F = 2, 3, 4, 5")
    fixed_monetary: tuple[float, float, float, float] = Field(
        (50.0, 100.0, 250.0, 500.0),
        description="Monetary lower bounds (currency units) for M = 2, 3, 4, 5")
    segment_table: str | None = Field(None, description="Path of a segment rule table (TOML); "
                                      "default: the table shipped in stream/segments.toml")

    # --- time
    as_of_mode: Literal["watermark", "wall_clock"] = Field(
        "watermark", description="Score at the event-time watermark (replays are "
        "deterministic) or at the wall clock")
    idle_partition_s: float = Field(60.0, ge=0, description="A partition with no applied event "
                                    "for this long stops holding the watermark back (s; 0: never)")
    min_dwell_s: float = Field(86400.0, ge=0, description="Flapping guard: event time a customer "
                               "keeps its segment after a change, unless a purchase moves it "
                               "(s; 0: off)")
    rescore_spacing_ms: int = Field(10, ge=0, description="Event time between two re-scores "
                                    "after a threshold refresh (rate limit of cause=rescore)")
    replay_max_skew_s: float = Field(604800.0, gt=0, allow_inf_nan=False, description="Event time a replayed "
                                     "partition may run ahead of the next record of any other "
                                     "(s): the partitions move through history together")
    live_max_skew_s: float = Field(604800.0, ge=0, allow_inf_nan=False,
                                   description="Event time a live worker's "
                                   "partition may run ahead of its other partitions (s) while "
                                   "they catch up on a backlog; records further ahead wait "
                                   "(0: apply every fetch as it comes)")
    window_days: int = Field(0, ge=0, description="Count frequency and monetary over the last "
                             "N days only (0: all time); a multiple of window_bucket_days")
    window_bucket_days: int = Field(30, ge=1, description="Window bucket width (days)")
    sweep_interval_s: float = Field(1.0, gt=0, description="How often owned partitions are "
                                    "swept for customers due without an event (s)")
    cache_customers: int = Field(20_000, ge=0, description="Customers a worker keeps decoded "
                                 "in memory after committing them (0: none; about 2-3 KB "
                                 "each; see README)")
    max_due_per_step: int = Field(10_000, ge=1, description="Due customers read per step")
    # upper bounds: mallopt takes a C int (a larger value wraps silently), and glibc's own
    # maximum threshold is 32 MiB on 64-bit (mallopt(3), DEFAULT_MMAP_THRESHOLD_MAX)
    malloc_mmap_threshold_bytes: int = Field(4_194_304, ge=0, le=33_554_432,
                                             description="glibc only: blocks this large or "
                                             "larger are mmap-ed and returned on free; a fixed "
                                             "threshold keeps RSS flat (bytes, at most 32 MiB; "
                                             "0: glibc's dynamic default)")
    malloc_arena_max: int = Field(2, ge=0, le=1_024, description="glibc only: most malloc "
                                  "arenas of a worker (0: glibc's default)")
    gc_thresholds: tuple[int, int, int] = Field(
        (50_000, 20, 20), description="Python's cyclic GC thresholds in a worker "
        "(gc.set_threshold; Python's default is [700,10,10]), each in 1..10,000,000")
    gc_freeze: bool = Field(True, description="Once a worker has started, move the objects "
                            "start-up made out of the cyclic GC's reach (gc.freeze)")

    # --- clustering
    n_clusters: int = Field(5, ge=2, le=20)
    cluster_seed: int = 42
    cluster_halflife: float = Field(0.05, gt=0, le=1,
                                    description="River KMeans step towards each point")
    cluster_min_customers: int = Field(100, ge=1,
                                       description="No cluster id before this many customers")
    train_sample_size: int = Field(500, ge=1, description="Customers the trainer samples and "
                                   "learns per step (one step per threshold block of "
                                   "partition 0)")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return check_namespace(value)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        for name in ("fixed_recency_days", "fixed_frequency", "fixed_monetary"):
            bounds = getattr(self, name)
            if list(bounds) != sorted(bounds):
                raise ValueError(f"{name} must be ascending, got {bounds}")
        try:  # what redis-py will parse: a scheme it knows, a numeric port (no value shown)
            url = urlsplit(self.redis_url.get_secret_value())
            url.port  # noqa: B018 - raises ValueError when not a number
        except ValueError:
            raise ValueError("redis_url: not a URL with a numeric port") from None
        if url.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        if self.window_days and self.window_days % self.window_bucket_days:
            raise ValueError("window_days must be a multiple of window_bucket_days")
        if self.window_days and self.population_layout == "chunked":
            raise ValueError("RFM_POPULATION_LAYOUT=chunked keeps no window: RFM_WINDOW_DAYS "
                             "must be 0 (a chunk finds a customer by the values it was stored "
                             "with, which a window moves without a write)")
        if not all(1 <= t <= MAX_GC_THRESHOLD for t in self.gc_thresholds):
            raise ValueError(f"gc_thresholds must all be in 1..{MAX_GC_THRESHOLD:,} (0 or huge "
                             f"values turn collection off), got {self.gc_thresholds}")
        if self.kafka_security_protocol.startswith("SASL") and not (
                self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(f"kafka_security_protocol {self.kafka_security_protocol} needs "
                             "kafka_sasl_username and kafka_sasl_password")
        if self.kafka_security_protocol.endswith("SSL") and self.kafka_ssl_cafile:
            import ssl

            try:  # refused here with the path, not by the first client that connects
                ssl.create_default_context(cafile=self.kafka_ssl_cafile)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"kafka_ssl_cafile {self.kafka_ssl_cafile!r} cannot be "
                                 f"used: {exc}") from None
        if self.heartbeat_interval_s >= self.session_timeout_s:
            raise ValueError("heartbeat_interval_s must be below session_timeout_s")
        return self

    @property
    def limits(self) -> Limits:
        return Limits(self.recent_event_ids, self.recent_order_ids,
                      text_ids=self.state_format < STATE_FORMAT)

    def time_policy(self) -> TimePolicy:
        """How time moves scores: as-of mode, idleness, flapping guard, rescore rate, window."""
        return TimePolicy(self.as_of_mode, round(self.idle_partition_s * 1000),
                          round(self.min_dwell_s * 1000), self.rescore_spacing_ms,
                          Window(self.window_days, self.window_bucket_days)
                          if self.window_days else None)

    def trainer(self) -> TrainerConfig:
        """The clustering model's parameters and training sample size."""
        return TrainerConfig(self.n_clusters, self.cluster_seed, self.cluster_halflife,
                             self.cluster_min_customers, self.train_sample_size)

    def fixed_thresholds(self) -> FixedThresholds:
        """The fixed business thresholds, monetary converted to minor units."""
        scale = 10 ** self.currency_decimals
        m = tuple(round(x * scale) for x in self.fixed_monetary)
        return FixedThresholds(self.fixed_recency_days, self.fixed_frequency,
                               (m[0], m[1], m[2], m[3]))

    def scoring(self) -> ScoringConfig:
        """How the worker makes its scoring thresholds."""
        return ScoringConfig(self.scoring_mode, self.fixed_thresholds(), self.min_population,
                             self.threshold_refresh_every)

    def input_rules(self) -> InputRules:
        """What a valid input record is."""
        return InputRules(self.currency, self.currency_decimals, self.max_message_bytes,
                          round(self.max_future_skew_s * 1000))

    def redacted(self) -> dict[str, object]:
        """Settings safe to log (secrets masked)."""
        return self.model_dump(mode="json")


def explain(exc: ValidationError) -> str:
    """One line per invalid setting, named as the environment variable that sets it, e.g.
    ``RFM_PARTITIONS = 'abc': Input should be a valid integer, ...`` (or as the key of the
    ``RFM_CONFIG_FILE`` when no variable sets it). The value is shown except for secrets
    (Redis URL, SASL password, HTTP token); checks across several settings have no single
    name."""
    env = {k.upper() for k in os.environ}
    config = os.environ.get("RFM_CONFIG_FILE")
    lines = []
    for error in exc.errors(include_url=False):
        field = ".".join(map(str, error.get("loc", ())))
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        if not field:
            lines.append(message)
            continue
        name, where = f"RFM_{field.upper()}", ""
        if config and name not in env:
            name, where = field, f" (in {config})"
        shown = Settings.model_fields.get(field.split(".")[0])
        secret = shown is not None and "SecretStr" in str(shown.annotation)
        value = "" if secret or "input" not in error else f" = {error['input']!r}"
        lines.append(f"{name}{value}{where}: {message}")
    return "\n  ".join(lines)
