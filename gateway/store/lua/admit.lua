-- admit.lua: decide a proxied request in one round trip, on the store's clock.
-- Checks run first and write nothing; the writes happen only for the outcome that needs them,
-- so a refused request never holds a lock, a reservation or a pacing slot.
--
-- KEYS  1 revoked set   2 quota hash    3 idempotency hash   4 task owner   5 cache entry
--       6 flight lock   7 budget hash   8 reservations hash
--       9 tombstone of this ticket (see cancel.lua)   10 ledger stream
--      and, as `admit_paced` (with lib_slots.lua, for a request that takes an upstream slot):
--      11 upstream schedule   12 slot queue   13 slot deadlines   14 slot waiters
--      15 slot minimums queue
-- ARGV  1 payload   2 a hit already found in another hash slot ('' = none; Redis Cluster)
--       3 the reservation's ledger context   4 the ledger context of a hit (blobs, not JSON:
--       inside the payload they would be escaped, and slower to decode)
-- payload: ticket, key (key id), hold_ms, count (count it against the quotas),
--   quotas [[field, limit, period ms], ...], idem {fp, ttl_ms}, task (the team must own KEYS[4]),
--   cache (look up KEYS[5], coalesce on KEYS[6]), served_ttl_ms (ARGV[2]'s ttl),
--   resv {id, period, amount, key} (its context: ARGV[3]), budget / key_budget (limits,
--   millicredits), slot (an upstream slot to take, see lib_slots.lua), hit_event (record a hit
--   with ARGV[4]), ledger {min_id, max_len}
-- Returns {verdict, now ms, retry ms, slot wait ms, budget used or -1, key budget used or -1,
--          entry or false, entry ttl ms, account granted or false, probe 0/1,
--          task's account or false, then (remaining, reset ms) per quota}

local now = clock()
local ADMIT, HIT, FOLLOW, REPLAY, QUOTA, BUDGET, NOT_FOUND, REVOKED, IDEM_BUSY, IDEM_MISMATCH,
      CANCELLED, KEY_BUDGET = 0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12

local ticket, hold = p.ticket, p.hold_ms
local quotas = p.quotas or {}
local nq = #quotas
local idem = p.idem

local granted, probe, task_account = false, 0, false

local function reply(verdict, retry, delay, used, key_used, entry, ttl, states)
  local out = {verdict, now, math.ceil(retry or 0), math.ceil(delay or 0), used or -1,
               key_used or -1, entry or false, ttl or 0, granted, probe, task_account}
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
  local names = {}
  for q = 1, nq do names[q] = quotas[q][1] end
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
    if not p.count then
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

if redis.call('EXISTS', KEYS[9]) == 1 then
  return reply(CANCELLED, 0, 0, nil, nil, nil, 0, states)
end
if redis.call('SISMEMBER', KEYS[1], p.key) == 1 then
  return reply(REVOKED, 0, 0, nil, nil, nil, 0, states)
end

local function count()
  if not p.count or nq == 0 then return end
  local args, longest = {}, 0
  for q = 1, nq do
    args[#args + 1] = quotas[q][1]
    args[#args + 1] = string.format('%.6f|%d', debts[q], now)
    if states[q][2] > longest then longest = states[q][2] end
  end
  redis.call('HSET', KEYS[2], unpack(args))
  redis.call('PEXPIRE', KEYS[2], math.ceil(longest) + 1000)
end

local function hold_idempotency()
  if idem then
    redis.call('HSET', KEYS[3], 'fp', idem.fp, 'state', 'busy', 'owner', ticket)
    redis.call('PEXPIRE', KEYS[3], hold)
  end
end

-- Idempotency-Key: a replay costs nothing and is not counted. A lock this ticket holds (it
-- followed another request, which gave up) is its own: it goes on.
if idem then
  local seen = redis.call('HMGET', KEYS[3], 'fp', 'state', 'answer', 'owner')
  if seen[1] then
    if seen[1] ~= idem.fp then return reply(IDEM_MISMATCH, 0, 0, nil, nil, nil, 0, states) end
    if seen[2] == 'done' then return reply(REPLAY, 0, 0, nil, nil, seen[3], 0, states) end
    if seen[4] ~= ticket then return reply(IDEM_BUSY, 0, 0, nil, nil, nil, 0, states) end
  end
end

if not quota_ok then
  return reply(QUOTA, quota_retry, 0, nil, nil, nil, 0, states)
end

if p.task then
  local owner = redis.call('GET', KEYS[4])
  if not owner then
    count()
    return reply(NOT_FOUND, 0, 0, nil, nil, nil, 0, states)
  end
  task_account = string.match(owner, '^a:(.+)$') or false  -- '1': before accounts were kept
end

-- a cache hit is answered now and all its bookkeeping done here: one round trip
local function served(entry, ttl)
  count()
  if idem then
    redis.call('HSET', KEYS[3], 'fp', idem.fp, 'state', 'done', 'owner', ticket, 'answer', entry)
    redis.call('PEXPIRE', KEYS[3], idem.ttl_ms)
  end
  if p.hit_event then
    local meta = cjson.decode(string.match(entry, '^[^\n]*'))
    record(KEYS[10], p.ledger, event(ARGV[4],
      ',"kind":"charge","credits":0,"cached":true,"saved":' .. string.format('%d', meta.c or 0)))
  end
  return reply(HIT, 0, 0, nil, nil, entry, ttl, states)
end

if p.served_ttl_ms then
  return served(ARGV[2], p.served_ttl_ms)
end
if p.cache then
  local entry = redis.call('GET', KEYS[5])
  if entry then
    return served(entry, redis.call('PTTL', KEYS[5]))
  end
  if redis.call('EXISTS', KEYS[6]) == 1 then
    count()
    hold_idempotency()
    return reply(FOLLOW, 0, 0, nil, nil, nil, 0, states)
  end
end

local r = p.resv
local used, key_used = nil, nil
if r then
  local held = redis.call('HMGET', KEYS[7], 'spent:' .. r.period, 'reserved:' .. r.period,
                          'k:' .. r.key .. ':spent', 'k:' .. r.key .. ':reserved')
  if p.budget then
    used = (tonumber(held[1]) or 0) + (tonumber(held[2]) or 0)
    if used + r.amount > p.budget then
      count()
      return reply(BUDGET, 0, 0, used, nil, nil, 0, states)
    end
  end
  if p.key_budget then
    key_used = (tonumber(held[3]) or 0) + (tonumber(held[4]) or 0)
    if key_used + r.amount > p.key_budget then
      count()
      return reply(KEY_BUDGET, 0, 0, used, key_used, nil, 0, states)
    end
  end
end

local slot, verdict, delay = nil, ADMIT, 0
if p.slot then
  local S = {sched = KEYS[11], queue = KEYS[12], due = KEYS[13], waiters = KEYS[14],
             minq = KEYS[15]}
  slot = decide_slot(S, ticket, p.team, p.slot, task_account or nil)
  if slot.verdict ~= SLOT_ADMIT and slot.verdict ~= SLOT_QUEUED then
    count()
    return reply(slot.verdict, slot.wait, 0, used, key_used, nil, 0, states)
  end
  place_slot(S, slot)
  verdict, delay, granted = slot.verdict, slot.wait, slot.account or false
  probe = slot.probe and 1 or 0
end

count()
hold_idempotency()
if p.cache then redis.call('SET', KEYS[6], ticket, 'PX', hold) end
if r then
  redis.call('HSET', KEYS[8], r.id, reservation(now + hold, r.period, r.amount, r.key, ARGV[3]))
  unreserve(KEYS[7], r.period, -r.amount, r.key)
  if used then used = used + r.amount end
  if key_used then key_used = key_used + r.amount end
end
return reply(verdict, 0, delay, used, key_used, nil, 0, states)
