-- finish.lua: the bookkeeping of one finished request, in one round trip, after the response.
-- Settling is idempotent: a reservation is settled by whoever removes it from the hash first.
--
-- KEYS  1 reservations hash   2 budget hash   3 ledger stream   4 cache entry   5 flight lock
--       6 idempotency hash    7 task owner
-- ARGV  1 settle ('' | charge | refund | hold)   2 reservation id   3 charge ('' = reserved)
--       4 hold id   5 hold ms   6 cache entry ('' = none)   7 cache ttl ms
--       8 ticket (the flight lock and idempotency lock are only touched if it owns them)
--       9 idempotency ('' | done | drop)   10 idempotency answer   11 idempotency ttl ms
--      12 task owner ttl ms ('' = none)   13 ledger event without reservation ('' = none)
--      14 ledger: drop entries older than this ms   15 release the flight lock (1/0)
-- Returns {settled 1/0, spent, reserved, charged} for the reservation's period.

local mode, rid = ARGV[1], ARGV[2]
local minid = ARGV[14] .. '-0'

local function record(event)
  redis.call('XADD', KEYS[3], 'MINID', minid, '*', 'e', event)
end

local settled, spent, reserved, charged = 0, 0, 0, 0
if mode ~= '' then
  local period, amount, context = take_reservation(KEYS[1], rid)
  if period then
    if mode == 'hold' then
      redis.call('HSET', KEYS[1], ARGV[4],
                 tostring(now + tonumber(ARGV[5])) .. '|' .. period .. '|' .. amount .. '|' .. context)
    else
      local charge = 0
      if mode == 'charge' then charge = tonumber(ARGV[3]) or amount end
      charged = charge
      redis.call('HINCRBY', KEYS[2], 'reserved:' .. period, -amount)
      if charge ~= 0 then redis.call('HINCRBY', KEYS[2], 'spent:' .. period, charge) end
      local event = cjson.decode(context)
      event.kind = mode
      event.credits = charge
      event.reserved = amount
      event.period = period
      record(cjson.encode(event))
    end
    local budget = redis.call('HMGET', KEYS[2], 'spent:' .. period, 'reserved:' .. period)
    settled, spent, reserved = 1, tonumber(budget[1]) or 0, tonumber(budget[2]) or 0
  end
end

if ARGV[6] ~= '' then
  redis.call('SET', KEYS[4], ARGV[6], 'PX', ARGV[7])
end
if ARGV[15] == '1' and redis.call('GET', KEYS[5]) == ARGV[8] then
  redis.call('DEL', KEYS[5])
end
if ARGV[9] ~= '' and redis.call('HGET', KEYS[6], 'owner') == ARGV[8] then
  if ARGV[9] == 'done' then
    redis.call('HSET', KEYS[6], 'state', 'done', 'answer', ARGV[10])
    redis.call('PEXPIRE', KEYS[6], ARGV[11])
  else
    redis.call('DEL', KEYS[6])
  end
end
if ARGV[12] ~= '' then
  redis.call('SET', KEYS[7], '1', 'PX', ARGV[12])
end
if ARGV[13] ~= '' then
  record(ARGV[13])
end
return {settled, spent, reserved, charged}
