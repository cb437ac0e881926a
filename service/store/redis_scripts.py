"""The history write both Redis stores make, as one Lua script per user: atomic on the user's slot.

A user's seen items are their history plus the items pushed out of it: `seen:<user>` holds only the
overflow (items trimmed from the history, newest `max_seen - max_history` kept), and reads take the
union. So a user with no more than `max_history` distinct items has no seen key at all (most users:
no second copy of their history; benchmarks/results/store-cluster.md), and moving the trimmed items
needs their names, which only a script (not MULTI/EXEC) can read and write in one atomic step.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain

from redis.typing import EncodableT

# KEYS: history, overflow (seen), users index. ARGV: max_history, max_overflow, ttl (0: none), now,
# idle cutoff, user, then timestamp, item pairs (ZADD GT: an older event never moves an item back).
ADD_HISTORY = """
local function zadd_gt(key, flat)  -- score, member pairs; unpacked in chunks: Lua's stack is bounded
  for i = 1, #flat, 1000 do
    redis.call('ZADD', key, 'GT', unpack(flat, i, math.min(i + 999, #flat)))
  end
end
local max_history, max_overflow, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local items = {}
for i = 7, #ARGV do items[#items + 1] = ARGV[i] end
zadd_gt(KEYS[1], items)
local pushed = redis.call('ZRANGE', KEYS[1], 0, -(max_history + 1), 'WITHSCORES')  -- member, score, ...
if #pushed > 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(max_history + 1))
  if max_overflow > 0 then
    local flat = {}
    for i = 1, #pushed, 2 do flat[#flat + 1] = pushed[i + 1]; flat[#flat + 1] = pushed[i] end
    zadd_gt(KEYS[2], flat)
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(max_overflow + 1))
  end
end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[6])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)  -- no-op while the user has no overflow
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[5])
end
return 1
"""


def add_history_args(
    keys: tuple[str, str, str], user_id: str, items: Mapping[str, float], *, max_history: int, max_seen: int,
    history_ttl: int | None, now: float,
) -> list[EncodableT]:
    """EVAL's arguments for ADD_HISTORY: script, key count, keys, then ARGV."""
    ttl = history_ttl or 0
    pairs = chain.from_iterable((repr(ts), item_id) for item_id, ts in items.items())
    return [ADD_HISTORY, 3, *keys, max_history, max(0, max_seen - max_history), ttl, repr(now), repr(now - ttl),
            user_id, *pairs]
