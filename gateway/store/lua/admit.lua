-- admit.lua: decide a proxied request in one round trip, on Redis's clock.
-- Checks run first and write nothing; the writes happen only for the outcome that needs them,
-- so a rejected request never holds a lock, a reservation or a pacing slot.
--
-- KEYS  1 revoked set   2 quota hash    3 idempotency hash   4 task owner   5 cache entry
--       6 flight lock   7 budget hash   8 reservations hash  9 upstream pacing
--      10 tombstone of this ticket (see cancel.lua)             11 ledger stream
-- ARGV  1 key id        2 ticket        3 hold ms            4 count quota (1/0)
--       5 idempotency fingerprint ('' = none)                6 check task owner (1/0)
--       7 cache lookup (1/0)            8 reservation id ('' = none)
--       9 reservation record ("period|amount|context")       10 period   11 amount
--      12 budget limit ('' = none)      13 pace interval ms ('' = none)   14 pace burst
--      15 pace queue ms
--      16 ledger event of a cache hit ('' = none)                17 ledger: drop entries before ms
--      18 idempotency ttl ms            19 an entry already found elsewhere ('' = none; cluster)
--      20 its ttl ms                    21 quota count, then (name, limit, period ms) each
-- Returns {verdict, now ms, retry ms, pace delay ms, budget used or -1, entry or false,
--          entry ttl ms, then (remaining, reset ms) per quota}

local ADMIT, HIT, FOLLOW, REPLAY, QUOTA, BUDGET, PACE, NOT_FOUND, REVOKED, IDEM_BUSY, IDEM_MISMATCH,
      CANCELLED = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11

local key_id, ticket, hold = ARGV[1], ARGV[2], tonumber(ARGV[3])
local count_quota = ARGV[4] == '1'
local idem_fp = ARGV[5]

local nq = tonumber(ARGV[21])
local quotas, names = {}, {}
for q = 1, nq do
  local base = 21 + (q - 1) * 3
  quotas[q] = {ARGV[base + 1], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])}
  names[q] = ARGV[base + 1]
end

