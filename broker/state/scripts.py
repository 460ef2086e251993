"""The Lua scripts the Redis store runs, and the names of the keys they touch.

Each script runs atomically in Redis, so one admission is one round trip and no two
replicas can both take the last unit of a limit. Time is Redis's own (`TIME`, in
milliseconds), so the replicas' clocks never disagree about a bucket or a lease; budget
windows are named by the caller (broker/state/budget.py) and passed in as keys.

Every key of one caller carries the same hash tag (`{name}`), so a script's keys live in
one slot (Redis Cluster can run them too). Caller names are `[A-Za-z0-9_.-]` (config), so a
name never breaks the tag.

Buckets are hashes {level, at}: `level` refilled at `rate` per millisecond up to the
capacity since `at`. The tokens-per-minute bucket may go negative (tokens are charged when a
request ends); a key is refused while it is. Stream slots are a sorted set: member = one
request's slot, score = its lease's expiry; expired members are dropped before counting, and
each replica refreshes its live slots' leases (HEARTBEAT), so the slots of a replica that
died free themselves when their lease runs out.
"""

from __future__ import annotations

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_LEVEL = """
local function level(key, capacity, rate)
  local v = redis.call('HMGET', key, 'level', 'at')
  if not v[1] then return capacity end
  local l = tonumber(v[1]) + (now - tonumber(v[2])) * rate
  if l > capacity then l = capacity end
  return l
end
"""

# KEYS: 1 request bucket, 2 token bucket, 3 stream slots, 4 day counters, 5 month counters.
# ARGV: 1 requests per ms (0: no limit), 2 burst, 3 tokens per ms (0: no limit), 4 tokens per
# minute, 5 max streams (0: no limit), 6 lease ms, 7 slot member, 8 day budget (-1: none),
# 9 month budget (-1: none), 10 day counters expire at (s), 11 month counters expire at (s).
# Returns {code, wait ms, day spend, month spend, streams}; code 0 admitted, 1 day budget,
# 2 month budget, 3 streams, 4 tokens, 5 requests. Checks in that order; nothing is taken
# unless all pass.
ADMIT = (
    _NOW
    + _LEVEL
    + """
local day_spend = tonumber(redis.call('HGET', KEYS[4], 'spend') or '0')
local month_spend = tonumber(redis.call('HGET', KEYS[5], 'spend') or '0')
local month_budget = tonumber(ARGV[9])
if month_budget >= 0 and month_spend >= month_budget then return {2, 0, day_spend, month_spend, 0} end
local day_budget = tonumber(ARGV[8])
if day_budget >= 0 and day_spend >= day_budget then return {1, 0, day_spend, month_spend, 0} end
local max_streams = tonumber(ARGV[5])
local streams = 0
if max_streams > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  streams = redis.call('ZCARD', KEYS[3])
  if streams >= max_streams then return {3, 0, day_spend, month_spend, streams} end
end
local tpm_rate = tonumber(ARGV[3])
if tpm_rate > 0 then
  local l = level(KEYS[2], tonumber(ARGV[4]), tpm_rate)
  if l < 0 then return {4, math.ceil(-l / tpm_rate), day_spend, month_spend, streams} end
end
local rpm_rate = tonumber(ARGV[1])
if rpm_rate > 0 then
  local burst = tonumber(ARGV[2])
  local l = level(KEYS[1], burst, rpm_rate)
  if l < 1 then return {5, math.ceil((1 - l) / rpm_rate), day_spend, month_spend, streams} end
  l = l - 1
  redis.call('HSET', KEYS[1], 'level', tostring(l), 'at', now)
  redis.call('PEXPIRE', KEYS[1], math.ceil((burst - l) / rpm_rate) + 1000)
end
if max_streams > 0 then
  local lease = tonumber(ARGV[6])
  redis.call('ZADD', KEYS[3], now + lease, ARGV[7])
  redis.call('PEXPIRE', KEYS[3], lease * 2)
  streams = streams + 1
end
redis.call('HINCRBY', KEYS[4], 'requests', 1)
redis.call('EXPIREAT', KEYS[4], ARGV[10])
redis.call('HINCRBY', KEYS[5], 'requests', 1)
redis.call('EXPIREAT', KEYS[5], ARGV[11])
return {0, 0, day_spend, month_spend, streams}
"""
)

# KEYS: 1 token bucket, 2 stream slots, 3 day counters, 4 month counters.
# ARGV: 1 slot member ("": none), 2 tokens per ms (0: no limit), 3 tokens per minute,
# 4 spend, 5 input tokens, 6 output tokens, 7 unpriced requests, 8 requests (replays of
# requests admitted without Redis), 9 day counters expire at (s), 10 month expire at (s).
# Returns {day spend, month spend}.
FINISH = (
    _NOW
    + _LEVEL
    + """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[2], ARGV[1]) end
local tokens = tonumber(ARGV[5]) + tonumber(ARGV[6])
local rate = tonumber(ARGV[2])
if rate > 0 and tokens > 0 then
  local cap = tonumber(ARGV[3])
  local l = level(KEYS[1], cap, rate) - tokens
  redis.call('HSET', KEYS[1], 'level', tostring(l), 'at', now)
  redis.call('PEXPIRE', KEYS[1], math.ceil((cap - l) / rate) + 1000)
end
local fields = {'spend', 'input_tokens', 'output_tokens', 'unpriced_requests', 'requests'}
local out = {}
for i = 3, 4 do
  for j, f in ipairs(fields) do
    local n = tonumber(ARGV[3 + j])
    if n ~= 0 then redis.call('HINCRBY', KEYS[i], f, n) end
  end
  redis.call('EXPIREAT', KEYS[i], ARGV[6 + i])
  out[i - 2] = tonumber(redis.call('HGET', KEYS[i], 'spend') or '0')
end
return out
"""
)

# KEYS: stream slot sets; ARGV[1] lease ms, ARGV[i + 1] the live member in KEYS[i].
# A member that already expired is not brought back (XX): its slot was given away.
HEARTBEAT = (
    _NOW
    + """
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', key, lease * 2)
end
return #KEYS
"""
)

USAGE_FIELDS = ("spend", "requests", "input_tokens", "output_tokens", "unpriced_requests")

# KEYS: per caller, its day counters, month counters and stream slots (3 keys each).
# Returns per caller: USAGE_FIELDS of the day, of the month, then the live stream slots.
USAGE = (
    _NOW
    + """
local out = {}
for i = 1, #KEYS, 3 do
  for j = 0, 1 do
    local v = redis.call('HMGET', KEYS[i + j], 'spend', 'requests', 'input_tokens', 'output_tokens', 'unpriced_requests')
    for k = 1, 5 do out[#out + 1] = tonumber(v[k] or '0') end
  end
  out[#out + 1] = redis.call('ZCOUNT', KEYS[i + 2], '(' .. now, '+inf')
end
return out
"""
)


def key_names(prefix: str, caller: str) -> dict[str, str]:
    """The fixed keys of one caller (the window counters add their window id)."""
    base = f"{prefix}:{{{caller}}}"
    return {
        "requests": f"{base}:rpm",
        "tokens": f"{base}:tpm",
        "streams": f"{base}:streams",
        "day": f"{base}:day:",
        "month": f"{base}:month:",
    }
