"""The Redis Cluster backend: `shardkv.open("redis://host:port[,host:port...]")`.

The same API as the local store, on an existing Redis Cluster (or Valkey, same protocol),
through redis-py's `RedisCluster` (blocking) and `redis.asyncio.cluster.RedisCluster`. What
maps natively keeps the local store's semantics and errors; what does not raises
`shardkv.Unsupported` before anything is sent. docs/BACKENDS.md is the user's view; this
docstring is the layout.

Keys. A store is a *namespace* (default "skv") of the cluster. It has `buckets` buckets (256
unless chosen at creation, at most 16384), fixed at creation in the metadata hash `<ns>:meta`,
each pinned to one hash slot by a hash tag `{t}` picked so that CRC16(t) lands on that slot
(the tags are spread evenly over the slots and stored in the metadata). A user key k belongs to
bucket `slot(k) % buckets`, where slot(k) is Redis's own hash slot of k, hash tags included; it
is stored as the string `<ns>{t}:k`. So keys that share a hash slot (`{user42}:name`,
`{user42}:email`) share a bucket, hence a Redis slot, and one Lua script can change them
atomically. A batch is atomic when all its keys have one slot(k); otherwise it raises
Unsupported naming the slots (no two-phase commit of our own on top of Redis).

Ordered index. Redis keeps no key order across a cluster, so an ordered store (the default)
also keeps, per bucket, a sorted set `<ns>{t}#i` of its keys (score 0, ordered by bytes, read
with ZRANGEBYLEX), changed by the same script as each write: the data and its index entry
never disagree. Keys with a ttl are also in `<ns>{t}#e` (score: expiry in ms), so that `len`
and scans can drop the index entries of keys Redis has expired by itself. A scan reads a page
of keys of every bucket (ZRANGEBYLEX, pipelined per node), merges the pages in the client and
reads the values of the keys it hands out (MGET per bucket). Every script names in KEYS every
key it touches, so that a slot being resharded answers TRYAGAIN or ASK rather than letting a
script see half of it. `open(..., ordered=False)` at creation keeps no index: writes are plain
SET/DEL and ordered calls raise Unsupported.

Failures. redis-py's own retries are off (a retried script could run twice). Reads are
retried here until `retry_timeout`; a write is retried only when it provably was not sent or
was refused by the server (connection refused, CLUSTERDOWN, TRYAGAIN, MOVED, READONLY,
LOADING); a write whose connection failed after it was sent raises `shardkv.Unavailable`:
it may or may not have been applied. The blocking client sends a command first straight to the
node that last served its slot (`RedisClusterStore._call`), the cluster client's way after that.
"""

from __future__ import annotations

import math

import asyncio
import functools
import heapq
import inspect
import itertools
import re
import time
from binascii import crc_hqx
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

import redis
from redis import exceptions as rex
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from shardkv.backends import Features
from shardkv.batches import MAX_BATCH_BYTES, MAX_BATCH_OPS, Batch, check_limits, check_ops, put_many_ops
from shardkv.aio import AsyncBatch
from shardkv.errors import Closed, Conflict, Error, StorageError, Unavailable, Unsupported
from shardkv.ipc.messages import OP_DELETE, OP_EXPECT, OP_EXPECT_ABSENT, OP_PUT, OP_PUT_TTL
from shardkv.limits import DEFAULT_MAX_VALUE_SIZE, MAX_KEY_LEN, check_key, check_scan_args, check_value, ttl_milliseconds
from shardkv.orderedmapping import ScanMapping, update_pairs

SLOTS = 16384
DEFAULT_NAMESPACE = "skv"
DEFAULT_BUCKETS = 256
LAYOUT_VERSION = "1"
DEFAULT_RETRY_TIMEOUT = 30.0
DEFAULT_SOCKET_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0
SCAN_FIRST_PAGE = 32  # keys per bucket in a scan's first round (a bucket's next pages grow 4x, up to SCAN_PAGE)
SCAN_PAGE = 1024
DURABILITY_ORDER = ("process", "interval", "fsync")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")

# -- Lua ---------------------------------------------------------------------------------------
# Every script touches one bucket: its data keys, index and expiry set share a hash tag. A data
# key is P..":"..member and the index P.."#i", so member = string.sub(data, #index).
LUA_PUT = """
local member = string.sub(KEYS[1], #KEYS[2])
if ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('ZADD', KEYS[3], redis.call('PEXPIRETIME', KEYS[1]), member)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('ZADD', KEYS[2], 0, member)
return 1
"""

LUA_DELETE = """
local member = string.sub(KEYS[1], #KEYS[2])
redis.call('ZREM', KEYS[2], member)
redis.call('ZREM', KEYS[3], member)
return redis.call('DEL', KEYS[1])
"""

# ARGV: '1' if an expected value is given, the expected value, '1' if a new value is given, it.
LUA_CAS = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if current ~= ARGV[2] then return 0 end
elseif current then
  return 0
end
if ARGV[3] == '1' then
  redis.call('SET', KEYS[1], ARGV[4])
  if KEYS[2] then redis.call('ZADD', KEYS[2], 0, string.sub(KEYS[1], #KEYS[2])) end
elseif current then
  redis.call('DEL', KEYS[1])
  if KEYS[2] then
    local member = string.sub(KEYS[1], #KEYS[2])
    redis.call('ZREM', KEYS[2], member)
    redis.call('ZREM', KEYS[3], member)
  end
end
return 1
"""

# ARGV: the ttl in ms, or '' to make the key permanent.
LUA_EXPIRE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] == '' then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  if KEYS[3] then redis.call('ZADD', KEYS[3], redis.call('PEXPIRETIME', KEYS[1]), string.sub(KEYS[1], #KEYS[2])) end
end
return 1
"""

# KEYS: index, expiry set, then each operation's data key. ARGV: one letter per operation
# (p put, P put with ttl, d delete, e expect a value, a expect absent), '1' to keep the index,
# then the operations' arguments in order (p: value; P: value, ttl ms; e: value). Preconditions
# are all checked first, against the state before the batch; a failed one returns {0, its
# position} and nothing is written.
LUA_BATCH = """
local kinds, indexed, cut = ARGV[1], ARGV[2] == '1', #KEYS[1]
local a = 3
for i = 1, #kinds do
  local kind = string.sub(kinds, i, i)
  if kind == 'e' then
    if redis.call('GET', KEYS[i + 2]) ~= ARGV[a] then return {0, i} end
    a = a + 1
  elseif kind == 'a' then
    if redis.call('EXISTS', KEYS[i + 2]) == 1 then return {0, i} end
  elseif kind == 'p' then
    a = a + 1
  elseif kind == 'P' then
    a = a + 2
  end
end
a = 3
for i = 1, #kinds do
  local kind, key = string.sub(kinds, i, i), KEYS[i + 2]
  if kind == 'p' then
    redis.call('SET', key, ARGV[a])
    if indexed then redis.call('ZADD', KEYS[1], 0, string.sub(key, cut)) end
    a = a + 1
  elseif kind == 'P' then
    redis.call('SET', key, ARGV[a], 'PX', ARGV[a + 1])
    if indexed then
      local member = string.sub(key, cut)
      redis.call('ZADD', KEYS[1], 0, member)
      redis.call('ZADD', KEYS[2], redis.call('PEXPIRETIME', key), member)
    end
    a = a + 2
  elseif kind == 'd' then
    redis.call('DEL', key)
    if indexed then
      local member = string.sub(key, cut)
      redis.call('ZREM', KEYS[1], member)
      redis.call('ZREM', KEYS[2], member)
    end
  elseif kind == 'e' then
    a = a + 1
  end
end
return {1}
"""

# The live keys of a bucket, before dropping expired ones: {ZCARD of the index, the members of
# the expiry set whose time has passed}. KEYS: index, expiry set. Read only; the caller sends
# the due members to LUA_DROP (which names their data keys: see there).
LUA_COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {redis.call('ZCARD', KEYS[1]), redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)}
"""

# Drop from the index the members whose key is gone (Redis expired it by itself), and fix
# their entries in the expiry set. KEYS: index, expiry set, then the data keys to check: every
# key a script touches is named in KEYS, so that a slot being resharded answers TRYAGAIN or
# ASK instead of a script seeing half of it. Returns how many index entries it removed.
LUA_DROP = """
local removed, cut = 0, #KEYS[1]
for i = 3, #KEYS do
  local member = string.sub(KEYS[i], cut)
  local at = redis.call('PEXPIRETIME', KEYS[i])
  if at == -2 then
    removed = removed + redis.call('ZREM', KEYS[1], member)
    redis.call('ZREM', KEYS[2], member)
  elseif at == -1 then
    redis.call('ZREM', KEYS[2], member)
  else
    redis.call('ZADD', KEYS[2], at, member)
  end
end
return removed
"""

# The store's metadata: written by the first opener only, read by every one.
LUA_META = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
return redis.call('HGETALL', KEYS[1])
"""

SCRIPTS = {"put": LUA_PUT, "delete": LUA_DELETE, "cas": LUA_CAS, "expire": LUA_EXPIRE, "batch": LUA_BATCH, "count": LUA_COUNT, "drop": LUA_DROP, "meta": LUA_META}


def _sha1(text: str) -> str:
    import hashlib  # noqa: PLC0415

    return hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - the script cache's own key


SHAS = {name: _sha1(body) for name, body in SCRIPTS.items()}


# -- URLs --------------------------------------------------------------------------------------
@dataclass
class ParsedURL:
    """A redis:// or rediss:// URL: the startup nodes, TLS, credentials and the options given
    in its query string (namespace, ordered, buckets, retry_timeout, socket_timeout,
    connect_timeout)."""

    nodes: list[tuple[str, int]]
    ssl: bool = False
    username: str | None = None
    password: str | None = None
    options: dict = field(default_factory=dict)


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


QUERY_OPTIONS = {"namespace": str, "ordered": _bool, "buckets": int, "retry_timeout": float, "socket_timeout": float, "connect_timeout": float}
_URL_PARTS = re.compile(r"^(rediss?)://(?:([^@/?#]*)@)?([^/?#]*)(/0?)?(?:\?([^#]*))?$", re.IGNORECASE)
_HOST_PORT = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]+))(?::(\d+))?$")


