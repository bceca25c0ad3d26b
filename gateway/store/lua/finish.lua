-- finish.lua: carry out what the end of one request decided, in one round trip. Idempotent, so
-- that the bookkeeping may send it again until it lands: a reservation is settled by whoever
-- removes it from the hash first, locks are only touched by the ticket that holds them, and an
-- event with no reservation behind it is recorded once per ticket (KEYS[8]).
--
-- KEYS  1 reservations hash   2 budget hash   3 ledger stream   4 cache entry   5 flight lock
--       6 idempotency hash    7 task owner    8 this ticket's guard
-- ARGV  1 payload   2 cache entry ('' = none)   3 idempotent answer ('' = none)
-- payload: ticket, settle ('charge' | 'refund' | 'hold'), rid (the reservation), charge
--   (millicredits; absent = as reserved), hold_id, hold_ms, cache_ttl_ms (store ARGV[2]),
--   release (the flight lock), idem ('done' | 'drop'), idem_ttl_ms, owner_ttl_ms (KEYS[7]),
--   task_account (kept in KEYS[7]: the account the task's polls go through),
--   event (a ledger event without reservation), guard_ms, ledger {min_id, max_len},
--   direct {period, amount, key, context}: the reservation, made while this store was away
--   (`store.on_error: open`), settled here as if it had been held, once per ticket (KEYS[8])
-- Returns {settled 1/0, spent, reserved, charged} for the reservation's period.

local charge = p.charge
if charge ~= nil and (type(charge) ~= 'number' or charge < 0 or charge ~= math.floor(charge)) then
  return redis.error_reply('finish: charge must be a whole number of millicredits')
end

local settled, spent, reserved, charged = 0, 0, 0, 0
local guarded = false  -- KEYS[8] was set by this call
local function first_time()
  if not guarded and redis.call('SET', KEYS[8], '1', 'NX', 'PX', p.guard_ms) then
    guarded = true
  end
  return guarded
end

if p.settle then
  local period, amount, key, context = take_reservation(KEYS[1], p.rid)
  local direct = false  -- never reserved here: nothing to take out of `reserved`
  if not period and p.direct and first_time() then
    period, amount, key, context = p.direct.period, p.direct.amount, p.direct.key,
                                   p.direct.context
    direct = true
  end
  if period then
    local now_spent, now_reserved  -- both counters as this call left them, when it wrote both
    if p.settle == 'hold' then
      redis.call('HSET', KEYS[1], p.hold_id,
                 reservation(clock() + p.hold_ms, period, amount, key, context))
      if direct then unreserve(KEYS[2], period, -amount, key) end
    else
      if p.settle == 'charge' then charged = charge or amount end
      if not direct then now_reserved = unreserve(KEYS[2], period, amount, key) end
      now_spent = spend(KEYS[2], period, charged, key)
      record(KEYS[3], p.ledger, event(context, string.format(
        ',"kind":"%s","credits":%d,"reserved":%d,"period":"%s","cached":false',
        p.settle, charged, amount, period)))
    end
    if now_spent and now_reserved then
      settled, spent, reserved = 1, now_spent, now_reserved
    else
      local budget = redis.call('HMGET', KEYS[2], 'spent:' .. period, 'reserved:' .. period)
      settled, spent, reserved = 1, tonumber(budget[1]) or 0, tonumber(budget[2]) or 0
    end
  end
end

if p.cache_ttl_ms then
  redis.call('SET', KEYS[4], ARGV[2], 'PX', p.cache_ttl_ms)
end
if p.release and redis.call('GET', KEYS[5]) == p.ticket then
  redis.call('DEL', KEYS[5])
end
if p.idem and redis.call('HGET', KEYS[6], 'owner') == p.ticket then
  if p.idem == 'done' then
    redis.call('HSET', KEYS[6], 'state', 'done', 'answer', ARGV[3])
    redis.call('PEXPIRE', KEYS[6], p.idem_ttl_ms)
  else
    redis.call('DEL', KEYS[6])
  end
end
if p.owner_ttl_ms then
  local owner = p.task_account and 'a:' .. p.task_account or '1'
  redis.call('SET', KEYS[7], owner, 'PX', p.owner_ttl_ms)
end
if p.event and first_time() then
  record(KEYS[3], p.ledger, p.event)
end
return {settled, spent, reserved, charged}
