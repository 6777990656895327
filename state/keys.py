"""Redis key layout.

Every key of a customer carries the hash tag of its Kafka partition, and nothing else is in
braces: ``rfm:<namespace>:{p<partition>}:<kind>[:<customer_id>]``. Redis Cluster hashes only
the first ``{...}``, so all keys of one partition live in one slot and one Lua call can update
a whole batch of that partition atomically.

Kinds
-----
``meta``          hash: ``offset`` (last applied Kafka offset), ``wm`` (max event time, epoch ms),
                  ``asof`` (the partition's as-of time, epoch ms, never moving back), ``seen``
                  (wall clock of the last applied event, for idleness), ``thr`` (the
                  partition's current scoring thresholds, JSON), ``seq`` (commit sequence),
                  ``tok`` (random token of the last commit: a writer's customer cache is
                  valid while it is the token that writer committed), ``pub`` (token of the
                  partition's outbox publisher, claimed by each new owner on assignment:
                  the outbox is read and acknowledged only with it)
``c:<id>``        string: the customer's RFM state and what was last published for it
                  (fields in ``state/codec.py``)
``due``           sorted set: customer -> event time (epoch ms) at which it must be re-scored
                  without an event (recency bound, window expiry, flapping guard, rescore)
``z:last``        sorted set: customer -> last purchase (epoch ms), the recency population
``z:freq``        sorted set: customer -> frequency, the frequency population
``z:mon``         sorted set: customer -> monetary (minor units), the monetary population
                  (these three: the ``sorted_sets`` population layout)
``p:<dim>:...``    the ``chunked`` population layout (a new namespace's with
                  ``RFM_POPULATION_LAYOUT=auto``, instead of the three sorted sets), ``<dim>``
                  one of ``last``, ``freq``, ``mon``: the same customer -> value populations
                  as chunks of at most 127 customers, with their index, sizes and groups
                  (``state/lua/chunks.lua``)
``segcount``      hash: segment name -> number of customers whose stored segment it is
``outbox``        stream: segment-change events not yet acknowledged by Kafka (field ``v``)
``layout``        string (partition 0's slot only): the namespace's population layout,
                  ``sorted_sets`` or ``chunked``, set by the first worker or replay
``model``         string: the latest clustering model snapshot (JSON), written by the commit of
                  the trainer's partition (0) only; ``model:version``: its version, which
                  workers poll
"""

from __future__ import annotations

from dataclasses import dataclass

NAMESPACE_RESERVED = "{}:*?[]\\"  # the key layout's separators, hash tags, glob characters
# and the glob escape (a breaker's l\ive matched, and dropped, the keys of live)


def check_namespace(name: str) -> str:
    """``name`` if it can be a namespace: not empty, none of ``{}:*?[]\\``, no whitespace or
    control character (an alias set by hand to ``"live "`` pointed every command at an empty
    namespace).

    Raises
    ------
    ValueError
        Naming the name and what is wrong with it.

    >>> check_namespace("rebuild-2026")
    'rebuild-2026'
    >>> check_namespace("live ")
    Traceback (most recent call last):
    ...
    ValueError: invalid namespace 'live ': no whitespace or control characters
    """
    if not name:
        raise ValueError("invalid namespace '': empty")
    if any(ch in NAMESPACE_RESERVED for ch in name):
        raise ValueError(f"invalid namespace {name!r}: none of {NAMESPACE_RESERVED}")
    if not name.isprintable() or any(ch.isspace() for ch in name):
        raise ValueError(f"invalid namespace {name!r}: no whitespace or control characters")
    return name


@dataclass(frozen=True, slots=True)
class PartitionKeys:
    """The keys of one (namespace, partition).

    Examples
    --------
    >>> k = PartitionKeys("live", 7)
    >>> k.customer("00042"), k.meta
    ('rfm:live:{p7}:c:00042', 'rfm:live:{p7}:meta')
    """

    namespace: str
    partition: int

    def __post_init__(self) -> None:
        check_namespace(self.namespace)
        if self.partition < 0:
            raise ValueError(f"invalid partition {self.partition}")

    @property
    def prefix(self) -> str:
        return f"rfm:{self.namespace}:{{p{self.partition}}}:"

    @property
    def meta(self) -> str:
        return self.prefix + "meta"

    @property
    def z_last(self) -> str:
        return self.prefix + "z:last"

    @property
    def z_freq(self) -> str:
        return self.prefix + "z:freq"

    @property
    def z_mon(self) -> str:
        return self.prefix + "z:mon"

    @property
    def chunk_bases(self) -> tuple[str, str, str]:
        """Key prefixes of the chunked recency, frequency and monetary populations."""
        return self.prefix + "p:last:", self.prefix + "p:freq:", self.prefix + "p:mon:"

    @property
    def segcount(self) -> str:
        return self.prefix + "segcount"

    @property
    def outbox(self) -> str:
        return self.prefix + "outbox"

    @property
    def model(self) -> str:
        return self.prefix + "model"

    @property
    def model_version(self) -> str:
        return self.prefix + "model:version"

    @property
    def due(self) -> str:
        return self.prefix + "due"

    def customer(self, customer_id: str) -> str:
        return self.prefix + "c:" + customer_id

    @property
    def customer_pattern(self) -> str:
        """SCAN pattern of this partition's customers (braces escaped for glob)."""
        return f"rfm:{self.namespace}:\\{{p{self.partition}\\}}:c:*"


def model_keys(namespace: str) -> tuple[str, str]:
    """Keys of the clustering model snapshot and its version (in the trainer partition's slot).

    >>> model_keys("live")
    ('rfm:live:{p0}:model', 'rfm:live:{p0}:model:version')
    """
    k = PartitionKeys(namespace, 0)
    return k.model, k.model_version


def layout_key(namespace: str) -> str:
    """Key of the namespace's population layout (in partition 0's slot).

    >>> layout_key("live")
    'rfm:live:{p0}:layout'
    """
    return PartitionKeys(namespace, 0).prefix + "layout"


def alias_key(name: str) -> str:
    """Key naming the namespace a configured namespace name resolves to (set by
    ``rfm-stream replay --switch``): ``rfm:alias:<name>``."""
    return f"rfm:alias:{name}"


def replay_claim_key(namespace: str) -> str:
    """Key a replay sets (``SET NX``) before it writes into ``namespace``, so that a second
    replay started at the same moment is refused: ``rfm:replay:<namespace>``."""
    return f"rfm:replay:{namespace}"


def live_frontier_key(namespace: str) -> str:
    """Hash where the workers of the group that writes ``namespace`` publish the event-time
    frontier of each partition they own (``stream.fastpath``: field = partition, value =
    ``"<frontier ms> <wall clock ms> <records fetched>"``): ``rfm:live:<namespace>:frontier``."""
    return f"rfm:live:{namespace}:frontier"


def replay_frontier_key(namespace: str) -> str:
    """Hash where the processes of one replay into ``namespace`` publish each partition's
    event-time frontier (``stream.interleave``): ``rfm:replay:<namespace>:frontier``."""
    return f"rfm:replay:{namespace}:frontier"