def parse_url(url: str) -> ParsedURL:
    """`redis://[user:password@]host:port[,host:port...][?option=value&...]` (or rediss://
    for TLS) as a ParsedURL; ValueError saying what is wrong. A missing port is 6379; the only
    database a Redis Cluster has is 0, so a path other than /0 is refused."""
    if not isinstance(url, str):
        raise TypeError(f"a Redis Cluster URL must be a str, not {type(url).__name__}")
    match = _URL_PARTS.match(url)
    if match is None:
        raise ValueError(f"not a Redis Cluster URL (redis://host:port[,host:port...]): {url!r}")
    scheme, userinfo, hosts, _path, query = match.groups()
    nodes = []
    for part in hosts.split(","):
        node = _HOST_PORT.match(part.strip())
        if node is None:
            raise ValueError(f"bad host:port {part!r} in {url!r}")
        host = node.group(1) or node.group(2)
        port = int(node.group(3) or 6379)
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port} in {url!r}")
        nodes.append((host, port))
    username = password = None
    if userinfo is not None:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    options = {}
    for name, value in parse_qsl(query or "", keep_blank_values=True, strict_parsing=bool(query)):
        if name not in QUERY_OPTIONS:
            raise ValueError(f"unknown option {name!r} in {url!r} (known: {', '.join(QUERY_OPTIONS)})")
        options[name] = QUERY_OPTIONS[name](value)
    return ParsedURL(nodes, scheme.lower() == "rediss", username, password, options)


# -- the layout --------------------------------------------------------------------------------
def user_slot(key: bytes) -> int:
    """Redis Cluster's hash slot of `key`: CRC16 of the key, or of its hash tag (the bytes
    between the first "{" and the next "}", when not empty), modulo 16384."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc_hqx(key, 0) & (SLOTS - 1)


@functools.lru_cache(maxsize=8)
def make_tags(buckets: int) -> tuple[str, ...]:
    """One hash tag per bucket, bucket b's tag hashing to the middle of the b-th of `buckets`
    equal ranges of slots (so the buckets spread evenly over the masters): the first of
    "0", "1", ... "z", "10", ... (base 36) that lands there."""
    wanted = {((2 * b + 1) * SLOTS) // (2 * buckets): b for b in range(buckets)}
    tags: list[str | None] = [None] * buckets
    missing, i = buckets, 0
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    while missing:
        n, text = i, ""
        while True:
            n, r = divmod(n, 36)
            text = digits[r] + text
            if not n:
                break
        bucket = wanted.get(crc_hqx(text.encode(), 0) & (SLOTS - 1))
        if bucket is not None and tags[bucket] is None:
            tags[bucket] = text
            missing -= 1
        i += 1
    return tuple(tags)  # type: ignore[arg-type]


class Layout:
    """The Redis keys of one store (see the module docstring)."""

    def __init__(self, namespace: str, tags: list[str], ordered: bool):
        self.namespace, self.tags, self.ordered = namespace, tags, ordered
        self.buckets = len(tags)
        ns = namespace.encode()
        self.prefix = [ns + b"{" + tag.encode() + b"}:" for tag in tags]
        self.index = [ns + b"{" + tag.encode() + b"}#i" for tag in tags]
        self.expiry = [ns + b"{" + tag.encode() + b"}#e" for tag in tags]
        self.slot = [crc_hqx(tag.encode(), 0) & (SLOTS - 1) for tag in tags]
        self.pattern = ns + b"{*"  # SCAN MATCH: every key of the store (not its metadata)
        # slot(k) -> bucket, as a list: one index instead of a modulo on the hot paths
        self.bucket_of_slot = [s % self.buckets for s in range(SLOTS)]

    @staticmethod
    def meta_key(namespace: str) -> bytes:
        """The metadata hash of a namespace (no hash tag: it is never in a batch)."""
        return namespace.encode() + b":meta"

    def bucket(self, key: bytes) -> int:
        """The bucket of a user key."""
        return self.bucket_of_slot[user_slot(key)]


# -- errors ------------------------------------------------------------------------------------
_NOT_APPLIED = tuple(
    cls
    for cls in (
        rex.ClusterDownError,
        rex.TryAgainError,
        rex.AskError,  # and MovedError
        rex.ReadOnlyError,
        rex.BusyLoadingError,
        getattr(rex, "MaxConnectionsError", None),
        getattr(rex, "MaxClientsReachedError", None),
        rex.SlotNotCoveredError,
    )
    if cls is not None
)
_CLIENT_BUGS = tuple(cls for cls in (getattr(rex, "CrossSlotTransactionError", None), getattr(rex, "InvalidPipelineStack", None)) if cls is not None)
RETRY, UNKNOWN = "retry", "unknown"


def classify(exc: BaseException):
    """What a failure of a request to the cluster means: RETRY (certainly not applied: safe
    to send again), UNKNOWN (the connection failed after it may have been sent), or the
    exception to raise (a shardkv error, or `exc` itself when it is not the cluster's)."""
    cause = exc
    unreachable = getattr(rex, "RedisClusterUnreachableError", None)
    if unreachable is not None and isinstance(exc, unreachable) and exc.__cause__ is not None:
        cause = exc.__cause__  # a refresh found no node; what failed first decides
    if isinstance(cause, (rex.AuthenticationError, getattr(rex, "AuthorizationError", rex.AuthenticationError), rex.NoPermissionError)):
        return Error(f"the Redis Cluster refused this client: {cause}")
    if isinstance(cause, _NOT_APPLIED):
        return RETRY
    if isinstance(cause, (rex.ConnectionError, rex.TimeoutError)):
        text = str(cause)
        # Raised by connect() (the blocking client also names the node, not a connection, as
        # the error's connection then): the request was never written to a socket.
        if isinstance(getattr(cause, "connection", None), ClusterNode) or " connecting to " in text or text.startswith("Timeout connecting"):
            return RETRY
        return UNKNOWN
    if isinstance(cause, rex.NoScriptError):
        return exc  # the caller sends the script's text instead
    if isinstance(cause, rex.ResponseError):
        text = str(cause)
        if isinstance(cause, getattr(rex, "OutOfMemoryError", ())) or text.startswith("OOM"):
            return StorageError(f"the Redis server refused the write (nothing applied): {text}")
        if text.startswith(("CLUSTERDOWN", "TRYAGAIN", "MOVED", "ASK", "READONLY", "LOADING", "MASTERDOWN")):
            return RETRY
        if text.startswith("WRONGTYPE"):
            return Error(f"a key of this store holds another Redis type (written by something other than shardkv?): {text}")
        return Error(f"the Redis Cluster answered an error: {text}")
    if isinstance(cause, _CLIENT_BUGS):
        return exc
    if isinstance(cause, rex.RedisClusterException):
        return RETRY  # no node known for a slot yet, no reachable node: nothing was sent
    return exc


def _unavailable(exc: BaseException, what: str) -> Unavailable:
    return Unavailable(f"{what}: {type(exc).__name__}: {exc}")


class _Retry:
    """The retry state of one request: how long to sleep before the next attempt, or raise."""

    __slots__ = ("deadline", "pause", "timeout")

    def __init__(self, timeout: float):
        self.timeout, self.deadline, self.pause = timeout, None, 0.005

    def next_pause(self, exc: BaseException, write: bool) -> float:
        """The seconds to wait before sending again; raises what the caller must raise."""
        verdict = classify(exc)
        if isinstance(verdict, BaseException):
            if verdict is exc:
                raise exc
            raise verdict from exc
        if verdict == UNKNOWN and write:
            raise _unavailable(exc, "the connection to the Redis Cluster failed during a write: it may or may not have been applied") from exc
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + self.timeout
        if now >= self.deadline:
            raise _unavailable(exc, f"the Redis Cluster did not serve the request within {self.timeout:g} s (retry_timeout)") from exc
        pause, self.pause = self.pause, min(self.pause * 2, 0.2)
        return min(pause, max(0.0, self.deadline - now))


# -- options -----------------------------------------------------------------------------------
@dataclass
class Options:
    """Checked options of one client (open's keyword arguments, or the URL's query)."""

    namespace: str = DEFAULT_NAMESPACE
    ordered: bool | None = None
    buckets: int | None = None
    durability: str | None = None
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    max_batch_ops: int = MAX_BATCH_OPS
    max_batch_bytes: int = MAX_BATCH_BYTES
    redis_options: dict = field(default_factory=dict)


def check_options(url: str, shards, durability, options: dict) -> tuple[ParsedURL, Options]:
    """The URL parsed and every option checked (TypeError/ValueError/Unsupported), before
    anything connects."""
    parsed = parse_url(url)
    if shards is not None:
        raise Unsupported("shards is an option of the local store; a Redis Cluster's shards are its masters (add them with redis-cli --cluster)")
    for name, value in parsed.options.items():
        if name in options and options[name] != value:
            raise ValueError(f"{name} is given twice, differently: {value!r} in the URL, {options[name]!r} as an argument")
    merged = {**parsed.options, **options}
    unknown = set(merged) - {f for f in Options.__dataclass_fields__ if f != "durability"}
    if unknown:
        raise TypeError(f"unknown option(s) for a Redis Cluster store: {', '.join(sorted(unknown))}")
    result = Options(durability=durability, **merged)
    if not isinstance(result.namespace, str) or not _NAMESPACE.match(result.namespace):
        raise ValueError(f"namespace must be 1 to 64 characters of A-Z a-z 0-9 _ . : -, not {result.namespace!r}")
    if result.ordered is not None and not isinstance(result.ordered, bool):
        raise TypeError(f"ordered must be True, False or None, not {type(result.ordered).__name__}")
    if result.buckets is not None:
        if isinstance(result.buckets, bool) or not isinstance(result.buckets, int):
            raise TypeError(f"buckets must be an int, not {type(result.buckets).__name__}")
        if not 1 <= result.buckets <= SLOTS:
            raise ValueError(f"buckets must be between 1 and {SLOTS}, not {result.buckets}")
    if durability is not None and durability not in DURABILITY_ORDER:
        raise ValueError(f"durability must be one of {', '.join(DURABILITY_ORDER)} (or None: the server's setting), not {durability!r}")
    for name in ("retry_timeout", "socket_timeout", "connect_timeout", "max_batch_ops", "max_batch_bytes"):
        value = getattr(result, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, not {type(value).__name__}")
        if not value > 0:
            raise ValueError(f"{name} must be positive, not {value!r}")
    if not isinstance(result.redis_options, dict):
        raise TypeError("redis_options must be a dict of redis-py connection options")
    return parsed, result


def connection_kwargs(parsed: ParsedURL, options: Options) -> dict:
    """redis-py arguments shared by the cluster client and the per-node clients of health()."""
    kwargs = {"socket_timeout": options.socket_timeout, "socket_connect_timeout": options.connect_timeout}
    if parsed.ssl:
        kwargs["ssl"] = True
    if parsed.username is not None:
        kwargs["username"] = parsed.username
    if parsed.password is not None:
        kwargs["password"] = parsed.password
    kwargs.update(options.redis_options)
    return kwargs


def _cluster_kwargs(cls, parsed: ParsedURL, options: Options, retry) -> dict:
    kwargs = connection_kwargs(parsed, options)
    kwargs["retry"] = retry
    parameters = inspect.signature(cls.__init__).parameters
    if int(redis.__version__.split(".")[0]) < 6:
        kwargs["cluster_error_retry_attempts"] = 0  # redis-py 5 retries here, not through `retry`
    if "topology_refresh_min_interval" in parameters:
        kwargs["topology_refresh_min_interval"] = 0.25  # find a promoted replica sooner
    return kwargs


def durability_of(configs: list[dict]) -> str | None:
    """The durability level every master keeps (the weakest of them), from each master's
    CONFIG GET appendonly/appendfsync: "fsync" (appendfsync always), "interval" (everysec),
    "process" (no: written to the OS only); None without the append-only file (or unknown)."""
    levels = []
    for config in configs:
        config = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in config.items()}
        if config.get("appendonly") != "yes":
            return None
        level = {"always": "fsync", "everysec": "interval", "no": "process"}.get(config.get("appendfsync", ""))
        if level is None:
            return None
        levels.append(level)
    return min(levels, key=DURABILITY_ORDER.index) if levels else None


def _describe_durability(configs: list[dict]) -> str:
    parts = set()
    for config in configs:
        config = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in config.items()}
        parts.add(f"appendonly {config.get('appendonly', '?')}, appendfsync {config.get('appendfsync', '?')}")
    return "; ".join(sorted(parts)) or "not readable (CONFIG GET refused)"


