"""Power loss, simulated in the file layer (tests/powerloss.py): data written but not fsynced
is dropped, cut or scrambled, and files created or renamed after the last directory fsync
vanish. At durability "fsync" nothing acknowledged is lost and the shard opens; at the weaker
levels the shard opens, consistent, holding a prefix of the writes."""

from __future__ import annotations

import random

import pytest

from engine_support import crash, open_engine
from powerloss import PowerLoss

pytestmark = pytest.mark.soak


def workload(e, rng, steps: int, states: list) -> None:
    """Random puts, deletes, batches, cross-shard batch phases and a compaction; `states` gets
    the model after every acknowledged step (so a prefix can be recognised)."""
    model = dict(states[-1]) if states else {}
    for step in range(steps):
        choice = rng.random()
        key = b"k%02d" % rng.randrange(40)
        if choice < 0.5:
            value = b"%d-" % step * rng.randint(1, 40)
            e.put(key, value)
            model[key] = value
        elif choice < 0.65:
            e.delete(key)
            model.pop(key, None)
        elif choice < 0.85:
            ops = [("put", b"b%02d" % rng.randrange(40), b"batch-%d" % step) for _ in range(rng.randint(2, 6))]
            e.apply(ops)
            model.update({k: v for _, k, v in ops})
        elif choice < 0.95:
            txid = 1000 + step
            e.prepare(txid, [("put", b"t%02d" % rng.randrange(10), b"tx-%d" % step)])
            e.commit(txid)
            for k in [b"t%02d" % i for i in range(10)]:  # what the committed batch wrote
                value = e.get(k)
                if value is not None:
                    model[k] = value
        else:
            e.compact()
        states.append(dict(model))


def contents(e) -> dict:
    return dict(e.scan())


@pytest.mark.parametrize("mode", ["drop", "prefix", "scramble", "reorder"])
@pytest.mark.parametrize("seed", range(6))
def test_power_loss_at_durability_fsync_loses_nothing_acknowledged(tmp_path, mode, seed):
    rng = random.Random(seed)
    states: list = [{}]
    with PowerLoss(tmp_path, seed=seed) as power:
        e = open_engine(tmp_path, durability="fsync")
        workload(e, rng, rng.randint(20, 120), states)
        crash(e)
        power.crash(mode)
    with open_engine(tmp_path, durability="fsync") as e:
        assert contents(e) == states[-1]
        assert e.prepared() == []


@pytest.mark.parametrize("mode", ["drop", "prefix", "scramble", "reorder"])
@pytest.mark.parametrize("durability", ["process", "interval"])
@pytest.mark.parametrize("seed", range(6))
def test_power_loss_at_weaker_durability_leaves_a_prefix(tmp_path, mode, durability, seed):
    rng = random.Random(seed)
    states: list = [{}]
    with PowerLoss(tmp_path, seed=seed) as power:
        e = open_engine(tmp_path, durability=durability)
        workload(e, rng, rng.randint(20, 120), states)
        crash(e)
        power.crash(mode)
    with open_engine(tmp_path, durability=durability) as e:  # it opens
        found = contents(e)
        assert found in states, "the recovered shard is not the state after any prefix of the writes"
        assert e.prepared() == []
