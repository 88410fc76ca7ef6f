"""One workload client of the fault harness: `python -m tests.faults.client DIR ID SECONDS LOG`.

Each operation it starts is written to LOG ("begin") and, once acknowledged, again ("ok" with
what it did); an operation without "ok" has an unknown outcome (the client, or what it talked
to, was killed). Operations: puts of the client's own keys (one at a time, and in batches of
100-160 same-size puts), `cas` increments of shared counters,
bank transfers between shared accounts and list appends across shards (atomic batches with
preconditions), and reads that check the invariants (total of the accounts, the two lists equal)
through get_many and scan: a violation is logged as "anomaly".
"""

from __future__ import annotations

import json
import random
import sys
import time

import shardkv

ACCOUNTS = [b"acct-%d" % i for i in range(6)]
TOTAL = 100 * len(ACCOUNTS)
COUNTERS = [b"counter-%d" % i for i in range(3)]
LISTS = (b"list-a", b"list-b")  # on different shards (checked by the harness)


def main(argv: list[str]) -> int:
    directory, ident, seconds, log_path = argv[0], int(argv[1]), float(argv[2]), argv[3]
    rng = random.Random(ident * 7919 + int(time.time()))
    log = open(log_path, "a", buffering=1)

    def note(**entry) -> None:
        log.write(json.dumps(entry) + "\n")

    db = None
    end = time.monotonic() + seconds
    seq = int(time.time() * 1000) % 10**9 * 100  # distinct across restarts of this client id
    while time.monotonic() < end:
        seq += 1
        try:
            if db is None:
                db = shardkv.open(directory, durability="process", lock_timeout=30)
            choice = rng.random()
            if choice < 0.07:
                # A big batch of same-size puts (the numpy paths): across both shards, or all on
                # shard 0 (one APPLY); each key is checked like a single put.
                candidates = [b"c%03d-b%04d" % (ident, i) for i in range(400)]
                keys = candidates[:160] if seq % 2 else [k for k in candidates if db.shard_of(k) == 0][:100]
                value = b"c%03d-%012d" % (ident, seq)
                for key in keys:
                    note(op="put", seq=seq, state="begin", key=key.hex(), value=value.hex())
                db.put_many([(key, value) for key in keys])
                for key in keys:
                    note(op="put", seq=seq, state="ok", key=key.hex(), value=value.hex())
            elif choice < 0.35:
                key, value = b"c%d-k%d" % (ident, rng.randrange(20)), b"c%d-%d" % (ident, seq)
                note(op="put", seq=seq, state="begin", key=key.hex(), value=value.hex())
                db.put(key, value)
                note(op="put", seq=seq, state="ok", key=key.hex(), value=value.hex())
            elif choice < 0.5:
                counter = rng.choice(COUNTERS)
                note(op="incr", seq=seq, state="begin", key=counter.hex())
                while True:
                    old = db.get(counter)
                    if db.cas(counter, old, b"%d" % (int(old or 0) + 1)):
                        break
                note(op="incr", seq=seq, state="ok", key=counter.hex())
            elif choice < 0.7:
                a, b = rng.sample(ACCOUNTS, 2)
                va, vb = db.get_many([a, b])
                amount = rng.randint(1, 9)
                note(op="transfer", seq=seq, state="begin")
                try:
                    db.write([("expect", a, va), ("expect", b, vb), ("put", a, b"%d" % (int(va) - amount)), ("put", b, b"%d" % (int(vb) + amount))])
                    note(op="transfer", seq=seq, state="ok")
                except shardkv.Conflict:
                    note(op="transfer", seq=seq, state="conflict")
            elif choice < 0.85:
                token = b"%d.%d;" % (ident, seq)
                old_a, old_b = db.get_many(LISTS)
                note(op="append", seq=seq, state="begin", token=token.hex())
                try:
                    with db.batch() as batch:
                        batch.expect(LISTS[0], old_a)
                        batch.expect(LISTS[1], old_b)
                        batch.put(LISTS[0], (old_a or b"") + token)
                        batch.put(LISTS[1], (old_b or b"") + token)
                    note(op="append", seq=seq, state="ok", token=token.hex())
                except shardkv.Conflict:
                    note(op="append", seq=seq, state="conflict", token=token.hex())
            else:
                values = db.get_many(ACCOUNTS + list(LISTS))
                if None not in values[: len(ACCOUNTS)] and sum(int(v) for v in values[: len(ACCOUNTS)]) != TOTAL:
                    note(op="read", state="anomaly", what="get_many: accounts do not add up", values=[v.decode() for v in values[: len(ACCOUNTS)]])
                if values[-2] != values[-1]:
                    note(op="read", state="anomaly", what="get_many: the lists differ", a=(values[-2] or b"").decode(), b=(values[-1] or b"").decode())
                scanned = dict(db.scan(prefix=b"acct-"))
                if len(scanned) == len(ACCOUNTS) and sum(int(v) for v in scanned.values()) != TOTAL:
                    note(op="read", state="anomaly", what="scan: accounts do not add up", values=[v.decode() for v in scanned.values()])
                note(op="read", state="ok")
        except (shardkv.Unavailable, shardkv.StorageError) as exc:
            note(op="error", state="unknown", error=repr(exc)[:200])
            if db is not None and "open the store again" in str(exc):
                try:
                    db.close()
                except Exception:  # noqa: BLE001
                    pass
                db = None
            time.sleep(0.05)
    if db is not None:
        db.close()
    note(op="exit", state="ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