def check_durability(wanted: str | None, configs: list[dict] | None) -> str | None:
    """The cluster's level; Unsupported if `wanted` (not None) is not exactly it."""
    level = durability_of(configs) if configs is not None else None
    if wanted is not None and wanted != level:
        described = _describe_durability(configs or [])
        raise Unsupported(
            f"durability is the Redis server's setting, not the client's: the masters run {described}"
            f" ({'no shardkv level' if level is None else repr(level)}), not {wanted!r}; open without durability= or change the servers' appendonly/appendfsync"
        )
    return level


def read_layout(meta: dict, options: Options) -> Layout:
    """The store's Layout from its metadata hash; ValueError where an option given
    contradicts what the store was created with."""
    meta = {k.decode(): v.decode() for k, v in meta.items()}
    if meta.get("layout") != LAYOUT_VERSION:
        raise Error(f"namespace {options.namespace!r} holds a store of layout {meta.get('layout')!r}, which this shardkv does not know (it writes {LAYOUT_VERSION})")
    tags = meta["tags"].split()
    ordered = meta["ordered"] == "1"
    if options.buckets is not None and options.buckets != len(tags):
        raise ValueError(f"namespace {options.namespace!r} was created with {len(tags)} buckets, not {options.buckets}; buckets is fixed at creation")
    if options.ordered and not ordered:
        raise ValueError(f"namespace {options.namespace!r} was created with ordered=False: it has no ordered index to read (copy it into a new namespace to get one)")
    return Layout(options.namespace, tags, ordered)


def new_meta(options: Options) -> list:
    """The metadata fields of a store created with these options (HSET arguments)."""
    tags = make_tags(options.buckets or DEFAULT_BUCKETS)
    ordered = options.ordered is not False
    return ["layout", LAYOUT_VERSION, "ordered", "1" if ordered else "0", "tags", " ".join(tags), "created", repr(time.time())]


# -- requests shared by both clients ----------------------------------------------------------
def _lex(bound: tuple[bytes, bool] | None, low: bool) -> bytes:
    """A ZRANGEBYLEX bound: (key, inclusive) or None (no bound)."""
    if bound is None:
        return b"-" if low else b"+"
    return (b"[" if bound[1] else b"(") + bound[0]


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key after every key that starts with `prefix` (None: there is none)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes((stripped[-1] + 1,))


def scan_bounds(start, stop, prefix) -> tuple:
    """(low, high) bounds of a scan, each (key, inclusive) or None."""
    low = None if start is None else (start, True)
    high = None if stop is None else (stop, False)
    if prefix is not None:
        if low is None or prefix > low[0]:
            low = (prefix, True)
        end = _prefix_end(prefix)
        if end is not None and (high is None or end < high[0] or (end == high[0] and high[1])):
            high = (end, False)
    return low, high


class _Desc:
    """A key that sorts backwards in a heap (descending scans)."""

    __slots__ = ("key",)

    def __init__(self, key: bytes):
        self.key = key

    def __lt__(self, other: "_Desc") -> bool:
        return self.key > other.key