local function reply(verdict, retry, delay, used, entry, ttl, states)
  local out = {verdict, now, math.ceil(retry or 0), math.ceil(delay or 0), used or -1,
               entry or false, ttl or 0}
  for q = 1, nq do
    out[#out + 1] = states[q][1]
    out[#out + 1] = math.ceil(states[q][2])
  end
  return out
end

-- quota windows (GCRA, kept as a request debt draining at limit/period, see quota.py):
-- computed now, stored only when the request counts
local states, debts, quota_ok, quota_retry = {}, {}, true, 0
if nq > 0 then
  local stored = redis.call('HMGET', KEYS[2], unpack(names))
  for q = 1, nq do
    local limit, period = quotas[q][2], quotas[q][3]
    local per_ms = limit / period
    local debt = 0
    if stored[q] then
      local d, at = string.match(stored[q], '^([^|]+)|(.+)$')
      debt = tonumber(d) - (now - tonumber(at)) * per_ms
      if debt < 0 then debt = 0 end
    end
    if not count_quota then
      states[q] = {math.floor(limit - debt + 1e-9), debt / per_ms}
    elseif debt + 1 > limit + 1e-9 then
      quota_ok = false
      local retry = (debt + 1 - limit) / per_ms
      if retry > quota_retry then quota_retry = retry end
      states[q] = {0, debt / per_ms}
    else
      debts[q] = debt + 1
      states[q] = {math.floor(limit - debt - 1 + 1e-9), (debt + 1) / per_ms}
    end
  end
end

if redis.call('EXISTS', KEYS[10]) == 1 then
  return reply(CANCELLED, 0, 0, nil, nil, 0, states)
end
if redis.call('SISMEMBER', KEYS[1], key_id) == 1 then
  return reply(REVOKED, 0, 0, nil, nil, 0, states)
end

local function count()
  if not count_quota or nq == 0 then return end
  local args, longest = {}, 0
  for q = 1, nq do
    args[#args + 1] = names[q]
    args[#args + 1] = string.format('%.6f|%d', debts[q], now)
    if states[q][2] > longest then longest = states[q][2] end
  end
  redis.call('HSET', KEYS[2], unpack(args))
  redis.call('PEXPIRE', KEYS[2], math.ceil(longest) + 1000)
end

local function hold_idempotency()
  if idem_fp ~= '' then
    redis.call('HSET', KEYS[3], 'fp', idem_fp, 'state', 'busy', 'owner', ticket)
    redis.call('PEXPIRE', KEYS[3], hold)
  end
end

-- Idempotency-Key: a replay costs nothing and is not counted
if idem_fp ~= '' then
  local seen = redis.call('HMGET', KEYS[3], 'fp', 'state', 'answer')
  if seen[1] then
    if seen[1] ~= idem_fp then return reply(IDEM_MISMATCH, 0, 0, nil, nil, 0, states) end
    if seen[2] ~= 'done' then return reply(IDEM_BUSY, 0, 0, nil, nil, 0, states) end
    return reply(REPLAY, 0, 0, nil, seen[3], 0, states)
  end
end

if not quota_ok then
  return reply(QUOTA, quota_retry, 0, nil, nil, 0, states)
end

if ARGV[6] == '1' and redis.call('EXISTS', KEYS[4]) == 0 then
  count()
  return reply(NOT_FOUND, 0, 0, nil, nil, 0, states)
end

-- a cache hit is answered now and all its bookkeeping done here: one round trip
local function served(entry, ttl)
  count()
  if idem_fp ~= '' then
    redis.call('HSET', KEYS[3], 'fp', idem_fp, 'state', 'done', 'owner', ticket, 'answer', entry)
    redis.call('PEXPIRE', KEYS[3], ARGV[18])
  end
  if ARGV[16] ~= '' then
    local meta = cjson.decode(string.match(entry, '^[^\n]*'))
    local event = cjson.decode(ARGV[16])
    event.kind, event.credits, event.cached, event.saved = 'charge', 0, true, meta.c or 0
    redis.call('XADD', KEYS[11], 'MINID', ARGV[17] .. '-0', '*', 'e', cjson.encode(event))
  end
  return reply(HIT, 0, 0, nil, entry, ttl, states)
end

if ARGV[19] ~= '' then
  return served(ARGV[19], tonumber(ARGV[20]))
end
local lock = false
if ARGV[7] == '1' then
  local entry = redis.call('GET', KEYS[5])
  if entry then
    return served(entry, redis.call('PTTL', KEYS[5]))
  end
  if redis.call('EXISTS', KEYS[6]) == 1 then
    count()
    hold_idempotency()
    return reply(FOLLOW, 0, 0, nil, nil, 0, states)
  end
  lock = true
end

local used = nil
local amount = tonumber(ARGV[11]) or 0
if ARGV[12] ~= '' and ARGV[8] ~= '' then
  local budget = redis.call('HMGET', KEYS[7], 'spent:' .. ARGV[10], 'reserved:' .. ARGV[10])
  used = (tonumber(budget[1]) or 0) + (tonumber(budget[2]) or 0)
  if used + amount > tonumber(ARGV[12]) then
    count()
    return reply(BUDGET, 0, 0, used, nil, 0, states)
  end
end

local delay = 0
if ARGV[13] ~= '' then
  local booked, wait = pace(KEYS[9], tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15]))
  if not booked then
    count()
    return reply(PACE, wait, 0, used, nil, 0, states)
  end
  delay = wait
end

count()
hold_idempotency()
if lock then redis.call('SET', KEYS[6], ticket, 'PX', hold) end
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[8], ARGV[8], tostring(now + hold) .. '|' .. ARGV[9])
  if amount > 0 then redis.call('HINCRBY', KEYS[7], 'reserved:' .. ARGV[10], amount) end
  if used then used = used + amount end
end
return reply(ADMIT, 0, delay, used, nil, 0, states)