class _Merge:
    """The keys of a scan in order: each bucket's index read a page at a time (ZRANGEBYLEX,
    a page growing 4x from SCAN_FIRST_PAGE to SCAN_PAGE), merged. The clients drive it:
    `step()` gives the next (key, bucket), a list of buckets whose next page must be read
    first (`command(bucket)`, then `absorb(bucket, members)`), or None at the end. Values are
    read afterwards, only for the keys handed out (see `_ScanValues`)."""

    def __init__(self, layout: Layout, low, high, reverse: bool, limit: int | None):
        self.layout, self.reverse = layout, reverse
        self.low = [low] * layout.buckets
        self.high = [high] * layout.buckets
        # A scan of `limit` keys needs about limit / buckets of each bucket: ask for twice
        # that (and one), so that few buckets need a second page (a round trip each).
        first = SCAN_FIRST_PAGE if limit is None else max(1, min(SCAN_FIRST_PAGE, -(-2 * limit // layout.buckets) + 1, limit))
        self.page = [first] * layout.buckets
        self.buffer: list[list] = [[] for _ in range(layout.buckets)]
        self.more = [True] * layout.buckets
        self.heap: list = []
        self.need: list[int] = list(range(layout.buckets))
        self.pending: int | None = None  # the bucket whose head was just handed out

    def command(self, bucket: int) -> tuple:
        """(None, the ZRANGEBYLEX command of the next page of `bucket`, None)."""
        index = self.layout.index[bucket]
        low, high = _lex(self.low[bucket], True), _lex(self.high[bucket], False)
        if self.reverse:
            return None, ("ZREVRANGEBYLEX", index, high, low, "LIMIT", 0, self.page[bucket]), None
        return None, ("ZRANGEBYLEX", index, low, high, "LIMIT", 0, self.page[bucket]), None

    def absorb(self, bucket: int, members: list) -> None:
        """Take the next page (a list of keys) of `bucket`."""
        self.more[bucket] = len(members) >= self.page[bucket]
        self.page[bucket] = min(SCAN_PAGE, self.page[bucket] * 4)
        if not members:
            return
        if self.reverse:
            self.high[bucket] = (members[-1], False)
        else:
            self.low[bucket] = (members[-1], False)
        members.reverse()  # pop() from the end hands them out in order
        self.buffer[bucket] = members
        heapq.heappush(self.heap, (members[-1] if not self.reverse else _Desc(members[-1]), bucket))

    def step(self):
        """The next (key, bucket), a list of buckets to read a page of first, or None."""
        if self.pending is not None:
            bucket, self.pending = self.pending, None
            members = self.buffer[bucket]
            if members:
                heapq.heappush(self.heap, (members[-1] if not self.reverse else _Desc(members[-1]), bucket))
            elif self.more[bucket]:
                self.need.append(bucket)
        if self.need:
            need, self.need = self.need, []
            return need
        if not self.heap:
            return None
        _, bucket = heapq.heappop(self.heap)
        self.pending = bucket
        return self.buffer[bucket].pop(), bucket


class _ScanValues:
    """Hands out a scan's (key, value) pairs: takes keys from the _Merge in chunks (`limit`
    of them, or SCAN_FIRST_PAGE growing 8x up to SCAN_PAGE), reads their values with one
    MGET per bucket, skips the keys whose value is gone (expired, or deleted since the index
    was read) and has their index entries dropped (LUA_DROP). Like _Merge, driven by the
    clients through `next_request()` and `take()`."""

    def __init__(self, store: "_Core", merge: _Merge, limit: int | None):
        self.store, self.merge, self.limit = store, merge, limit
        self.produced = 0
        self.chunk = SCAN_FIRST_PAGE if limit is None else min(limit, SCAN_PAGE)

    def wanted(self) -> int:
        """How many keys to take from the merge for the next chunk."""
        if self.limit is None:
            return self.chunk
        return max(1, min(self.chunk, self.limit - self.produced))

    def values_commands(self, keys: list) -> tuple[list, list]:
        """(positions per bucket, MGET commands) of a chunk of (key, bucket)."""
        groups: dict[int, list[int]] = {}
        for i, (_, bucket) in enumerate(keys):
            groups.setdefault(bucket, []).append(i)
        prefix = self.store._prefix
        return list(groups.values()), [(None, ("MGET", *[prefix[b] + keys[i][0] for i in idx]), None) for b, idx in groups.items()]

    def pairs(self, keys: list, positions: list, answers: list) -> tuple[list, list]:
        """((key, value) pairs to hand out, LUA_DROP commands for the keys found gone)."""
        values = [None] * len(keys)
        for idx, answer in zip(positions, answers):
            for i, value in zip(idx, answer):
                values[i] = value
        out, gone = [], {}
        for (key, bucket), value in zip(keys, values):
            if value is None:
                gone.setdefault(bucket, []).append(key)
            elif self.limit is None or self.produced < self.limit:
                out.append((key, value))
                self.produced += 1
        self.chunk = min(SCAN_PAGE, self.chunk * 8)
        layout, prefix = self.store._layout, self.store._prefix
        drops = [("drop", (layout.index[b], layout.expiry[b], *[prefix[b] + k for k in members]), ()) for b, members in gone.items()]
        return out, drops

    def done(self) -> bool:
        """True once `limit` pairs were handed out."""
        return self.limit is not None and self.produced >= self.limit


def _conflict(checked: list, position: int) -> Conflict:
    kind, key, value = checked[position - 1]
    wanted = "absent" if kind == OP_EXPECT_ABSENT else repr(bytes(value)[:40])
    return Conflict(f"precondition failed: key {bytes(key)[:40]!r} is not {wanted}; nothing was applied")


class _Core:
    """What the blocking and the asyncio clients share: options, layout, and turning the API's
    calls into Redis commands (each `_plan_*` returns what to send and how to read the answer)."""

    _closed = True

    def _setup(self, url: str, parsed: ParsedURL, options: Options, layout: Layout, durability: str | None, reads_ordered: bool) -> None:
        self.url = url
        self._parsed, self._options, self._layout = parsed, options, layout
        self.namespace, self.buckets = options.namespace, layout.buckets
        self.durability = durability
        self.max_batch_ops, self.max_batch_bytes = int(options.max_batch_ops), int(options.max_batch_bytes)
        self.retry_timeout = float(options.retry_timeout)
        self._indexed = layout.ordered  # the store keeps its index: every write maintains it
        self._reads_ordered = layout.ordered and reads_ordered
        self._prefix, self._bucket_of_slot = layout.prefix, layout.bucket_of_slot
        self._features = Features(
            backend="redis-cluster",
            cross_shard_batches=False,
            ordered_scans=self._reads_ordered,
            durability_levels=() if durability is None else (durability,),
        )
        self._closed = False

    @property
    def features(self) -> Features:
        """What this client supports (docs/BACKENDS.md): no atomic batch across hash slots,
        ordered reads only with the index, the one durability level the servers keep."""
        return self._features

    def slot_of(self, key) -> int:
        """Redis Cluster's hash slot of `key` (hash tags honoured): the keys of an atomic batch
        must all have the same one."""
        return user_slot(check_key(key))

    def _storage_slot(self, key) -> int:
        """The hash slot the key is stored in (its bucket's)."""
        return self._layout.slot[self._layout.bucket(check_key(key))]

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("the shardkv client is closed")

    def _check_ordered(self, what: str) -> None:
        self._check_open()
        if not self._reads_ordered:
            why = "was created with ordered=False" if not self._indexed else "was opened with ordered=False"
            raise Unsupported(f"{what} needs the ordered index, and this store {why} (features.ordered_scans is False)")

    # -- plans: (script name or None, command arguments, write?, decode) -------------------
    def _data_key(self, key) -> tuple[bytes, int]:
        if type(key) is not bytes or not 0 < len(key) <= MAX_KEY_LEN:
            key = check_key(key)
        bucket = self._bucket_of_slot[user_slot(key)]
        return self._prefix[bucket] + key, bucket

    def _plan_put(self, key, value, ttl):
        data, bucket = self._data_key(key)
        value = check_value(value, DEFAULT_MAX_VALUE_SIZE)
        self._check_open()
        layout = self._layout
        if ttl is None:
            if self._indexed:
                return "put", (data, layout.index[bucket]), (value,), None
            return None, ("SET", data, value), None, None
        ms = ttl_milliseconds(ttl)
        if self._indexed:
            return "put", (data, layout.index[bucket], layout.expiry[bucket]), (value, ms), None
        return None, ("SET", data, value, "PX", ms), None, None

    def _plan_delete(self, key):
        data, bucket = self._data_key(key)
        self._check_open()
        if self._indexed:
            return "delete", (data, self._layout.index[bucket], self._layout.expiry[bucket]), (), _is_one
        return None, ("DEL", data), None, _is_one

    def _plan_cas(self, key, expected, new):
        data, bucket = self._data_key(key)
        expected = None if expected is None else check_value(expected, 2**31 - 1)
        new = None if new is None else check_value(new, DEFAULT_MAX_VALUE_SIZE)
        self._check_open()
        keys = (data, self._layout.index[bucket], self._layout.expiry[bucket]) if self._indexed else (data,)
        args = (b"0" if expected is None else b"1", expected or b"", b"0" if new is None else b"1", new or b"")
        return "cas", keys, args, _is_one

    def _plan_expire(self, key, seconds):
        data, bucket = self._data_key(key)
        ms = b"" if seconds is None else ttl_milliseconds(seconds)
        self._check_open()
        keys = (data, self._layout.index[bucket], self._layout.expiry[bucket]) if self._indexed else (data,)
        return "expire", keys, (ms,), _is_one

    def _plan_get_many(self, keys) -> tuple[list, list, list]:
        """(the checked keys, per bucket group: their positions, MGET commands)."""
        keys = [k if type(k) is bytes and 0 < len(k) <= MAX_KEY_LEN else check_key(k) for k in keys]
        self._check_open()
        groups: dict[int, list[int]] = {}
        bucket_of_slot = self._bucket_of_slot
        for i, key in enumerate(keys):
            groups.setdefault(bucket_of_slot[user_slot(key)], []).append(i)
        positions, commands = [], []
        for bucket, idx in groups.items():
            prefix = self._prefix[bucket]
            positions.append(idx)
            commands.append((None, ("MGET", *[prefix + keys[i] for i in idx]), None))
        return keys, positions, commands

    def _batch_commands(self, checked: list, atomic: bool) -> list:
        """The batch scripts of checked operations: one for an atomic batch (Unsupported if
        its keys span hash slots), one per bucket otherwise (ValueError for an expect)."""
        check_limits(checked, self.max_batch_ops, self.max_batch_bytes)
        self._check_open()
        if not checked:
            return []
        if atomic:
            slots: dict[int, bytes] = {}
            for _, key, _ in checked:
                slots.setdefault(user_slot(bytes(key)), bytes(key))
            if len(slots) > 1:
                raise Unsupported(_cross_slot_message(slots))
            groups = {self._bucket_of_slot[next(iter(slots))]: checked}
        else:
            groups = {}
            for op in checked:
                if op[0] in (OP_EXPECT, OP_EXPECT_ABSENT):
                    raise ValueError("a non-atomic batch (atomic=False) cannot hold an expect: its other writes could not wait for it")
                groups.setdefault(self._bucket_of_slot[user_slot(bytes(op[1]))], []).append(op)
        return [self._batch_command(bucket, ops) for bucket, ops in groups.items()]

    def _batch_command(self, bucket: int, ops: list) -> tuple:
        prefix, layout = self._prefix[bucket], self._layout
        kinds, keys, args = bytearray(), [layout.index[bucket], layout.expiry[bucket]], []
        for kind, key, value in ops:
            keys.append(prefix + bytes(key))
            if kind == OP_PUT:
                kinds += b"p"
                args.append(value)
            elif kind == OP_PUT_TTL:
                kinds += b"P"
                value = bytes(value)
                args += (value[8:], int.from_bytes(value[:8], "little"))
            elif kind == OP_DELETE:
                kinds += b"d"
            elif kind == OP_EXPECT:
                kinds += b"e"
                args.append(value)
            elif kind == OP_EXPECT_ABSENT:
                kinds += b"a"
            else:  # check_ops makes nothing else
                raise ValueError(f"unknown operation kind {kind}")
        return "batch", tuple(keys), (bytes(kinds), b"1" if self._indexed else b"0", *args), ops

    def _plan_scan(self, start, stop, reverse, prefix, limit) -> _Merge | None:
        start, stop, prefix = check_scan_args(start, stop, prefix, limit)
        self._check_ordered("scan")
        low, high = scan_bounds(start, stop, prefix)
        if limit == 0:
            return None
        return _Merge(self._layout, low, high, bool(reverse), limit)

    def _count_commands(self) -> list:
        layout = self._layout
        return [("count", (layout.index[b], layout.expiry[b]), ()) for b in range(layout.buckets)]

    def _drop_commands(self, answers: list) -> tuple[int, list]:
        """(the index entries counted, LUA_DROP commands for the members whose expiry passed)
        from the buckets' LUA_COUNT answers."""
        layout, total, drops = self._layout, 0, []
        for bucket, (count, due) in enumerate(answers):
            total += int(count)
            if due:
                prefix = layout.prefix[bucket]
                drops.append(("drop", (layout.index[bucket], layout.expiry[bucket], *[prefix + m for m in due]), ()))
        return total, drops

    def _write_ops(self, ops, atomic) -> list:
        if not isinstance(atomic, bool):
            raise TypeError(f"atomic must be True or False, not {type(atomic).__name__}")
        return self._batch_commands(check_ops(ops, self.max_batch_ops, self.max_batch_bytes), atomic)

    def _put_many_ops(self, items, atomic) -> list:
        if not isinstance(atomic, bool):
            raise TypeError(f"atomic must be True or False, not {type(atomic).__name__}")
        return self._write_ops(put_many_ops(items, self.max_batch_ops), atomic)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"namespace {self.namespace!r}, {self.buckets} buckets{'' if self._indexed else ', unordered'}"
        return f"<shardkv {type(self).__name__} {_redact(self.url)} {state}>"


# Commands _call may send straight to a node: each names its one slot's key first (EVAL and
# EVALSHA after the script and the key count).
_DIRECT_COMMANDS = frozenset(("GET", "SET", "DEL", "PTTL", "MGET", "EVALSHA", "EVAL"))


def _key_slot(key: bytes) -> int:
    """Redis's hash slot of a Redis key (hash tag honoured)."""
    return user_slot(key)


def _queued(pipe, commands: list):
    """`pipe` with every planned command queued: a plain command, or a script by its SHA
    (blocking and asyncio pipelines queue alike; only their execute() differs)."""
    for script, keys, args, *_ in commands:
        if script is None:
            pipe.execute_command(*keys)
        else:
            pipe.execute_command("EVALSHA", SHAS[script], len(keys), *keys, *args)
    return pipe


def _seconds_left(pttl: int) -> float | None:
    """PTTL's answer as ttl() returns it: -2 (no such key) None, -1 (no expiry) math.inf."""
    if pttl == -1:
        return math.inf
    return pttl / 1000 if pttl > 0 else None


def _is_one(answer) -> bool:
    return int(answer) == 1


def _redact(url: str) -> str:
    return re.sub(r"(://[^:@/]*:)[^@/]*@", r"\1***@", url)


def _cross_slot_message(slots: dict[int, bytes]) -> str:
    shown = ", ".join(f"slot {slot} ({key[:30]!r})" for slot, key in sorted(slots.items())[:8])
    more = f" and {len(slots) - 8} more" if len(slots) > 8 else ""
    return (
        f"this batch's keys span {len(slots)} hash slots: {shown}{more}. Redis Cluster applies a batch atomically only within one hash slot:"
        " keep related keys in one slot with a hash tag (only the part between { and } is hashed: {user42}:name and {user42}:email share a slot),"
        " or pass atomic=False (put_many(..., atomic=False), write(..., atomic=False)) to apply it slot by slot, not atomically"
    )


def _decode_batch(answer, command) -> None:
    if int(answer[0]) != 1:
        raise _conflict(command[3], int(answer[1]))


def _pairs(flat) -> dict:
    """A flat [field, value, ...] reply (or one redis-py already made a dict of) as a dict."""
    if isinstance(flat, dict):
        return flat
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


# -- the blocking client -----------------------------------------------------------------------
class RedisClusterStore(_Core, ScanMapping):
    """A shardkv store on a Redis Cluster; see `open` and docs/BACKENDS.md. One object may be
    shared by threads; a forked child gets fresh connections by itself (redis-py's pools)."""

    def __init__(self, url: str, shards=None, durability: str | None = None, **options):
        parsed, checked = check_options(url, shards, durability, options)
        kwargs = _cluster_kwargs(RedisCluster, parsed, checked, Retry(NoBackoff(), 0))
        deadline = time.monotonic() + checked.retry_timeout
        while True:
            try:
                self._rc = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in parsed.nodes], **kwargs)
                break
            except Exception as exc:  # noqa: BLE001 - classified below
                verdict = classify(exc)
                if isinstance(verdict, BaseException) and verdict is not exc:
                    raise verdict from exc
                if verdict is exc or time.monotonic() > deadline:
                    raise _unavailable(exc, f"cannot reach the Redis Cluster at {_redact(url)}") from exc
                time.sleep(0.1)
        self._closed, self.retry_timeout = False, float(checked.retry_timeout)  # for _call, until _setup
        self._direct: dict[int, object] = {}  # slot -> plain client of the node serving it (see _call)
        self._direct_ok = False
        try:
            # Sending straight to a node is safe only if its client never resends a command by
            # itself (a resent script could run twice): ours are built with retries off.
            self._direct_ok = all(getattr(self._rc.get_redis_connection(node).get_retry(), "_retries", 1) == 0 for node in self._rc.get_primaries())
            level = check_durability(checked.durability, self._configs())
            meta_key = Layout.meta_key(checked.namespace)
            meta = _pairs(self._call(("HGETALL", meta_key), write=False))
            if not meta:  # a new store: the first opener's metadata wins
                meta = _pairs(self._call_script("meta", (meta_key,), tuple(new_meta(checked)), write=True))
            layout = read_layout(meta, checked)
        except BaseException:
            self._closed = True
            self._rc.close()
            raise
        self._setup(url, parsed, checked, layout, level, reads_ordered=checked.ordered is not False)

    # -- sending -----------------------------------------------------------------------------
    def _configs(self) -> list[dict] | None:
        """CONFIG GET append* of every master (None if a server refuses CONFIG)."""
        configs = []
        try:
            for node in self._rc.get_primaries():
                configs.append(self._rc.get_redis_connection(node).config_get("append*"))
        except rex.ResponseError:
            return None
        except Exception as exc:  # noqa: BLE001
            raise _unavailable(exc, "cannot read the masters' durability settings (CONFIG GET)") from exc
        return configs

    def _direct_client(self, key: bytes):
        """The plain redis-py client of the node that served `key`'s slot last time we looked,
        or None (a direct send not allowed: see _call)."""
        if not self._direct_ok:
            return None
        slot = user_slot(key)
        client = self._direct.get(slot)
        if client is None:
            client = self._rc.get_redis_connection(self._rc.nodes_manager.get_node_from_slot(slot))
            self._direct[slot] = client
        return client

    def _call(self, args: tuple, write: bool):
        """One command, sent to the node of its keys; retried as the module docstring says.

        The first try goes straight to the node that served the key's slot when last seen,
        through that node's plain redis-py client: redis-py's cluster client spends about
        35 us of Python more per command (routing policies, metrics), a third of a request
        here. Anything that surely did not run there (MOVED after a reshard, a node down:
        connection refused) goes on through the cluster client, which follows redirections
        and refreshes the slot map; a write that may have run raises Unavailable."""
        if args[0] in _DIRECT_COMMANDS:
            try:
                client = self._direct_client(args[3] if args[0] in ("EVALSHA", "EVAL") else args[1])
            except Exception:  # noqa: BLE001 - no node known for the slot: the cluster client finds one
                client = None
            if client is not None:
                try:
                    return client.execute_command(*args)
                except Exception as exc:  # noqa: BLE001
                    verdict = classify(exc)
                    if isinstance(verdict, BaseException):
                        if verdict is exc:
                            raise  # NOSCRIPT (the caller sends the script's text), or not the cluster's
                        raise verdict from exc
                    if verdict == UNKNOWN and write:
                        raise _unavailable(exc, "the connection to the Redis Cluster failed during a write: it may or may not have been applied") from exc
                    self._direct.clear()  # the slot map may be stale: ask the cluster client from now on
        retry = None
        while True:
            try:
                return self._rc.execute_command(*args)
            except Exception as exc:  # noqa: BLE001
                if self._closed:
                    raise Closed("the shardkv client is closed") from exc
                retry = retry or _Retry(self.retry_timeout)
                time.sleep(retry.next_pause(exc, write))

    def _call_script(self, name: str, keys: tuple, args: tuple, write: bool):
        """Run a script by its SHA1; on NOSCRIPT (a new or restarted master) send its text."""
        try:
            return self._call(("EVALSHA", SHAS[name], len(keys), *keys, *args), write)
        except rex.NoScriptError:
            return self._call(("EVAL", SCRIPTS[name], len(keys), *keys, *args), write)

    def _run(self, plan):
        script, args_or_keys, script_args, decode = plan
        if script is None:
            answer = self._call(args_or_keys, write=True)
        else:
            answer = self._call_script(script, args_or_keys, script_args, write=True)
        return answer if decode is None else decode(answer)

    def _pipeline(self, commands: list, write: bool) -> list:
        """Several commands at once, pipelined per node: (script or None, keys or arguments,
        script arguments). Reads are retried whole; a write pipeline (a non-atomic batch)
        raises Unavailable when a part of it may have failed."""
        if not write:
            answers = self._node_pipelines(commands)
            if answers is not None:
                return answers
        retry = None
        while True:
            self._check_open()
            pipe = _queued(self._rc.pipeline(), commands)
            try:
                answers = pipe.execute(raise_on_error=False)
            except Exception as exc:  # noqa: BLE001
                answers = [exc] * len(commands)
            finally:
                pipe.reset()
            failed = [(i, a) for i, a in enumerate(answers) if isinstance(a, Exception)]
            if not failed:
                return answers
            if all(isinstance(a, rex.NoScriptError) for _, a in failed):
                self._load_scripts()  # nothing ran for those: send them again
                if write:
                    for i, _ in failed:
                        script, keys, args, *_ = commands[i]
                        answers[i] = self._call_script(script, keys, args, write)
                    return answers
                continue
            if write:
                first = next(a for _, a in failed if not isinstance(a, rex.NoScriptError))
                raise _unavailable(first, "a non-atomic batch failed on some hash slots: each slot's part was applied entirely or not at all, some may not have been") from first
            retry = retry or _Retry(self.retry_timeout)
            time.sleep(retry.next_pause(failed[0][1], False))

    def _node_pipelines(self, commands: list) -> list | None:
        """Reads sent straight to the nodes that serve their slots (as the client last saw
        them), one plain pipeline per node: redis-py's cluster pipeline costs tens of
        microseconds more per command, which a scan's round of one command per bucket feels.
        None on any error (a slot moved, a node down, NOSCRIPT): the caller then goes through
        the cluster pipeline, which follows redirections and refreshes the slot map."""
        self._check_open()
        try:
            groups: dict[str, tuple] = {}
            get_node = self._rc.nodes_manager.get_node_from_slot
            for i, command in enumerate(commands):
                script, args = command[0], command[1]
                key = args[0] if script is not None else args[2] if args[0] == "MEMORY" else args[1]
                node = get_node(_key_slot(key))
                groups.setdefault(node.name, (node, []))[1].append(i)
            answers = [None] * len(commands)
            for node, positions in groups.values():
                pipe = self._rc.get_redis_connection(node).pipeline(transaction=False)
                for i in positions:
                    script, args, script_args = commands[i][:3]
                    if script is None:
                        pipe.execute_command(*args)
                    else:
                        pipe.execute_command("EVALSHA", SHAS[script], len(args), *args, *script_args)
                for i, answer in zip(positions, pipe.execute(raise_on_error=False)):
                    if isinstance(answer, Exception):
                        return None
                    answers[i] = answer
            return answers
        except Exception:  # noqa: BLE001 - the cluster pipeline will tell what it was
            return None

    def _load_scripts(self) -> None:
        """SCRIPT LOAD every script into every master (a promoted replica has none)."""
        for node in self._rc.get_primaries():
            client = self._rc.get_redis_connection(node)
            for body in SCRIPTS.values():
                try:
                    client.script_load(body)
                except rex.RedisError:
                    pass  # that node is down: a retry will tell

    # -- the API -----------------------------------------------------------------------------
    def get(self, key, default=None):
        """The value of `key`, or `default` if it is absent."""
        if type(key) is not bytes or not 0 < len(key) <= MAX_KEY_LEN:
            key = check_key(key)
        if self._closed:
            raise Closed("the shardkv client is closed")
        value = self._call(("GET", self._prefix[self._bucket_of_slot[user_slot(key)]] + key), write=False)
        return default if value is None else value

    def put(self, key, value, ttl=None) -> None:
        """Set `key` to `value`; with `ttl` (seconds), the key expires that long from now."""
        self._run(self._plan_put(key, value, ttl))

    def delete(self, key) -> bool:
        """Remove `key`; True if it was present."""
        return self._run(self._plan_delete(key))

    def cas(self, key, expected, new) -> bool:
        """Set `key` to `new` if its value is `expected` (None: absent); `new=None` deletes.
        Atomic: one script on the key's node."""
        return self._run(self._plan_cas(key, expected, new))

    def ttl(self, key):
        """Seconds left before `key` expires: None if it is absent, math.inf if it never expires."""
        data, _ = self._data_key(key)
        self._check_open()
        return _seconds_left(self._call(("PTTL", data), write=False))

    def expire(self, key, seconds) -> bool:
        """Make `key` expire `seconds` from now (None: never); False if the key is absent."""
        return self._run(self._plan_expire(key, seconds))

    def get_many(self, keys) -> list:
        """The values of `keys` (None for a missing one), in order: one MGET per bucket,
        pipelined per node. Each bucket is read at one instant, not the whole list."""
        keys, positions, commands = self._plan_get_many(keys)
        if not commands:
            return []
        if len(commands) == 1:
            answers = [self._call(commands[0][1], write=False)]
        else:
            answers = self._pipeline(commands, write=False)
        values = [None] * len(keys)
        for idx, answer in zip(positions, answers):
            for i, value in zip(idx, answer):
                values[i] = value
        return values

    def write(self, ops, atomic: bool = True) -> None:
        """Apply ("put", key, value[, ttl]), ("delete", key) and ("expect", key, value or
        None) operations: atomically, all or nothing, when every key has the same hash slot
        (else Unsupported, nothing sent); Conflict if a precondition fails. atomic=False applies
        the operations slot by slot (each slot's part atomic, the whole not; no expect)."""
        self._write_commands(self._write_ops(ops, atomic))

    def put_many(self, items, atomic: bool = True) -> None:
        """Set every (key, value) of a mapping or iterable of pairs; atomic as `write`."""
        self._write_commands(self._put_many_ops(items, atomic))

    def batch(self) -> Batch:
        """A batch to fill in a `with` block, applied atomically when the block exits normally
        (its keys must share a hash slot), discarded if it raises."""
        self._check_open()
        return Batch(lambda checked: self._write_commands(self._batch_commands(checked, True)))

    def _write_commands(self, commands: list) -> None:
        if len(commands) == 1:
            script, keys, args, _ = commands[0]
            _decode_batch(self._call_script(script, keys, args, write=True), commands[0])
        elif commands:
            for answer, command in zip(self._pipeline(commands, write=True), commands):
                _decode_batch(answer, command)

    def scan(self, start=None, stop=None, reverse=False, prefix=None, limit=None) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs with start <= key < stop (and starting with `prefix`), in key
        order, merged from every bucket's index. Not a snapshot: each bucket's page is read at
        one instant. Unsupported without the ordered index."""
        merge = self._plan_scan(start, stop, reverse, prefix, limit)
        return iter(()) if merge is None else self._scan(merge, limit)

    def _scan(self, merge: _Merge, limit: int | None):
        values = _ScanValues(self, merge, limit)
        while not values.done():
            keys, wanted = [], values.wanted()
            while len(keys) < wanted:
                step = merge.step()
                if step is None:
                    break
                if type(step) is tuple:
                    keys.append(step)
                    continue
                for bucket, members in zip(step, self._reads([merge.command(bucket) for bucket in step])):
                    merge.absorb(bucket, members)
            if not keys:
                return
            positions, commands = values.values_commands(keys)
            out, drops = values.pairs(keys, positions, self._reads(commands))
            if drops:
                try:
                    self._pipeline(drops, write=True)
                except Error:
                    pass  # only tidying: len() or a later scan drops them
            yield from out

    def _reads(self, commands: list) -> list:
        """The answers of read commands: one call, or a pipeline."""
        if len(commands) == 1:
            script, args, script_args = commands[0][:3]
            return [self._call(args, write=False) if script is None else self._call_script(script, args, script_args, write=False)]
        return self._pipeline(commands, write=False)

    def min(self):
        """(key, value) of the smallest key, or None."""
        return next(self.scan(limit=1), None)

    def max(self):
        """(key, value) of the largest key, or None."""
        return next(self.scan(reverse=True, limit=1), None)

    def above(self, key):
        """(key, value) of the smallest key strictly after `key`, or None."""
        key = check_key(key)
        self._check_ordered("above")
        return next(self._scan(_Merge(self._layout, (key, False), None, False, 1), 1), None)

    def below(self, key):
        """(key, value) of the largest key strictly before `key`, or None."""
        key = check_key(key)
        self._check_ordered("below")
        return next(self._scan(_Merge(self._layout, None, (key, False), True, 1), 1), None)

    def __len__(self) -> int:
        """The number of live keys: from the index (one script per bucket, which first drops
        expired keys), or without it by SCAN of every master."""
        self._check_open()
        if self._indexed:
            total, drops = self._drop_commands(self._pipeline(self._count_commands(), write=False))
            if drops:
                total -= sum(int(n) for n in self._pipeline(drops, write=True))
            return total
        return sum(1 for _ in self._scan_keys())

    def _scan_keys(self):
        """Every data key of the store, by SCAN of each master (unordered)."""
        for node in self._rc.get_primaries():
            client = self._rc.get_redis_connection(node)
            retry, cursor = None, 0
            while True:
                try:
                    cursor, keys = client.scan(cursor, match=self._layout.pattern, count=1000)
                except Exception as exc:  # noqa: BLE001
                    retry = retry or _Retry(self.retry_timeout)
                    time.sleep(retry.next_pause(exc, False))
                    continue
                yield from (key for key in keys if b"}:" in key)
                if not cursor:
                    break

    def clear(self) -> None:
        """Remove every key of the store (its metadata stays). Not atomic."""
        self._check_open()
        for node in self._rc.get_primaries():
            client = self._rc.get_redis_connection(node)
            keys = list(client.scan_iter(match=self._layout.pattern, count=1000))
            for i in range(0, len(keys), 1000):
                pipe = client.pipeline(transaction=False)
                for key in keys[i : i + 1000]:
                    pipe.unlink(key)
                pipe.execute()

    def update(self, other=(), /, **kwds) -> None:
        """Set the pairs of `other` (a mapping, an object with keys(), or (key, value) pairs)
        and of `kwds`, as dict.update does, as put_many(atomic=False) of 1,000 pairs at a time
        (not a round trip per key). Not atomic as a whole."""
        self._check_open()
        pairs = update_pairs(other, kwds)
        while True:
            batch = list(itertools.islice(pairs, 1000))
            if not batch:
                return
            self.put_many(batch, atomic=False)

    def __getitem__(self, key):
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key, value) -> None:
        self.put(key, value)

    def __delitem__(self, key) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def __contains__(self, key) -> bool:
        # A key of the wrong type is the same TypeError as for db[key], as in the local store.
        return self.get(key) is not None

    def __iter__(self):
        self._check_ordered("iteration")
        return (key for key, _ in self.scan())

    def index_stats(self) -> dict:
        """The ordered index's size: entries (index members, including keys expired but not
        yet dropped), expiring (members of the expiry sets) and bytes (MEMORY USAGE of both)."""
        self._check_open()
        if not self._indexed:
            return {"entries": 0, "expiring": 0, "bytes": 0}
        layout = self._layout
        commands = []
        for b in range(layout.buckets):
            commands += [(None, ("ZCARD", layout.index[b]), None), (None, ("ZCARD", layout.expiry[b]), None)]
            commands += [(None, ("MEMORY", "USAGE", layout.index[b], "SAMPLES", 0), None), (None, ("MEMORY", "USAGE", layout.expiry[b], "SAMPLES", 0), None)]
        answers = self._pipeline(commands, write=False)
        return {"entries": sum(answers[0::4]), "expiring": sum(answers[1::4]), "bytes": sum(a or 0 for a in answers[2::4]) + sum(a or 0 for a in answers[3::4])}

    def health(self) -> dict:
        """The cluster's nodes as `shardkv status redis://...` prints them: overall status
        (healthy, degraded, down) and exit_code, and per node id, address, role (master or
        replica), its master's id, slots ([first, last] ranges), reachable, flags."""
        self._check_open()
        return collect_health([(n.host, n.port) for n in self._rc.get_nodes()] or self._parsed.nodes, connection_kwargs(self._parsed, self._options), self)

    def sync(self) -> None:
        """Unsupported: durability is the servers' setting (appendonly/appendfsync)."""
        raise Unsupported(f"durability is the Redis server's setting (this cluster: {self.durability or 'no append-only file'}); there is nothing for the client to sync")

    def compact(self, *args, **kwargs):
        """Unsupported: Redis reclaims memory by itself."""
        raise Unsupported("compaction is the Redis server's business (it frees memory as keys go)")

    def close(self) -> None:
        """Close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._rc.close()

    def __enter__(self) -> "RedisClusterStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            if not self._closed:
                self._rc.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# -- health ------------------------------------------------------------------------------------
def parse_cluster_nodes(text: str) -> list[dict]:
    """CLUSTER NODES as a list of nodes: id, address, role, master (id), slots, flags, link."""
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        flags = parts[2].split(",")
        slots = []
        for item in parts[8:]:
            if item.startswith("["):
                continue  # a slot being migrated
            first, _, last = item.partition("-")
            slots.append([int(first), int(last or first)])
        role = "master" if "master" in flags else "replica" if "slave" in flags else "unknown"
        nodes.append(
            {
                "id": parts[0],
                "address": parts[1].split("@")[0].split(",")[0],
                "role": role,
                "master": None if parts[3] == "-" else parts[3],
                "slots": slots,
                "flags": [f for f in flags if f not in ("myself", "master", "slave")],
                "link": parts[7],
            }
        )
    return nodes


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def collect_health(addresses: list[tuple[str, int]], kwargs: dict, store=None) -> dict:
    """Ask the first node that answers for CLUSTER NODES and CLUSTER INFO, then ping every
    node (0.5 s each at most): the health object."""
    quick = {**kwargs, "socket_timeout": 0.5, "socket_connect_timeout": 0.5}
    view, info = None, {}
    for host, port in addresses:
        try:
            with redis.Redis(host=host, port=port, **quick) as r:
                raw = r.execute_command("CLUSTER", "NODES")
                view = raw.decode() if isinstance(raw, bytes) else raw
                text = r.execute_command("CLUSTER", "INFO")
                text = text.decode() if isinstance(text, bytes) else text
                info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
                break
        except (rex.RedisError, OSError):
            continue
    nodes = parse_cluster_nodes(view or "")
    for node in nodes:
        if not node["address"] or node["address"].endswith(":0"):
            node["reachable"] = False  # a node without an address (it left, or never joined)
            continue
        try:
            host, port = _host_port(node["address"])
            with redis.Redis(host=host, port=port, **quick) as r:
                node["reachable"] = bool(r.ping())
        except (rex.RedisError, OSError, ValueError):
            node["reachable"] = False
    masters = sorted((n for n in nodes if n["role"] == "master"), key=lambda n: (not n["slots"], n["slots"][:1], n["address"]))
    ordered_nodes = []
    for master in masters:
        ordered_nodes.append(master)
        ordered_nodes += sorted((n for n in nodes if n["master"] == master["id"]), key=lambda n: n["address"])
    ordered_nodes += [n for n in nodes if n not in ordered_nodes]
    failing = any(not n["reachable"] or {"fail", "pfail", "fail?", "handshake", "noaddr"} & set(n["flags"]) for n in nodes)
    if view is None or info.get("cluster_state") != "ok":
        status = "down"
    else:
        status = "degraded" if failing else "healthy"
    health = {
        "status": status,
        "exit_code": {"healthy": 0, "degraded": 1}.get(status, 2),
        "backend": "redis-cluster",
        "cluster_state": info.get("cluster_state", "unreachable"),
        "slots_ok": int(info.get("cluster_slots_ok", 0)),
        "slots_assigned": int(info.get("cluster_slots_assigned", 0)),
        "nodes": ordered_nodes,
    }
    if store is not None:
        health["store"] = {"namespace": store.namespace, "buckets": store.buckets, "ordered": store._indexed, "durability": store.durability}
    return health


def _slot_ranges(slots: list) -> str:
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in slots) or "-"


def render_table(health: dict) -> str:
    """The health object as the table `shardkv status redis://...` prints."""
    rows = [["ROLE", "ADDRESS", "SLOTS", "REACHABLE", "FLAGS", "ID"]]
    for node in health["nodes"]:
        role = node["role"] if node["role"] != "replica" else "  replica"
        rows.append([role, node["address"], _slot_ranges(node["slots"]), "yes" if node["reachable"] else "NO", ",".join(node["flags"]) or "-", node["id"][:12]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"cluster_state: {health['cluster_state']}, slots ok: {health['slots_ok']}/{SLOTS}")
    return "\n".join(lines + [f"status: {health['status']}"])


def render_prometheus(health: dict) -> str:
    """The health object in the Prometheus text format."""
    lines = ["# HELP shardkv_redis_node_up 1 if the node answered", "# TYPE shardkv_redis_node_up gauge"]
    for node in health["nodes"]:
        lines.append(f'shardkv_redis_node_up{{address="{node["address"]}",role="{node["role"]}"}} {1 if node["reachable"] else 0}')
    lines += ["# HELP shardkv_redis_slots_ok hash slots in the ok state (CLUSTER INFO cluster_slots_ok)", "# TYPE shardkv_redis_slots_ok gauge", f"shardkv_redis_slots_ok {health['slots_ok']}"]
    lines += ["# HELP shardkv_health the exit code of `shardkv status`: 0 healthy, 1 degraded, 2 down", "# TYPE shardkv_health gauge", f"shardkv_health {health['exit_code']}"]
    return "\n".join(lines) + "\n"


# -- the asyncio client ------------------------------------------------------------------------
class AsyncRedisClusterStore(_Core):
    """The asyncio client of a store on a Redis Cluster: `await shardkv.aopen("redis://...")`.
    The blocking client's API as coroutines (`await db.len()` for len); not shared between
    event loops."""

    @classmethod
    async def create(cls, url: str, shards=None, durability: str | None = None, **options) -> "AsyncRedisClusterStore":
        """Connect, read (or create) the store's metadata and check durability."""
        from redis.asyncio.cluster import ClusterNode as AsyncNode  # noqa: PLC0415
        from redis.asyncio.cluster import RedisCluster as AsyncCluster  # noqa: PLC0415
        from redis.asyncio.retry import Retry as AsyncRetry  # noqa: PLC0415

        parsed, checked = check_options(url, shards, durability, options)
        self = cls()
        kwargs = _cluster_kwargs(AsyncCluster, parsed, checked, AsyncRetry(NoBackoff(), 0))
        self.retry_timeout = float(checked.retry_timeout)
        deadline = time.monotonic() + checked.retry_timeout
        while True:
            rc = AsyncCluster(startup_nodes=[AsyncNode(h, p) for h, p in parsed.nodes], **kwargs)
            try:
                await rc.initialize()
                break
            except Exception as exc:  # noqa: BLE001 - classified below
                await _aclose(rc)
                verdict = classify(exc)
                if isinstance(verdict, BaseException) and verdict is not exc:
                    raise verdict from exc
                if verdict is exc or time.monotonic() > deadline:
                    raise _unavailable(exc, f"cannot reach the Redis Cluster at {_redact(url)}") from exc
                # A node that is down can be the first one asked (the default node): ask again.
                await asyncio.sleep(0.1)
        self._rc = rc
        self._closed = False  # for _call during setup
        try:
            configs: list | None = []
            try:
                for node in rc.get_primaries():
                    configs.append(_pairs(await node.execute_command("CONFIG", "GET", "append*")))
            except rex.ResponseError:
                configs = None
            except Exception as exc:  # noqa: BLE001
                raise _unavailable(exc, "cannot read the masters' durability settings (CONFIG GET)") from exc
            level = check_durability(checked.durability, configs)
            meta_key = Layout.meta_key(checked.namespace)
            meta = _pairs(await self._call(("HGETALL", meta_key), write=False))
            if not meta:
                meta = _pairs(await self._call_script("meta", (meta_key,), tuple(new_meta(checked)), write=True))
            layout = read_layout(meta, checked)
        except BaseException:
            self._closed = True
            await _aclose(rc)
            raise
        self._setup(url, parsed, checked, layout, level, reads_ordered=checked.ordered is not False)
        return self

    # -- sending -----------------------------------------------------------------------------
    async def _call(self, args: tuple, write: bool):
        retry = None
        while True:
            try:
                return await self._rc.execute_command(*args)
            except Exception as exc:  # noqa: BLE001
                if self._closed:
                    raise Closed("the shardkv client is closed") from exc
                retry = retry or _Retry(self.retry_timeout)
                await asyncio.sleep(retry.next_pause(exc, write))

    async def _call_script(self, name: str, keys: tuple, args: tuple, write: bool):
        try:
            return await self._call(("EVALSHA", SHAS[name], len(keys), *keys, *args), write)
        except rex.NoScriptError:
            return await self._call(("EVAL", SCRIPTS[name], len(keys), *keys, *args), write)

    async def _run(self, plan):
        script, args_or_keys, script_args, decode = plan
        if script is None:
            answer = await self._call(args_or_keys, write=True)
        else:
            answer = await self._call_script(script, args_or_keys, script_args, write=True)
        return answer if decode is None else decode(answer)

    async def _pipeline(self, commands: list, write: bool) -> list:
        retry = None
        while True:
            self._check_open()
            pipe = _queued(self._rc.pipeline(), commands)
            try:
                answers = await pipe.execute(raise_on_error=False)
            except Exception as exc:  # noqa: BLE001
                answers = [exc] * len(commands)
            failed = [(i, a) for i, a in enumerate(answers) if isinstance(a, Exception)]
            if not failed:
                return answers
            if all(isinstance(a, rex.NoScriptError) for _, a in failed):
                for i, _ in failed:
                    script, keys, args, *_ = commands[i]
                    answers[i] = await self._call_script(script, keys, args, write)
                return answers
            if write:
                first = next(a for _, a in failed if not isinstance(a, rex.NoScriptError))
                raise _unavailable(first, "a non-atomic batch failed on some hash slots: each slot's part was applied entirely or not at all, some may not have been") from first
            retry = retry or _Retry(self.retry_timeout)
            await asyncio.sleep(retry.next_pause(failed[0][1], False))

    # -- the API -----------------------------------------------------------------------------
    async def get(self, key, default=None):
        """The value of `key`, or `default` if it is absent."""
        data, _ = self._data_key(key)
        self._check_open()
        value = await self._call(("GET", data), write=False)
        return default if value is None else value

    async def put(self, key, value, ttl=None) -> None:
        """Set `key` to `value` (with `ttl`: expiring that many seconds from now)."""
        await self._run(self._plan_put(key, value, ttl))

    async def delete(self, key) -> bool:
        """Remove `key`; True if it was present."""
        return await self._run(self._plan_delete(key))

    async def cas(self, key, expected, new) -> bool:
        """Set `key` to `new` if its value is `expected` (None: absent); `new=None` deletes."""
        return await self._run(self._plan_cas(key, expected, new))

    async def ttl(self, key):
        """Seconds left before `key` expires: None if it is absent, math.inf if it never expires."""
        data, _ = self._data_key(key)
        self._check_open()
        return _seconds_left(await self._call(("PTTL", data), write=False))

    async def expire(self, key, seconds) -> bool:
        """Make `key` expire `seconds` from now (None: never); False if it is absent."""
        return await self._run(self._plan_expire(key, seconds))

    async def get_many(self, keys) -> list:
        """The values of `keys` (None for a missing one), in order; one MGET per bucket."""
        keys, positions, commands = self._plan_get_many(keys)
        if not commands:
            return []
        if len(commands) == 1:
            answers = [await self._call(commands[0][1], write=False)]
        else:
            answers = await self._pipeline(commands, write=False)
        values = [None] * len(keys)
        for idx, answer in zip(positions, answers):
            for i, value in zip(idx, answer):
                values[i] = value
        return values

    async def write(self, ops, atomic: bool = True) -> None:
        """As the blocking client's `write`."""
        await self._write_commands(self._write_ops(ops, atomic))

    async def put_many(self, items, atomic: bool = True) -> None:
        """As the blocking client's `put_many`."""
        await self._write_commands(self._put_many_ops(items, atomic))

    def batch(self) -> "AsyncBatch":
        """`async with db.batch() as b:` - applied atomically when the block exits normally."""
        self._check_open()
        return AsyncBatch(lambda checked: self._write_commands(self._batch_commands(checked, True)))

    async def _write_commands(self, commands: list) -> None:
        if len(commands) == 1:
            script, keys, args, _ = commands[0]
            _decode_batch(await self._call_script(script, keys, args, write=True), commands[0])
        elif commands:
            for answer, command in zip(await self._pipeline(commands, write=True), commands):
                _decode_batch(answer, command)

    def scan(self, start=None, stop=None, reverse=False, prefix=None, limit=None):
        """An async iterator of (key, value) in key order (as the blocking client's scan)."""
        merge = self._plan_scan(start, stop, reverse, prefix, limit)
        return self._scan(merge, limit)

    async def _scan(self, merge: _Merge | None, limit: int | None):
        if merge is None:
            return
        values = _ScanValues(self, merge, limit)
        while not values.done():
            keys, wanted = [], values.wanted()
            while len(keys) < wanted:
                step = merge.step()
                if step is None:
                    break
                if type(step) is tuple:
                    keys.append(step)
                    continue
                for bucket, members in zip(step, await self._reads([merge.command(bucket) for bucket in step])):
                    merge.absorb(bucket, members)
            if not keys:
                return
            positions, commands = values.values_commands(keys)
            out, drops = values.pairs(keys, positions, await self._reads(commands))
            if drops:
                try:
                    await self._pipeline(drops, write=True)
                except Error:
                    pass  # only tidying: len() or a later scan drops them
            for item in out:
                yield item

    async def _reads(self, commands: list) -> list:
        if len(commands) == 1:
            script, args, script_args = commands[0][:3]
            if script is None:
                return [await self._call(args, write=False)]
            return [await self._call_script(script, args, script_args, write=False)]
        return await self._pipeline(commands, write=False)

    async def _first(self, merge: _Merge):
        async for item in self._scan(merge, 1):
            return item
        return None

    async def min(self):
        """(key, value) of the smallest key, or None."""
        return await self._first(self._plan_scan(None, None, False, None, 1))

    async def max(self):
        """(key, value) of the largest key, or None."""
        return await self._first(self._plan_scan(None, None, True, None, 1))

    async def above(self, key):
        """(key, value) of the smallest key strictly after `key`, or None."""
        key = check_key(key)
        self._check_ordered("above")
        return await self._first(_Merge(self._layout, (key, False), None, False, 1))

    async def below(self, key):
        """(key, value) of the largest key strictly before `key`, or None."""
        key = check_key(key)
        self._check_ordered("below")
        return await self._first(_Merge(self._layout, None, (key, False), True, 1))

    async def len(self) -> int:
        """The number of live keys (an `async` stand-in for len(db))."""
        self._check_open()
        if self._indexed:
            total, drops = self._drop_commands(await self._pipeline(self._count_commands(), write=False))
            if drops:
                total -= sum(int(n) for n in await self._pipeline(drops, write=True))
            return total
        count = 0
        for node in self._rc.get_primaries():
            cursor = 0
            while True:
                answer = await node.execute_command("SCAN", cursor, "MATCH", self._layout.pattern, "COUNT", 1000)
                cursor, keys = int(answer[0]), answer[1]
                count += sum(1 for key in keys if b"}:" in key)
                if not cursor:
                    break
        return count

    async def health(self) -> dict:
        """The cluster's nodes (see the blocking client's health), asked from a thread."""
        self._check_open()
        addresses = [(n.host, n.port) for n in self._rc.get_nodes()] or self._parsed.nodes
        return await asyncio.to_thread(collect_health, addresses, connection_kwargs(self._parsed, self._options), self)

    async def close(self) -> None:
        """Close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await _aclose(self._rc)

    async def __aenter__(self) -> "AsyncRedisClusterStore":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def _aclose(rc) -> None:
    closer = getattr(rc, "aclose", None) or rc.close
    await closer()


class _Opening:
    """Lets `async with shardkv.aopen(url) as db` work as well as `db = await shardkv.aopen(url)`."""

    def __init__(self, coroutine):
        self._coroutine = coroutine
        self._client: AsyncRedisClusterStore | None = None

    def __await__(self):
        return self._coroutine.__await__()

    async def __aenter__(self) -> AsyncRedisClusterStore:
        self._client = await self._coroutine
        return self._client

    async def __aexit__(self, *exc) -> None:
        await self._client.close()


# -- the registry's entry points -----------------------------------------------------------------
def health(url: str, **options) -> dict:
    """The health object of the cluster at `url` (as a store's `health()`), without opening a
    store: `shardkv status redis://...` creates nothing in the cluster."""
    parsed, checked = check_options(url, None, None, options)
    return collect_health(parsed.nodes, connection_kwargs(parsed, checked))


def open(url: str, shards=None, durability: str | None = None, **options) -> RedisClusterStore:  # noqa: A001
    """Open the store `namespace` of the Redis Cluster at `url`
    ("redis://host:port[,host:port...]", or rediss:// for TLS; user:password@ before the
    hosts; options may also be given as ?name=value). Options:

    namespace: the store's name in the cluster ("skv"); stores of different names never meet.
    ordered: None (default) follows the store (a new one gets the ordered index); False opens
        without ordered reads (a new store then keeps no index at all: cheaper writes); True
        requires the index (ValueError for a store created without one).
    buckets: number of index buckets of a new store (default 256, 1 to 16384); fixed then.
    durability: None, or the level the cluster must keep ("process", "interval", "fsync"):
        Unsupported unless the masters' appendonly/appendfsync give exactly that level.
    retry_timeout: seconds reads (and writes that were certainly not applied) are retried
        while nodes fail over (30); then Unavailable.
    socket_timeout, connect_timeout: redis-py's socket timeouts (10 s, 5 s).
    max_batch_ops, max_batch_bytes: the largest batch sent (as the local store's).
    redis_options: more redis-py connection arguments (ssl_ca_certs, ...).

    `shards` is the local store's and must be None."""
    return RedisClusterStore(url, shards, durability, **options)


def aopen(url: str, shards=None, durability: str | None = None, **options) -> _Opening:
    """The asyncio client (`await` it, or `async with`); the options of `open`."""
    return _Opening(AsyncRedisClusterStore.create(url, shards, durability, **options))


__all__ = ["AsyncRedisClusterStore", "RedisClusterStore", "aopen", "health", "open", "parse_url", "render_prometheus", "render_table"]
